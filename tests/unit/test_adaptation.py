"""Online adaptation of the profile (``arbiter.adapt: agreement``, legion/arbitration/adaptation.py):
its statistics on synthetic picks where each member's skill is known, its bounded and stored
state, the config's checks, the Arbiter re-weighing the views of a task with choices by it, and
``/v1/agents`` showing it. No Ray, no model: the agents are test_choices' scripted stand-in; the
Arbiter, the strategies, the SQLite store and the route are the real ones."""

from __future__ import annotations

import asyncio
import math
import sqlite3

import numpy as np
import pytest

from legion.arbitration.adaptation import (
    FLOOR,
    Adaptation,
    Settings,
    cross_family_skill,
    within_family_factors,
)
from legion.arbitration.arbiter import Arbiter
from legion.config import ConfigError, config_from_dict
from legion.profile import load_profile
from tests.unit.test_choices import ChoiceAgents, choose, config, run
from tests.unit.test_panel import write_profile
from tests.unit.test_routes import client

AGENTS = [
    {"name": "a", "views": [{"name": "x"}, {"name": "y", "scoring": "per_token"}]},
    {"name": "b", "views": [{"name": "z", "prompt_form": "cloze"}]},
    {"name": "c"},
]


def one_coin(rng, truth, n_options, skill):
    """A member's picks: the truth with accuracy 1/K + skill (1 - 1/K), else another choice."""
    acc = 1 / n_options + skill * (1 - 1 / n_options)
    right = rng.random(len(truth)) < acc
    other = (truth + rng.integers(1, n_options, len(truth))) % n_options
    return np.where(right, truth, other)


def test_agreement_across_families_recovers_each_members_skill_times_its_familys_scale():
    rng = np.random.default_rng(7)
    n, k = 6000, 4
    truth = rng.integers(0, k, n)
    skills = {"g1": 0.6, "g2": 0.2, "s1": 0.5, "s2": 0.3}
    family = ["g", "g", "s", "s"]
    picks = np.stack([one_coin(rng, truth, k, s) for s in skills.values()], axis=1)
    est, support = cross_family_skill(picks, np.full(n, k), family)
    # E[(K agree - 1) / (K - 1)] = kappa_i kappa_j for independent members: a g member's estimate
    # is its skill times the s members' mean skill (0.4), and the other way round (0.4).
    assert est == pytest.approx([0.6 * 0.4, 0.2 * 0.4, 0.5 * 0.4, 0.3 * 0.4], abs=0.03)
    assert list(support) == [2 * n] * 4


def test_a_view_that_echoes_another_of_its_family_gains_nothing_from_the_echo():
    rng = np.random.default_rng(3)
    n, k = 6000, 4
    truth = rng.integers(0, k, n)
    good = one_coin(rng, truth, k, 0.6)
    weak = one_coin(rng, truth, k, 0.1)
    s1, s2 = one_coin(rng, truth, k, 0.4), one_coin(rng, truth, k, 0.4)
    # g_echo writes what g_weak writes (one model's views share its biases): agreement within the
    # family would make both look strong; across families they stay weak.
    picks = np.stack([good, weak, weak.copy(), s1, s2], axis=1)
    est, _ = cross_family_skill(picks, np.full(n, k), ["g", "g", "g", "s", "s"])
    assert est[0] > 3 * est[1] and est[1] == pytest.approx(est[2])
    train = {"g_good": 0.3, "g_weak": 0.3, "g_echo": 0.3, "s1": 0.3, "s2": 0.3}
    family = {"g_good": "g", "g_weak": "g", "g_echo": "g", "s1": "s", "s2": "s"}
    f = within_family_factors(dict(zip(train, est, strict=True)), train, family, bound=2.0)
    assert f["g_good"] > 1.5 and f["g_weak"] < 0.7 and f["g_echo"] == pytest.approx(f["g_weak"])
    assert f["s1"] == pytest.approx(1.0, abs=0.15) and f["s2"] == pytest.approx(1.0, abs=0.15)


def test_factors_are_bounded_and_one_where_nothing_identifies_them():
    family = {"g1": "g", "g2": "g", "s": "s"}
    train = {"g1": 0.3, "g2": 0.3, "s": 0.3}
    f = within_family_factors({"g1": 0.9, "g2": -0.2, "s": 0.1}, train, family, bound=1.5)
    assert f == {"g1": 1.5, "g2": pytest.approx(1 / 1.5), "s": 1.0}  # s is alone in its family
    # One family only: agreement within it cannot tell skill from shared bias.
    solo = {"g1": "g", "g2": "g"}
    assert within_family_factors({"g1": 0.9, "g2": 0.1}, train, solo, bound=2.0) == {"g1": 1.0, "g2": 1.0}
    # What the profile already knew is not counted twice: the same ratio as on train is factor 1.
    f = within_family_factors({"g1": 0.4, "g2": 0.2, "s": 0.3}, {"g1": 0.6, "g2": 0.3, "s": 0.3}, family, 4.0)
    assert f["g1"] == pytest.approx(1.0) and f["g2"] == pytest.approx(1.0)


def profile_for(tmp_path, weights):
    panel = config(tmp_path, agents=AGENTS).panel
    return load_profile(write_profile(tmp_path / "profile.json", panel, [weights[m.name] for m in panel]))


OWNER = {"a/x": "a", "a/y": "a", "b/z": "b", "c": "c"}
# a/x agrees with every other agent's pick, a/y with none: chance-corrected agreement 1 and below
# 0 (counted as FLOOR); a/x's skill over its family's mean is 1 / ((1 + FLOOR) / 2).
FACTOR_X = 2 / (1 + FLOOR)


def test_the_window_is_bounded_stored_and_read_again_after_a_restart(tmp_path):
    prof = profile_for(tmp_path, dict.fromkeys(OWNER, 1.0))
    path = tmp_path / "adaptation.db"
    settings = Settings(window=12, min_items=10, every=5, bound=2.0)
    ad = Adaptation(prof, OWNER, settings, path, key="panel-1")
    for _ in range(30):
        ad.record({"a/x": 0, "a/y": 1, "b/z": 0, "c": 0}, 2)
    st = ad.state()
    assert st.recorded == 30 and st.window_items == 12 and st.refits == 5  # refits at 10, 15, .., 30
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM adapt_picks").fetchone()[0] == 12
        # Indices only: no task text is kept.
        assert conn.execute("SELECT picks FROM adapt_picks LIMIT 1").fetchone()[0] == "[0, 1, 0, 0]"
    again = Adaptation(prof, OWNER, settings, path, key="panel-1")
    assert again.factors() == ad.factors() and again.factors()["a/x"] == pytest.approx(FACTOR_X)
    assert again.factors()["a/y"] == 0.5 and again.factors()["b/z"] == 1.0
    # Another panel or profile has a window of its own.
    other = Adaptation(prof, OWNER, settings, path, key="panel-2")
    assert other.state().recorded == 0 and set(other.factors().values()) == {1.0}


def test_items_answered_by_one_agent_only_are_not_recorded(tmp_path):
    prof = profile_for(tmp_path, dict.fromkeys(OWNER, 1.0))
    ad = Adaptation(prof, OWNER, Settings(window=50, min_items=10, every=1))
    ad.record({"a/x": 0, "a/y": 1, "b/z": None}, 3)  # only agent a answered
    ad.record({"a/x": 7, "a/y": 1, "b/z": 0}, 3)  # a pick out of range counts as no answer
    assert ad.state().recorded == 1
    with pytest.raises(ValueError, match="at least 2"):
        ad.record({"a/x": 0, "b/z": 0}, 1)


def test_the_adapted_profile_scales_each_weight_and_keeps_the_fitted_one_when_factors_are_one(tmp_path):
    prof = profile_for(tmp_path, {"a/x": 1.0, "a/y": -0.5, "b/z": 0.25, "c": 0.0})
    ad = Adaptation(prof, OWNER, Settings())
    assert ad.adapt(prof) is prof
    got = ad.adapt(prof, {"a/x": 2.0, "a/y": 0.5})
    w = got.weights
    assert w == {"a/x": 2.0, "a/y": -0.25, "b/z": 0.25, "c": 0.0}
    assert got.agents[0].temperature == pytest.approx(0.5) and got.agents[3].temperature is None
    assert prof.weights["a/x"] == 1.0  # the fitted profile is untouched


@pytest.mark.parametrize(
    ("arbiter", "agents", "says"),
    [
        ({"adapt": "agreement"}, AGENTS, "set arbiter.profile"),
        ({"adapt": "agreement", "profile": "P"}, [{"name": "a"}], "at least two agents"),
        (
            {"adapt": "agreement", "profile": "P", "adapt_min_items": 60, "adapt_window": 50},
            AGENTS,
            "<= adapt_window",
        ),
        ({"adapt": "sometimes"}, AGENTS, "adapt"),
        ({"adapt_bound": 0.5}, AGENTS, "adapt_bound"),
    ],
)
def test_bad_adaptation_settings_are_config_errors_naming_the_field(tmp_path, arbiter, agents, says):
    if arbiter.get("profile") == "P":
        panel = config_from_dict({"agents": agents, "data_dir": str(tmp_path)}).panel
        arbiter = {**arbiter, "profile": str(write_profile(tmp_path / "p.json", panel))}
    with pytest.raises(ConfigError, match=says):
        config_from_dict({"agents": agents, "arbiter": arbiter, "data_dir": str(tmp_path)})


def adapting_arbiter(tmp_path, agents):
    """An Arbiter whose profile leans on view a/y (weight 1.5 against a/x's 1.0), adapting after
    10 tasks; b/z and c agree with a/x on every task, a/y never does."""
    panel = config(tmp_path, agents=AGENTS).panel
    weights = {"a/x": 1.0, "a/y": 1.5, "b/z": 0.0, "c": 0.0}
    path = tmp_path / "profile.json"
    if not path.exists():  # a restart finds the same file (a rewrite would differ in fitted_at)
        write_profile(path, panel, [weights[m.name] for m in panel])
    cfg = config(
        tmp_path,
        agents=AGENTS,
        profile=str(path),
        adapt="agreement",
        adapt_min_items=10,
        adapt_window=100,
        adapt_every=5,
    )
    return Arbiter(cfg, agents)


SCORES = {
    "a/x": [math.log(3), 0.0],
    "a/y": [0.0, math.log(3)],
    "b/z": [1.0, 0.0],
    "c": [2.0, 0.0],
}


def test_the_arbiter_re_weighs_the_views_after_enough_unlabelled_tasks_and_keeps_it(tmp_path):
    agents = ChoiceAgents(SCORES)
    arbiter = adapting_arbiter(tmp_path, agents)
    two = ["yes", "no"]
    first = [run(arbiter, choose("learned", choices=two)).choice.index for _ in range(10)]
    # The fitted profile: a/y (1.5) outweighs a/x (1.0), so "no" (index 1).
    assert first == [1] * 10
    summary = arbiter.adaptation_summary()
    assert summary["recorded"] == 10 and summary["refits"] == 1
    # a/x agrees with the other agents on every task, a/y never: a/x up, a/y down to the bound.
    assert summary["factors"] == pytest.approx({"a/x": FACTOR_X, "a/y": 0.5, "b/z": 1.0, "c": 1.0}, abs=1e-4)
    r = run(arbiter, choose("learned", choices=two))
    assert r.choice.index == 0 and r.choice.probability_source == "profile"
    # The adapted combination: log-odds (1.0 FACTOR_X - 1.5 * 0.5) log 3 for "yes".
    odds = 3 ** (FACTOR_X - 0.75)
    assert r.choice.probabilities[0] == pytest.approx(odds / (odds + 1), abs=1e-5)
    # Stored: a restarted Arbiter decides with the adapted weights at once.
    again = adapting_arbiter(tmp_path, ChoiceAgents(SCORES))
    assert again.adaptation_summary()["recorded"] == 11
    assert run(again, choose("learned", choices=two)).choice.index == 0


def test_off_by_default_nothing_is_recorded_and_the_fitted_profile_decides(tmp_path):
    panel = config(tmp_path, agents=AGENTS).panel
    weights = {"a/x": 1.0, "a/y": 1.5, "b/z": 0.0, "c": 0.0}
    path = write_profile(tmp_path / "profile.json", panel, [weights[m.name] for m in panel])
    arbiter = Arbiter(config(tmp_path, agents=AGENTS, profile=str(path)), ChoiceAgents(SCORES))
    got = [run(arbiter, choose("learned", choices=["yes", "no"])).choice.index for _ in range(12)]
    assert got == [1] * 12 and arbiter.adaptation_summary() is None
    assert not (tmp_path / "adaptation.db").exists()


class AdaptingArbiterClient:
    """The ingress's view of the Arbiter actor: the real Arbiter's answers, no agents listed."""

    def __init__(self, arbiter: Arbiter):
        self.arbiter = arbiter

    async def agents(self) -> list[dict]:
        return []

    async def adaptation(self) -> dict | None:
        return await asyncio.to_thread(self.arbiter.adaptation_summary)


def test_v1_agents_shows_where_the_adaptation_stands(tmp_path):
    arbiter = adapting_arbiter(tmp_path, ChoiceAgents(SCORES))
    for _ in range(10):
        run(arbiter, choose("learned", choices=["yes", "no"]))
    c = client(tmp_path, AdaptingArbiterClient(arbiter), cfg=arbiter.cfg)
    body = c.get("/v1/agents").json()
    assert body["adaptation"]["mode"] == "agreement" and body["adaptation"]["recorded"] == 10
    assert body["adaptation"]["factors"]["a/x"] == pytest.approx(FACTOR_X, abs=1e-4)
    assert body["adaptation"]["bound"] == 2.0
    off = client(tmp_path / "off").get("/v1/agents").json()
    assert off["adaptation"] is None


def test_legion_eval_replays_the_adaptation_in_item_order_without_labels(tmp_path):
    from legion.evaluation.multiple_choice import Item, evaluate
    from tests.unit.test_evaluate import TableScorer

    panel = config(tmp_path, agents=AGENTS).panel
    weights = {"a/x": 1.0, "a/y": 1.5, "b/z": 0.0, "c": 0.0}
    path = write_profile(tmp_path / "profile.json", panel, [weights[m.name] for m in panel])
    cfg = config(tmp_path, agents=AGENTS, profile=str(path), adapt_min_items=10, adapt_every=5)
    items = [Item(id=f"i{k}", context="c", choices=["p", "q"], answer=k % 2) for k in range(30)]
    table = {}
    for it in items:
        right = [0.0, 0.0]
        right[it.answer] = math.log(3)
        table[it.id] = {"a/x": right, "a/y": right[::-1], "b/z": right, "c": right}
    res = evaluate(cfg, items, ["learned"], scorer=TableScorer(table), adapt="agreement")
    # The fitted profile follows a/y, always wrong; adapted after the 10th item, a/x leads.
    assert res["learned"]["accuracy"] == 0.0
    row = res["learned@adapted"]
    assert row["accuracy"] == pytest.approx(20 / 30, abs=1e-4) and row["refits"] == 5
    assert row["factors"]["a/y"] == 0.5
    assert "learned@adapted" not in evaluate(cfg, items, ["learned"], scorer=TableScorer(table))


def test_the_result_cache_key_of_a_task_with_choices_moves_with_the_stored_factors(tmp_path):
    """A cached answer decided with one set of factors is not served once the adaptation has
    re-weighed the views (the same request then decides otherwise, as the test above shows)."""
    from legion.service.pipeline import TaskPipeline
    from legion.state.cache import ResultCache

    arbiter = adapting_arbiter(tmp_path, ChoiceAgents(SCORES))
    cfg = arbiter.cfg.model_copy(deep=True)
    cfg.cache.enabled = True
    pipeline = TaskPipeline.from_config(cfg, arbiter=None, retriever=None)  # type: ignore[arg-type]
    req = choose("learned", choices=["yes", "no"])
    before = pipeline._cache_key(req)
    assert before == pipeline._cache_key(req)
    for _ in range(10):
        run(arbiter, choose("learned", choices=["yes", "no"]))
    assert arbiter.adaptation_summary()["refits"] == 1
    after = pipeline._cache_key(req)
    assert after != before
    # Free text is not weighed by the adapted profile: its key stays.
    text = req.model_copy(update={"choices": None, "strategy": "plurality"})
    assert ResultCache.key(text, cfg) == pipeline._cache_key(text)
