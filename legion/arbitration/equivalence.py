"""Free-text answers: when two say the same thing, and where one ends.

Votes count answers, so equivalent answers must fall in one group: ``"4"`` and ``"2 + 2 = 4"``,
``"madrid"`` and ``"The capital of Spain is Madrid."``, ``"dog."`` and ``"The lazy dog."``.
``rule_verdict`` compares the final answers two texts state (after an ``=`` or an "answer is"
marker), as numbers when both are numbers, else by containment of one's words in the other's
(never across a negation the other lacks). Where the rules cannot tell, an ``Equivalence`` asks
a fallback: ``EmbeddingSimilarity`` (cosine similarity of the final answers' embeddings) or
``AgentJudge`` (the agents' log-probability of "yes" after asking whether two answers say the
same). ``canonical`` is the rules-only grouping.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from legion.arbitration.strategies import normalize_answer
from legion.messages import Candidate

log = logging.getLogger(__name__)

_MARKER = re.compile(r"\b(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:=]?\s*", re.IGNORECASE)
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")
_WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NEGATIONS = frozenset({"not", "no", "never", "none", "neither", "nor", "isn't", "aren't", "cannot", "can't"})
_STOPWORDS = frozenset({"is", "are", "was", "were", "of", "in", "on", "to", "it", "its", "and", "or", "be"})
# Where an answer lists alternatives: "a; b", "a or b", "a, b, c" (two parts joined by a comma
# are not a list: "Paris, France").
_ALTERNATIVES = re.compile(r"\s*(?:;|\bor\b)\s*", re.IGNORECASE)


def final_answer(text: str) -> str:
    """The answer a text states: its first non-empty line, from after its last answer marker
    (``"answer:"``, ``"the answer is"``) or, failing that, after its last ``=``."""
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    marks = list(_MARKER.finditer(line))
    if marks and marks[-1].end() < len(line):
        return line[marks[-1].end() :].strip()
    if "=" in line:
        tail = line.rsplit("=", 1)[1].strip()
        if tail:
            return tail
    return line


def _as_number(normalized: str) -> float | None:
    if _NUMBER.match(normalized):
        return float(normalized)
    return float(_WORD_NUMBERS[normalized]) if normalized in _WORD_NUMBERS else None


def _numbers(words: list[str]) -> set[float]:
    return {n for n in map(_as_number, words) if n is not None}


def _key(text: str) -> str:
    return normalize_answer(final_answer(text))


def _contains(short: list[str], long: list[str]) -> bool:
    n = len(short)
    return any(long[i : i + n] == short for i in range(len(long) - n + 1))


def lists_alternatives(answer: str) -> bool:
    """Whether ``answer`` names several alternatives ("coal; wind", "coal or wind", "coal, wind,
    oil") rather than one answer: containing one of them is not saying it."""
    if len([p for p in _ALTERNATIVES.split(answer) if p.strip()]) > 1:
        return True
    return len([p for p in answer.split(",") if p.strip()]) > 2


@dataclass(frozen=True)
class Verdict:
    """Whether two answers say the same (``None``: the rules cannot tell), what decided it (a
    rule: ``equal``, ``number``, ``alternatives``, ``containment``, ``negation``, ``no content``,
    ``empty``, ``no rule``; or a fallback's name), and the fallback's evidence (similarity,
    yes-probability)."""

    same: bool | None
    via: str
    score: float | None = None


def rule_verdict(a: str, b: str) -> Verdict:
    """The rules' verdict on answers ``a`` and ``b``, from their final answers: equal, equal
    numbers, or one's words found in order in the other's (with a word that is not a stopword).
    A negation one has and the other lacks, a number on its own, different numbers in both, or
    a longer answer that lists alternatives ("coal; wind; oil" is not "wind") say no for good:
    no fallback may join them. ``same`` is ``None`` only where no rule applies."""
    ka, kb = _key(a), _key(b)
    if not ka or not kb:
        return Verdict(False, "empty")
    if ka == kb:
        return Verdict(True, "equal")
    na, nb = _as_number(ka), _as_number(kb)
    if na is not None and nb is not None:
        return Verdict(na == nb, "number")
    finals = sorted((final_answer(a), final_answer(b)), key=lambda t: len(normalize_answer(t).split()))
    if lists_alternatives(finals[1]):  # "wind" is not "coal; wind; oil", whatever a fallback says
        return Verdict(False, "alternatives")
    wa, wb = ka.split(), kb.split()
    if set(wa) & _NEGATIONS != set(wb) & _NEGATIONS:
        return Verdict(False, "negation")
    short, long = sorted((wa, wb), key=len)
    if not any(w not in _STOPWORDS and w not in _NEGATIONS for w in short):
        return Verdict(False, "no content")
    if _contains(short, long):
        return Verdict(True, "containment")
    numbers_a, numbers_b = _numbers(wa), _numbers(wb)
    if na is not None or nb is not None or (numbers_a and numbers_b and numbers_a != numbers_b):
        return Verdict(False, "number")
    return Verdict(None, "no rule")


def equivalent(a: str, b: str) -> bool:
    """Whether the rules (``rule_verdict``) say answers ``a`` and ``b`` say the same."""
    return rule_verdict(a, b).same is True


class Fallback(Protocol):
    """A second opinion where the rules cannot tell. ``name`` is what the trace calls it."""

    name: str

    async def same(self, a: str, b: str, question: str = "") -> tuple[bool, float]:
        """Whether final answers ``a`` and ``b`` (to ``question``, when given) say the same, and
        the evidence (a similarity or a probability). Raises when it cannot tell."""
        ...


class EmbeddingSimilarity:
    """Two answers are the same when their embeddings' cosine similarity is at least
    ``min_similarity``. ``load`` builds the embedder (``legion.engine.embedding.Embedder`` or any
    object whose ``embed(texts)`` returns unit vectors) on first use, in a worker thread; if it
    fails, every later call raises ``FallbackUnavailable`` with the reason, without retrying."""

    name = "embedding"

    def __init__(self, load: Callable[[], Any] | None = None, *, min_similarity: float = 0.8):
        self._load = load or _bundled_embedder
        self.min_similarity = min_similarity
        self._embedder: Any = None
        self._load_error: str | None = None
        self._lock = threading.Lock()

    def load(self) -> str | None:
        """Load the embedder now, if it is not loaded (blocking; once): None, or why it failed."""
        with self._lock:
            self._load_once()
            return self._load_error

    def _load_once(self) -> None:
        if self._embedder is None and self._load_error is None:
            try:
                self._embedder = self._load()
            except Exception as exc:  # torch missing, model files missing, out of memory
                self._load_error = f"the embedding model could not load ({type(exc).__name__}: {exc})"
                log.warning("answer equivalence falls back to the rules only: %s", self._load_error)

    def _embed(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            self._load_once()
            if self._embedder is None:
                raise FallbackUnavailable(self._load_error or "no embedder")
            return self._embedder.embed(texts)

    async def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of ``a`` and ``b``'s embeddings."""
        va, vb = await asyncio.to_thread(self._embed, [a, b])
        return float(sum(x * y for x, y in zip(va, vb, strict=True)))

    async def same(self, a: str, b: str, question: str = "") -> tuple[bool, float]:
        sim = await self.similarity(a, b)
        return sim >= self.min_similarity, round(sim, 4)


def _bundled_embedder() -> Any:
    from legion.engine.embedding import Embedder

    return Embedder(threads=1)


class _Scorer(Protocol):
    async def score(self, agent: str, task: str, context: str, continuations: list[str]) -> list[Any]: ...


_YES = (" yes", " Yes")
_NO = (" no", " No")


def judge_question(a: str, b: str, question: str = "") -> str:
    """What ``AgentJudge`` asks each agent (its prompt renders it like any task)."""
    about = f' to the question "{question.strip()}"' if question.strip() else ""
    return f'Do the answers "{a}" and "{b}"{about} say the same thing? Answer yes or no.'


class AgentJudge:
    """The agents' own judgement: each agent named in ``judges`` scores " yes" and " no" (both
    cases, their probability mass summed) after ``judge_question``; the answers are the same
    when more than half of the agents that answered put more mass on yes. The evidence is the
    mean yes-probability (yes mass over yes and no mass). Agents that fail or take longer than
    ``timeout_s`` do not count; when none answers, ``same`` raises ``FallbackUnavailable``."""

    name = "judge"

    def __init__(self, agents: _Scorer, judges: Sequence[str], *, timeout_s: float | None = None):
        self._agents = agents
        self.judges = list(judges)
        self._timeout_s = timeout_s

    async def yes_probabilities(self, a: str, b: str, question: str = "") -> dict[str, float]:
        """Each answering judge's P(yes) (yes mass over yes and no mass)."""
        prompt = judge_question(a, b, question)
        conts = [*_YES, *_NO]

        async def ask(agent: str) -> list[Any]:
            return await asyncio.wait_for(self._agents.score(agent, prompt, "", conts), self._timeout_s)

        got = await asyncio.gather(*(ask(j) for j in self.judges), return_exceptions=True)
        out: dict[str, float] = {}
        errors: list[str] = []
        for agent, result in zip(self.judges, got, strict=True):
            if isinstance(result, BaseException):
                errors.append(f"{agent}: {type(result).__name__}: {result}")
                continue
            lp = [s.logprob for s in result]
            yes, no = _logsumexp(lp[: len(_YES)]), _logsumexp(lp[len(_YES) :])
            out[agent] = 1.0 / (1.0 + math.exp(no - yes))
        if not out:
            raise FallbackUnavailable("no agent judged the answers: " + ("; ".join(errors) or "no judges"))
        return out

    async def same(self, a: str, b: str, question: str = "") -> tuple[bool, float]:
        p = await self.yes_probabilities(a, b, question)
        yes = sum(v > 0.5 for v in p.values())
        return 2 * yes > len(p), round(sum(p.values()) / len(p), 4)


def _logsumexp(xs: list[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


class FallbackUnavailable(RuntimeError):
    """A fallback cannot judge (its model did not load, no agent answered)."""


@dataclass
class AnswerGroup:
    """Answers found equivalent: the group's vote key, and each member with what joined it to
    the group's first member (``None`` for the first)."""

    key: str
    members: list[tuple[Candidate, Verdict | None]]

    def trace(self) -> dict:
        """The shape the trace and the console read: ``{"key", "members": [{"agent", "text",
        "via", "score"}]}``."""
        return {
            "key": self.key,
            "members": [
                {
                    "agent": c.agent,
                    "text": c.text,
                    "via": v.via if v else None,
                    "score": v.score if v else None,
                }
                for c, v in self.members
            ],
        }


@dataclass
class Grouping:
    """The outcome of grouping: ``candidates`` with every answering one's ``normalized`` set to
    its group's key, the ``groups`` that joined different answers, every fallback comparison
    made (``checked``: ``{"a", "b", "via", "score", "same"}``), and why the fallback was given up
    (``fallback_error``; the rules' verdicts stand)."""

    candidates: list[Candidate]
    groups: list[AnswerGroup]
    checked: list[dict] = field(default_factory=list)
    fallback_error: str | None = None

    def trace(self) -> dict:
        """The data of the ``equivalent_answers`` trace event."""
        out: dict[str, Any] = {"groups": [g.trace() for g in self.groups]}
        if self.checked:
            out["checked"] = self.checked
        return out


def _assemble(
    candidates: Sequence[Candidate], groups: list[list[tuple[Candidate, Verdict | None]]]
) -> Grouping:
    key_of: dict[int, str] = {}
    merged: list[AnswerGroup] = []
    for g in groups:
        keys = [_key(c.text) or c.normalized for c, _ in g]
        key = min(keys, key=len)  # the shortest final answer, ties to the first
        for c, _ in g:
            key_of[id(c)] = key
        if len({c.normalized for c, _ in g}) > 1:
            merged.append(AnswerGroup(key, g))
    out = [c.model_copy(update={"normalized": key_of[id(c)]}) if id(c) in key_of else c for c in candidates]
    return Grouping(out, merged)


class Equivalence:
    """Groups free-text answers: the rules first (cheap, exact); where they cannot tell, the
    ``fallback`` (none: rules only). A candidate joins the first group whose first member the
    rules join it to, else the first whose first member the fallback does (a chain of partial
    overlaps does not merge everything); a group's key is its shortest final answer. Failed and
    empty candidates keep theirs. The fallback is asked once per pair of distinct answers, for
    one candidate's groups at once; after it fails it is not asked again in that grouping."""

    def __init__(self, fallback: Fallback | None = None):
        self.fallback = fallback

    @property
    def mode(self) -> str:
        """``rules``, or the fallback's name (as ``arbiter.equivalence`` calls it)."""
        return self.fallback.name if self.fallback else "rules"

    async def verdict(self, a: str, b: str, question: str = "") -> Verdict:
        """The rules' verdict on ``a`` and ``b``, or, where they cannot tell, the fallback's
        (which raises when it cannot judge)."""
        v = rule_verdict(a, b)
        if v.same is not None or self.fallback is None:
            return v
        same, score = await self.fallback.same(final_answer(a), final_answer(b), question)
        return Verdict(same, self.fallback.name, score)

    async def judge(self, answer: str, reference: str, question: str = "") -> bool:
        """Whether ``answer`` says what ``reference`` says (an eval's judge). Raises when the
        fallback cannot judge."""
        return (await self.verdict(answer, reference, question)).same is True

    async def group(self, candidates: Sequence[Candidate], question: str = "") -> Grouping:
        """``candidates`` (answers to ``question``) grouped; a fallback that fails is reported in
        ``fallback_error``, never raised."""
        groups: list[list[tuple[Candidate, Verdict | None]]] = []
        asked: dict[tuple[str, str], Verdict] = {}
        checked: list[dict] = []
        error: str | None = None
        for c in candidates:
            if not c.ok or not c.normalized:
                continue
            verdicts = [rule_verdict(g[0][0].text, c.text) for g in groups]
            home = next((i for i, v in enumerate(verdicts) if v.same), None)
            if home is None and self.fallback is not None and error is None:
                open_ = [i for i, v in enumerate(verdicts) if v.same is None]
                try:
                    found = await self._ask(c, [groups[i][0][0] for i in open_], asked, checked, question)
                except Exception as exc:
                    error = (
                        str(exc) if isinstance(exc, FallbackUnavailable) else f"{type(exc).__name__}: {exc}"
                    )
                    log.warning("answer equivalence: the %s fallback failed: %s", self.fallback.name, error)
                    found = []
                for i, v in zip(open_, found, strict=False):
                    verdicts[i] = v
                home = next((i for i, v in enumerate(verdicts) if v.same), None)
            if home is None:
                groups.append([(c, None)])
            else:
                groups[home].append((c, verdicts[home]))
        out = _assemble(candidates, groups)
        out.checked, out.fallback_error = checked, error
        return out

    async def _ask(
        self,
        c: Candidate,
        firsts: list[Candidate],
        asked: dict[tuple[str, str], Verdict],
        checked: list[dict],
        question: str,
    ) -> list[Verdict]:
        assert self.fallback is not None
        a_of = [final_answer(f.text) for f in firsts]
        b = final_answer(c.text)
        todo = {(a, b) for a in a_of if (a, b) not in asked}

        async def one(pair: tuple[str, str]) -> None:
            same, score = await self.fallback.same(*pair, question)
            asked[pair] = Verdict(same, self.fallback.name, score)
            checked.append(
                {"a": pair[0], "b": pair[1], "via": self.fallback.name, "score": score, "same": same}
            )

        await asyncio.gather(*(one(p) for p in sorted(todo)))
        return [asked[(a, b)] for a in a_of]


def canonical(candidates: Sequence[Candidate]) -> tuple[list[Candidate], dict[str, list[str]]]:
    """``candidates`` grouped by the rules alone (``Equivalence`` without a fallback, but
    synchronous), and the groups that joined different answers (``{key: [texts]}``)."""
    groups: list[list[tuple[Candidate, Verdict | None]]] = []
    for c in candidates:
        if not c.ok or not c.normalized:
            continue
        for g in groups:
            v = rule_verdict(g[0][0].text, c.text)
            if v.same:
                g.append((c, v))
                break
        else:
            groups.append([(c, None)])
    out = _assemble(candidates, groups)
    return out.candidates, {g.key: [c.text for c, _ in g.members] for g in out.groups}
