"""Adaptive fan-out: ask the panel in waves and stop once the full panel's vote is settled.

The rule (docs/arbitration.md, "Adaptive fan-out"): every member ``m`` has a skill
``kappa_m`` in [0, 1), its accuracy above chance (Cohen's kappa against a uniform guess), read
from the profile's train accuracies or else from its trust record. On a task with ``K`` options
its accuracy is ``a_m = 1/K + kappa_m (1 - 1/K)`` and, as in the one-coin Dawid-Skene model, it
names the true answer with probability ``a_m`` and any other with ``(1 - a_m) / (K - 1)``. Its
vote then weighs ``log(a_m (K - 1) / (1 - a_m))``, the Bayes-optimal weight of an independent
voter (Nitzan and Paroush), and that weighted vote of every member is the full panel's decision
this module predicts. After the votes so far, the posterior over the true answer gives each
member not yet asked a predictive distribution over its vote; ``settle_risk`` draws the members
not asked from it and returns how often the full panel's weighted vote would differ from the
present leader. The Arbiter stops when that risk is at most ``arbiter.adaptive_risk``.

``learned`` with a profile that holds the members' sway covariance (``legion calibrate`` writes
it) is weighed by prediction instead: the members not asked add to each choice's combined score
an amount that, on the fit's items, moved with what the asked members gave it. Given the asked
members' contributions, the remaining sum is Gaussian with the conditional mean and variance of
that covariance (``conditional_sway``), its spread widened on an item whose asked contributions
run larger than the fit's (``item_spread``); ``conditional_risk`` is then the chance that the full
combination's argmax is not the present leader. Members are asked in the order that removes
the most of that variance per unit of compute (``covariance_order``): views of one model repeat
one another, and asking one of them tells much of what the others would say.

On free text the options are open: ``K`` is the distinct answers so far plus one, the true
answer may be one not seen yet, and a wrong answer not seen yet is a fresh one that no other
member repeats. A profile that records the members' answer patterns on its fit's items (who wrote
the same answer as whom, ``legion calibrate --answers``) replaces that model on free text: the
risk is how often the full panel's plurality changed on the fit's items after the same pattern of
agreement among the members asked (``PatternTable``). Plain Python and numpy; the Arbiter and
``legion eval`` call the same functions.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from legion.arbitration.scoring import contributions
from legion.arbitration.strategies.base import OptionScores
from legion.arbitration.strategies.learned import agent_scores, learned_distribution
from legion.profile import Profile

MAX_SKILL = 0.95  # a member is never taken as certain: one vote never settles a whole panel
DEFAULT_SKILL = 0.2  # a member with no profile accuracy and no trust record
SAMPLES = 4000  # Monte Carlo draws per risk estimate (its standard error is at most 0.008)


def skill_from_accuracy(accuracy: float, n_options: int) -> float:
    """Accuracy above chance on ``n_options``-way items, in [0, MAX_SKILL]: what carries over to a
    task with another number of options (0.46 on 4-way ARC is 0.28 above chance)."""
    chance = 1.0 / max(2, n_options)
    return min(MAX_SKILL, max(0.0, (accuracy - chance) / (1.0 - chance)))


def accuracy_on(skill: float, n_options: int) -> float:
    """A member's accuracy on ``n_options``-way items from its skill."""
    chance = 1.0 / max(2, n_options)
    return chance + min(MAX_SKILL, max(0.0, skill)) * (1.0 - chance)


def vote_weight(skill: float, n_options: int) -> float:
    """The member's weight in the Bayes-optimal vote on ``n_options``-way items (0 at chance)."""
    a = accuracy_on(skill, n_options)
    k = max(2, n_options)
    return math.log(a * (k - 1) / (1.0 - a))


def skill_from_trust(agreements: int, updates: int, n_options: int = 4) -> float:
    """A member's skill from how often it agreed with the panel's decisions (its trust record),
    shrunk towards DEFAULT_SKILL by a prior worth 10 tasks: agreement overstates accuracy, so
    this only orders members and seeds the rule until a profile is fitted."""
    prior = accuracy_on(DEFAULT_SKILL, n_options)
    rate = (agreements + 10 * prior) / (updates + 10)
    return skill_from_accuracy(rate, n_options)


def fanout_order(
    members: Sequence[str], reliability: Mapping[str, float], cost: Mapping[str, float]
) -> list[str]:
    """Members by reliability per unit of compute, best first (ties keep the panel's order)."""
    rank = {m: i for i, m in enumerate(members)}
    return sorted(members, key=lambda m: (-reliability.get(m, 0.0) / max(1e-9, cost.get(m, 1.0)), rank[m]))


def waves(order: Sequence[str], first: int, size: int) -> list[list[str]]:
    """``order`` cut into a first wave of ``first`` members, then waves of ``size``."""
    head = list(order[:first])
    rest = list(order[first:])
    return [head] + [rest[i : i + size] for i in range(0, len(rest), size)] if head else []


@dataclass(frozen=True)
class Settlement:
    """Where the vote stands after the members asked so far."""

    leader: str | None
    risk: float  # P(the full panel's decision differs from ``leader``)
    remaining: int  # members not asked yet

    def settled(self, limit: float) -> bool:
        return self.leader is not None and (self.remaining == 0 or self.risk <= limit)


def vote_points(
    votes: Mapping[str, str | None], skill: Mapping[str, float], n_options: int
) -> dict[str, float]:
    """Each answer's points in the Bayes-optimal weighted vote (member -> answer key; None: it
    failed and does not vote). With a uniform prior, softmax of the points is the posterior."""
    points: dict[str, float] = {}
    for m, v in votes.items():
        if v is not None:
            points[v] = points.get(v, 0.0) + vote_weight(skill.get(m, DEFAULT_SKILL), n_options)
    return points


def settle_risk(
    points: Mapping[str, float],
    leader: str | None,
    remaining: Sequence[tuple[float, float]],
    n_options: int | None,
    samples: int = SAMPLES,
) -> float:
    """P(the full panel's decision differs from ``leader``).

    ``points`` are the answers' log-odds so far (``vote_points``, or the ``learned`` strategy's
    combined scores); answers without points have 0. ``remaining`` holds, for each member not
    asked yet, its accuracy on these items and the points its vote would add. ``n_options`` is
    the number of choices (``points`` then holds every choice's key or a subset), or None for
    free text. The truth is drawn from softmax(points), each remaining member votes for it with
    its accuracy and else for another answer, and the decision is the most points; a tie with
    the leader counts as half a difference. Deterministic for the same arguments."""
    if leader is None:
        return 1.0
    seen = sorted(set(points) | {leader})
    if n_options is not None:
        labels = seen + [f"\x00{i}" for i in range(max(0, n_options - len(seen)))]
    else:
        labels = [*seen, "\x00unseen"]  # the true answer may be one nobody gave yet
    k = max(2, len(labels))
    index = {x: i for i, x in enumerate(labels)}
    tally = np.zeros(len(labels))
    for x, p in points.items():
        tally[index[x]] = p
    lead = index[leader]
    if not remaining:
        others = np.delete(tally, lead)
        best = others.max() if others.size else -np.inf
        return 1.0 if best > tally[lead] + 1e-12 else (0.5 if abs(best - tally[lead]) <= 1e-12 else 0.0)
    post = np.exp(tally - tally.max())
    post /= post.sum()
    key = repr(
        (sorted(points.items()), leader, [tuple(round(x, 6) for x in r) for r in remaining], n_options)
    )
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    truth = rng.choice(len(labels), size=samples, p=post)
    totals = np.tile(tally, (samples, 1))
    rows = np.arange(samples)
    n_seen = len(seen)
    for accuracy, weight in remaining:
        right = rng.random(samples) < accuracy
        if n_options is not None:  # a wrong vote: any other choice
            wrong = rng.integers(0, k - 1, samples)
            wrong = wrong + (wrong >= truth)
        else:  # a wrong vote: another answer seen so far, or a fresh one nobody repeats (-1)
            truth_seen = truth < n_seen
            n_wrong = n_seen - truth_seen + 1
            u = np.floor(rng.random(samples) * n_wrong).astype(int)
            among_seen = u + (truth_seen & (u >= truth))
            wrong = np.where(u < n_wrong - 1, among_seen, -1)
        vote = np.where(right, truth, wrong)
        hit = vote >= 0
        totals[rows[hit], vote[hit]] += weight
    mine = totals[:, lead]
    others = np.delete(totals, lead, axis=1)
    best = others.max(axis=1)
    differs = (best > mine + 1e-12).astype(float) + 0.5 * (np.abs(best - mine) <= 1e-12)
    return float(differs.mean())


_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(48)  # nodes and weights for E over N(0, 1)


def _norm_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)))


def conditional_sway(cov: np.ndarray, asked: Sequence[int], rest: Sequence[int]) -> tuple[np.ndarray, float]:
    """What the members ``rest`` add to a choice's combined score, given the ``asked`` members'
    contributions to it (each less its item mean), under the Gaussian with covariance ``cov``:
    the coefficients of its conditional mean (one per asked member) and its standard deviation."""
    a, r = list(asked), list(rest)
    if not r:
        return np.zeros(len(a)), 0.0
    one = np.ones(len(r))
    total = float(one @ cov[np.ix_(r, r)] @ one)
    if not a:
        return np.zeros(0), math.sqrt(max(0.0, total))
    cross = cov[np.ix_(a, r)] @ one
    beta = np.linalg.lstsq(cov[np.ix_(a, a)], cross, rcond=None)[0]
    return beta, math.sqrt(max(0.0, total - float(cross @ beta)))


def item_spread(cov: np.ndarray, asked: Sequence[int], centred: np.ndarray) -> float:
    """How much wider this item's asked contributions (``centred``: [asked, choices], each less
    its item mean) spread than ``cov`` expects: the root of their Mahalanobis square per degree of
    freedom, at least 1. A task whose scores run larger than the fit's items (longer choices,
    another kind of question) widens the prediction's spread by it rather than trusting the fit's
    scale; a smaller spread is not taken as certainty."""
    a = list(asked)
    k = centred.shape[1]
    if not a or k < 2:
        return 1.0
    inv = np.linalg.pinv(cov[np.ix_(a, a)])
    q = float(np.einsum("ij,ik,kj->", centred, inv, centred))
    return math.sqrt(max(1.0, q / (len(a) * (k - 1))))


def conditional_risk(mean: Sequence[float], leader: int, sd: float) -> float:
    """P(argmax of ``mean + e`` is not ``leader``), ``e`` independent N(0, sd^2) per choice:
    one minus E_z[prod over the others of Phi((mean_leader - mean_j) / sd + z)], by 48-point
    Gauss-Hermite quadrature (deterministic). A tie counts as half."""
    mu = np.asarray(mean, dtype=np.float64)
    others = np.delete(mu, leader)
    if others.size == 0:
        return 0.0
    if sd <= 1e-12:
        best = float(others.max())
        return 1.0 if best > mu[leader] + 1e-12 else (0.5 if abs(best - mu[leader]) <= 1e-12 else 0.0)
    gap = (mu[leader] - others) / sd
    win = float(
        np.sum(_GH_W * np.prod(_norm_cdf(gap[:, None] + _GH_X[None, :]), axis=0)) / math.sqrt(2 * math.pi)
    )
    return min(1.0, max(0.0, 1.0 - win))


def covariance_order(members: Sequence[str], cov: np.ndarray, cost: Mapping[str, float]) -> list[str]:
    """Members in the order that, one at a time, removes the most of the variance of what the
    members not yet asked would add, per unit of compute (ties keep the panel's order)."""
    n = len(members)
    asked: list[int] = []
    left = list(range(n))

    def unexplained(a: list[int]) -> float:
        return conditional_sway(cov, a, [i for i in range(n) if i not in a])[1] ** 2

    now = unexplained(asked)
    while left:
        gains = {i: (now - unexplained([*asked, i])) / max(1e-9, cost.get(members[i], 1.0)) for i in left}
        best = max(left, key=lambda i: (gains[i], -i))
        asked.append(best)
        left.remove(best)
        now = unexplained(asked)
    return [members[i] for i in asked]


# ---------------------------------------------------------------- free text: answer patterns
# A profile may record who wrote the same free-text answer as whom on its fit's items
# (``Profile.answer_patterns``). The members' answers are not independent (views of one model repeat
# one another; views that write from one prompt write one answer), and on free text the Bayes vote
# above cannot know that. The patterns can: the chance that the full panel decides otherwise than
# the members asked so far is how often it did on the fit's items whose asked members agreed in the
# same pattern, (changes + 1/2) / (matches + 1), so that a pattern seen rarely never settles a vote.


def pattern_key(labels: Sequence[int]) -> tuple[int, ...]:
    """Labels renumbered by first appearance (-1, no answer, stays): equal keys, equal agreement."""
    seen: dict[int, int] = {}
    return tuple(-1 if v < 0 else seen.setdefault(v, len(seen)) for v in labels)


def answer_labels(answers: Sequence[str | None]) -> list[int]:
    """Answers as labels numbered by first appearance (equal answers, equal labels; None or an
    empty answer: -1): a row of answer patterns, as ``legion calibrate --answers`` writes them."""
    keys: dict[str, int] = {}
    return [keys.setdefault(a, len(keys)) if a else -1 for a in answers]


def plurality_label(
    labels: Sequence[int], idx: Sequence[int], weight: Sequence[float], standing: Sequence[float]
) -> int:
    """The label the members ``idx`` elect: the most weight (plurality: 1 each), a tie to the most
    standing (the profile's or trust weights, as the Arbiter breaks ties), then to the member first
    in order; -1 when none of them answered."""
    points: dict[int, float] = {}
    stand: dict[int, float] = {}
    first: dict[int, int] = {}
    for i in idx:
        v = labels[i]
        if v < 0:
            continue
        points[v] = points.get(v, 0.0) + weight[i]
        stand[v] = stand.get(v, 0.0) + max(0.0, standing[i])
        first.setdefault(v, i)
    if not points:
        return -1
    return max(points, key=lambda v: (round(points[v], 9), round(stand[v], 9), -first[v]))


_TABLES: dict[tuple, PatternTable] = {}  # PatternTable.of's tables, oldest first


class PatternTable:
    """The fit's answer patterns over a panel's members (rows: items, columns: members), with the
    full panel's elected label on each item under the given vote weights and standing."""

    def __init__(self, rows: np.ndarray, weight: Sequence[float], standing: Sequence[float]):
        self.rows = [tuple(int(v) for v in r) for r in np.asarray(rows, dtype=int)]
        self.weight = [float(w) for w in weight]
        self.standing = [float(x) for x in standing]
        every = range(len(self.weight))
        self.full = [plurality_label(r, every, self.weight, self.standing) for r in self.rows]
        self._groups: dict[tuple[int, ...], dict[tuple[int, ...], tuple[int, int]]] = {}
        self._orders: dict[tuple, list[str]] = {}

    @classmethod
    def of(cls, rows: np.ndarray, weight: Sequence[float], standing: Sequence[float]) -> PatternTable:
        """The table for these rows, weights and standing, built once while they stay the same
        (a panel's tasks share one, with what it has counted and planned)."""
        arr = np.asarray(rows, dtype=int)
        key = (arr.shape, arr.tobytes(), tuple(map(float, weight)), tuple(map(float, standing)))
        got = _TABLES.get(key)
        if got is None:
            got = cls(arr, weight, standing)
            if len(_TABLES) >= 16:
                _TABLES.pop(next(iter(_TABLES)))
            _TABLES[key] = got
        return got

    def _counts(self, asked: Sequence[int]) -> dict[tuple[int, ...], tuple[int, int]]:
        """For the members ``asked`` (in that order): each agreement pattern's (items, items whose
        full vote elected another label than the asked members did)."""
        asked = tuple(asked)
        got = self._groups.get(asked)
        if got is None:
            counts: dict[tuple[int, ...], list[int]] = {}
            for row, full in zip(self.rows, self.full, strict=True):
                c = counts.setdefault(pattern_key([row[i] for i in asked]), [0, 0])
                c[0] += 1
                c[1] += plurality_label(row, asked, self.weight, self.standing) != full
            got = self._groups[asked] = {k: (n, changed) for k, (n, changed) in counts.items()}
        return got

    def risk(self, asked: Sequence[int], labels: Sequence[int]) -> tuple[float, int]:
        """(P(the full panel elects another answer than ``asked`` do), items matched) after the
        members ``asked`` (column indices) answered ``labels`` (aligned; -1: no answer)."""
        n, changed = self._counts(asked).get(pattern_key(labels), (0, 0))
        return (changed + 0.5) / (n + 1), n

    def order(self, units: Mapping[str, Sequence[int]], cost: Mapping[str, float], limit: float) -> list[str]:
        """Units in the order that lets the rule stop soonest on the fit's items: greedily the unit
        after which the most items would settle at ``limit``, per unit of cost (ties: given order).
        Remembered: a panel plans the same order for every task."""
        key = (
            tuple((u, tuple(c)) for u, c in units.items()),
            tuple((u, float(cost.get(u, 1.0))) for u in units),
            float(limit),
        )
        got = self._orders.get(key)
        if got is None:
            got = self._orders[key] = self._greedy(units, cost, limit)
        return list(got)

    def _greedy(
        self, units: Mapping[str, Sequence[int]], cost: Mapping[str, float], limit: float
    ) -> list[str]:
        chosen: list[str] = []
        left = list(units)
        while left:
            best, best_score = left[0], -1.0
            for u in left:
                asked = [i for v in [*chosen, u] for i in units[v]]
                settle = sum(
                    n for n, changed in self._counts(asked).values() if (changed + 0.5) / (n + 1) <= limit
                )
                score = settle / max(1e-9, cost.get(u, 1.0))
                if score > best_score + 1e-12:
                    best, best_score = u, score
            chosen.append(best)
            left.remove(best)
        return chosen


def n_labels(points: Mapping[str, float], leader: str | None, n_options: int | None) -> int:
    """How many answers the rule weighs: the choices, or on free text those seen plus one."""
    if n_options is not None:
        return max(2, n_options)
    return max(2, len(set(points) | ({leader} if leader else set())) + 1)


def member_cost(member: object, choices: bool) -> float:
    """A member's compute per task, relative to one pass over the task: a scoring rule that also
    scores the choices after a content-free prompt (``pmi``, ``calibrated``) makes two passes."""
    if choices and getattr(member, "scoring", None) in ("pmi", "calibrated"):
        return 2.0
    return 1.0


def member_skills(
    members: Sequence[str],
    train_accuracy: Mapping[str, float | None],
    trust: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[dict[str, float], str]:
    """Each member's skill and where it came from: the profile's train accuracies (fitted on
    4-way ARC items) when every member has one, else its trust record's (agreements, updates),
    else DEFAULT_SKILL for all."""
    if members and all(train_accuracy.get(m) is not None for m in members):
        return {m: skill_from_accuracy(float(train_accuracy[m] or 0.0), 4) for m in members}, "profile"
    if trust:
        return {m: skill_from_trust(*trust.get(m, (0, 0))) for m in members}, "trust"
    return dict.fromkeys(members, DEFAULT_SKILL), "default"


class StopRule:
    """One strategy's adaptive fan-out over one panel: the order members are asked in, and the
    settlement after each answer. Every strategy is weighed by the Bayes vote of the members'
    picks; ``learned`` with a profile that records each member's sway (``vote_points``) is weighed
    by the profile's own combined scores, the members not asked adding their sway.

    ``units`` groups members that answer as one: on free text, views of one agent that write
    from the same prompt share one decode and give the same answer, so they are asked together
    (at the cost of one) and, not yet asked, vote together."""

    def __init__(
        self,
        members: Sequence[str],
        skill: Mapping[str, float],
        cost: Mapping[str, float],
        sway: Mapping[str, float] | None = None,
        skill_source: str = "profile",
        units: Mapping[str, Sequence[str]] | None = None,
        profile: Profile | None = None,
        covariance: np.ndarray | None = None,
        patterns: PatternTable | None = None,
        limit: float = 0.05,
    ):
        self.members = list(members)
        self.skill = dict(skill)
        # learned: the profile that combines the members' scores, and each member's sway in it.
        whole = sway is not None and profile is not None and all(m in sway for m in members)
        self.sway = dict(sway) if whole and sway is not None else None
        self.profile = profile if whole else None
        self.skill_source = skill_source
        self.units = {u: list(ms) for u, ms in (units or {m: [m] for m in members}).items()}
        self.unit_of = {m: u for u, ms in self.units.items() for m in ms}
        reliability = {
            u: sum(self.sway[m] if self.sway is not None else vote_weight(skill[m], 4) for m in ms)
            for u, ms in self.units.items()
        }
        unit_cost = {u: max(cost.get(m, 1.0) for m in ms) for u, ms in self.units.items()}
        # learned with the members' sway covariance (one unit per member: choices)
        self.cov = (
            covariance
            if covariance is not None
            and self.profile is not None
            and all(len(ms) == 1 for ms in self.units.values())
            else None
        )
        self.index = {m: i for i, m in enumerate(self.members)}
        # free text with the profile's answer patterns (columns in ``members``' order)
        self.patterns = patterns if self.sway is None else None
        if self.cov is not None:
            self.unit_order = covariance_order(self.members, self.cov, unit_cost)
        elif self.patterns is not None:
            columns = {u: [self.index[m] for m in ms] for u, ms in self.units.items()}
            self.unit_order = self.patterns.order(columns, unit_cost, limit)
        else:
            self.unit_order = fanout_order(list(self.units), reliability, unit_cost)
        self.order = [m for u in self.unit_order for m in self.units[u]]

    @property
    def predicts(self) -> bool:
        """Whether the stop is weighed by the covariance prediction (``look_predicted``)."""
        return self.cov is not None

    @property
    def by_points(self) -> bool:
        """Whether ``look_points`` (the learned combination) applies rather than ``look_votes``."""
        return self.sway is not None

    def plan(self, first: int, size: int) -> list[list[str]]:
        """Waves of members: ``first`` units, then ``size`` units at a time."""
        return [[m for u in wave for m in self.units[u]] for wave in waves(self.unit_order, first, size)]

    def _rest(
        self, remaining: Sequence[str], k: int, weight: Callable[[str], float]
    ) -> list[tuple[float, float]]:
        """Each unit not asked yet: its accuracy on ``k`` options and the points its vote adds."""
        left = [u for u in self.unit_order if any(m in remaining for m in self.units[u])]
        out = []
        for u in left:
            ms = [m for m in self.units[u] if m in remaining]
            acc = sum(accuracy_on(self.skill[m], k) for m in ms) / len(ms)
            out.append((acc, sum(weight(m) for m in ms)))
        return out

    def look_votes(
        self,
        votes: Mapping[str, str | None],
        leader: str | None,
        remaining: Sequence[str],
        n_options: int | None,
    ) -> Settlement:
        """The settlement by the Bayes vote of the members' answers so far (None: failed), or with
        the profile's answer patterns by how often the full panel decided otherwise after the same
        agreement (``look_patterns``)."""
        if self.patterns is not None:
            return self.look_patterns(votes, remaining)
        k = n_labels({v: 0.0 for v in votes.values() if v is not None}, leader, n_options)
        points = vote_points(votes, self.skill, k)
        rest = self._rest(remaining, k, lambda m: vote_weight(self.skill[m], k))
        return Settlement(leader, settle_risk(points, leader, rest, n_options), len(remaining))

    def look_patterns(self, votes: Mapping[str, str | None], remaining: Sequence[str]) -> Settlement:
        """The settlement of a free-text vote by the answer patterns: the leader is the plurality
        (by the vote weights, ties to the standing) of the members asked so far."""
        table = self.patterns
        assert table is not None
        asked = [m for m in self.members if m in votes]
        labels = answer_labels([votes[m] for m in asked])
        idx = [self.index[m] for m in asked]
        row = [-1] * len(self.members)
        for i, v in zip(idx, labels, strict=True):
            row[i] = v
        lead = plurality_label(row, idx, table.weight, table.standing)
        leader = next((votes[m] for m, v in zip(asked, labels, strict=True) if v == lead >= 0), None)
        risk = table.risk(idx, labels)[0] if remaining else 0.0
        return Settlement(leader, risk, len(remaining))

    def look_choices(
        self,
        scores: OptionScores,
        votes: Mapping[str, str | None],
        decide: Callable[[], str | None],
        remaining: Sequence[str],
    ) -> Settlement:
        """The settlement of a task with choices after the members in ``scores`` scored them
        (``votes``: each one's pick, None: failed): by the profile's combined scores when
        ``by_points``, else by the Bayes vote, the leader then being the strategy's (``decide``)."""
        n = len(scores.options)
        if self.cov is not None and self.profile is not None and scores.loglik:
            got_c = self.look_predicted(scores, remaining)
            if got_c is not None:
                return got_c
        if self.profile is not None and scores.loglik:
            got = learned_distribution(scores, self.profile, scores.options)
            if got is not None:
                points = {
                    o: math.log(max(float(p), 1e-300)) for o, p in zip(scores.options, got[0], strict=True)
                }
                leader = max(scores.options, key=lambda o: (points[o], -scores.options.index(o)))
                return self.look_points(points, leader, remaining, n)
        return self.look_votes(votes, decide(), remaining, n)

    def look_predicted(self, scores: OptionScores, remaining: Sequence[str]) -> Settlement | None:
        """The settlement by the profile's combined scores of the members so far plus the
        prediction of what the members not asked would add (``conditional_sway``); None when no
        profiled member has scored yet."""
        assert self.cov is not None and self.profile is not None
        terms = contributions(self.profile, agent_scores(scores, self.profile))
        asked = [m for m in self.members if m in terms]
        if not asked:
            return None
        contrib = np.array([terms[m] for m in asked])  # [asked, choices]
        total = contrib.sum(axis=0)
        order = scores.options
        lead = max(range(len(order)), key=lambda i: (total[i], -i))
        rest = [m for m in remaining if m in self.index]
        beta, sd = conditional_sway(self.cov, [self.index[m] for m in asked], [self.index[m] for m in rest])
        centred = contrib - contrib.mean(axis=1, keepdims=True)
        mean = total + centred.T @ beta
        sd *= item_spread(self.cov, [self.index[m] for m in asked], centred)
        return Settlement(order[lead], conditional_risk(mean, lead, sd), len(remaining))

    def look_points(
        self, points: Mapping[str, float], leader: str | None, remaining: Sequence[str], n_options: int
    ) -> Settlement:
        """The settlement by combined scores so far (the learned strategy's log-odds per choice)."""
        sway = self.sway
        assert sway is not None
        rest = self._rest(remaining, max(2, n_options), lambda m: sway[m])
        return Settlement(leader, settle_risk(points, leader, rest, n_options), len(remaining))


# What makes a member's written answer: views of one agent alike in these write the same text.
_WRITING_FIELDS = ("role_prompt", "prompt_template", "prompt_format", "few_shot", "few_shot_seed", "shots")


def writing_units(members: Sequence[object], owner: Mapping[str, str]) -> dict[str, list[str]]:
    """Members grouped by what they write from: the agent that owns them, their prompt and
    exemplar fields and their sampling (the agent shares one decode between such views)."""
    units: dict[tuple, list[str]] = {}
    for m in members:
        name = m.name  # type: ignore[attr-defined]
        sampling = getattr(m, "sampling", None)
        key = (
            owner.get(name, name),
            *(repr(getattr(m, f, None)) for f in _WRITING_FIELDS),
            sampling.model_dump_json() if hasattr(sampling, "model_dump_json") else repr(sampling),
        )
        units.setdefault(key, []).append(name)
    return {ms[0]: ms for ms in units.values()}


def stop_rule(
    strategy: str,
    members: Sequence[object],
    profile: Profile | None,
    trust: Mapping[str, tuple[int, int]] | None,
    choices: bool,
    owner: Mapping[str, str] | None = None,
    *,
    weights: Mapping[str, float] | None = None,
    standing: Mapping[str, float] | None = None,
    limit: float = 0.05,
) -> StopRule:
    """The stop rule for ``strategy`` over ``members`` (panel member configs) with the profile
    or else the trust records (member -> (agreements, updates)). On free text, with ``owner``
    (member -> agent), members that write alike form one unit, and a profile with the members'
    answer patterns weighs the vote by them: ``weights`` are the vote's (None: one each, plurality),
    ``standing`` breaks its ties, ``limit`` is the risk the order is planned for."""
    names = [m.name for m in members]  # type: ignore[attr-defined]
    by_name = {a.name: a for a in profile.agents} if profile is not None else {}
    acc = {n: by_name[n].train_accuracy if n in by_name else None for n in names}
    skill, source = member_skills(names, acc, trust)
    cost = {m.name: member_cost(m, choices) for m in members}  # type: ignore[attr-defined]
    sway = None
    if strategy == "learned" and choices and by_name:
        sway = {n: float(v) for n in names if n in by_name and (v := by_name[n].vote_points) is not None}
    units = writing_units(members, owner) if not choices and owner is not None else None
    cov = None
    if sway is not None and profile is not None and profile.covariance is not None:
        got = profile.covariance
        if all(n in got.members for n in names):
            pos = [got.members.index(n) for n in names]
            cov = np.asarray(got.matrix, dtype=np.float64)[np.ix_(pos, pos)]
    table = None
    got_p = profile.answer_patterns if profile is not None and not choices else None
    if got_p is not None and all(n in got_p.members for n in names):
        pos = [got_p.members.index(n) for n in names]
        rows = np.asarray(got_p.items, dtype=int)[:, pos]
        w = [float((weights or {}).get(n, 1.0)) for n in names]
        table = PatternTable.of(rows, w, [float((standing or {}).get(n, 0.0)) for n in names])
    return StopRule(names, skill, cost, sway, source, units, profile, cov, table, limit)


def run_waves(
    plan: Sequence[Sequence[str]],
    look: Callable[[list[str], list[str]], Settlement],
    limit: float,
) -> tuple[list[str], Settlement]:
    """Replay adaptive fan-out over answers known in advance (``legion eval``): the waves of the
    plan in order, ``look(asked, remaining)`` weighing the vote after each, as the Arbiter does;
    returns the members asked and the settlement at the stop."""
    order = [m for wave in plan for m in wave]
    asked: list[str] = []
    last = Settlement(None, 1.0, len(order))
    for wave in plan:
        asked += wave
        last = look(list(asked), order[len(asked) :])
        if last.settled(limit):
            break
    return asked, last
