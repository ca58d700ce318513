"""Arbitration strategies: pick one answer from the agents' candidates.

A strategy is a plain object with ``name`` and ``decide(candidates, weights, scores)``; the
Arbiter looks strategies up by name in a registry (``get_strategy``), so new ones plug in
without touching the actors. Single-round strategies decide over the first answers;
multi-round ones (``legion.deliberation``) also have ``deliberate(session)`` and call the
agents again through the session.

Besides the candidates a strategy may ask for ``OptionScores`` (``needs_scores``): every
agent's log-likelihood of every distinct answer, given its own prompt, so that each agent
ranks all answers and not only its own. ``uses_trust`` strategies get the agents' trust
weights (``legion.trust``).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from legion.errors import NoCandidates, UnknownStrategy
from legion.messages import Candidate, Decision

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s.-]|(?<!\d)\.|\.(?!\d)|-(?!\d)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_LEADING = re.compile(r"^(answer|final answer|the answer is|it is|it's)\s*[:\-]?\s*")


def normalize_answer(text: str) -> str:
    """Reduce an answer to the form votes compare: first line, lower case, no articles,
    punctuation or extra spaces; ``"The answer is: Paris."`` and ``"paris"`` are equal.
    Decimal points and minus signs inside numbers are kept (``-3.5`` stays ``-3.5``).
    """
    text = unicodedata.normalize("NFKC", text).strip()
    first = next((line for line in text.splitlines() if line.strip()), "")
    s = first.lower().strip()
    s = _THOUSANDS.sub("", s)
    s = _LEADING.sub("", s)
    s = _PUNCT.sub(" ", s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


@dataclass
class OptionScores:
    """Every agent's log-likelihood of every distinct answer (the options).

    ``loglik[agent][i]`` is the summed log-probability of option ``i`` after the agent's own
    prompt for the task; ``prior[agent][i]`` the same after a prompt without the question
    (for calibration; may be empty). ``n_tokens`` and ``n_bytes`` allow length normalisation.
    """

    options: list[str]  # normalised answers
    texts: list[str]  # the text shown for each option
    loglik: dict[str, list[float]] = field(default_factory=dict)
    prior: dict[str, list[float]] = field(default_factory=dict)
    n_tokens: dict[str, list[int]] = field(default_factory=dict)
    n_bytes: list[int] = field(default_factory=list)

    def probabilities(self, agent: str) -> list[float]:
        """The agent's softmax over the options of its log-likelihoods."""
        return _softmax(self.loglik[agent])

    def trace(self) -> dict[str, Any]:
        return {
            "options": self.options,
            "loglik": {a: [round(x, 4) for x in v] for a, v in self.loglik.items()},
            **({"prior": {a: [round(x, 4) for x in v] for a, v in self.prior.items()}} if self.prior else {}),
        }


def _softmax(xs: Sequence[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [x / s for x in e]


@runtime_checkable
class Strategy(Protocol):
    """Decide one answer over candidates; ``weights`` maps agent name to a trust weight and
    ``scores`` holds every agent's log-likelihood of every answer when the strategy asked
    for them (``needs_scores``)."""

    name: str

    def decide(
        self,
        candidates: Sequence[Candidate],
        weights: Mapping[str, float] | None = None,
        scores: OptionScores | None = None,
    ) -> Decision: ...


def usable(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates with an answer. Raises ``NoCandidates`` when every agent failed;
    agents that answered with nothing abstain (see ``abstained``)."""
    answered = [c for c in candidates if c.ok]
    if not answered:
        failed = ", ".join(f"{c.agent}: {c.error}" for c in candidates) or "no agents"
        raise NoCandidates(f"every agent failed ({failed}); retry, or check /v1/agents")
    return [c for c in answered if c.normalized]


_usable = usable  # the name older callers use


def abstained() -> Decision:
    """The decision when every agent that answered gave an empty answer."""
    return Decision(answer="", answer_key="", votes={}, ranking=[], details={"all_abstained": True})


def _best_text(group: list[Candidate]) -> str:
    # The group's representative: its highest-scoring candidate's raw text, first line.
    best = max(group, key=lambda c: c.score if c.score is not None else float("-inf"))
    return next((line.strip() for line in best.text.splitlines() if line.strip()), best.text.strip())


def group_candidates(candidates: Sequence[Candidate]) -> dict[str, list[Candidate]]:
    """Candidates grouped by normalised answer, in order of first appearance."""
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(c.normalized, []).append(c)
    return groups


def representative_text(key: str, groups: Mapping[str, list[Candidate]], scores: OptionScores | None) -> str:
    """The text to answer with for the normalised answer ``key``."""
    if key in groups:
        return _best_text(groups[key])
    if scores is not None and key in scores.options:
        return scores.texts[scores.options.index(key)]
    return key


def _rank_by_points(
    points: Mapping[str, float], groups: Mapping[str, list[Candidate]], order: Sequence[str]
) -> list[str]:
    # Most points first; ties go to the best log-likelihood score, then to first appearance.
    def key(k: str) -> tuple[float, float, int]:
        best = max((c.score for c in groups.get(k, []) if c.score is not None), default=float("-inf"))
        return (-points[k], -best, order.index(k))

    return sorted(points, key=key)


def _decision(
    points: dict[str, float],
    groups: Mapping[str, list[Candidate]],
    order: Sequence[str],
    scores: OptionScores | None,
    **details: Any,
) -> Decision:
    ranking = _rank_by_points(points, groups, order)
    winner = ranking[0]
    tied = [k for k in ranking if math.isclose(points[k], points[winner])]
    return Decision(
        answer=representative_text(winner, groups, scores),
        answer_key=winner,
        votes={k: round(v, 6) for k, v in points.items()},
        ranking=ranking,
        details={"tie_broken_by_score": len(tied) > 1, "tied": tied if len(tied) > 1 else [], **details},
    )


class Plurality:
    """Most votes wins (one vote per agent, times its weight when weights are given); ties go
    to the answer whose best candidate has the highest log-likelihood score, then to the
    answer that appeared first."""

    name = "plurality"
    needs_scores = False
    uses_trust = False

    def decide(
        self,
        candidates: Sequence[Candidate],
        weights: Mapping[str, float] | None = None,
        scores: OptionScores | None = None,
    ) -> Decision:
        groups = group_candidates(usable(candidates))
        if not groups:
            return abstained()
        votes = {
            key: float(sum((weights or {}).get(c.agent, 1.0) for c in members))
            for key, members in groups.items()
        }
        return _decision(votes, groups, list(groups), scores)


class TrustWeighted(Plurality):
    """Plurality where each agent's vote counts its trust weight (Hedge, ``legion.trust``)."""

    name = "trust"
    uses_trust = True

    def decide(
        self,
        candidates: Sequence[Candidate],
        weights: Mapping[str, float] | None = None,
        scores: OptionScores | None = None,
    ) -> Decision:
        d = super().decide(candidates, weights, scores)
        d.details["weights"] = {a: round(w, 4) for a, w in (weights or {}).items()}
        return d


def _options(groups: Mapping[str, list[Candidate]], scores: OptionScores | None) -> list[str]:
    if scores is not None and scores.options:
        return list(scores.options)
    return list(groups)


class Borda:
    """Borda count: every agent ranks all answers (by its log-likelihood of each, given its
    own prompt) and gives ``m - 1`` points to its first, ``m - 2`` to its second, and so on;
    tied answers share their points. Without option scores an agent ranks its own answer
    first and the others tied last. Points are multiplied by trust weights when given."""

    name = "borda"
    needs_scores = True
    uses_trust = False

    def decide(
        self,
        candidates: Sequence[Candidate],
        weights: Mapping[str, float] | None = None,
        scores: OptionScores | None = None,
    ) -> Decision:
        ok = usable(candidates)
        groups = group_candidates(ok)
        options = _options(groups, scores)
        if not options:
            return abstained()
        m = len(options)
        points = dict.fromkeys(options, 0.0)
        voters = _voters(ok, scores)
        for agent, values in voters.items():
            w = (weights or {}).get(agent, 1.0)
            for k, p in _borda_points(options, values).items():
                points[k] += w * p
        return _decision(
            points, groups, options, scores, rankings_from="scores" if scores else "own answer", options=m
        )


def _voters(ok: Sequence[Candidate], scores: OptionScores | None) -> dict[str, dict[str, float]]:
    # Each voting agent's value of every option: its log-likelihood when scores exist, else
    # 1 for its own answer and 0 for the rest.
    if scores is not None and scores.loglik:
        return {a: dict(zip(scores.options, v, strict=True)) for a, v in scores.loglik.items()}
    options = list(group_candidates(ok))
    return {c.agent: {k: (1.0 if k == c.normalized else 0.0) for k in options} for c in ok}


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


class Approval:
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

    def configure(self, settings: Any) -> Approval:
        return Approval(getattr(settings, "approval_ratio", self.ratio))

    def decide(
        self,
        candidates: Sequence[Candidate],
        weights: Mapping[str, float] | None = None,
        scores: OptionScores | None = None,
    ) -> Decision:
        ok = usable(candidates)
        groups = group_candidates(ok)
        options = _options(groups, scores)
        if not options:
            return abstained()
        points = dict.fromkeys(options, 0.0)
        approvals: dict[str, list[str]] = {}
        cut = math.log(self.ratio)
        for agent, values in _voters(ok, scores).items():
            top = max(values.values())
            approved = [k for k in options if values[k] - top >= cut - 1e-12]
            approvals[agent] = approved
            for k in approved:
                points[k] += (weights or {}).get(agent, 1.0)
        return _decision(points, groups, options, scores, ratio=self.ratio, approvals=approvals)


_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add a strategy to the registry under its ``name``."""
    _REGISTRY[strategy.name] = strategy
    return strategy


def get_strategy(name: str) -> Strategy:
    """Return the registered strategy ``name`` or raise ``UnknownStrategy`` listing the choices."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownStrategy(
            f"unknown strategy {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}",
            details={"allowed": sorted(_REGISTRY)},
        ) from None


def build_strategy(name: str, settings: Any = None) -> Strategy:
    """The strategy ``name`` with its parameters taken from ``settings`` (an ``ArbiterConfig``)."""
    strategy = get_strategy(name)
    configure = getattr(strategy, "configure", None)
    if settings is not None and configure is not None:
        return configure(settings)
    return strategy


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


register(Plurality())
register(Borda())
register(Approval())
register(TrustWeighted())

# Strategies defined in their own modules register themselves on import.
from legion import deliberation, equilibrium  # noqa: E402, F401
