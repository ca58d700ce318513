"""The Arbiter (``legion.arbitration.arbiter``) without Ray or a model: the agents are scripted stand-ins
behind its ``Agents`` protocol (they stand in for the Ray actors, not for the Arbiter)."""

from __future__ import annotations

import asyncio

import pytest

from legion.arbitration.arbiter import Arbiter
from legion.config import config_from_dict
from legion.engine.llama import ScoredContinuation
from legion.errors import AgentGone, AgentUnavailable, NoCandidates, Overloaded, TaskTimeout
from legion.messages import (
    AgentHealth,
    Candidate,
    GenerateRequest,
    Generation,
    TaskRequest,
    TaskResult,
    TraceEvent,
)

NAMES = ("solver", "reasoner", "critic")


class ScriptedAgents:
    """Each agent answers ``reply(agent, request)``: a text, an exception to raise, or
    ``HANG`` (never answers until cancelled). ``loglik[agent][text]`` scores a continuation."""

    HANG = object()

    def __init__(self, reply, loglik=None, saturated=False):
        self._reply = reply
        self._loglik = loglik or {}
        self._saturated = saturated
        self.asked: list[tuple[str, GenerateRequest]] = []
        self.scored: list[tuple[str, str]] = []
        self.cancelled: list[str] = []

    def saturated(self) -> bool:
        return self._saturated

    async def generate(self, agent: str, req: GenerateRequest) -> Generation:
        self.asked.append((agent, req))
        out = self._reply(agent, req)
        if out is self.HANG:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(agent)
                raise
        if isinstance(out, BaseException):
            raise out
        await asyncio.sleep(0)
        return Generation(
            text=out,
            prompt_tokens=5,
            completion_tokens=2,
            finish_reason="stop",
            mean_logprob=-0.5,
            seconds=0.0,
        )

    async def score(
        self, agent: str, task: str, context: str, continuations: list[str], view: str | None = None
    ) -> list[ScoredContinuation]:
        self.scored.append((agent, task))
        table = self._loglik[agent]
        if isinstance(table, BaseException):
            raise table
        prior = task == "N/A"
        return [
            ScoredContinuation(
                logprob=-1.0 if prior else table[c.strip()], n_tokens=1, n_bytes=len(c), is_greedy=False
            )
            for c in continuations
        ]


def make(tmp_path, agents, **arbiter):
    cfg = config_from_dict(
        {
            "agents": [{"name": n, "role": n} for n in NAMES],
            "arbiter": {"agent_timeout_s": 30.0, **arbiter},
            "data_dir": str(tmp_path),
        }
    )
    return Arbiter(cfg, agents)


def task(strategy="plurality", timeout_s=None, text="What is the capital of France?"):
    return TaskRequest(id="task-1", task=text, strategy=strategy, max_tokens=8, timeout_s=timeout_s)


def by_agent(answers):
    return lambda agent, req: answers[agent]


def steps(result: TaskResult) -> list[str]:
    return [e.step for e in result.trace]


def test_plurality_answers_with_the_trace_and_a_trust_step(tmp_path):
    agents = ScriptedAgents(by_agent({"solver": "Paris", "reasoner": "Paris.", "critic": "Lyon"}))
    arbiter = make(tmp_path, agents)
    r = asyncio.run(arbiter.run(task()))
    assert r.answer == "Paris" and r.votes == {"paris": 2.0, "lyon": 1.0}
    assert [c.agent for c in r.candidates] == list(NAMES) and r.missing_agents == []
    assert steps(r)[0] == "fanout" and steps(r)[-1] == "decision" and steps(r).count("candidate") == 3
    assert {a for a, _ in agents.asked} == set(NAMES) and agents.scored == []  # plurality scores nothing
    # The dissenter lost trust, the agreeing agents did not.
    w = arbiter.trust.weights(list(NAMES))
    assert w["critic"] < w["solver"] == w["reasoner"]


def test_a_dead_agent_is_named_and_the_others_answer(tmp_path):
    def reply(agent, req):
        return AgentUnavailable("agent actor died during the task") if agent == "critic" else "Paris"

    r = asyncio.run(make(tmp_path, ScriptedAgents(reply)).run(task()))
    assert r.answer == "Paris" and r.missing_agents == ["critic"]
    failed = next(e for e in r.trace if e.step == "agent_failed")
    assert failed.data == {"agent": "critic", "error": "agent actor died during the task", "during": "fanout"}
    critic = next(c for c in r.candidates if c.agent == "critic")
    assert critic.error_code == "not_ready" and not critic.ok


def test_a_broken_agent_says_what_it_raised(tmp_path):
    def reply(agent, req):
        return ValueError("boom") if agent == "solver" else "Paris"

    r = asyncio.run(make(tmp_path, ScriptedAgents(reply)).run(task()))
    assert r.candidates[0].error == "agent raised ValueError: boom" and r.missing_agents == ["solver"]


def test_an_agent_past_its_deadline_is_dropped_and_stopped(tmp_path):
    agents = ScriptedAgents(lambda a, r: ScriptedAgents.HANG if a == "reasoner" else "Paris")
    r = asyncio.run(make(tmp_path, agents, agent_timeout_s=0.05).run(task()))
    assert r.answer == "Paris" and r.missing_agents == ["reasoner"]
    assert r.candidates[1].error == "no answer within agent_timeout_s=0.05"
    assert agents.cancelled == ["reasoner"]


def test_a_task_past_its_timeout_is_a_504_with_its_trace(tmp_path):
    agents = ScriptedAgents(lambda a, r: ScriptedAgents.HANG)
    with pytest.raises(TaskTimeout) as info:
        asyncio.run(make(tmp_path, agents).run(task(timeout_s=0.05)))
    err = info.value
    assert err.http_status == 504 and "timeout of 0.05 s" in err.message
    assert [e["step"] for e in err.trace] == ["fanout"] and err.trace[0]["data"]["agents"] == list(NAMES)
    assert sorted(agents.cancelled) == sorted(NAMES)  # the agents' work was stopped
    # Each agent got what was left of the task's deadline.
    assert all(0 < req.timeout_s <= 0.05 for _, req in agents.asked)


def test_full_agents_are_overloaded(tmp_path):
    with pytest.raises(Overloaded, match="every pool"):
        asyncio.run(make(tmp_path, ScriptedAgents(lambda a, r: "x", saturated=True)).run(task()))
    refused = ScriptedAgents(lambda a, r: Overloaded("the agent's queue is full"))
    with pytest.raises(Overloaded, match="every agent's queue is full") as info:
        asyncio.run(make(tmp_path, refused).run(task()))
    assert info.value.details["retry_after_s"] == 2


def test_every_agent_failing_is_no_candidates(tmp_path):
    with pytest.raises(NoCandidates, match="solver: agent raised RuntimeError"):
        asyncio.run(make(tmp_path, ScriptedAgents(lambda a, r: RuntimeError("x"))).run(task()))


SPLIT = {"solver": "Paris", "reasoner": "Lyon", "critic": "Lyon"}
# Every agent finds "Paris" far likelier than "Lyon" once asked to score both.
LOGLIK = {a: {"Paris": -0.5, "Lyon": -4.0} for a in NAMES}


@pytest.mark.parametrize("strategy", ["borda", "approval", "equilibrium"])
def test_scoring_strategies_ask_every_agent_to_score_every_answer(tmp_path, strategy):
    agents = ScriptedAgents(by_agent(SPLIT), LOGLIK)
    r = asyncio.run(make(tmp_path, agents).run(task(strategy)))
    assert r.answer == "Paris"  # the scores, not the 2-1 vote, decide
    assert sorted(a for a, _ in agents.scored) == sorted(NAMES * 2)  # with and without the question
    scores = next(e for e in r.trace if e.step == "scores")
    assert scores.data["options"] == ["paris", "lyon"] and set(scores.data["loglik"]) == set(NAMES)


def test_scoring_is_skipped_when_the_agents_agree(tmp_path):
    agents = ScriptedAgents(lambda a, r: "Paris", LOGLIK)
    r = asyncio.run(make(tmp_path, agents).run(task("borda")))
    assert r.answer == "Paris" and agents.scored == [] and "scores" not in steps(r)


def test_an_agent_that_fails_to_score_is_left_out_of_the_scores(tmp_path):
    loglik = {**LOGLIK, "critic": AgentUnavailable("gone")}
    r = asyncio.run(make(tmp_path, ScriptedAgents(by_agent(SPLIT), loglik)).run(task("borda")))
    failed = [e.data for e in r.trace if e.step == "agent_failed"]
    assert failed == [{"agent": "critic", "error": "gone", "during": "scoring"}]
    assert set(next(e for e in r.trace if e.step == "scores").data["loglik"]) == {"solver", "reasoner"}


def test_trust_weights_reach_the_vote_and_the_trace(tmp_path):
    arbiter = make(
        tmp_path, ScriptedAgents(by_agent({"solver": "Paris", "reasoner": "Lyon", "critic": "Lyon"}))
    )
    arbiter.trust.update(list(NAMES), {"solver": 0.0, "reasoner": 1.0, "critic": 1.0})  # earlier tasks
    r = asyncio.run(arbiter.run(task("trust")))
    traced = next(e for e in r.trace if e.step == "trust").data["weights"]
    assert traced["solver"] > traced["critic"] and steps(r)[0] == "trust"
    assert r.votes["paris"] == pytest.approx(traced["solver"], abs=1e-4)


def test_debate_asks_the_dissenters_again(tmp_path):
    def reply(agent, req):
        if "Other agents answered" in req.context:
            return "Lyon"  # everyone comes round
        return SPLIT[agent]

    agents = ScriptedAgents(reply)
    r = asyncio.run(make(tmp_path, agents, debate_rounds=2).run(task("debate")))
    assert r.answer == "Lyon" and "debate_round_1" in steps(r) and "debate_round" in steps(r)
    assert len(agents.asked) == 6  # the fan-out, then one round
    assert [c.text for c in r.candidates] == ["Paris", "Lyon", "Lyon"]  # the first answers


def test_decomposition_plans_splits_and_integrates(tmp_path):
    def reply(agent, req):
        if req.task.startswith("Split this task"):
            return "1. What is 2+3?\n2. What is 4+5?"
        if "Answers to the parts" in req.context:
            return "5 and 9"
        return {"What is 2+3?": "5", "What is 4+5?": "9"}[req.task]

    agents = ScriptedAgents(reply)
    r = asyncio.run(make(tmp_path, agents).run(task("decompose", text="Add 2+3 and 4+5")))
    assert r.answer == "5 and 9"
    rounds = [s for s in steps(r) if s in ("plan", "subtasks_1", "subtasks", "integrate")]
    assert rounds == ["plan", "plan", "subtasks_1", "subtasks", "integrate", "integrate"]
    subtasks = [a for a, req in agents.asked if req.task in ("What is 2+3?", "What is 4+5?")]
    assert len(set(subtasks)) == 2  # both parts at once, to two agents


def test_conflict_resolves_a_split_vote_with_the_agents_scores(tmp_path):
    loglik = {a: {"Paris": -0.5, "Lyon": -4.0, "Nice": -6.0} for a in NAMES}
    agents = ScriptedAgents(by_agent({"solver": "Paris", "reasoner": "Lyon", "critic": "Nice"}), loglik)
    r = asyncio.run(make(tmp_path, agents).run(task("conflict")))
    assert r.answer == "Paris"
    check = next(e for e in r.trace if e.step == "conflict_check").data
    assert check["split"] is True and "conflict_resolution" in steps(r)


def test_the_stream_gives_candidates_as_they_arrive_then_the_result(tmp_path):
    release = asyncio.Event()

    class SlowCritic(ScriptedAgents):
        async def generate(self, agent, req):
            if agent == "critic":
                await release.wait()
            return await super().generate(agent, req)

    async def consume():
        seen = []
        async for item in make(tmp_path, SlowCritic(lambda a, r: "Paris")).stream(task()):
            seen.append(item)
            if isinstance(item, Candidate) and item.agent == "reasoner":
                release.set()  # the critic answers only once two candidates were streamed
        return seen

    seen = asyncio.run(consume())
    cands = [i.agent for i in seen if isinstance(i, Candidate)]
    assert cands[-1] == "critic" and sorted(cands) == sorted(NAMES)
    assert isinstance(seen[0], TraceEvent) and seen[0].step == "fanout"
    assert isinstance(seen[-1], TaskResult) and seen[-1].answer == "Paris"
    assert seen[-2].step == "decision"


def test_equivalent_free_text_answers_share_one_vote_and_the_trace_shows_the_group(tmp_path):
    texts = {"solver": "4", "reasoner": "2 + 2 = 4", "critic": "5"}
    r = asyncio.run(make(tmp_path, ScriptedAgents(lambda a, req: texts[a])).run(task()))
    assert r.answer in ("4", "2 + 2 = 4") and max(r.votes.values()) == 2.0, r.votes
    (event,) = [e for e in r.trace if e.step == "equivalent_answers"]
    # The shape the console (legion/ui/app.js, answerGroups) reads.
    assert event.data == {
        "during": "fanout",
        "mode": "rules",
        "groups": [
            {
                "key": "4",
                "members": [
                    {"agent": "solver", "text": "4", "via": None, "score": None},
                    {"agent": "reasoner", "text": "2 + 2 = 4", "via": "equal", "score": None},
                ],
            }
        ],
    }
    assert {c.agent: c.normalized for c in r.candidates} == {"solver": "4", "reasoner": "4", "critic": "5"}


class JudgingAgents(ScriptedAgents):
    """Scripted agents that, asked whether two answers say the same, say yes only of "NYC" and
    "New York City" (the judge's continuations' log-probabilities; the Arbiter is the subject)."""

    async def score(self, agent, task, context, continuations, view=None):
        self.scored.append((agent, task))
        same = "NYC" in task and "New York City" in task
        lp = {"yes": -0.2 if same else -3.0, "no": -3.0 if same else -0.2}
        return [
            ScoredContinuation(logprob=lp[c.strip().lower()], n_tokens=1, n_bytes=len(c), is_greedy=False)
            for c in continuations
        ]


def test_the_judge_mode_asks_the_answering_agents_where_the_rules_cannot_tell(tmp_path):
    texts = {"solver": "NYC", "reasoner": "New York City", "critic": "Boston"}
    agents = JudgingAgents(lambda a, req: texts[a])
    r = asyncio.run(
        make(tmp_path, agents, equivalence="judge").run(task(text="Which city is the Big Apple?"))
    )
    assert r.votes == {"nyc": 2.0, "boston": 1.0} and r.answer in ("NYC", "New York City")
    judged = [t for _, t in agents.scored]
    # Two pairs (New York City joined NYC's group, so Boston meets only NYC), three judges each.
    assert len(judged) == 2 * 3
    assert all("Which city is the Big Apple?" in t for t in judged)
    (event,) = [e for e in r.trace if e.step == "equivalent_answers"]
    joined = event.data["groups"][0]["members"][1]
    assert event.data["mode"] == "judge" and joined["agent"] == "reasoner" and joined["via"] == "judge"
    assert joined["score"] > 0.9 and len(event.data["checked"]) == 2


def test_an_embedder_that_cannot_load_leaves_the_rules_and_the_trace_says_why(tmp_path):
    loads = []

    def embedder():
        loads.append(1)
        raise ImportError("No module named 'torch'")

    texts = {"solver": "NYC", "reasoner": "New York City", "critic": "NYC."}
    cfg = make(tmp_path, None, equivalence="embedding").cfg
    r = asyncio.run(Arbiter(cfg, ScriptedAgents(lambda a, req: texts[a]), embedder=embedder).run(task()))
    assert r.answer == "NYC" and r.votes == {"nyc": 2.0, "new york city": 1.0}
    (failed,) = [e for e in r.trace if e.step == "equivalence_fallback_failed"]
    assert failed.data["fallback"] == "embedding" and "No module named 'torch'" in failed.data["error"]
    assert loads == [1]


def test_the_embedder_loads_only_for_a_pair_the_rules_cannot_tell(tmp_path):
    loads = []

    def embedder():
        loads.append(1)
        raise ImportError("not loaded")

    rules_decide = {"solver": "4", "reasoner": "2 + 2 = 4", "critic": "5"}
    for mode in ("rules", "embedding"):
        cfg = make(tmp_path, None, equivalence=mode).cfg
        arbiter = Arbiter(cfg, ScriptedAgents(lambda a, req: rules_decide[a]), embedder=embedder)
        asyncio.run(arbiter.run(task()))
    assert loads == []


class StatusAgents(ScriptedAgents):
    """Agents whose health checks answer, fail for good, or hang, by name."""

    def __init__(self, status):
        super().__init__(lambda agent, req: "Paris")
        self._status = status

    def pool_info(self, agent: str) -> dict:
        return {"replicas": [{"name": agent, "in_flight": 0}], "min_replicas": 1, "max_replicas": 1}

    async def status(self, agent: str):
        what = self._status[agent]
        if what == "hang":
            await asyncio.Event().wait()
        if isinstance(what, BaseException):
            raise what
        return AgentHealth(name=agent, loaded=True, state="ready"), {"requests": 3}


def test_the_agent_list_says_which_agents_answer_which_may_come_back_and_which_are_gone(tmp_path):
    agents = StatusAgents(
        {"solver": "ok", "reasoner": AgentGone("its actor died for good"), "critic": "hang"}
    )
    arbiter = make(tmp_path, agents)
    asyncio.run(arbiter.run(task()))  # a vote, so that the agents have trust records
    listed = {e["name"]: e for e in asyncio.run(arbiter.describe_agents(timeout_s=0.2))}
    assert [e for e in listed] == list(NAMES)
    assert listed["solver"]["health"]["state"] == "ready" and listed["solver"]["stats"] == {"requests": 3}
    assert listed["reasoner"]["health"] == {
        "name": "reasoner",
        "loaded": False,
        "state": "failed",
        "error": "its actor died for good",
    }
    assert listed["critic"]["health"]["state"] == "loading" and listed["critic"]["stats"] is None
    assert "no answer within 0.2 s" in listed["critic"]["health"]["error"]
    for e in listed.values():
        assert e["pool"]["replicas"][0]["name"] == e["name"] and e["config"]["name"] == e["name"]
        assert e["trust"]["updates"] == 1
