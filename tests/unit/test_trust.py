"""Hedge trust weights: the update rule and their persistence in a real SQLite file."""

import math

import pytest

from legion.arbitration.trust import TrustStore, agreement_losses, hedge_update


def test_hedge_update_multiplies_by_exp_minus_eta_loss_and_keeps_mean_one():
    w = hedge_update({"a": 1.0, "b": 1.0}, {"a": 0.0, "b": 1.0}, eta=0.5)
    assert math.isclose(w["a"] / w["b"], math.exp(0.5))
    assert math.isclose(sum(w.values()) / 2, 1.0)


def test_hedge_repeated_losses_concentrate_weight_on_the_agent_that_agrees():
    w = {"good": 1.0, "bad": 1.0, "meh": 1.0}
    for i in range(50):
        w = hedge_update(w, {"good": 0.0, "bad": 1.0, "meh": float(i % 2)}, eta=0.2)
    assert w["good"] > w["meh"] > w["bad"]


def test_hedge_floor_keeps_every_agent_in_the_vote():
    w = {"a": 1.0, "b": 1.0}
    for _ in range(200):
        w = hedge_update(w, {"a": 0.0, "b": 1.0}, eta=1.0, floor=0.05)
    assert w["b"] == 0.05
    assert w["a"] > 1.0


def test_agents_without_a_loss_keep_their_relative_weight():
    w = hedge_update({"a": 2.0, "b": 1.0, "c": 1.0}, {"b": 1.0}, eta=0.3)
    assert math.isclose(w["a"] / w["c"], 2.0)
    assert w["b"] < w["c"]


def test_hedge_rejects_bad_losses():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        hedge_update({"a": 1.0}, {"a": 2.0}, eta=0.1)


def test_agreement_losses_skip_failed_agents():
    assert agreement_losses({"a": "paris", "b": "lyon", "c": None}, "paris") == {"a": 0.0, "b": 1.0}


def test_store_persists_across_reopen(tmp_path):
    path = tmp_path / "trust.db"
    store = TrustStore(path, eta=0.5)
    assert store.weights(["a", "b"]) == {"a": 1.0, "b": 1.0}
    after = store.update(["a", "b"], {"a": 0.0, "b": 1.0})
    store.update(["a", "b"], {"a": 0.0})
    reopened = TrustStore(path, eta=0.5)
    rec = reopened.records(["a", "b", "new"])
    assert rec["a"].weight > rec["b"].weight
    assert math.isclose(rec["a"].weight / rec["b"].weight, after["a"] / after["b"])
    assert (rec["a"].updates, rec["a"].agreements) == (2, 2)
    assert (rec["b"].updates, rec["b"].agreements) == (1, 0)
    assert rec["new"].weight == 1.0 and rec["new"].updates == 0
