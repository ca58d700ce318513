"""The Consensus Game solver and the equilibrium-ranking strategy on hand-built answers."""

import numpy as np
import pytest

from legion.arbitration.strategies import OptionScores, build_strategy
from legion.arbitration.strategies.equilibrium import (
    EquilibriumRanking,
    initial_discriminator,
    initial_generator,
    solve,
)
from legion.config import ArbiterConfig
from legion.errors import NoCandidates
from legion.messages import Candidate


def cand(agent, key, score=-1.0, error=None):
    return Candidate(agent=agent, text=key, normalized=key, score=score, error=error)


def test_solver_converges():
    g1 = initial_generator([0.5, 0.3, 0.2])
    d1 = initial_discriminator([0.2, 0.7, 0.4])
    short = solve(g1, d1, iterations=100)
    long = solve(g1, d1, iterations=2000)
    assert long.residual < 1e-3
    assert long.residual < short.residual / 10
    assert np.allclose(long.generator.sum(axis=1), 1.0)
    assert np.allclose(long.discriminator.sum(axis=0), 1.0)
    # Later iterates barely move: the policies have settled.
    longer = solve(g1, d1, iterations=2500)
    assert np.abs(longer.generator - long.generator).max() < 1e-2


@pytest.mark.parametrize("p", [[0.1, 0.6, 0.3], [0.45, 0.05, 0.2, 0.3], [0.9, 0.1]])
def test_uniform_discriminator_keeps_the_generator_ranking(p):
    eq = solve(initial_generator(p), initial_discriminator([0.5] * len(p)), iterations=1000)
    for rank_by in ("generator", "discriminator", "product"):
        assert list(np.argsort(-eq.ranking_scores(rank_by))) == list(np.argsort(-np.asarray(p)))


def test_discriminator_can_overturn_a_weak_generator_preference():
    # The generator slightly prefers answer 0; the discriminator strongly believes answer 1.
    eq = solve(initial_generator([0.4, 0.35, 0.25]), initial_discriminator([0.1, 0.9, 0.2]), iterations=1000)
    assert int(np.argmax(eq.ranking_scores("product"))) == 1


def test_lambda_zero_and_large_lambda_stay_valid():
    g1, d1 = initial_generator([0.6, 0.4]), initial_discriminator([0.3, 0.8])
    for lam in (0.0, 10.0):
        eq = solve(g1, d1, iterations=300, lam=lam)
        assert np.isfinite(eq.generator).all() and np.isfinite(eq.discriminator).all()


def test_strategy_ranks_from_option_scores_and_calibration():
    # Every agent finds "water" likely given the question, but "the" even more likely
    # without it: calibration (the discriminator) must see through the common word.
    scores = OptionScores(
        options=["the", "water"],
        texts=["the", "water"],
        loglik={"a": [-2.0, -2.3], "b": [-2.1, -2.2]},
        prior={"a": [-1.0, -6.0], "b": [-1.0, -6.0]},
    )
    cands = [cand("a", "the"), cand("b", "water")]
    d = EquilibriumRanking(iterations=500, discriminator="pmi").decide(cands, None, scores)
    assert d.answer_key == "water"
    assert d.details["init"] == "loglik+pmi"
    assert d.details["iterations"] == 500 and d.details["solver_ms"] >= 0
    # Without the prior the generator's preference stands.
    plain = OptionScores(options=scores.options, texts=scores.texts, loglik=scores.loglik)
    assert (
        EquilibriumRanking(iterations=500, discriminator="pmi").decide(cands, None, plain).answer_key == "the"
    )


def test_length_discriminator_corrects_the_bias_for_short_answers():
    # The short answer wins on raw likelihood only because it is short: per byte, the long
    # answer is far more likely.
    scores = OptionScores(
        options=["ice", "liquid water at room temperature"],
        texts=["ice", "liquid water at room temperature"],
        loglik={"a": [-6.0, -8.0], "b": [-6.5, -8.2]},
        n_bytes=[4, 33],
    )
    cands = [cand("a", "ice"), cand("b", "ice")]
    d = EquilibriumRanking(iterations=500, lam=0.1, rank_by="product", discriminator="length").decide(
        cands, None, scores
    )
    assert d.details["init"] == "loglik+length"
    assert d.answer_key == "liquid water at room temperature"
    gen_only = EquilibriumRanking(iterations=500, rank_by="generator", lam=100.0).decide(cands, None, scores)
    assert gen_only.answer_key == "ice"


def test_strategy_single_candidate_and_failures():
    s = EquilibriumRanking()
    assert s.decide([cand("a", "42"), cand("b", "", error="died")]).answer_key == "42"
    with pytest.raises(NoCandidates):
        s.decide([cand("a", "", error="boom")])
    assert s.decide([cand("a", "")]).details["all_abstained"]


def test_strategy_without_scores_uses_votes():
    d = EquilibriumRanking().decide([cand("a", "x"), cand("b", "x"), cand("c", "y")])
    assert d.answer_key == "x"
    assert d.details["init"] == "votes+confidence"


def test_config_sets_the_parameters():
    s = build_strategy("equilibrium", ArbiterConfig(equilibrium_iterations=7, equilibrium_eta=0.5))
    assert (s.iterations, s.eta) == (7, 0.5)
