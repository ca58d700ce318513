"""``legion calibrate``: fit how the Arbiter combines its agents, and the profile that holds it.

The model is a conditional logit over each item's own choices: choice ``i`` of an item gets
``z_i = sum_a w_a * f_a(i)``, where ``f_a`` is agent ``a``'s log-softmax over the item's
choices of its scores, and ``P(i) = softmax(z)_i``. ``w_a`` is the agent's weight (its inverse
temperature): 0 silences it, 1 takes its distribution as it is, a negative weight would read it
backwards. The weights are fit by Newton's method on the mean log-loss plus ``l2 / 2 * |w|^2``
(convex, so the fit is exact), with ``l2`` chosen by k-fold cross-validation on the training
items. Nothing depends on the number of choices or on positions, so a profile fitted on ARC
applies to any multiple-choice set.

Free text (``--candidates``): the same model over each item's generated candidates instead of its
given choices, ``f_a`` a member's log-softmax over the candidates of its scores under its view's
rule (what ``learned`` weighs there), from the file ``legion eval --free-text --dump-candidates``
writes; the target spreads evenly over the candidates the judge holds right, and items with no
right candidate, or only right ones, teach nothing and are left out.

Without labels (``--unlabelled``), a one-coin Dawid-Skene model (each agent picks the right
choice with its own probability, else one of the others uniformly) is fit by EM over the
agents' picks; its posteriors over each item's choices are the soft labels the same
conditional logit is fit to.

A profile is JSON (``PROFILE_FORMAT``, ``PROFILE_VERSION``): the weights, the view of every
agent it was fitted for (a running agent that differs is a start-up error naming it), and the
fit's data, size and cross-validation figures. No Ray and no model here; ``legion.evaluation.multiple_choice``
scores the items.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from legion.agent import exemplar_pool
from legion.arbitration.adaptive import answer_labels
from legion.arbitration.scoring import log_softmax
from legion.config import load_config
from legion.engine import views
from legion.engine.views import load_items, parse_item
from legion.errors import ConfigError
from legion.evaluation.multiple_choice import ScoreCache, Scorer, print_progress
from legion.profile import (
    PROFILE_FORMAT,
    PROFILE_VERSION,
    AnswerPatterns,
    FitInfo,
    Profile,
    ProfileAgent,
    SwayCovariance,
    load_profile,
    save_profile,
    view_of,
)

log = logging.getLogger(__name__)

L2_GRID = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
_NEG = -1e30  # the logit of a padded (absent) choice


# ---------------------------------------------------------------------------------- data


@dataclass
class Dataset:
    """Items as padded arrays: ``x[j, a, i]`` agent ``a``'s log-softmax feature of choice ``i``
    of item ``j`` (0 where the item has fewer choices), ``mask[j, i]`` whether choice ``i``
    exists, ``q[j, i]`` the target distribution (one-hot labels, or soft labels); ``right[j, i]``
    whether choice ``i`` counts as right where several may (None: the target's most likely one)."""

    agents: list[str]
    x: np.ndarray  # [n, A, M]
    mask: np.ndarray  # [n, M] bool
    q: np.ndarray  # [n, M]
    right: np.ndarray | None = None  # [n, M] bool

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def subset(self, idx: np.ndarray) -> Dataset:
        right = None if self.right is None else self.right[idx]
        return Dataset(self.agents, self.x[idx], self.mask[idx], self.q[idx], right)

    @property
    def labels(self) -> np.ndarray:
        return self.q.argmax(axis=1)

    def hits(self, pick: np.ndarray) -> np.ndarray:
        """Whether each item's picked choice (``pick``, [n] indices) is right."""
        if self.right is not None:
            return self.right[np.arange(self.n), pick]
        return pick == self.labels


def build_dataset(
    agents: Sequence[str],
    scores: Sequence[Mapping[str, Sequence[float]]],
    labels: Sequence[int] | None = None,
    soft: np.ndarray | None = None,
    right: np.ndarray | None = None,
) -> Dataset:
    """The dataset of ``scores`` (per item, each agent's scores of the item's choices) with
    ``labels`` (the correct choice's index) or ``soft`` ([n, M] target distributions), and
    ``right`` ([n, M] bool) where more than one choice of an item may count as right."""
    n, width = len(scores), max(len(next(iter(s.values()))) for s in scores)
    x = np.zeros((n, len(agents), width))
    mask = np.zeros((n, width), dtype=bool)
    for j, s in enumerate(scores):
        m = len(s[agents[0]])
        mask[j, :m] = True
        for k, a in enumerate(agents):
            if len(s[a]) != m:
                raise ValueError(f"item {j}: agent {a} scored {len(s[a])} choices, {agents[0]} {m}")
            x[j, k, :m] = log_softmax(s[a])
    if soft is not None:
        q = np.where(mask, soft, 0.0)
    else:
        if labels is None:
            raise ValueError("give labels or soft targets")
        q = np.zeros((n, width))
        q[np.arange(n), np.asarray(labels)] = 1.0
    return Dataset(list(agents), x, mask, q, None if right is None else np.where(mask, right, False))


# ---------------------------------------------------------------------------------- the model


def choice_probabilities(w: np.ndarray, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``P(choice)`` per item ([n, M]) of weights ``w`` ([A]) on features ``x`` ([n, A, M])."""
    z = np.einsum("a,nam->nm", w, x)
    z = np.where(mask, z, _NEG)
    z -= z.max(axis=1, keepdims=True)
    e = np.where(mask, np.exp(z), 0.0)
    return e / e.sum(axis=1, keepdims=True)


def log_loss(w: np.ndarray, data: Dataset) -> float:
    """Mean cross-entropy of the targets under ``w``."""
    p = choice_probabilities(w, data.x, data.mask)
    return float(-(data.q * np.log(np.clip(p, 1e-300, None))).sum(axis=1).mean())


def accuracy(w: np.ndarray, data: Dataset) -> float:
    """Share of items whose best-scored choice (first on ties) is right (``Dataset.hits``)."""
    p = choice_probabilities(w, data.x, data.mask)
    return float(data.hits(p.argmax(axis=1)).mean())


def fit_weights(data: Dataset, l2: float, iterations: int = 50, tol: float = 1e-10) -> np.ndarray:
    """The weights minimising mean log-loss + ``l2 / 2 * |w|^2`` (Newton's method with a
    backtracking line search; the objective is convex)."""
    n_agents = data.x.shape[1]
    w = np.zeros(n_agents)

    def objective(v: np.ndarray) -> float:
        return log_loss(v, data) + 0.5 * l2 * float(v @ v)

    f = objective(w)
    for _ in range(iterations):
        p = choice_probabilities(w, data.x, data.mask)
        r = p - data.q  # [n, M]
        grad = np.einsum("nam,nm->a", data.x, r) / data.n + l2 * w
        xp = np.einsum("nam,nm->na", data.x, p)  # E_p[x] per item
        hess = np.einsum("nam,nbm,nm->ab", data.x, data.x, p) - np.einsum("na,nb->ab", xp, xp)
        hess = hess / data.n + (l2 + 1e-12) * np.eye(n_agents)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:
            cand = w - t * step
            fc = objective(cand)
            if fc <= f - 1e-4 * t * float(grad @ step) or t < 1e-8:
                break
            t /= 2
        w, f_old, f = cand, f, fc
        if f_old - f < tol:
            break
    return w


def folds_of(n: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """``k`` disjoint index sets covering ``range(n)``, drawn with ``seed``."""
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::k] for i in range(k)]


def cross_validate(
    data: Dataset, grid: Sequence[float] = L2_GRID, k: int = 5, seed: int = 0
) -> tuple[float, list[dict[str, float]]]:
    """The ``l2`` of ``grid`` with the lowest mean held-out log-loss over ``k`` folds (the
    larger one on a tie: the simpler model), and every value's held-out log-loss and accuracy."""
    if data.n < k:
        raise ValueError(f"cross-validation over {k} folds needs at least {k} items, got {data.n}")
    folds = folds_of(data.n, k, seed)
    rows = []
    for l2 in grid:
        losses, correct = [], 0
        for f in folds:
            train = np.setdiff1d(np.arange(data.n), f)
            w = fit_weights(data.subset(train), l2)
            held = data.subset(f)
            losses.append(log_loss(w, held) * held.n)
            correct += round(accuracy(w, held) * held.n)
        rows.append(
            {"l2": l2, "log_loss": round(sum(losses) / data.n, 5), "accuracy": round(correct / data.n, 4)}
        )
    best = min(rows, key=lambda r: (r["log_loss"], -r["l2"]))
    return best["l2"], rows


# ---------------------------------------------------------------------------------- weak supervision


def dawid_skene(
    picks: np.ndarray, n_choices: Sequence[int], iterations: int = 100, tol: float = 1e-8
) -> tuple[np.ndarray, np.ndarray]:
    """One-coin Dawid-Skene by EM: ``picks[j, a]`` is agent ``a``'s choice on item ``j``, each
    item has ``n_choices[j]`` choices. Agent ``a`` picks the right one with probability
    ``p_a``, else one of the others uniformly. Returns the agents' ``p`` ([A]) and the
    posterior over each item's choices ([n, M], M the most choices). Starts from the majority
    vote (the posterior of agents all at 0.7), so agents better than chance anchor the labels."""
    picks = np.asarray(picks, dtype=int)
    n, n_agents = picks.shape
    m = np.asarray(n_choices, dtype=int)
    width = int(m.max())
    mask = np.arange(width)[None, :] < m[:, None]
    onehot = np.zeros((n, n_agents, width))
    onehot[np.arange(n)[:, None], np.arange(n_agents)[None, :], picks] = 1.0
    p = np.full(n_agents, 0.7)
    post = np.zeros((n, width))
    for _ in range(iterations):
        # E-step: log P(picks | truth = i) = sum_a [pick == i] log p_a + [pick != i] log((1-p_a)/(m-1))
        pc = np.clip(p, 1e-4, 1 - 1e-4)
        right = np.log(pc)[None, :, None]
        wrong = np.log((1 - pc)[None, :, None] / np.maximum(m - 1, 1)[:, None, None])
        ll = (onehot * right + (1 - onehot) * wrong).sum(axis=1)
        ll = np.where(mask, ll, _NEG)
        ll -= ll.max(axis=1, keepdims=True)
        new_post = np.where(mask, np.exp(ll), 0.0)
        new_post /= new_post.sum(axis=1, keepdims=True)
        # M-step: each agent's expected share of right picks.
        new_p = (onehot * new_post[:, None, :]).sum(axis=(0, 2)) / n
        done = np.abs(new_p - p).max() < tol
        p, post = new_p, new_post
        if done:
            break
    return p, post


# ---------------------------------------------------------------------------------- fitting


@dataclass
class FitResult:
    weights: np.ndarray
    l2: float
    cv: list[dict[str, float]]
    train_accuracy: float
    single_accuracy: dict[str, float]
    vote_points: dict[str, float] = field(default_factory=dict)
    covariance: np.ndarray | None = None  # [A, A]: sway_covariance of the fitted weights


def feature_scale(data: Dataset) -> np.ndarray:
    """Each agent's spread of log-softmax scores ([A]): the standard deviation over the items'
    choices of its scores less the item's mean. Views differ in scale (a sum over a long choice
    against a letter's log-probability); the fit works on standardised features, so one L2
    penalty treats every agent alike."""
    n_choices = data.mask.sum(axis=1, keepdims=True)
    mean = (data.x * data.mask[:, None, :]).sum(axis=2, keepdims=True) / n_choices[:, None, :]
    dev = np.where(data.mask[:, None, :], data.x - mean, 0.0)
    var = (dev**2).sum(axis=(0, 2)) / max(1, int(data.mask.sum()) - data.n)
    return np.sqrt(np.maximum(var, 1e-12))


def fit(data: Dataset, grid: Sequence[float] = L2_GRID, folds: int = 5, seed: int = 0) -> FitResult:
    """Choose ``l2`` by cross-validation on standardised features (``feature_scale``), then fit
    the weights on all of ``data``; the weights are returned in the agents' own units."""
    scale = feature_scale(data)
    std = Dataset(data.agents, data.x / scale[None, :, None], data.mask, data.q, data.right)
    l2, rows = cross_validate(std, grid, folds, seed)
    w = fit_weights(std, l2) / scale
    single = {
        a: round(float(data.hits(np.where(data.mask, data.x[:, k, :], _NEG).argmax(axis=1)).mean()), 4)
        for k, a in enumerate(data.agents)
    }
    return FitResult(
        w, l2, rows, round(accuracy(w, data), 4), single, vote_points(w, data), sway_covariance(w, data)
    )


def sway_covariance(w: np.ndarray, data: Dataset) -> np.ndarray:
    """The covariance ([A, A]) of the agents' contributions to the fitted combination, ``w * x``
    less its mean over the item's choices, pooled over every item's choices: what adaptive
    fan-out predicts the members not asked from (``legion.arbitration.adaptive``)."""
    n_choices = data.mask.sum(axis=1, keepdims=True)  # [n, 1]
    c = data.x * w[None, :, None]
    mean = (c * data.mask[:, None, :]).sum(axis=2, keepdims=True) / n_choices[:, None, :]
    dev = np.where(data.mask[:, None, :], c - mean, 0.0)  # [n, A, M]
    cov = np.einsum("naj,nbj->ab", dev, dev) / max(1, int(data.mask.sum()))
    return (cov + cov.T) / 2


def vote_points(w: np.ndarray, data: Dataset) -> dict[str, float]:
    """Each agent's mean sway in the fit: ``|w| * (x[pick] - mean of x over the other choices)``,
    its own pick's log-softmax gap over the item's other choices, times its weight."""
    out = {}
    n_choices = data.mask.sum(axis=1)
    for k, a in enumerate(data.agents):
        x = np.where(data.mask, data.x[:, k, :], _NEG)
        pick = x.argmax(axis=1)
        top = x[np.arange(data.n), pick]
        rest = (np.where(data.mask, data.x[:, k, :], 0.0).sum(axis=1) - top) / np.maximum(1, n_choices - 1)
        out[a] = round(float(abs(w[k]) * (top - rest).mean()), 6)
    return out


def make_profile(
    result: FitResult,
    agents: Sequence[Any],
    *,
    method: str,
    data: Sequence[str],
    items_per_file: Mapping[str, int],
    excluded: int,
    folds: int,
    seconds: float = 0.0,
) -> Profile:
    """The profile of a fit for ``agents`` (agent configs, in the fit's order)."""
    chosen = next(r for r in result.cv if r["l2"] == result.l2)
    best = max(result.single_accuracy, key=lambda a: result.single_accuracy[a])
    return Profile(
        format=PROFILE_FORMAT,
        version=PROFILE_VERSION,
        agents=[
            ProfileAgent(
                name=a.name,
                weight=round(float(w), 6),
                temperature=round(1.0 / abs(float(w)), 6) if abs(float(w)) > 1e-12 else None,
                view=view_of(a),
                train_accuracy=result.single_accuracy.get(a.name),
                vote_points=result.vote_points.get(a.name),
            )
            for a, w in zip(agents, result.weights, strict=True)
        ],
        covariance=None
        if result.covariance is None
        else SwayCovariance(
            members=[a.name for a in agents],
            matrix=[[float(f"{v:.10g}") for v in row] for row in result.covariance],
            items=int(sum(items_per_file.values())),
        ),
        fit=FitInfo(
            method=method,  # type: ignore[arg-type]
            data=list(data),
            items=sum(items_per_file.values()),
            items_per_file=dict(items_per_file),
            excluded_exemplars=excluded,
            l2=result.l2,
            folds=folds,
            cv=result.cv,
            cv_accuracy=chosen["accuracy"],
            train_accuracy=result.train_accuracy,
            best_single=best,
            best_single_accuracy=result.single_accuracy[best],
            fitted_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            seconds=round(seconds, 2),
        ),
    )


# ---------------------------------------------------------------------------------- the command


def _load_unlabelled(path: str | Path, limit: int | None) -> list[Any]:
    # Items whose 'answer' may be absent (weak supervision needs none): it is set to 0, unused.

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data file {p} does not exist")
    out = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and "answer" not in row:
                row["answer"] = 0
                line = json.dumps(row)
            out.append(parse_item(line, lineno, p))
    return out


def exemplar_ids(agents: Sequence[Any], pool: Sequence[Any] | None = None) -> set[str]:
    """The ids of the items some agent (agent configs) takes as a few-shot exemplar, drawn from
    ``pool`` or else each agent's own pool, as ``legion serve`` and ``legion eval`` draw them."""
    return {
        x.id for a in agents for x in views.exemplar_items(a, pool if pool is not None else exemplar_pool(a))
    }


# ---------------------------------------------------------------------------------- free-text candidates


def load_candidates(path: str | Path) -> dict[str, Any]:
    """The file ``legion eval --free-text --dump-candidates`` wrote (``ConfigError`` when it is
    not one)."""
    from legion.evaluation.freetext import CANDIDATES_FORMAT, CANDIDATES_VERSION

    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--candidates {p}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != CANDIDATES_FORMAT:
        raise ConfigError(
            f"--candidates {p}: not a free-text candidates file (write one with legion eval --free-text "
            "--dump-candidates)"
        )
    if data.get("version") != CANDIDATES_VERSION:
        raise ConfigError(
            f"--candidates {p}: version {data.get('version')!r}, this Legion reads "
            f"{CANDIDATES_VERSION}: dump again"
        )
    return data


def check_candidate_members(data: Mapping[str, Any], panel: Sequence[Any], source: str) -> None:
    """``ConfigError`` naming the member when the dump's members are not ``panel`` (member
    configs), each in the same view: a profile is fitted for exactly the members it will weigh."""
    dumped = {m["name"]: m["view"] for m in data["members"]}
    running = {m.name: view_of(m) for m in panel}
    for name in sorted(set(dumped) ^ set(running)):
        where = "the config" if name in running else source
        raise ConfigError(f"member {name!r} is only in {where}: dump again with this config's panel")
    for name, view in running.items():
        diff = [f for f in view if view[f] != dumped[name].get(f)]
        if diff:
            raise ConfigError(
                f"member {name!r} differs from its view in {source} ({', '.join(diff)}): dump again "
                "with this config"
            )


def candidates_dataset(
    members: Sequence[str], records: Sequence[Mapping[str, Any]], exclude: set[str] = frozenset()
) -> tuple[Dataset, dict[str, int]]:
    """The dataset of dumped free-text items: each member's scores of an item's candidates under
    its view's rule (``features``), the target even over the candidates the judge holds right.
    Items left out, counted by why: an id in ``exclude`` (an exemplar), no scores (one candidate,
    or every member gave the same answer), a member that did not score, no candidate right, every
    candidate right."""
    left = dict.fromkeys(("exemplar", "unscored", "member_missing", "none_right", "all_right"), 0)
    feats, rights = [], []
    for r in records:
        features, right = r.get("features") or {}, list(r["right"])
        why = (
            "exemplar"
            if r["id"] in exclude
            else "unscored"
            if not features or len(right) < 2
            else "member_missing"
            if any(m not in features for m in members)
            else "none_right"
            if not any(right)
            else "all_right"
            if all(right)
            else None
        )
        if why is not None:
            left[why] += 1
            continue
        feats.append({m: features[m] for m in members})
        rights.append(right)
    if not feats:
        raise ConfigError(f"no dumped item has candidates both right and wrong to fit on (left out: {left})")
    width = max(len(r) for r in rights)
    right = np.zeros((len(rights), width), dtype=bool)
    for j, r in enumerate(rights):
        right[j, : len(r)] = r
    soft = right / right.sum(axis=1, keepdims=True)
    return build_dataset(list(members), feats, soft=soft, right=right), left


def _calibrate_candidates(args: Any, t0: float) -> int:
    # legion calibrate --candidates: fit on free-text dumps, no model loaded.
    cfg = load_config(args.config)
    panel = cfg.panel
    names = [m.name for m in panel]
    files = [f.strip() for f in args.candidates.split(",") if f.strip()]
    exemplars = exemplar_ids(panel)
    dumps = {path: load_candidates(path) for path in files}
    per_file, excluded = {}, 0
    for path, dump in dumps.items():
        check_candidate_members(dump, panel, f"--candidates {path}")
        try:
            part, left = candidates_dataset(names, dump["items"], exemplars)
        except ConfigError as exc:
            raise ConfigError(f"--candidates {path}: {exc.message}") from None
        print(f"{path}: {part.n} of {len(dump['items'])} items fitted on, left out {left}")
        per_file[str(path)] = part.n
        excluded += left["exemplar"]
    data, _ = candidates_dataset(names, [r for d in dumps.values() for r in d["items"]], exemplars)
    result = fit(data, folds=args.folds)
    profile = make_profile(
        result,
        panel,
        method="conditional_logit",
        data=files,
        items_per_file=per_file,
        excluded=excluded,
        folds=args.folds,
        seconds=time.perf_counter() - t0,
    )
    save_profile(profile, args.out)
    _print_fit(profile, args.out, args.folds)
    print(
        "(free-text candidates: an item's pick is right when the judge holds that candidate right; items "
        "whose candidates are all right or all wrong are not counted)"
    )
    return 0


def answer_patterns(
    files: Sequence[str], members: Sequence[str], exclude: set[str] | frozenset[str] = frozenset()
) -> AnswerPatterns:
    """The members' free-text answer patterns on the items of ``legion eval --free-text --out``
    files: per item, each member's answer (its ``single:<member>`` row) normalised as the vote
    normalises it, labelled by first appearance; an empty answer is -1. Items in ``exclude`` (some
    member's few-shot exemplars, whose answer it was shown) are left out."""
    from legion.arbitration.strategies.base import normalize_answer

    rows: list[list[int]] = []
    for path in files:
        try:
            answers = json.loads(Path(path).read_text(encoding="utf-8"))["answers"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = f"{exc.__class__.__name__}: {exc}"
            raise ConfigError(
                f"--answers {path}: not the --out file of legion eval --free-text ({why})"
            ) from None
        for item_id, rec in answers.items():
            if item_id in exclude:
                continue
            by = rec.get("by", {}) if isinstance(rec, dict) else {}
            missing = [m for m in members if f"single:{m}" not in by]
            if missing:
                raise ConfigError(
                    f"--answers {path}: item {item_id} has no answer of {missing}; run legion eval "
                    "--free-text with the config whose members are fitted"
                )
            rows.append(
                answer_labels([normalize_answer(str(by[f"single:{m}"].get("answer") or "")) for m in members])
            )
    if not rows:
        raise ConfigError(f"--answers {', '.join(files)}: no items")
    return AnswerPatterns(members=list(members), items=rows, data=[str(f) for f in files])


def _calibrate_answers(args: Any) -> int:
    # legion calibrate --answers: the members' free-text answer patterns added to a profile.
    cfg = load_config(args.config)
    into = args.profile or cfg.arbiter.profile
    if into is None:
        raise ConfigError("--answers adds to a profile: give --profile, or set arbiter.profile")
    profile = load_profile(into)
    members = [m.name for m in cfg.panel]
    unknown = sorted(set(members) - {a.name for a in profile.agents})
    if unknown:
        raise ConfigError(f"--profile {into} has no agents {unknown} of the config's panel")
    files = [f.strip() for f in args.answers.split(",") if f.strip()]
    patterns = answer_patterns(files, members, exemplar_ids(cfg.panel))
    out = profile.model_copy(update={"answer_patterns": patterns})
    Profile.model_validate(out.model_dump(mode="json"))
    save_profile(out, args.out)
    print(
        f"answer patterns of {len(members)} members on {len(patterns.items)} items ({', '.join(files)}) "
        f"added to {into}; written to {args.out}"
    )
    return 0


def score_files(
    cfg: Any,
    agents: Sequence[Any],
    files: Sequence[str],
    *,
    limit: int | None,
    shots: str | None,
    scores_path: str | None,
    n_threads: int,
    unlabelled: bool,
    progress: Any = None,
) -> tuple[list[Mapping[str, list[float]]], list[int], dict[str, int], int]:
    """Every agent's scores of the first ``limit`` items of each file, minus the items some
    agent takes as a few-shot exemplar (drawn, as ``legion eval`` does, from ``shots`` or the
    file itself when it is a training split), with the items' answers, the items kept per file
    and how many were left out."""

    all_scores: list[Mapping[str, list[float]]] = []
    labels: list[int] = []
    per_file: dict[str, int] = {}
    excluded = 0
    for path in files:
        items = _load_unlabelled(path, limit) if unlabelled else load_items(path, limit)
        # The exemplars: from --shots, else each member's own pool, as legion serve draws them.
        pool_path = shots or "each member's own (shots, or the shipped ARC-Easy train split)"
        pool = load_items(shots) if shots and any(a.few_shot for a in agents) else None
        taken = exemplar_ids(agents, pool)
        kept = [it for it in items if it.id not in taken]
        excluded += len(items) - len(kept)
        log.info(
            "%s: %d items, %d left out as exemplars (pool %s)",
            path,
            len(kept),
            len(items) - len(kept),
            pool_path,
        )
        scorer = Scorer(
            agents, pool, n_threads=n_threads, cache=ScoreCache(scores_path) if scores_path else None
        )
        try:
            scored = scorer.score_items(kept, progress)
        finally:
            scorer.close()
        for it, (s, _, _) in zip(kept, scored, strict=True):
            all_scores.append({a.name: list(s.loglik[a.name]) for a in agents})
            labels.append(it.answer)
        per_file[str(path)] = len(kept)
    return all_scores, labels, per_file, excluded


def run_calibrate_cli(args: Any) -> int:
    """``legion calibrate``: score the training items, fit, write the profile, print a summary."""
    import sys

    t0 = time.perf_counter()
    if getattr(args, "answers", None):
        return _calibrate_answers(args)
    if getattr(args, "candidates", None):
        return _calibrate_candidates(args, t0)
    cfg = load_config(args.config)
    names = [a.strip() for a in args.agents.split(",")] if getattr(args, "agents", None) else None
    panel = cfg.panel  # every view of every agent: the members legion serve votes with
    agents = [a for a in panel if names is None or a.name in names]
    unknown = sorted(set(names or []) - {a.name for a in panel})
    if unknown or not agents:
        raise ConfigError(f"no panel member named {unknown}; configured: {[a.name for a in panel]}")
    files = [f.strip() for f in args.data.split(",") if f.strip()]
    scores, labels, per_file, excluded = score_files(
        cfg,
        agents,
        files,
        limit=args.limit,
        shots=getattr(args, "shots", None),
        scores_path=getattr(args, "scores", None),
        n_threads=args.threads,
        unlabelled=args.unlabelled,
        progress=print_progress if sys.stderr.isatty() else None,
    )
    names = [a.name for a in agents]
    folds = args.folds
    if args.unlabelled:
        picks = np.array([[int(np.argmax(s[a])) for a in names] for s in scores])
        p, post = dawid_skene(picks, [len(s[names[0]]) for s in scores])
        log.info("Dawid-Skene accuracies: %s", {a: round(float(x), 3) for a, x in zip(names, p, strict=True)})
        data = build_dataset(names, scores, soft=post)
        method = "dawid_skene"
    else:
        data = build_dataset(names, scores, labels)
        method = "conditional_logit"
    result = fit(data, folds=folds)
    profile = make_profile(
        result,
        agents,
        method=method,
        data=files,
        items_per_file=per_file,
        excluded=excluded,
        folds=folds,
        seconds=time.perf_counter() - t0,
    )
    save_profile(profile, args.out)
    _print_fit(profile, args.out, folds)
    if args.unlabelled:
        print(
            "(no labels: every accuracy above is agreement with the Dawid-Skene labels, not with the answers)"
        )
    return 0


def _print_fit(profile: Profile, out: str, folds: int) -> None:
    fi = profile.fit
    print(
        f"fitted on {fi.items} items ({', '.join(f'{k}: {v}' for k, v in fi.items_per_file.items())}), "
        f"{fi.excluded_exemplars} exemplars left out; method {fi.method}"
    )
    print(f"{'agent':<16} {'weight':>10} {'alone':>7}")
    for a in profile.agents:
        print(
            f"{a.name:<16} {a.weight:>10.4g} {a.train_accuracy if a.train_accuracy is not None else 0:>7.4f}"
        )
    print(f"cross-validation ({folds} folds):  l2  log-loss  accuracy")
    for r in fi.cv:
        mark = "  <- chosen" if r["l2"] == fi.l2 else ""
        print(f"  {r['l2']:>8g}  {r['log_loss']:.4f}  {r['accuracy']:.4f}{mark}")
    print(
        f"held-out accuracy {fi.cv_accuracy:.4f} against the best single agent {fi.best_single} "
        f"{fi.best_single_accuracy:.4f} (on all fit items); profile written to {out}"
    )
