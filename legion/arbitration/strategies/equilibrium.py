"""Equilibrium ranking: the Consensus Game (Jacob et al., ICLR 2024) over a finite answer set.

A generator ``G[v, y] = P(answer y | v)`` and a discriminator ``D[v, y] = P(v | answer y)``,
``v`` in {correct, incorrect}, play a signalling game: the discriminator is rewarded for
recovering ``v`` from the generator's answer. Both start from the agents' log-likelihoods and
run piKL no-regret iterations, each player best-responding to the average of the other's past
policies while a KL penalty (``lam``) keeps it close to its initial policy. Answers are ranked
by the equilibrium policies. ``EquilibriumRanking`` is the strategy built on ``solve``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from legion.arbitration.strategies.base import (
    Groups,
    OptionScores,
    Scores,
    SingleRound,
    Weights,
    representative_text,
)
from legion.arbitration.strategies.learned import learned_distribution
from legion.messages import Candidate, Decision
from legion.profile import Profile, load_profile

if TYPE_CHECKING:
    from legion.config import ArbiterConfig

log = logging.getLogger(__name__)

_EPS = 1e-6
CORRECT, INCORRECT = 0, 1


@dataclass
class Equilibrium:
    """The solver's output: both policies at the last iterate, and how far they still moved."""

    generator: np.ndarray  # [2, m]: rows P(y | correct), P(y | incorrect)
    discriminator: np.ndarray  # [2, m]: columns P(correct | y), P(incorrect | y)
    iterations: int
    residual: float  # L1 change of both policies in the last iteration
    seconds: float

    def ranking_scores(self, rank_by: str = "product") -> np.ndarray:
        """Per-answer score to rank by: ``generator`` P(y|correct), ``discriminator``
        P(correct|y), or ``product`` of the two (the answer both players agree on)."""
        g = self.generator[CORRECT]
        d = self.discriminator[CORRECT]
        if rank_by == "generator":
            return g
        if rank_by == "discriminator":
            return d
        if rank_by == "product":
            return g * d
        raise ValueError(f"rank_by must be generator, discriminator or product, got {rank_by!r}")


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def initial_generator(p_correct: Sequence[float]) -> np.ndarray:
    """``G1`` from P(y | correct): the incorrect row puts its mass where the correct row does not."""
    p = np.clip(np.asarray(p_correct, dtype=np.float64), _EPS, None)
    p = p / p.sum()
    q = np.clip(1.0 - p, _EPS, None)
    q = q / q.sum()
    return np.stack([p, q])


def initial_discriminator(p_correct_given_y: Sequence[float]) -> np.ndarray:
    """``D1`` from P(correct | y) per answer (each clipped away from 0 and 1)."""
    d = np.clip(np.asarray(p_correct_given_y, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.stack([d, 1.0 - d])


def solve(
    g1: np.ndarray,
    d1: np.ndarray,
    *,
    iterations: int = 500,
    eta: float = 0.1,
    lam: float = 0.1,
) -> Equilibrium:
    """Run ``iterations`` piKL steps from ``g1`` ([2, m], rows sum to 1) and ``d1`` ([2, m],
    columns sum to 1). Step t of each player:

        G(y|v) ∝ exp((mean_{τ≤t} D_τ(v|y) / 2 + lam * log G1(y|v)) / (1 / (eta * t) + lam))
        D(v|y) ∝ exp((mean_{τ≤t} G_τ(y|v) / 2 + lam * log D1(v|y)) / (1 / (eta * t) + lam))

    The average of past opponents is a no-regret learner's view; the KL term keeps each
    player near its prior, so the fixed point is a regularised equilibrium.
    """
    t0 = time.perf_counter()
    g1 = np.asarray(g1, dtype=np.float64)
    d1 = np.asarray(d1, dtype=np.float64)
    if g1.shape != d1.shape or g1.ndim != 2 or g1.shape[0] != 2:
        raise ValueError(f"g1 and d1 must both be [2, m] arrays, got {g1.shape} and {d1.shape}")
    # Plain floats, not numpy: with a handful of answers numpy's per-call overhead would
    # cost three times the arithmetic (measured side by side).
    m = g1.shape[1]
    log_g1 = np.log(np.clip(g1, _EPS, None)).tolist()
    log_d1 = np.log(np.clip(d1, _EPS, None)).tolist()
    g, d = g1.tolist(), d1.tolist()
    sum_g = [[0.0] * m, [0.0] * m]
    sum_d = [[0.0] * m, [0.0] * m]
    residual = 0.0
    exp = math.exp
    for t in range(1, iterations + 1):
        for v in (CORRECT, INCORRECT):
            gv, dv, sgv, sdv = g[v], d[v], sum_g[v], sum_d[v]
            for y in range(m):
                sgv[y] += gv[y]
                sdv[y] += dv[y]
        scale = 1.0 / (1.0 / (eta * t) + lam)
        half = 0.5 / t
        g_new = []
        for v in (CORRECT, INCORRECT):
            x = [(sum_d[v][y] * half + lam * log_g1[v][y]) * scale for y in range(m)]
            top = max(x)
            e = [exp(a - top) for a in x]
            z = sum(e)
            g_new.append([a / z for a in e])
        d_c, d_i = [], []
        for y in range(m):
            a = (sum_g[CORRECT][y] * half + lam * log_d1[CORRECT][y]) * scale
            b = (sum_g[INCORRECT][y] * half + lam * log_d1[INCORRECT][y]) * scale
            top = max(a, b)
            ea, eb = exp(a - top), exp(b - top)
            d_c.append(ea / (ea + eb))
            d_i.append(eb / (ea + eb))
        d_new = [d_c, d_i]
        if t == iterations:
            residual = sum(abs(a - b) for v in (0, 1) for a, b in zip(g_new[v], g[v], strict=True)) + sum(
                abs(a - b) for v in (0, 1) for a, b in zip(d_new[v], d[v], strict=True)
            )
        g, d = g_new, d_new
    g, d = np.asarray(g), np.asarray(d)
    return Equilibrium(g, d, iterations, residual, time.perf_counter() - t0)


def _pool(logits: Mapping[str, np.ndarray], weights: Mapping[str, float] | None) -> np.ndarray:
    # Log-linear pool of the agents' distributions over the answers (a weighted mean of
    # log-probabilities), renormalised: agents that agree reinforce each other.
    names = list(logits)
    w = np.array([(weights or {}).get(a, 1.0) for a in names], dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(names), 1.0 / len(names))
    logp = np.stack([np.log(_softmax(logits[a], axis=0)) for a in names])
    return _softmax((w[:, None] * logp).sum(axis=0), axis=0)


class EquilibriumRanking(SingleRound):
    """Rank the candidate answers by the Consensus Game's regularised equilibrium.

    With option scores (every agent's log-likelihood of every distinct answer), the generator
    starts from the agents' pooled P(y | question) (a weighted mean of log-probabilities, the
    weights being trust weights when given) and the discriminator from their pooled
    P(correct | y) judged apart from length (``discriminator="length"``: per-byte
    likelihood) or from how common the answer is anyway (``"pmi"``: the likelihood over the
    likelihood after a question-free prompt). Without option scores it falls back to the
    vote shares and the candidates' own mean log-likelihoods.
    """

    name = "equilibrium"
    needs_scores = True
    uses_trust = True

    def __init__(
        self,
        iterations: int = 500,
        eta: float = 0.1,
        lam: float = 1.0,
        rank_by: str = "generator",
        discriminator: str = "length",
        profile: Profile | None = None,
    ):
        if discriminator not in ("length", "pmi"):
            raise ValueError(f"discriminator must be length or pmi, got {discriminator!r}")
        self.iterations = iterations
        self.eta = eta
        self.lam = lam
        self.rank_by = rank_by
        self.discriminator = discriminator
        self.profile = profile  # a fitted profile: the generator starts from its distribution

    def configure(self, settings: ArbiterConfig) -> EquilibriumRanking:
        """A copy with the parameters of ``settings`` (and its profile, when one is set)."""
        return EquilibriumRanking(
            settings.equilibrium_iterations,
            settings.equilibrium_eta,
            settings.equilibrium_lambda,
            settings.equilibrium_rank_by,
            settings.equilibrium_discriminator,
            load_profile(settings.profile) if settings.profile else None,
        )

    def _judged(self, scores: OptionScores, agent: str, idx: list[int]) -> np.ndarray | None:
        # The discriminator's view of each answer: its likelihood judged apart from how long
        # or how common it is (the generator's raw likelihood favours short, frequent text).
        ll = np.asarray(scores.loglik[agent], dtype=np.float64)[idx]
        if self.discriminator == "pmi":
            if agent not in scores.prior:
                return None
            return ll - np.asarray(scores.prior[agent], dtype=np.float64)[idx]
        if not scores.n_bytes:
            return None
        # Per-byte log-likelihood, rescaled to the options' mean length so that its spread
        # is comparable to the raw log-likelihood's.
        nb = np.maximum(np.asarray(scores.n_bytes, dtype=np.float64)[idx], 1.0)
        return ll / nb * nb.mean()

    def initial_policies(
        self, keys: list[str], groups: dict[str, list[Candidate]], weights, scores: OptionScores | None
    ) -> tuple[np.ndarray, np.ndarray, str]:
        if scores is not None and scores.loglik:
            idx = [scores.options.index(k) for k in keys]
            gen_logits = {a: np.asarray(v, dtype=np.float64)[idx] for a, v in scores.loglik.items()}
            p_gen = _pool(gen_logits, weights)
            judged = {a: j for a in gen_logits if (j := self._judged(scores, a, idx)) is not None}
            p_disc = _pool(judged, weights) if judged else p_gen
            source = f"loglik+{self.discriminator}" if judged else "loglik"
            calibrated = (
                learned_distribution(scores, self.profile, keys) if self.profile is not None else None
            )
            if calibrated is not None:
                # The fitted combination replaces the pooled generator: its P(y | question)
                # is calibrated on labelled items.
                p_gen = calibrated[0]
                source = "profile+" + source
            return initial_generator(p_gen), initial_discriminator(p_disc), source
        # Candidates only: vote shares for the generator, answer confidence for the discriminator.
        share = np.array(
            [sum((weights or {}).get(c.agent, 1.0) for c in groups[k]) for k in keys], dtype=np.float64
        )
        conf = np.array(
            [np.exp(max((c.score for c in groups[k] if c.score is not None), default=-10.0)) for k in keys]
        )
        return initial_generator(share / share.sum()), initial_discriminator(conf), "votes+confidence"

    def tally(self, groups: Groups, keys: Sequence[str], weights: Weights, scores: Scores) -> Decision:
        if len(keys) == 1:
            key = keys[0]
            return Decision(
                answer=representative_text(key, groups, scores),
                answer_key=key,
                votes={key: 1.0},
                ranking=[key],
                details={"single_answer": True},
            )
        g1, d1, source = self.initial_policies(keys, groups, weights, scores)
        eq = solve(g1, d1, iterations=self.iterations, eta=self.eta, lam=self.lam)
        rank = eq.ranking_scores(self.rank_by)
        order = sorted(range(len(keys)), key=lambda i: (-rank[i], i))
        ranking = [keys[i] for i in order]
        winner = ranking[0]
        extra = {}
        if source.startswith("profile+"):
            # Both rankings: the calibrated distribution's alone, and the equilibrium's.
            extra["calibrated_ranking"] = [
                keys[i] for i in sorted(range(len(keys)), key=lambda i: (-g1[0][i], i))
            ]
            extra["equilibrium_ranking"] = ranking
        return Decision(
            answer=representative_text(winner, groups, scores),
            answer_key=winner,
            votes={k: round(float(rank[i]), 6) for i, k in enumerate(keys)},
            ranking=ranking,
            details={
                "init": source,
                "rank_by": self.rank_by,
                "iterations": eq.iterations,
                "eta": self.eta,
                "lambda": self.lam,
                "residual": eq.residual,
                "solver_ms": round(eq.seconds * 1000, 3),
                "generator_init": [round(float(x), 6) for x in g1[CORRECT]],
                "discriminator_init": [round(float(x), 6) for x in d1[CORRECT]],
                "generator": [round(float(x), 6) for x in eq.generator[CORRECT]],
                "discriminator": [round(float(x), 6) for x in eq.discriminator[CORRECT]],
                **extra,
            },
        )
