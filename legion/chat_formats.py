"""Chat template sources: the chat formats Legion names (``chatml``, ``llama3``, ``gemma``) and
the Jinja sandbox every chat template is checked and rendered in.

Shared ground: ``legion.config`` checks a ``chat_template`` value against these while it loads,
and ``legion.engine.chat_template`` renders prompts with the same sandbox. Templates run in
Jinja's immutable sandbox: they cannot reach Python internals or change the messages they are given.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError, TemplateSyntaxError
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


@dataclass(frozen=True)
class NamedTemplate:
    """A chat format written out by us from its documented token layout."""

    source: str
    stop: tuple[str, ...]  # its end-of-turn marker, as text (see ChatTemplate.stop)
    about: str


# Each template renders system, user and assistant turns and, with add_generation_prompt, the
# opening of the assistant's turn. Newlines are explicit ("\n") and no block tag is followed
# by one, so trim_blocks never changes the layout.
NAMED_TEMPLATES: dict[str, NamedTemplate] = {
    "chatml": NamedTemplate(
        source=(
            "{% for message in messages %}"
            "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
            "{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
        stop=("<|im_end|>",),
        about="ChatML (Qwen, Hermes, many fine-tunes): <|im_start|>role ... <|im_end|>",
    ),
    "llama3": NamedTemplate(
        source=(
            "{{ bos_token }}"
            "{% for message in messages %}"
            "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
            "{{ message['content'] | trim }}<|eot_id|>"
            "{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        ),
        stop=("<|eot_id|>",),
        about="Llama 3 / 3.x Instruct: <|start_header_id|>role<|end_header_id|> ... <|eot_id|>",
    ),
    # Gemma has no system role: system text opens the next user turn, as Gemma's own template does.
    "gemma": NamedTemplate(
        source=(
            "{{ bos_token }}"
            "{% set ns = namespace(system='') %}"
            "{% for message in messages %}"
            "{% if message['role'] == 'system' %}"
            "{% set ns.system = ns.system ~ (message['content'] | trim) ~ '\n\n' %}"
            "{% else %}"
            "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
            "{% if message['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
            "{{ message['content'] | trim }}<end_of_turn>\n"
            "{% endif %}"
            "{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
        ),
        stop=("<end_of_turn>",),
        about="Gemma 1/2/3 (-it models, and the bundled Gemma 3 270M): <start_of_turn>role ... <end_of_turn>",
    ),
}


def is_inline_template(value: str) -> bool:
    """Whether a ``chat_template`` config value is Jinja source rather than a template name."""
    return "{{" in value or "{%" in value


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, made strict: reaching for an unsafe attribute is an error
    at once (the stock sandbox renders a bare ``x.__class__`` as an empty string)."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; a prompt wants the JSON as it is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=bool(kw.get("sort_keys")))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_env_lock = threading.Lock()
_env: _Sandbox | None = None


def sandbox_environment() -> _Sandbox:
    global _env
    with _env_lock:
        if _env is None:
            # trim_blocks and lstrip_blocks: the settings chat templates are written for.
            env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            _env = env
        return _env


def check_template_source(source: str) -> None:
    """Compile ``source``; raise ``ValueError`` saying where its Jinja syntax is wrong."""
    try:
        sandbox_environment().from_string(source)
    except TemplateSyntaxError as exc:
        raise ValueError(f"the chat template is not valid Jinja (line {exc.lineno}: {exc.message})") from None
