"""What every arbitration strategy shares: the Strategy and Session protocols, answer
normalisation, the agents' option scores, and the helpers that turn points into a decision.

A strategy decides one answer from the agents' candidates. ``SingleRound`` strategies take the
first answers (and, with ``needs_scores``, every agent's log-likelihood of every distinct
answer); multi-round ones (``legion.arbitration.strategies.deliberation``) call the agents again through the
``Session`` the Arbiter gives them. ``uses_trust`` strategies get the agents' trust weights.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from legion.errors import NoCandidates
from legion.messages import Candidate, Decision, GenerateRequest

if TYPE_CHECKING:
    from legion.config import ArbiterConfig

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s.-]|(?<!\d)\.|\.(?!\d)|-(?!\d)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_LEADING = re.compile(r"^(answer|final answer|the answer is|it is|it's)\s*[:\-]?\s*")


# The arguments of ``SingleRound.tally``: answer groups by normalised answer, agents' weights
# (None: equal), the agents' log-likelihoods of every option (None: not scored).
Groups = Mapping[str, list[Candidate]]
Weights = Mapping[str, float] | None


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
    # True when ``loglik`` already holds each agent's scores under its own scoring rule
    # (``legion eval``); at serve time it holds the raw log-likelihoods.
    rule_applied: bool = False

    def probabilities(self, agent: str) -> list[float]:
        """The agent's softmax over the options of its log-likelihoods."""
        return _softmax(self.loglik[agent])

    def trace(self) -> dict[str, Any]:
        return {
            "options": self.options,
            "loglik": {a: [round(x, 4) for x in v] for a, v in self.loglik.items()},
            **({"prior": {a: [round(x, 4) for x in v] for a, v in self.prior.items()}} if self.prior else {}),
        }


Scores = OptionScores | None  # the third argument of ``SingleRound.tally``


def choice_candidates(
    scores: OptionScores, roles: Mapping[str, str], weights: Mapping[str, float] | None = None
) -> list[Candidate]:
    """Each member's answer over scored choices: its best-scored choice (``scores.loglik`` holds
    each member's scores under its own rule; ties go to the first choice), for the members in
    ``roles`` (name -> role) that scored, in that order; ``weights`` is their standing in a tie."""
    out = []
    for name, role in roles.items():
        ll = scores.loglik.get(name)
        if ll is None:
            continue
        best = max(range(len(ll)), key=lambda i: (ll[i], -i))
        n_tok = scores.n_tokens.get(name) or [1] * len(ll)
        out.append(
            Candidate(
                agent=name,
                role=role,
                text=scores.texts[best],
                normalized=scores.options[best],
                score=ll[best] / max(1, n_tok[best]),
                weight=None if weights is None else weights.get(name),
            )
        )
    return out


def _softmax(xs: Sequence[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [x / s for x in e]


class Session(Protocol):
    """What a strategy may do with the agents of one task (the Arbiter's session, or a test's)."""

    task: str
    settings: ArbiterConfig
    roles: Mapping[str, str]  # agent name -> role, in config order
    weights: Mapping[str, float] | None

    async def fanout(self) -> list[Candidate]:
        """Every agent's first answer to the task (asked once, then remembered)."""
        ...

    async def ask(self, requests: Mapping[str, GenerateRequest], step: str) -> list[Candidate]:
        """Send each named agent its request, all at once; failed agents carry ``error``."""
        ...

    async def option_scores(self, candidates: Sequence[Candidate]) -> OptionScores | None:
        """Every agent's log-likelihood of every distinct answer in ``candidates``."""
        ...

    def request(self, task: str, context: str = "") -> GenerateRequest:
        """A generation request for this task's limits (max_tokens) with ``task``/``context``."""
        ...

    def trace(self, step: str, **data: Any) -> None: ...


@runtime_checkable
class Strategy(Protocol):
    """One way to arbitrate.

    ``needs_scores``: ``deliberate`` asks every agent to score every distinct answer before
    deciding. ``uses_trust``: the session carries the agents' trust weights. ``configure``
    returns the strategy with the parameters of an ``ArbiterConfig``. ``deliberate`` runs the
    strategy on one task through a ``Session``; ``decide`` decides over answers already given
    (``weights`` maps agent name to a trust weight, ``scores`` holds the option scores).
    """

    name: str
    needs_scores: bool
    uses_trust: bool

    def configure(self, settings: ArbiterConfig) -> Strategy: ...

    async def deliberate(self, session: Session) -> Decision: ...

    def decide(
        self,
        candidates: Sequence[Candidate],
        weights: Mapping[str, float] | None = None,
        scores: OptionScores | None = None,
    ) -> Decision: ...


class SingleRound:
    """A strategy that decides over the agents' first answers: fan out once, score the distinct
    answers when it ``needs_scores`` and they differ, then ``decide``: the subclass's ``tally``.
    ``decides_choices``: it can decide a task with choices from the members' scores alone.
    ``adaptive_fanout``: its first round may stop early (``arbiter.fanout: adaptive``)."""

    name = ""
    needs_scores = False
    uses_trust = False
    decides_choices = True
    adaptive_fanout = True

    def configure(self, settings: ArbiterConfig) -> SingleRound:
        return self

    async def deliberate(self, session: Session) -> Decision:
        cands = await session.fanout()
        scores = None
        if self.needs_scores and len({c.normalized for c in cands if c.ok}) > 1:
            scores = await session.option_scores(cands)
        return self.decide(cands, session.weights, scores)

    def decide(
        self,
        candidates: Sequence[Candidate],
        weights: Mapping[str, float] | None = None,
        scores: OptionScores | None = None,
    ) -> Decision:
        """The decision over ``candidates``: abstained when no agent gave an answer, else the
        subclass's ``tally`` of the answer groups and the options to rank (``ballot``)."""
        groups, options = ballot(candidates, scores)
        if not options:
            return abstained()
        return self.tally(groups, options, weights, scores)

    def tally(self, groups: Groups, options: Sequence[str], weights: Weights, scores: Scores) -> Decision:
        raise NotImplementedError


def usable(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates with an answer. Raises ``NoCandidates`` when every agent failed;
    agents that answered with nothing abstain (see ``abstained``)."""
    answered = [c for c in candidates if c.ok]
    if not answered:
        failed = ", ".join(f"{c.agent}: {c.error}" for c in candidates) or "no agents"
        raise NoCandidates(f"every agent failed ({failed}); retry, or check /v1/agents")
    return [c for c in answered if c.normalized]


def ballot(
    candidates: Sequence[Candidate], scores: OptionScores | None
) -> tuple[dict[str, list[Candidate]], list[str]]:
    """The usable candidates grouped by answer, and the answers to rank: the scored options
    when there are scores, else the groups. No answers to rank means every agent abstained."""
    groups = group_candidates(usable(candidates))
    return groups, list(scores.options) if scores is not None and scores.options else list(groups)


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


def standing(group: Sequence[Candidate]) -> float:
    """What a group of answers weighs when votes tie: its members' weights (``Candidate.weight``,
    the profile's or the trust weights), summed; 0 when none carries one."""
    return sum(max(0.0, c.weight) for c in group if c.weight is not None)


def _rank_by_points(
    points: Mapping[str, float], groups: Mapping[str, list[Candidate]], order: Sequence[str]
) -> list[str]:
    # Most points first; ties go to the members' standing (profile or trust weights), and only
    # then to the best log-likelihood score (one model's own view of its answer), then to first
    # appearance.
    def key(k: str) -> tuple[float, float, float, int]:
        group = groups.get(k, [])
        best = max((c.score for c in group if c.score is not None), default=float("-inf"))
        return (-points[k], -standing(group), -best, order.index(k))

    return sorted(points, key=key)


def ranked_decision(
    points: dict[str, float],
    groups: Mapping[str, list[Candidate]],
    order: Sequence[str],
    scores: OptionScores | None,
    **details: Any,
) -> Decision:
    """The decision for ``points`` per answer: most points first, ties broken by score."""
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
