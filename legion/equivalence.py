"""Free-text answers: when two say the same thing, and where one ends.

Votes count answers, so equivalent answers must fall in one group: ``"4"`` and ``"2 + 2 = 4"``,
``"madrid"`` and ``"The capital of Spain is Madrid."``, ``"dog."`` and ``"The lazy dog."``.
``equivalent`` compares the final answers two texts state (after an ``=`` or an "answer is"
marker), as numbers when both are numbers, else by containment of one's words in the other's
(never across a negation the shorter one lacks). ``canonical`` groups candidates by it and
gives every member its group's key. ``prompt_markers`` lists the stop sequences a completion
template implies, so that an agent stops where its prompt's next turn would begin.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from legion.messages import Candidate
from legion.strategies import normalize_answer

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
_TEMPLATE_MARKER = re.compile(r"(?m)^([A-Z][A-Za-z]{0,19}(?: [A-Za-z]{1,20}){0,2}):")


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


def equivalent(a: str, b: str) -> bool:
    """Whether answers ``a`` and ``b`` say the same: equal final answers, equal numbers, or one
    final answer's words found in order in the other's (with a word that is not a stopword,
    no negation in the longer that the shorter lacks, and not one of several alternatives the
    longer lists: "wind" is not "coal; wind; oil")."""
    ka, kb = _key(a), _key(b)
    if not ka or not kb:
        return False
    if ka == kb:
        return True
    na, nb = _as_number(ka), _as_number(kb)
    if na is not None and nb is not None:
        return na == nb
    finals = sorted((final_answer(a), final_answer(b)), key=lambda t: len(normalize_answer(t).split()))
    if lists_alternatives(finals[1]):
        return False
    short, long = sorted((ka.split(), kb.split()), key=len)
    if not any(w not in _STOPWORDS and w not in _NEGATIONS for w in short):
        return False
    if (set(long) & _NEGATIONS) - set(short):
        return False
    return _contains(short, long)


def canonical(candidates: Sequence[Candidate]) -> tuple[list[Candidate], dict[str, list[str]]]:
    """``candidates`` with every answering one's ``normalized`` set to its group's key, and the
    groups that joined different answers (``{key: [texts]}``, for the trace).

    A candidate joins the first group it is equivalent to (compared with the group's first
    member, so a chain of partial overlaps does not merge everything); a group's key is the
    shortest final answer among its members, ties to the first."""
    groups: list[list[Candidate]] = []
    for c in candidates:
        if not c.ok or not c.normalized:
            continue
        for g in groups:
            if equivalent(g[0].text, c.text):
                g.append(c)
                break
        else:
            groups.append([c])
    key_of: dict[int, str] = {}
    merged: dict[str, list[str]] = {}
    for g in groups:
        keys = [_key(c.text) or c.normalized for c in g]
        key = min(keys, key=len)
        for c in g:
            key_of[id(c)] = key
        if len({c.normalized for c in g}) > 1:
            merged[key] = [c.text for c in g]
    out = [c.model_copy(update={"normalized": key_of[id(c)]}) if id(c) in key_of else c for c in candidates]
    return out, merged


def prompt_markers(template: str) -> list[str]:
    """Stop sequences a completion template implies: ``"\\nAnswer:"`` and ``"\\nQuestion:"`` for
    ``"Question: {task}\\nAnswer:"``. A base model that has answered goes on to write the
    prompt's next turn; its own markers end the answer there."""
    plain = re.sub(r"\{[a-z_]+\}", "", template)
    return list(dict.fromkeys(f"\n{m}:" for m in _TEMPLATE_MARKER.findall(plain)))
