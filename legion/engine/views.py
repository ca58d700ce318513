"""Views of a multiple-choice item: how the item is put to the model (``prompt_form``), which
solved training items come before it (``few_shot``, ``few_shot_seed``) and how choice
log-likelihoods become scores (``scoring``, ``apply_rule``).

Items (``Item``, read from the eval format by ``load_items``): ``context`` usually
``"...Question: q\\nAnswer:"`` (the lm-evaluation-harness form), and the scored text of choice
``i`` is ``context + " " + choices[i]``. Every function here is pure: a serving agent
(``legion.agent.Agent.score_choices``) and ``legion eval`` (``legion.evaluation.multiple_choice``)
build the same scoring calls with ``view_calls`` and turn their results into the same scores
with ``view_scores``, so a task's choices and an eval item are scored alike.
"""

from __future__ import annotations

import json
import random
import re
import string
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from legion.errors import InvalidRequest

_QA = re.compile(r"^(?P<pre>.*?)Question:[ \t]*(?P<q>.*?)\s*\n[ \t]*Answer:[ \t]*$", re.DOTALL)
LETTERS = string.ascii_uppercase
CONTENT_FREE = "N/A"  # the content-free input of contextual calibration (Zhao et al., 2021)
# Domain premise of PMI scoring (Holtzman et al., 2021): what precedes an answer without its
# question, in the view's own form.
_PREMISE = {"qa": "Answer:", "letters": "Answer:", "cloze": ""}


@dataclass
class Item:
    """One multiple-choice item; the scored text of choice ``i`` is ``context + " " + choices[i]``."""

    id: str
    context: str
    choices: list[str]
    answer: int


def load_items(path: str | Path, limit: int | None = None) -> list[Item]:
    """The items of a JSONL file in file order (the first ``limit``); a bad line raises
    ``InvalidRequest`` naming its line number and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise InvalidRequest(f"data file {p} does not exist")
    items: list[Item] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            items.append(parse_item(line, lineno, p))
    if not items:
        raise InvalidRequest(f"{p} holds no items: one JSON object per line is expected")
    return items


def parse_item(line: str, lineno: int, path: Path) -> Item:
    where = f"{path}:{lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise InvalidRequest(f"{where}: each line must be a JSON object")
    for key in ("context", "choices", "answer"):
        if key not in row:
            raise InvalidRequest(f"{where}: missing field {key!r} (need context, choices, answer)")
    context, choices, answer = row["context"], row["choices"], row["answer"]
    if not isinstance(context, str):
        raise InvalidRequest(f"{where}: 'context' must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise InvalidRequest(f"{where}: 'choices' must be a list of at least two strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise InvalidRequest(
            f"{where}: 'answer' must be an index into choices (0..{len(choices) - 1}), got {answer!r}"
        )
    return Item(id=str(row.get("id", lineno)), context=context, choices=choices, answer=answer)


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


def apply_rule(
    rule: str,
    loglik: Sequence[float],
    n_tokens: Sequence[int],
    n_bytes: Sequence[int],
    reference: Sequence[float] | None = None,
) -> list[float]:
    """Each choice's score under ``rule`` (higher is better), on the scale of a summed
    log-likelihood: per-token and per-byte means are multiplied back by the choices' mean
    length, so a softmax over the scores is as sharp as one over raw log-likelihoods.
    ``reference`` is the log-likelihood after the premise (``pmi``) or the content-free
    prompt (``calibrated``)."""
    if rule == "sum":
        return list(loglik)
    if rule in ("per_token", "per_byte"):
        lengths = n_tokens if rule == "per_token" else n_bytes
        mean = sum(lengths) / len(lengths)
        return [x / max(1, n) * mean for x, n in zip(loglik, lengths, strict=True)]
    if rule in ("pmi", "calibrated"):
        if reference is None:
            raise ValueError(f"scoring rule {rule!r} needs the reference log-likelihoods")
        return [x - r for x, r in zip(loglik, reference, strict=True)]
    raise ValueError(f"unknown scoring rule {rule!r}")


def needs_reference(rule: str) -> bool:
    return rule in ("pmi", "calibrated")


def question_item(task: str, choices: Sequence[str]) -> Item:
    """A task and its choices as an item of the eval format (``Question: task\\nAnswer:``), the
    form every view renders from; ``answer`` is unknown (-1)."""
    return Item(id="task", context=f"Question: {task}\nAnswer:", choices=list(choices), answer=-1)


def view_calls(view: Any, prefix: str, item: _ItemLike) -> list[tuple[str, list[str]]]:
    """The scoring calls of ``view`` (its ``prompt_form`` and ``scoring``) on ``item`` after
    ``prefix`` (its role prompt and exemplars): its rendering of the item, then the reference
    its rule divides by, if any (PMI's premise, or calibration's content-free prompt)."""
    main = render(item, view.prompt_form)
    out = [(prefix + main.context, main.continuations)]
    if view.scoring == "pmi":
        out.append((premise(view.prompt_form), main.continuations))
    elif view.scoring == "calibrated":
        cf = content_free(item, view.prompt_form)
        out.append((prefix + cf.context, cf.continuations))
    return out


def view_scores(
    scoring: str,
    calls: Sequence[tuple[str, Sequence[str]]],
    logprobs: Sequence[Sequence[float]],
    n_tokens: Sequence[int],
) -> list[float]:
    """The choices' scores under ``scoring`` from the log-likelihoods of each of ``view_calls``'
    calls (``logprobs[k]`` for call ``k``) and the first call's token counts."""
    n_bytes = [len(c.encode("utf-8")) for c in calls[0][1]]
    reference = logprobs[1] if len(logprobs) > 1 else None
    return apply_rule(scoring, logprobs[0], n_tokens, n_bytes, reference)
