"""Arbitration strategies: pick one answer from the agents' candidates.

A strategy is a plain object with ``name`` and ``decide(candidates, weights)``; the Arbiter
looks strategies up by name in a registry (``get_strategy``), so new ones plug in without
touching the actors.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

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


@runtime_checkable
class Strategy(Protocol):
    """Decide one answer over candidates; ``weights`` maps agent name to a trust weight."""

    name: str

    def decide(
        self, candidates: Sequence[Candidate], weights: Mapping[str, float] | None = None
    ) -> Decision: ...


def _usable(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates with an answer. Raises ``NoCandidates`` when every agent failed;
    agents that answered with nothing abstain (see ``abstained``)."""
    answered = [c for c in candidates if c.ok]
    if not answered:
        failed = ", ".join(f"{c.agent}: {c.error}" for c in candidates) or "no agents"
        raise NoCandidates(f"every agent failed ({failed}); retry, or check /v1/agents")
    return [c for c in answered if c.normalized]


def abstained() -> Decision:
    """The decision when every agent that answered gave an empty answer."""
    return Decision(answer="", answer_key="", votes={}, ranking=[], details={"all_abstained": True})


def _best_text(group: list[Candidate]) -> str:
    # The group's representative: its highest-scoring candidate's raw text, first line.
    best = max(group, key=lambda c: c.score if c.score is not None else float("-inf"))
    return next((line.strip() for line in best.text.splitlines() if line.strip()), best.text.strip())


class Plurality:
    """Most votes wins (one vote per agent, times its weight when weights are given); ties go
    to the answer whose best candidate has the highest log-likelihood score, then to the
    answer that appeared first."""

    name = "plurality"

    def decide(self, candidates: Sequence[Candidate], weights: Mapping[str, float] | None = None) -> Decision:
        usable = _usable(candidates)
        if not usable:
            return abstained()
        groups: dict[str, list[Candidate]] = {}
        for c in usable:
            groups.setdefault(c.normalized, []).append(c)
        votes = {
            key: float(sum((weights or {}).get(c.agent, 1.0) for c in members))
            for key, members in groups.items()
        }
        order = list(groups)  # first appearance

        def rank_key(key: str) -> tuple[float, float, int]:
            best = max((c.score for c in groups[key] if c.score is not None), default=float("-inf"))
            return (-votes[key], -best, order.index(key))

        ranking = sorted(groups, key=rank_key)
        winner = ranking[0]
        tied = [k for k in ranking if votes[k] == votes[winner]]
        return Decision(
            answer=_best_text(groups[winner]),
            answer_key=winner,
            votes=votes,
            ranking=ranking,
            details={"tie_broken_by_score": len(tied) > 1, "tied": tied if len(tied) > 1 else []},
        )


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


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


register(Plurality())
