"""Prompt-injection defence, second layer: a guard flags known injection patterns in user text
and documents. (The first layer, user text and documents put into prompts as data, is
``legion.engine.prompts``.)

``InjectionGuard`` flags known attack phrasings in user input (reported in the trace, or
refused) and in retrieved chunks (dropped, and reported in the trace). It is a pattern list:
it catches the common phrasings in ``tests/data/injections.jsonl`` and misses paraphrases
and encodings (the corpus lists those too); the framing is what still stands then.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from legion.engine.prompts import CONTROL_TOKEN

T = TypeVar("T")

_ZERO_WIDTH = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\u00ad]")
_SPACES = re.compile(r"[ \t\r\f\v]+")


# --------------------------------------------------------------------------- detection
@dataclass(frozen=True)
class _Pattern:
    name: str
    regex: re.Pattern[str]


_BUILTIN: tuple[tuple[str, str], ...] = (
    (
        "override_instructions",
        r"\b(?:ignore|disregard|forget|override|bypass|skip|drop|abandon|neglect)\b[^.\n]{0,40}?"
        r"\b(?:all|any|your|previous|prior|above|earlier|preceding|foregoing|former|original|initial|"
        r"existing|system|developer|safety|current|given|old)\s+(?:[\w'-]+\s+){0,2}?"
        r"(?:instructions?|prompts?|rules|directions|directives|guidelines|guardrails|messages?|context|"
        r"commands?|programming|constraints|restrictions|polic(?:y|ies))\b",
    ),
    (
        "new_instructions",
        r"\b(?:new|updated|real|actual|secret|hidden|override)\s+(?:system\s+)?"
        r"(?:instructions?|directives?|task|prompt)\s*:",
    ),
    (
        "role_override",
        r"\byou\s+are\s+(?:now|no\s+longer)\b|\bfrom\s+now\s+on\b[^.\n]{0,40}\byou\b"
        r"|\b(?:act|behave|respond)\s+as\s+(?:if\s+you\s+(?:are|were)\s+)?(?:an?\s+)?"
        r"(?:unrestricted|unfiltered|uncensored|jailbroken|evil|rogue)\b"
        r"|\bpretend\b[^.\n]{0,40}\b(?:no|without)\s+(?:rules|restrictions|limits|filters|guidelines)\b",
    ),
    (
        "jailbreak_persona",
        r"\b(?:do\s+anything\s+now|developer\s+mode|god\s+mode|jail\s?break(?:ing|ed|s)?|"
        r"dan\s+mode|no\s+(?:restrictions|filters)\s+mode)\b",
    ),
    (
        "prompt_leak",
        r"\b(?:reveal|print|show|repeat|output|display|dump|leak|tell\s+me|give\s+me|what\s+(?:is|are|was|were))"
        r"(?:\s+(?:me|us|all|of|the|your|its|exact|full|entire|verbatim|hidden|secret|original|initial|"
        r"system|developer|above|previous))*"
        r"\s+(?:system\s+prompt|(?:system|hidden|secret|initial|original|developer)\s+"
        r"(?:instructions?|messages?|prompt|rules))\b",
    ),
    (
        "control_tokens",
        CONTROL_TOKEN.pattern + r"|(?:^|\n)\s*#{2,}\s*(?:system|instruction)s?\b",
    ),
    (
        "exfiltration",
        r"\b(?:send|post|upload|forward|transmit|exfiltrate|email|leak)\b[^.\n]{0,60}"
        r"\b(?:api[\s_-]?keys?|secrets?|credentials|passwords?|tokens?|conversation|chat\s+history|"
        r"system\s+prompt)\b[^.\n]{0,40}\b(?:to|at)\s+(?:https?://|\S+@\S+)"
        r"|!\[[^\]]*\]\(https?://[^)\s]*\?[^)\s]*=",
    ),
    (
        "answer_hijack",
        r"\b(?:instead|rather)\b[^.\n]{0,30}\b(?:respond|reply|answer|say|output|print|write)\s+"
        r"(?:only\s+)?(?:with\s+)?[\"'“]"
        r"|\b(?:always|only)\s+(?:respond|reply|answer)\s+with\s+[\"'“]",
    ),
)


def _canonical(text: str) -> str:
    # Obfuscation a pattern should see through: compatibility forms, zero-width characters,
    # runs of spaces. Newlines stay: some patterns anchor on them.
    text = unicodedata.normalize("NFKC", text)
    text = _ZERO_WIDTH.sub("", text)
    return _SPACES.sub(" ", text)


@dataclass(frozen=True)
class Finding:
    """One match: which pattern, and the matched text (shortened)."""

    pattern: str
    excerpt: str

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "excerpt": self.excerpt}


@dataclass
class ChunkScreen(Generic[T]):
    """Chunks kept, and chunks dropped with what flagged them."""

    kept: list[T] = field(default_factory=list)
    dropped: list[tuple[T, list[Finding]]] = field(default_factory=list)


class InjectionGuard:
    """Flags known prompt-injection patterns (built-in plus ``extra_patterns`` regexes)."""

    def __init__(self, extra_patterns: Iterable[str] = (), *, enabled: bool = True):
        self.enabled = enabled
        self._patterns = [_Pattern(n, re.compile(p, re.IGNORECASE)) for n, p in _BUILTIN]
        for i, p in enumerate(extra_patterns):
            self._patterns.append(_Pattern(f"custom_{i}", re.compile(p, re.IGNORECASE)))

    @property
    def pattern_names(self) -> list[str]:
        return [p.name for p in self._patterns]

    def scan(self, text: str) -> list[Finding]:
        """Every pattern that matches ``text`` (at most one finding per pattern)."""
        if not self.enabled or not text:
            return []
        canon = _canonical(text)
        out = []
        for p in self._patterns:
            m = p.regex.search(canon)
            if m:
                out.append(Finding(p.name, m.group(0).strip()[:80]))
        return out

    def scan_all(self, texts: Sequence[str]) -> list[Finding]:
        """Findings over several texts, one per pattern."""
        seen: dict[str, Finding] = {}
        for t in texts:
            for f in self.scan(t):
                seen.setdefault(f.pattern, f)
        return list(seen.values())

    def screen_chunks(self, chunks: Iterable[T], text_of: Callable[[T], str] = str) -> ChunkScreen[T]:
        """Split retrieved chunks into those to keep and those to drop (flagged)."""
        screen: ChunkScreen[T] = ChunkScreen()
        for c in chunks:
            found = self.scan(text_of(c))
            if found:
                screen.dropped.append((c, found))
            else:
                screen.kept.append(c)
        return screen
