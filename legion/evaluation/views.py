"""Agents as different views of a multiple-choice item: how the item is put to the model
(``prompt_form``), which solved training items come before it (``few_shot``,
``few_shot_seed``) and how choice log-likelihoods become scores (``scoring``).

Items are ``legion.evaluation.multiple_choice.Item``s: ``context`` usually ``"...Question: q\\nAnswer:"`` (the
lm-evaluation-harness form), and the scored text of choice ``i`` is ``context + " " +
choices[i]``. Every function here is pure; ``legion.evaluation.multiple_choice`` runs the model.
"""

from __future__ import annotations

import random
import re
import string
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

_QA = re.compile(r"^(?P<pre>.*?)Question:[ \t]*(?P<q>.*?)\s*\n[ \t]*Answer:[ \t]*$", re.DOTALL)
LETTERS = string.ascii_uppercase
CONTENT_FREE = "N/A"  # the content-free input of contextual calibration (Zhao et al., 2021)
# Domain premise of PMI scoring (Holtzman et al., 2021): what precedes an answer without its
# question, in the view's own form.
_PREMISE = {"qa": "Answer:", "letters": "Answer:", "cloze": ""}


class _ItemLike(Protocol):
    context: str
    choices: list[str]
    answer: int


@dataclass(frozen=True)
class Rendered:
    """One item as a view puts it: the context and the continuations it scores."""

    context: str
    continuations: list[str]


def split_question(context: str) -> tuple[str, str] | None:
    """``(preamble, question)`` of a ``"...Question: q\\nAnswer:"`` context; ``None`` when the
    context has no such markers (a cloze set such as HellaSwag)."""
    m = _QA.match(context)
    return (m.group("pre"), m.group("q")) if m else None


def render(item: _ItemLike, form: str) -> Rendered:
    """``item`` in ``form``. A context without question markers is taken as the question."""
    parts = split_question(item.context)
    pre, q = parts if parts is not None else ("", item.context)
    conts = [" " + c for c in item.choices]
    if form == "qa":
        return Rendered(item.context, conts)
    if form == "cloze":
        return Rendered(f"{pre}{q}", conts)
    if form == "letters":
        head = f"{pre}Question: {q}\n" if parts is not None else f"{q}\n"
        letters = _letters(len(item.choices))
        return Rendered(head + _listed(item.choices) + "Answer:", letters)
    raise ValueError(f"unknown prompt form {form!r}; use qa, cloze or letters")


def _letters(n: int) -> list[str]:
    if n > len(LETTERS):
        raise ValueError(f"the letters form takes at most {len(LETTERS)} choices, got {n}")
    return [" " + LETTERS[i] for i in range(n)]


def _listed(choices: Sequence[str]) -> str:
    return "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(choices))


def solved(item: _ItemLike, form: str) -> str:
    """``item`` in ``form`` with its correct answer, as a few-shot exemplar block."""
    r = render(item, form)
    return f"{r.context}{r.continuations[item.answer]}\n\n"


def exemplar_seed(agent: Any) -> int:
    """The agent's ``few_shot_seed``, or one derived from its name."""
    seed = getattr(agent, "few_shot_seed", None)
    return seed if seed is not None else zlib.crc32(agent.name.encode())


def exemplar_items(agent: Any, pool: Sequence[_ItemLike]) -> list[_ItemLike]:
    """The ``few_shot`` training items the agent draws from ``pool`` with its seed."""
    k = getattr(agent, "few_shot", 0)
    if not k or not pool:
        return []
    rng = random.Random(exemplar_seed(agent))
    return rng.sample(list(pool), min(k, len(pool)))


def exemplars(agent: Any, pool: Sequence[_ItemLike]) -> str:
    """The agent's few-shot block: ``few_shot`` training items drawn with its seed, each in
    its prompt form with its correct answer."""
    form = getattr(agent, "prompt_form", "qa")
    return "".join(solved(x, form) for x in exemplar_items(agent, pool))


def premise(form: str) -> str:
    """The question-free premise PMI scoring divides by, in ``form``."""
    return _PREMISE[form]


def content_free(item: _ItemLike, form: str) -> Rendered:
    """The item's input replaced by the content-free one, in ``form``: its question (and any
    preamble) and, in the letters form, the listed choices, which leaves the prior over
    letters; in the other forms the item's own choices are scored."""
    cf = CONTENT_FREE
    if form == "qa":
        return Rendered(f"Question: {cf}\nAnswer:", [" " + c for c in item.choices])
    if form == "cloze":
        return Rendered(cf, [" " + c for c in item.choices])
    if form == "letters":
        letters = _letters(len(item.choices))
        return Rendered(f"Question: {cf}\n" + _listed([cf] * len(letters)) + "Answer:", letters)
    raise ValueError(f"unknown prompt form {form!r}; use qa, cloze or letters")
