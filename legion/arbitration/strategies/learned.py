"""The ``learned`` strategy: the agents' option scores combined with the weights of a profile
fitted on labelled data (``legion calibrate``, ``arbiter.profile``).

Each answer gets ``sum_a w_a * log_softmax(s_a)``: agent ``a``'s log-probabilities over the
distinct answers read at its fitted temperature ``1 / w_a``; the answer with the most wins.
Without option scores (every agent gave the same answer, or scoring failed) the weights are
vote weights (negative ones count as 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from legion.arbitration.scoring import combine
from legion.arbitration.strategies.base import (
    Groups,
    OptionScores,
    Scores,
    SingleRound,
    Weights,
    ranked_decision,
    representative_text,
)
from legion.engine.views import apply_rule
from legion.errors import InvalidRequest
from legion.messages import Decision
from legion.profile import Profile, load_profile

if TYPE_CHECKING:
    from legion.config import ArbiterConfig


def agent_scores(scores: OptionScores, profile: Profile) -> dict[str, list[float]]:
    """Each profiled agent's scores of the options under the scoring rule of the view it was
    fitted for. ``legion eval`` hands them over with the rule applied; at serve time the raw
    log-likelihoods get it here (``pmi`` and ``calibrated`` subtract the agent's likelihood
    after its prompt with the content-free task ``N/A``; without it the raw score is used)."""
    out: dict[str, list[float]] = {}
    for a in profile.agents:
        ll = scores.loglik.get(a.name)
        if ll is None:
            continue
        rule = a.view.get("scoring") or "sum"
        if scores.rule_applied or rule == "sum":
            out[a.name] = list(ll)
        elif rule in ("per_token", "per_byte"):
            n_tok = scores.n_tokens.get(a.name) or [1] * len(ll)
            n_bytes = scores.n_bytes or [1] * len(ll)
            out[a.name] = apply_rule(rule, ll, n_tok, n_bytes)
        else:
            prior = scores.prior.get(a.name)
            out[a.name] = apply_rule(rule, ll, [], [], prior) if prior else list(ll)
    return out


def learned_distribution(
    scores: OptionScores, profile: Profile, keys: Sequence[str]
) -> tuple[np.ndarray, dict[str, float]] | None:
    """The profile's P(answer) over ``keys`` (options of ``scores``) and the weights used;
    None when no profiled agent scored them."""
    idx = [scores.options.index(k) for k in keys]
    feats = {a: [v[i] for i in idx] for a, v in agent_scores(scores, profile).items()}
    if not feats:
        return None
    return combine(profile, feats)


class Learned(SingleRound):
    """Decide by the fitted combination of the agents' scores (see the module docstring)."""

    name = "learned"
    needs_scores = True
    uses_trust = False

    def __init__(self, profile: Profile | None = None, path: str | None = None):
        self.profile = profile
        self.path = path

    def configure(self, settings: ArbiterConfig) -> Learned:
        if settings.profile is None:
            return Learned()
        return Learned(load_profile(settings.profile), settings.profile)

    def tally(self, groups: Groups, keys: Sequence[str], weights: Weights, scores: Scores) -> Decision:
        if self.profile is None:
            raise InvalidRequest(
                "strategy 'learned' needs a profile: fit one with legion calibrate and set "
                "arbiter.profile (or pick another strategy)"
            )
        got = learned_distribution(scores, self.profile, keys) if scores is not None else None
        if got is None:
            w = self.profile.weights
            points = {k: sum(max(0.0, w.get(c.agent, 0.0)) for c in groups.get(k, [])) for k in keys}
            return ranked_decision(points, groups, keys, scores, source="votes", profile=self.path)
        p, used = got
        order = sorted(range(len(keys)), key=lambda i: (-p[i], i))
        ranking = [keys[i] for i in order]
        return Decision(
            answer=representative_text(ranking[0], groups, scores),
            answer_key=ranking[0],
            votes={k: round(float(p[i]), 6) for i, k in enumerate(keys)},
            ranking=ranking,
            details={
                "source": "scores",
                "profile": self.path,
                "weights": {a: round(x, 4) for a, x in used.items()},
            },
        )
