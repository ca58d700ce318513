"""Voting strategies over the agents' first answers: plurality, trust-weighted plurality,
Borda count and approval voting."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from legion.arbitration.strategies.base import (
    Groups,
    OptionScores,
    Scores,
    SingleRound,
    Weights,
    ranked_decision,
)
from legion.messages import Candidate, Decision

if TYPE_CHECKING:
    from legion.config import ArbiterConfig


class Plurality(SingleRound):
    """Most votes wins (one vote per agent, times its weight when weights are given); ties go
    to the answer whose best candidate has the highest log-likelihood score, then to the
    answer that appeared first."""

    name = "plurality"
    needs_scores = False
    uses_trust = False

    def tally(self, groups: Groups, options: Sequence[str], weights: Weights, scores: Scores) -> Decision:
        votes = {
            key: float(sum((weights or {}).get(c.agent, 1.0) for c in members))
            for key, members in groups.items()
        }
        return ranked_decision(votes, groups, list(groups), scores)


class TrustWeighted(Plurality):
    """Plurality where each agent's vote counts its trust weight (Hedge, ``legion.arbitration.trust``)."""

    name = "trust"
    uses_trust = True

    def tally(self, groups: Groups, options: Sequence[str], weights: Weights, scores: Scores) -> Decision:
        d = super().tally(groups, options, weights, scores)
        d.details["weights"] = {a: round(w, 4) for a, w in (weights or {}).items()}
        return d


class Borda(SingleRound):
    """Borda count: every agent ranks all answers (by its log-likelihood of each, given its
    own prompt) and gives ``m - 1`` points to its first, ``m - 2`` to its second, and so on;
    tied answers share their points. Without option scores an agent ranks its own answer
    first and the others tied last. Points are multiplied by trust weights when given."""

    name = "borda"
    needs_scores = True
    uses_trust = False

    def tally(self, groups: Groups, options: Sequence[str], weights: Weights, scores: Scores) -> Decision:
        m = len(options)
        points = dict.fromkeys(options, 0.0)
        voters = _voters(groups, scores)
        for agent, values in voters.items():
            w = (weights or {}).get(agent, 1.0)
            for k, p in _borda_points(options, values).items():
                points[k] += w * p
        return ranked_decision(
            points, groups, options, scores, rankings_from="scores" if scores else "own answer", options=m
        )


def _voters(
    groups: Mapping[str, list[Candidate]], scores: OptionScores | None
) -> dict[str, dict[str, float]]:
    # Each voting agent's value of every option: its log-likelihood when scores exist, else
    # 1 for its own answer and 0 for the rest.
    if scores is not None and scores.loglik:
        return {a: dict(zip(scores.options, v, strict=True)) for a, v in scores.loglik.items()}
    return {
        c.agent: {k: float(k == c.normalized) for k in groups} for members in groups.values() for c in members
    }


def _borda_points(options: Sequence[str], values: Mapping[str, float]) -> dict[str, float]:
    m = len(options)
    ordered = sorted(options, key=lambda k: -values[k])
    points: dict[str, float] = {}
    i = 0
    while i < m:
        j = i
        while j + 1 < m and math.isclose(values[ordered[j + 1]], values[ordered[i]]):
            j += 1
        share = sum(m - 1 - r for r in range(i, j + 1)) / (j - i + 1)
        for r in range(i, j + 1):
            points[ordered[r]] = share
        i = j + 1
    return points


class Approval(SingleRound):
    """Approval voting: every agent approves each answer it finds at least ``ratio`` times as
    likely as its favourite (by its log-likelihoods over all answers); most approvals win.
    Without option scores an agent approves only its own answer (which is plurality)."""

    name = "approval"
    needs_scores = True
    uses_trust = False

    def __init__(self, ratio: float = 0.5):
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"approval ratio must lie in (0, 1], got {ratio}")
        self.ratio = ratio

    def configure(self, settings: ArbiterConfig) -> Approval:
        return Approval(settings.approval_ratio)

    def tally(self, groups: Groups, options: Sequence[str], weights: Weights, scores: Scores) -> Decision:
        points = dict.fromkeys(options, 0.0)
        approvals: dict[str, list[str]] = {}
        cut = math.log(self.ratio)
        for agent, values in _voters(groups, scores).items():
            top = max(values.values())
            approved = [k for k in options if values[k] - top >= cut - 1e-12]
            approvals[agent] = approved
            for k in approved:
                points[k] += (weights or {}).get(agent, 1.0)
        return ranked_decision(points, groups, options, scores, ratio=self.ratio, approvals=approvals)
