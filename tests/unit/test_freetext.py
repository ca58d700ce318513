"""The free-text eval (``legion.evaluation.freetext``) without a model: items, the judge, the agreement
figures, and a whole run of the real Arbiter over scripted agents (they stand in for the
models, not for the eval or the Arbiter)."""

from __future__ import annotations

import asyncio

import pytest

from legion.config import config_from_dict
from legion.engine.views import Item
from legion.errors import InvalidRequest
from legion.evaluation.freetext import FreeTextEval, JudgeAgreement, exact_match, judge, short_item
from legion.messages import GenerateRequest, Generation

ITEM = Item(
    id="q1",
    context="Question: Which of these is a renewable resource?\nAnswer:",
    choices=["coal", "wind", "natural gas", "oil"],
    answer=1,
)


def test_short_item_forms():
    listed = short_item(ITEM)
    assert listed.task == "Which of these is a renewable resource?\nChoices: coal; wind; natural gas; oil"
    assert listed.reference == "wind"
    assert listed.others == ["coal", "natural gas", "oil"]
    assert short_item(ITEM, "open").task == "Which of these is a renewable resource?"
    with pytest.raises(InvalidRequest, match="unknown free-text form"):
        short_item(ITEM, "cloze")


@pytest.mark.parametrize(
    ("answer", "right", "exact"),
    [
        ("wind", True, True),
        ("Wind.", True, True),
        ("The answer is wind", True, True),
        ("wind power", True, False),  # the reference stated inside a longer answer
        ("coal", False, False),
        ("coal; wind; natural gas; oil", False, False),  # listing every choice is no answer
        ("not wind", False, False),  # the negation guard
        ("", False, False),
    ],
)
def test_judge_and_exact_match(answer, right, exact):
    item = short_item(ITEM)
    assert asyncio.run(judge(answer, item)) is right
    assert exact_match(answer, item.reference) is exact


def test_judge_allows_a_wrong_choice_that_says_the_same_as_the_reference():
    # "the sun" among the wrong choices and "sun" as the reference: stating it is still right.
    item = short_item(
        Item(
            id="x",
            context="Question: What gives light?\nAnswer:",
            choices=["sun", "the sun", "rock"],
            answer=0,
        )
    )
    assert asyncio.run(judge("the sun", item))
    assert not asyncio.run(judge("rock", item))


def test_agreement_counts_and_kappa():
    from legion.evaluation.freetext import Answered

    ag = JudgeAgreement()
    item = short_item(ITEM)
    pairs = [(True, True)] * 4 + [(False, False)] * 4 + [(True, False)] * 3
    for i, (right, exact) in enumerate(pairs):
        ag.add(Answered(answer="same" if i == 10 else f"a{i}", tokens=1, right=right, exact=exact), item)
    ag.add(Answered(answer="same", tokens=1, right=True, exact=False), item)  # a repeat: one example
    s = ag.summary()
    assert (s["both_right"], s["both_wrong"], s["judge_only"], s["exact_only"]) == (4, 4, 4, 0)
    assert s["agreement"] == pytest.approx(8 / 12, abs=1e-4)
    # chance agreement: P(judge right) 8/12, P(exact) 4/12 -> 8/12 * 4/12 + 4/12 * 8/12 = 4/9
    assert s["cohen_kappa"] == pytest.approx((8 / 12 - 4 / 9) / (1 - 4 / 9), abs=1e-4)
    assert [d["answer"] for d in s["disagreements"]] == ["a8", "a9", "same"]


class _Scripted:
    """Agents answering from a table by (agent, temperature, seed): the models' stand-in."""

    def __init__(self, answers):
        self.answers = answers
        self.asked: list[tuple[str, GenerateRequest]] = []

    def saturated(self) -> bool:
        return False

    async def generate(self, agent: str, req: GenerateRequest) -> Generation:
        self.asked.append((agent, req))
        text = self.answers(agent, req)
        await asyncio.sleep(0)
        return Generation(
            text=text,
            prompt_tokens=9,
            completion_tokens=len(text.split()),
            finish_reason="stop",
            mean_logprob=-0.5,
            seconds=0.0,
        )


def _cfg(tmp_path):
    agents = [{"name": n} for n in ("solver", "reasoner", "critic")]
    return config_from_dict({"agents": agents, "data_dir": str(tmp_path)})


def test_a_run_judges_every_method_and_counts_its_tokens(tmp_path):
    def answers(agent, req):
        if req.temperature is not None and req.temperature > 0:  # self-consistency samples
            return {1000: "coal", 1001: "Wind.", 1002: "the answer is wind"}[req.seed]
        return {"solver": "coal", "reasoner": "wind power", "critic": "wind"}[agent]

    agents = _Scripted(answers)
    ev = FreeTextEval(_cfg(tmp_path), agents, ["plurality"], samples=3, sc_agent="solver", trust_dir=tmp_path)
    res = asyncio.run(ev.run([short_item(ITEM)], concurrency=1))
    # Two of three agents say wind (once as "wind power"): equivalence joins them, plurality wins.
    assert res["plurality"]["accuracy"] == 1.0
    # The group answers with its first member's text ("wind power"): right, but no exact match.
    assert res["plurality"]["exact_match"] == 0.0
    assert res["single:solver"]["accuracy"] == 0.0
    assert res["single:reasoner"] == {"accuracy": 1.0, "exact_match": 0.0, "tokens_per_item": 2.0, "n": 1}
    assert res["greedy:solver"]["accuracy"] == 0.0
    # Samples: coal, Wind., the answer is wind -> wind wins 2 to 1; three samples' tokens.
    assert res["self-consistency:solverx3"]["accuracy"] == 1.0
    assert res["self-consistency:solverx3"]["tokens_per_item"] == 1 + 1 + 4
    assert res["plurality"]["tokens_per_item"] == 1 + 2 + 1
    greedy = [r for a, r in agents.asked if a == "solver" and r.temperature == 0.0]
    assert len(greedy) == 1 and greedy[0].max_tokens == 32


def test_unknown_sc_agent_is_refused(tmp_path):
    with pytest.raises(InvalidRequest, match="--sc-agent 'nobody'"):
        FreeTextEval(_cfg(tmp_path), _Scripted(lambda a, r: ""), ["plurality"], sc_agent="nobody")


def test_rejudge_with_another_equivalence_reads_saved_answers(tmp_path):
    """Saved answers judged again with a fallback (here a scripted similarity standing in for
    the embedding model): the rules' verdicts stand, the fallback decides only what they left."""
    from legion.arbitration.equivalence import Equivalence

    class Similar:
        name = "scripted"

        async def same(self, a, b, question=""):
            return ({a.lower(), b.lower()} == {"breeze", "wind"}), 0.9

    item = short_item(ITEM)
    saved = {
        "q1": {
            "task": item.task,
            "reference": "wind",
            "by": {
                "single:a": {"answer": "breeze"},
                "single:b": {"answer": "coal"},
                "single:c": {"answer": "wind"},
            },
        }
    }
    rules = FreeTextEval(_cfg(tmp_path), None, [], samples=0)
    asyncio.run(rules.rejudge(saved, [item]))
    fallback = FreeTextEval(_cfg(tmp_path), None, [], samples=0, equivalence=Equivalence(Similar()))
    asyncio.run(fallback.rejudge(saved, [item]))
    assert [rules.results()[m]["accuracy"] for m in ("single:a", "single:b", "single:c")] == [0.0, 0.0, 1.0]
    assert [fallback.results()[m]["accuracy"] for m in ("single:a", "single:b", "single:c")] == [
        1.0,
        0.0,
        1.0,
    ]
    with pytest.raises(InvalidRequest, match="not in --data"):
        asyncio.run(rules.rejudge({"other": saved["q1"]}, [item]))


def test_fanout_adaptive_adds_a_row_per_strategy_with_the_members_it_asked(tmp_path):
    agents = _Scripted(lambda agent, req: "wind")  # unanimous: adaptive stops before the panel is done
    ev = FreeTextEval(
        _cfg(tmp_path), agents, ["plurality", "debate"], samples=0, trust_dir=tmp_path, fanout="adaptive"
    )
    res = asyncio.run(ev.run([short_item(ITEM)], concurrency=1))
    assert res["plurality@adaptive"]["accuracy"] == res["plurality"]["accuracy"] == 1.0
    assert res["plurality"]["agents_asked"] == 3 and res["plurality@adaptive"]["agents_asked"] < 3
    assert res["plurality@adaptive"]["tokens_per_item"] < res["plurality"]["tokens_per_item"]
    assert "debate@adaptive" not in res  # its rounds ask every agent again: adaptive does not apply
