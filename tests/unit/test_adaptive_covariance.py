"""Adaptive fan-out for ``learned`` by prediction: the members' sway covariance that ``legion
calibrate`` writes into the profile, what the members not asked would add given the asked ones
(``conditional_sway``), the risk that the full combination decides otherwise
(``conditional_risk``), and the order they are asked in. Statistics on synthetic panels whose
scores come from a known model (one model's views share that model's noise), fitted on one set of
items and judged on another; then the Arbiter using it. No Ray, no model."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from legion.arbitration import adaptive
from legion.arbitration.adaptation import Adaptation, Settings
from legion.arbitration.arbiter import Arbiter
from legion.arbitration.strategies.base import OptionScores
from legion.config import config_from_dict
from legion.errors import ConfigError
from legion.evaluation.calibrate import Dataset, FitResult, fit, make_profile, sway_covariance
from legion.profile import load_profile, parse_profile
from tests.unit.test_adaptive import AGENTS, MEMBERS, choose, profiled
from tests.unit.test_choices import ChoiceAgents

# -------------------------------------------------------------------- a synthetic panel

# Two "models", each with several views: a view's score of a choice is the truth's bonus times
# its skill, plus its model's noise on that choice (shared by the model's views) and its own.
FAMILY = ["g", "g", "g", "g", "s", "s", "s"]
SKILL = [1.0, 0.9, 0.6, 0.5, 1.1, 0.8, 0.4]
SHARED, OWN = 1.0, 0.6
NAMES = [f"{f}{i}" for i, f in enumerate(FAMILY)]


def synthetic_items(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores ``[n, members, k]`` and the true choice of each item."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, n)
    fam_noise = {f: rng.normal(0, SHARED, (n, k)) for f in set(FAMILY)}
    x = np.empty((n, len(NAMES), k))
    for i, f in enumerate(FAMILY):
        x[:, i, :] = fam_noise[f] + rng.normal(0, OWN, (n, k))
        x[np.arange(n), i, truth] += SKILL[i]
    return x, truth


def dataset(x: np.ndarray, truth: np.ndarray) -> Dataset:
    n, _, k = x.shape
    q = np.zeros((n, k))
    q[np.arange(n), truth] = 1.0
    lsm = x - np.log(np.exp(x).sum(axis=2, keepdims=True))
    return Dataset(list(NAMES), lsm, np.ones((n, k), dtype=bool), q)


def profile_of(result: FitResult, n_items: int):
    agents = [config_from_dict({"agents": [{"name": m}]}).agents[0] for m in NAMES]
    return make_profile(
        result,
        agents,
        method="conditional_logit",
        data=["synthetic.jsonl"],
        items_per_file={"synthetic.jsonl": n_items},
        excluded=0,
        folds=5,
    )


@pytest.fixture(scope="module")
def fitted():
    x, truth = synthetic_items(1500, 4, seed=1)
    result = fit(dataset(x, truth), folds=5)
    return profile_of(result, 1500)


def option_scores(row: np.ndarray, members) -> OptionScores:
    k = row.shape[1]
    opts = [str(j) for j in range(k)]
    return OptionScores(
        opts, opts, loglik={m: list(map(float, row[NAMES.index(m)])) for m in members}, rule_applied=True
    )


def replay(rule: adaptive.StopRule, x: np.ndarray, limit: float, weights: np.ndarray):
    """Each item asked in the rule's waves; the members asked and whether the stop's leader is the
    full combination's decision."""
    plan = rule.plan(2, 1)
    asked_n, same = [], []
    for row in x:
        full = int(np.argmax((weights[:, None] * row).sum(axis=0)))

        def look(asked, remaining, row=row):
            return rule.look_choices(option_scores(row, asked), {}, lambda: None, remaining)

        asked, stop = adaptive.run_waves(plan, look, limit)
        asked_n.append(len(asked))
        same.append(stop.leader == str(full))
    return np.mean(asked_n), np.mean(same)


# -------------------------------------------------------------------- the statistics


def test_the_covariance_is_each_members_weighted_score_less_its_item_mean():
    x, truth = synthetic_items(50, 3, seed=0)
    data = dataset(x, truth)
    w = np.linspace(0.5, 2.0, len(NAMES))
    got = sway_covariance(w, data)
    c = data.x * w[None, :, None]
    dev = c - c.mean(axis=2, keepdims=True)
    want = np.einsum("naj,nbj->ab", dev, dev) / (50 * 3)
    assert got == pytest.approx(want) and np.allclose(got, got.T)


def test_conditional_sway_is_the_gaussian_regression_of_the_rest_on_the_asked():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(5, 5))
    cov = a @ a.T + 0.1 * np.eye(5)
    z = rng.multivariate_normal(np.zeros(5), cov, size=200_000)
    asked, rest = [0, 3], [1, 2, 4]
    beta, sd = adaptive.conditional_sway(cov, asked, rest)
    target = z[:, rest].sum(axis=1)
    fitted_beta = np.linalg.lstsq(z[:, asked], target, rcond=None)[0]
    assert beta == pytest.approx(fitted_beta, abs=0.02)
    assert sd == pytest.approx(np.std(target - z[:, asked] @ beta), rel=0.01)
    # Nothing asked: the whole sum's spread; nothing left: nothing to predict.
    assert adaptive.conditional_sway(cov, [], [0, 1])[1] == pytest.approx(np.sqrt(cov[:2, :2].sum()))
    assert adaptive.conditional_sway(cov, [0, 1], [])[1] == 0.0


@pytest.mark.parametrize(
    "mean,sd", [([1.0, 0.2, -0.5], 0.7), ([0.3, 0.35, 0.1, -1.0], 0.4), ([2.0, 0.0], 1.5)]
)
def test_conditional_risk_is_the_chance_that_another_choice_ends_on_top(mean, sd):
    rng = np.random.default_rng(5)
    draws = np.asarray(mean) + rng.normal(0, sd, (400_000, len(mean)))
    want = float(np.mean(np.argmax(draws, axis=1) != 0))
    assert adaptive.conditional_risk(mean, 0, sd) == pytest.approx(want, abs=0.004)
    # No spread left: the leader either is the argmax or is not.
    assert adaptive.conditional_risk([1.0, 0.0], 0, 0.0) == 0.0
    assert adaptive.conditional_risk([1.0, 0.0], 1, 0.0) == 1.0


def test_a_view_that_echoes_another_is_asked_after_a_view_of_the_other_model():
    # m1 repeats m0 (one model, one noise); m2 is another model's view, weaker on its own.
    cov = np.array([[1.0, 0.99, 0.1], [0.99, 1.0, 0.1], [0.1, 0.1, 0.6]])
    order = adaptive.covariance_order(["m0", "m1", "m2"], cov, {})
    assert order[0] in ("m0", "m1") and order[1] == "m2"
    # Compute counts: m0 alone explains 4.4 of the sum's variance 4.98, m2 1.07; at five times
    # m2's cost the twins come after it.
    assert adaptive.covariance_order(["m0", "m1", "m2"], cov, {"m0": 2.0, "m1": 2.0})[0] == "m0"
    assert adaptive.covariance_order(["m0", "m1", "m2"], cov, {"m0": 5.0, "m1": 5.0})[0] == "m2"


def test_prediction_stops_earlier_than_the_sway_bound_and_keeps_the_full_decision(fitted):
    prof = fitted
    assert prof.covariance is not None and prof.covariance.members == NAMES
    weights = np.array([a.weight for a in prof.agents])
    cost = dict.fromkeys(NAMES, 1.0)
    skill = dict.fromkeys(NAMES, 0.3)
    sway = {a.name: float(a.vote_points or 0.0) for a in prof.agents}
    cov = np.asarray(prof.covariance.matrix)
    predicted = adaptive.StopRule(NAMES, skill, cost, sway, profile=prof, covariance=cov)
    bounded = adaptive.StopRule(NAMES, skill, cost, sway, profile=prof)
    assert predicted.predicts and not bounded.predicts
    x, _ = synthetic_items(600, 4, seed=2)  # items the profile was not fitted on
    # The prediction's stated risk holds on unseen items (within sampling error of 600 items) ...
    asked_p, same_p = replay(predicted, x, 0.05, weights)
    assert 1 - same_p <= 0.05 + 0.02
    # ... and on the frontier it is ahead of the rule that knows only each member's mean sway:
    # it differs from the full decision no more often, asking fewer members.
    asked_p, same_p = replay(predicted, x, 0.1, weights)
    asked_b, same_b = replay(bounded, x, 0.03, weights)
    assert same_p >= same_b and asked_p < asked_b - 0.3
    assert asked_p < 0.6 * len(NAMES)


def test_a_lower_risk_asks_more_and_differs_less(fitted):
    prof = fitted
    weights = np.array([a.weight for a in prof.agents])
    rule = adaptive.StopRule(
        NAMES,
        dict.fromkeys(NAMES, 0.3),
        dict.fromkeys(NAMES, 1.0),
        {a.name: float(a.vote_points or 0.0) for a in prof.agents},
        profile=prof,
        covariance=np.asarray(prof.covariance.matrix),
    )
    x, _ = synthetic_items(400, 3, seed=3)
    loose = replay(rule, x, 0.2, weights)
    tight = replay(rule, x, 0.01, weights)
    assert tight[0] > loose[0] and tight[1] >= loose[1] and tight[1] >= 0.97


# -------------------------------------------------------------------- the profile


def test_calibrate_writes_the_covariance_and_a_bad_one_is_refused_naming_it(fitted, tmp_path):
    data = json.loads(fitted.model_dump_json())
    assert parse_profile(data).covariance.items == 1500
    for bad, says in [
        ({"members": NAMES, "matrix": [[1.0]], "items": 3}, "7 x 7"),
        ({"members": ["g0", "zz"], "matrix": [[1, 0], [0, 1]], "items": 3}, "not agents of the profile"),
        ({"members": ["g0", "g1"], "matrix": [[1, 0.5], [0.2, 1]], "items": 3}, "symmetric"),
        ({"members": ["g0", "g1"], "matrix": [[-1, 0], [0, 1]], "items": 3}, ">= 0"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_profile({**data, "covariance": bad})
        assert "covariance" in str(err.value) and says in str(err.value)
    # A profile without one (written before it existed) still reads, and falls back to the sway bound.
    del data["covariance"]
    assert parse_profile(data).covariance is None


def test_adapted_weights_scale_the_covariance_with_them(fitted):
    family = {m: m[0] for m in NAMES}
    ad = Adaptation(fitted, family, Settings())
    factors = dict.fromkeys(NAMES, 1.0) | {"g0": 2.0, "s4": 0.5}
    got = ad.adapt(fitted, factors)
    before, after = np.asarray(fitted.covariance.matrix), np.asarray(got.covariance.matrix)
    i, j = NAMES.index("g0"), NAMES.index("s4")
    assert after[i, i] == pytest.approx(4 * before[i, i]) and after[j, j] == pytest.approx(before[j, j] / 4)
    assert after[i, j] == pytest.approx(before[i, j]) and after[1, 2] == pytest.approx(before[1, 2])


# -------------------------------------------------------------------- the Arbiter


def covariance_profiled(tmp_path, cov, **arbiter):
    """The five-member panel of test_adaptive with weights 1 and the sway covariance ``cov``."""
    accuracy, sway = dict.fromkeys(MEMBERS, 0.6), dict.fromkeys(MEMBERS, 1.0)
    return profiled(tmp_path, accuracy, sway, covariance=cov, **arbiter)


# a/x, a/y and a/z say nearly the same (one model); b/u and b/v are the other model's views.
TWINS = np.array(
    [
        [1.0, 0.95, 0.95, 0.1, 0.1],
        [0.95, 1.0, 0.95, 0.1, 0.1],
        [0.95, 0.95, 1.0, 0.1, 0.1],
        [0.1, 0.1, 0.1, 1.0, 0.3],
        [0.1, 0.1, 0.1, 0.3, 1.0],
    ]
)


def test_the_arbiter_asks_in_the_covariance_order_and_stops_on_the_prediction(tmp_path):
    cfg = covariance_profiled(tmp_path, TWINS, fanout="adaptive", adaptive_risk=0.05)
    assert load_profile(cfg.arbiter.profile).covariance is not None
    agents = ChoiceAgents({m: [6.0, 0.0, 0.0] for m in MEMBERS})
    r = asyncio.run(Arbiter(cfg, agents).run(choose("learned")))
    asked = [m for _, _, _, ms, _ in agents.calls for m in ms]
    # One of the twins and a view of the other model first; their firm agreement predicts the rest.
    assert asked[:2] == ["a/x", "b/u"] and r.agents_asked == 2 and r.answer == "oxygen"
    stop = next(e.data for e in r.trace if e.step == "adaptive_stop")
    assert stop["skipped"] == r.skipped_agents and r.adaptive_risk <= 0.05
    # Split between the two models: a/x's twins will side with it, so that settles it too ...
    split = {
        "a/x": [6.0, 0, 0],
        "a/y": [6.0, 0, 0],
        "a/z": [6.0, 0, 0],
        "b/u": [0, 6.0, 0],
        "b/v": [0, 6.0, 0],
    }
    r = asyncio.run(Arbiter(cfg, ChoiceAgents(split)).run(choose("learned")))
    assert r.agents_asked == 2 and r.answer == "oxygen"
    # ... but where the views are independent, nothing predicts the three not asked: it asks on.
    cfg = covariance_profiled(tmp_path, np.eye(5), fanout="adaptive", adaptive_risk=0.05)
    r = asyncio.run(Arbiter(cfg, ChoiceAgents(split)).run(choose("learned")))
    assert r.agents_asked > 2 and r.answer == "oxygen"


def test_free_text_takes_the_members_skills_from_the_choices_profile(tmp_path):
    # The free-text profile's accuracies are of picking among candidates, near chance for most
    # views: taken as skills they would make two agreeing views settle a vote that counts nine.
    from legion.arbitration.strategies import get_strategy

    cfg = covariance_profiled(tmp_path, TWINS, fanout="adaptive")
    text = load_profile(cfg.arbiter.profile).model_copy(deep=True)
    for a in text.agents:
        a.train_accuracy = 0.25
    path = tmp_path / "free_text.json"
    path.write_text(text.model_dump_json(), encoding="utf-8")
    cfg = config_from_dict(
        {
            "agents": AGENTS,
            "data_dir": str(tmp_path),
            "arbiter": {"profile": cfg.arbiter.profile, "free_text_profile": str(path), "fanout": "adaptive"},
        }
    )
    arbiter = Arbiter(cfg, ChoiceAgents({}))
    rule = asyncio.run(arbiter._stop_rule(get_strategy("plurality"), MEMBERS, choices=False))
    assert rule.skill == {m: pytest.approx(adaptive.skill_from_accuracy(0.6, 4)) for m in MEMBERS}
