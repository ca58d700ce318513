"""``legion calibrate``'s fitting and profiles (``legion.evaluation.calibrate``) on synthetic data, and the
``learned`` strategy in ``legion eval``'s accounting: no model, no Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest

from legion.arbitration.strategies import OptionScores, build_strategy
from legion.config import AgentConfig, config_from_dict
from legion.engine.views import Item
from legion.errors import ConfigError, InvalidRequest
from legion.evaluation.calibrate import (
    build_dataset,
    choice_probabilities,
    cross_validate,
    dawid_skene,
    fit,
    fit_weights,
    make_profile,
)
from legion.evaluation.multiple_choice import default_strategies, evaluate
from legion.profile import PROFILE_VERSION, AnswerPatterns, check_agents, load_profile, parse_profile


def synthetic(true_w, n, m=4, seed=0, spread=1.5):
    """Items whose agents score the choices at random and whose answers are drawn from the
    conditional logit with ``true_w`` (some items with 3 choices, to test the padding)."""
    rng = np.random.default_rng(seed)
    names = [f"a{k}" for k in range(len(true_w))]
    scores, labels = [], []
    for j in range(n):
        mj = m - 1 if j % 5 == 0 else m
        s = {a: list(rng.normal(0, spread, mj)) for a in names}
        z = sum(w * np.asarray(s[a]) for a, w in zip(names, true_w, strict=True))
        p = np.exp(z - z.max())
        labels.append(int(rng.choice(mj, p=p / p.sum())))
        scores.append(s)
    return names, scores, labels


def test_the_fit_recovers_known_weights():
    true_w = [1.5, 0.5, 0.0, -0.5]
    names, scores, labels = synthetic(true_w, 4000)
    w = fit_weights(build_dataset(names, scores, labels), l2=1e-4)
    assert np.allclose(w, true_w, atol=0.12), w


def test_padding_keeps_absent_choices_out():
    names, scores, labels = synthetic([1.0, 1.0], 20)
    data = build_dataset(names, scores, labels)
    p = choice_probabilities(np.array([1.0, 1.0]), data.x, data.mask)
    assert np.allclose(p.sum(axis=1), 1.0)
    assert np.all(p[~data.mask] == 0.0) and (~data.mask).any()


def test_cross_validation_regularises_noise_and_not_signal():
    # Answers unrelated to the scores: the held-out loss is lowest with the weights near 0.
    names, scores, _ = synthetic([1.0, 1.0, 1.0], 300, seed=1)
    noise = list(np.random.default_rng(2).integers(0, 3, 300))
    l2_noise, rows = cross_validate(build_dataset(names, scores, noise))
    assert l2_noise >= 0.3, rows
    # A strong, well-sampled signal: little or no shrinkage.
    names, scores, labels = synthetic([2.0, 0.0, 1.0], 1500, seed=3)
    l2_signal, rows = cross_validate(build_dataset(names, scores, labels))
    assert l2_signal <= 0.03, rows
    assert {r["l2"] for r in rows} >= {l2_signal} and all(0 <= r["accuracy"] <= 1 for r in rows)


def test_the_fit_beats_an_unweighted_pool_when_one_agent_is_noise():
    # a0 is informative, a1 is noise at a high temperature: equal weights are worse.
    names, scores, labels = synthetic([2.0, 0.0], 2000, seed=4)
    data = build_dataset(names, scores, labels)
    result = fit(data)
    assert result.weights[0] > 1.5 and abs(result.weights[1]) < 0.2
    from legion.evaluation.calibrate import accuracy

    assert accuracy(result.weights, data) > accuracy(np.array([1.0, 1.0]), data)


def test_the_fit_does_not_depend_on_an_agents_units():
    # An agent whose scores are 100 times larger (a sum over long texts against a letter's
    # log-probability) gets a weight 100 times smaller and the same penalty: same predictions.
    names, scores, labels = synthetic([1.0, 0.3], 400, seed=7)
    loud = [{"a0": [100 * v for v in s["a0"]], "a1": s["a1"]} for s in scores]
    base = fit(build_dataset(names, scores, labels))
    scaled = fit(build_dataset(names, loud, labels))
    assert scaled.l2 == base.l2
    assert np.allclose(scaled.weights * [100, 1], base.weights, rtol=1e-3, atol=1e-6)


def test_dawid_skene_recovers_agent_accuracies_without_labels():
    rng = np.random.default_rng(5)
    n, m = 3000, 4
    acc = np.array([0.8, 0.6, 0.45, 0.25])  # the last one is at chance
    truth = rng.integers(0, m, n)
    picks = np.empty((n, len(acc)), dtype=int)
    for a, p in enumerate(acc):
        right = rng.random(n) < p
        other = (truth + rng.integers(1, m, n)) % m
        picks[:, a] = np.where(right, truth, other)
    est, post = dawid_skene(picks, [m] * n)
    assert np.allclose(est, acc, atol=0.04), est
    assert (post.argmax(axis=1) == truth).mean() > acc.max()
    assert np.allclose(post.sum(axis=1), 1.0)


def agents(*names, **view):
    return [AgentConfig(name=n, **view) for n in names]


def a_profile(names=("x", "y"), weights=None, **view):
    cfgs = agents(*names, **view)
    _, s, labels = synthetic(weights or [1.0] * len(names), 60, seed=6)
    scores = [{name: v for name, v in zip(names, item.values(), strict=True)} for item in s]
    result = fit(build_dataset(list(names), scores, labels), folds=3)
    if weights is not None:
        result.weights = np.asarray(weights, dtype=float)
    return make_profile(
        result,
        cfgs,
        method="conditional_logit",
        data=["train.jsonl"],
        items_per_file={"train.jsonl": 60},
        excluded=0,
        folds=3,
    )


def test_a_profile_round_trips_through_its_file(tmp_path):
    prof = a_profile()
    path = tmp_path / "p.json"
    path.write_text(json.dumps(prof.model_dump(mode="json")))
    back = load_profile(path)
    assert back == prof and back.version == PROFILE_VERSION
    assert back.summary(str(path))["items"] == 60 and set(back.weights) == {"x", "y"}
    # fit() writes the members' sway covariance, which /v1/agents' profile summary names.
    assert back.covariance is not None and back.covariance.members == ["x", "y"]
    assert back.summary()["covariance"] == {"members": 2, "items": 60}
    assert back.agents[0].view["prompt_form"] == "qa"
    # Answer patterns (legion calibrate --answers) come back too, and the summary counts them.
    assert back.summary()["answer_patterns"] is None
    with_patterns = back.model_copy(
        update={"answer_patterns": AnswerPatterns(members=["x", "y"], items=[[0, 0], [0, 1]])}
    )
    path.write_text(json.dumps(with_patterns.model_dump(mode="json")))
    again = load_profile(path)
    assert again.answer_patterns is not None and again.answer_patterns.items == [[0, 0], [0, 1]]
    assert again.summary()["answer_patterns"] == {"members": 2, "items": 2}


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d.pop("fit"), "fit: Field required"),
        (lambda d: d.update(version=99), "version: Value error, this Legion reads profile version 1"),
        (lambda d: d["agents"][1].update(weight="heavy"), "agents.1.weight"),
        (lambda d: d["agents"][0]["view"].pop("scoring"), "agents.0.view"),
        (lambda d: d["agents"][0].update(colour="red"), "agents.0.colour: Extra inputs"),
        (lambda d: d.update(agents=[]), "agents: List should have at least 1 item"),
        (lambda d: d.update(format="other"), "format"),
    ],
)
def test_a_bad_profile_names_the_field(edit, fragment):
    data = a_profile().model_dump(mode="json")
    edit(data)
    with pytest.raises(ConfigError, match="not a valid Arbiter profile") as err:
        parse_profile(data)
    assert fragment in err.value.message


def test_unreadable_and_missing_profile_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_profile(tmp_path / "bad.json")


def test_the_running_agents_must_be_the_fitted_ones():
    prof = a_profile()
    check_agents(prof, agents("x", "y"))
    with pytest.raises(ConfigError, match="agent 'z' is not in"):
        check_agents(prof, agents("x", "y", "z"))
    with pytest.raises(ConfigError, match="fitted for agent 'y', which is not configured"):
        check_agents(prof, agents("x"))
    with pytest.raises(ConfigError, match=r"agent 'x' differs .*scoring: 'sum' in the profile, 'pmi' now"):
        check_agents(prof, [AgentConfig(name="x", scoring="pmi"), AgentConfig(name="y")])


def test_the_config_checks_its_profile_at_start_up(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(a_profile().model_dump(mode="json")))
    cfg = config_from_dict({"agents": [{"name": "x"}, {"name": "y"}], "arbiter": {"profile": str(path)}})
    assert cfg.arbiter.profile == str(path)
    with pytest.raises(ConfigError, match=r"arbiter.profile: .*agent 'y' differs .*few_shot"):
        config_from_dict(
            {"agents": [{"name": "x"}, {"name": "y", "few_shot": 2}], "arbiter": {"profile": str(path)}}
        )
    with pytest.raises(ConfigError, match=r"arbiter\.profile: profile file .* does not exist"):
        config_from_dict({"agents": [{"name": "x"}], "arbiter": {"profile": str(tmp_path / "no.json")}})


def test_learned_weighs_agents_by_the_profile_and_needs_one(tmp_path):
    from legion.config import ArbiterConfig
    from legion.messages import Candidate

    path = tmp_path / "p.json"
    # x is trusted, y and z carry no weight: x's choice wins against their two votes.
    path.write_text(json.dumps(a_profile(("x", "y", "z"), [2.0, 0.0, 0.0]).model_dump(mode="json")))
    strat = build_strategy("learned", ArbiterConfig(profile=str(path)))
    scores = OptionScores(
        options=["a", "b"],
        texts=["A", "B"],
        loglik={"x": [-1.0, -2.0], "y": [-3.0, -0.1], "z": [-3.0, -0.1]},
        rule_applied=True,
    )
    cands = [
        Candidate(agent="x", role="solver", text="A", normalized="a", score=-1.0),
        Candidate(agent="y", role="solver", text="B", normalized="b", score=-0.1),
        Candidate(agent="z", role="solver", text="B", normalized="b", score=-0.1),
    ]
    d = strat.decide(cands, None, scores)
    assert d.answer_key == "a" and d.ranking == ["a", "b"]
    assert d.votes["a"] == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-5)
    assert d.details["weights"] == {"x": 2.0, "y": 0.0, "z": 0.0}
    # Without scores, the weights are vote weights.
    assert strat.decide(cands, None, None).answer_key == "a"
    with pytest.raises(InvalidRequest, match="needs a profile"):
        build_strategy("learned", ArbiterConfig()).decide(cands, None, scores)


def test_learned_applies_the_fitted_views_rule_to_raw_serve_time_scores(tmp_path):
    from legion.config import ArbiterConfig
    from legion.messages import Candidate

    path = tmp_path / "p.json"
    path.write_text(json.dumps(a_profile(("x",), [1.0], scoring="calibrated").model_dump(mode="json")))
    strat = build_strategy("learned", ArbiterConfig(profile=str(path)))
    cands = [Candidate(agent="x", role="solver", text="A", normalized="a", score=-1.0)]
    # Raw: "a" is likelier; after the content-free prior is subtracted, "b" is.
    raw = OptionScores(
        options=["a", "b"], texts=["A", "B"], loglik={"x": [-1.0, -2.0]}, prior={"x": [-0.5, -3.0]}
    )
    assert strat.decide(cands, None, raw).answer_key == "b"
    applied = OptionScores(
        options=["a", "b"], texts=["A", "B"], loglik={"x": [-1.0, -2.0]}, rule_applied=True
    )
    assert strat.decide(cands, None, applied).answer_key == "a"


def test_eval_runs_learned_only_with_a_profile_and_reports_it(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(a_profile(("x", "y", "z"), [3.0, 0.0, 0.0]).model_dump(mode="json")))
    assert "learned" not in default_strategies() and "learned" in default_strategies(profile=True)
    cfg = config_from_dict({"agents": [{"name": n} for n in "xyz"], "arbiter": {"profile": str(path)}})
    items = [Item(id=f"i{k}", context="c", choices=["a", "b"], answer=0) for k in range(6)]

    class Scorer:
        def score_items(self, items, progress=None):
            out = []
            for _ in items:
                s = OptionScores(
                    options=["0", "1"],
                    texts=["a", "b"],
                    loglik={"x": [-1.0, -1.5], "y": [-2.0, -1.0], "z": [-2.0, -1.0]},
                    n_tokens={a: [1, 1] for a in "xyz"},
                    n_bytes=[1, 1],
                    rule_applied=True,
                )
                out.append((s, dict.fromkeys("xyz", 0.1), 0.0))
            return out

        def close(self):
            pass

    res = evaluate(cfg, items, ["plurality", "learned", "equilibrium"], scorer=Scorer())
    assert res["learned"]["accuracy"] == 1.0 and res["plurality"]["accuracy"] == 0.0
    assert res["single:x"]["accuracy"] == 1.0


def test_equilibrium_starts_from_the_profile_and_reports_both_rankings(tmp_path):
    from legion.config import ArbiterConfig
    from legion.messages import Candidate

    path = tmp_path / "p.json"
    path.write_text(json.dumps(a_profile(("x", "y"), [2.0, 0.0]).model_dump(mode="json")))
    eq = build_strategy("equilibrium", ArbiterConfig(profile=str(path)))
    scores = OptionScores(
        options=["a", "b"],
        texts=["A", "B"],
        loglik={"x": [-1.0, -2.0], "y": [-3.0, -0.1]},
        n_bytes=[1, 1],
        rule_applied=True,
    )
    cands = [
        Candidate(agent="x", role="solver", text="A", normalized="a", score=-1.0),
        Candidate(agent="y", role="solver", text="B", normalized="b", score=-0.1),
    ]
    d = eq.decide(cands, None, scores)
    assert d.details["init"].startswith("profile+")
    assert d.details["calibrated_ranking"] == ["a", "b"]
    assert d.details["equilibrium_ranking"] == d.ranking
    plain = build_strategy("equilibrium", ArbiterConfig()).decide(cands, None, scores)
    assert "calibrated_ranking" not in plain.details and not plain.details["init"].startswith("profile")


def test_the_arbiter_serves_learned_from_its_profile(tmp_path):
    import asyncio

    from legion.arbitration.arbiter import Arbiter
    from tests.unit.test_arbiter import NAMES, ScriptedAgents, by_agent, task

    path = tmp_path / "p.json"
    path.write_text(json.dumps(a_profile(NAMES, [2.0, 0.0, 0.0]).model_dump(mode="json")))
    cfg = config_from_dict(
        {
            "agents": [{"name": n} for n in NAMES],
            "arbiter": {"agent_timeout_s": 30.0, "profile": str(path)},
            "data_dir": str(tmp_path),
        }
    )
    # The solver alone says Paris and is sure of it; the other two say Lyon.
    loglik = {
        "solver": {"Paris": -1.0, "Lyon": -3.0},
        "reasoner": {"Paris": -3.0, "Lyon": -1.0},
        "critic": {"Paris": -3.0, "Lyon": -1.0},
    }
    answers = by_agent({"solver": "Paris", "reasoner": "Lyon", "critic": "Lyon"})
    learned = asyncio.run(Arbiter(cfg, ScriptedAgents(answers, loglik)).run(task("learned")))
    plurality = asyncio.run(Arbiter(cfg, ScriptedAgents(answers, loglik)).run(task("plurality")))
    assert learned.answer == "Paris" and plurality.answer == "Lyon"
    decision = next(e for e in learned.trace if e.step == "decision")
    assert decision.data["weights"] == {"solver": 2.0, "reasoner": 0.0, "critic": 0.0}
    assert decision.data["profile"] == str(path) and decision.data["ranking"] == ["paris", "lyon"]


def test_v1_agents_shows_the_profile(tmp_path):
    from fastapi.testclient import TestClient

    import serve_app
    from legion.service.pipeline import TaskPipeline
    from legion.service.security import SecurityPolicy
    from tests.unit.test_pipeline import FakeRetriever
    from tests.unit.test_routes import AgentsArbiter

    def client(**arbiter):
        # As tests/unit/test_routes.py builds its ingress, with arbiter settings of its own.
        data = {"agents": [{"name": "solver"}], "data_dir": str(tmp_path), "arbiter": arbiter}
        cfg = config_from_dict(data)
        ingress = object.__new__(serve_app.LegionIngress)
        ingress.cfg, ingress.security = cfg, SecurityPolicy(cfg)
        ingress.arbiter, ingress.retriever = AgentsArbiter(), FakeRetriever()
        ingress.pipeline = TaskPipeline.from_config(cfg, ingress.arbiter, ingress.retriever)
        return TestClient(serve_app._build_api(ingress))

    path = tmp_path / "p.json"
    path.write_text(json.dumps(a_profile(("solver",), [1.5]).model_dump(mode="json")))
    body = client(profile=str(path)).get("/v1/agents").json()
    assert body["profile"]["weights"] == {"solver": 1.5} and body["profile"]["path"] == str(path)
    assert body["profile"]["method"] == "conditional_logit" and body["profile"]["items"] == 60
    assert body["agents"][0]["name"] == "solver"
    assert client().get("/v1/agents").json()["profile"] is None
