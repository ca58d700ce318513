"""Chat prompts: a model's own chat template (``tokenizer.chat_template`` in its GGUF), or one we
name or the config gives inline, rendered with Jinja2 in a sandbox.

``read_model_chat_info`` reads what a GGUF says about chat (its template, BOS/EOS/EOT tokens,
its end-of-generation set) through llama.cpp itself, loading the vocabulary only.
``chat_template_for`` picks an agent's template and checks it at start-up; ``ChatTemplate.render``
turns chat turns into the prompt text. Templates run in Jinja's immutable sandbox: they cannot
reach Python internals or change the messages they are given.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError, TemplateSyntaxError, meta
from jinja2.exceptions import SecurityError

from legion.chat_formats import NAMED_TEMPLATES, sandbox_environment
from legion.errors import ConfigError, InvalidRequest, ModelLoadError
from legion.messages import ChatTurn

if TYPE_CHECKING:
    from legion.config import AgentConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelChatInfo:
    """What a GGUF says about chat, as llama.cpp reads it."""

    path: str
    architecture: str  # general.architecture, e.g. "llama", "gemma3"
    template: str | None  # tokenizer.chat_template; None when the file has none
    bos_token: str  # the BOS token's text ("" when the model has none)
    eos_token: str
    eot_token: str  # the end-of-turn token's text ("" when the model names none)
    eog_ids: tuple[int, ...]  # every token llama.cpp ends generation at (llama_vocab_is_eog)
    eog_tokens: tuple[str, ...]  # their texts
    add_bos: bool  # llama.cpp puts BOS before a prompt itself
    # Text -> id of every token llama.cpp parses out of text only when asked to (CONTROL and
    # UNKNOWN attributes): the markers a template writes, which user text must never produce.
    control_tokens: tuple[tuple[str, int], ...] = ()


_backend_lock = threading.Lock()
_backend_ready = False


def read_model_chat_info(path: str | Path) -> ModelChatInfo:
    """Read a GGUF's chat metadata and end-of-generation tokens through llama.cpp.

    Loads the vocabulary only (no weights): about half a second for Gemma's 262k tokens.
    """
    import ctypes

    import llama_cpp as lc
    from llama_cpp import _logger as lc_logger

    global _backend_ready
    path = str(path)
    if not Path(path).is_file():
        raise ModelLoadError(f"model file {path} does not exist; fix model_path")
    lc_logger.set_verbose(False)
    with _backend_lock:
        if not _backend_ready:
            lc.llama_backend_init()
            _backend_ready = True
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(path.encode(), params)
    if not model:
        raise ModelLoadError(f"llama.cpp could not read {path}: is it a GGUF model file?")
    try:
        vocab = lc.llama_model_get_vocab(model)

        def text(tok: int) -> str:
            if tok < 0:
                return ""
            return lc.llama_vocab_get_text(vocab, tok).decode("utf-8", errors="replace")

        buf = ctypes.create_string_buffer(256)
        n = lc.llama_model_meta_val_str(model, b"general.architecture", buf, len(buf))
        arch = buf.value.decode("utf-8", errors="replace") if n >= 0 else ""
        raw = lc.llama_model_chat_template(model, None)
        template = raw.decode("utf-8", errors="replace") if raw else None
        # No call lists the end-of-generation set or the control tokens; ask about every token
        # (0.3 s for 262k).
        special = lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_UNKNOWN
        eog, control = [], []
        for t in range(lc.llama_vocab_n_tokens(vocab)):
            if lc.llama_vocab_is_eog(vocab, t):
                eog.append(t)
            if lc.llama_vocab_get_attr(vocab, t) & special and (piece := text(t)):
                control.append((piece, t))
        return ModelChatInfo(
            path=path,
            architecture=arch,
            template=template,
            bos_token=text(lc.llama_vocab_bos(vocab)),
            eos_token=text(lc.llama_vocab_eos(vocab)),
            eot_token=text(lc.llama_vocab_eot(vocab)),
            eog_ids=tuple(eog),
            eog_tokens=tuple(text(t) for t in eog),
            add_bos=bool(lc.llama_vocab_get_add_bos(vocab)),
            control_tokens=tuple(control),
        )
    finally:
        lc.llama_model_free(model)


_SYSTEM_PROBE = "LEGION-SYSTEM-PROBE"


class ChatTemplate:
    """One chat template, compiled, with the tokens it renders and the text stops it needs.

    ``stop`` holds the end-of-turn markers of a named template as text, for a model that spells
    them out instead of having them as tokens; the model's end-of-generation tokens themselves
    (``eog_ids``) end generation in the engine (``llama_vocab_is_eog``), not as text.
    """

    def __init__(
        self,
        source: str,
        *,
        name: str = "inline",
        bos_token: str = "",
        eos_token: str = "",
        stop: Sequence[str] = (),
        strip_bos: bool = False,
        eog_ids: Sequence[int] = (),
        control_tokens: Sequence[tuple[str, int]] = (),
    ):
        try:
            self._template = sandbox_environment().from_string(source)
        except TemplateSyntaxError as exc:
            raise ValueError(
                f"chat template {name} is not valid Jinja (line {exc.lineno}: {exc.message})"
            ) from None
        self.source = source
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.stop = tuple(stop)
        self.eog_ids = tuple(eog_ids)
        self._strip_bos = strip_bos and bool(bos_token)
        self._control = dict(control_tokens)
        # Longest first, as llama.cpp matches them (``<|im_start|>`` before ``<|im``).
        marks = sorted(self._control, key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, marks))) if marks else None
        self._unsplit_warned = False
        self.supports_system = self._probe_system()
        # A template that reads a ``tools`` variable renders function definitions itself, in its
        # model's own format (Qwen's, Llama 3.1's, Hermes'); others get Legion's rendering.
        self.takes_tools = "tools" in meta.find_undeclared_variables(sandbox_environment().parse(source))

    def render(
        self,
        turns: Sequence[ChatTurn | Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt text for ``turns``; ``add_generation_prompt`` opens the assistant's turn.

        A template without a system role gets the system text at the start of the first user
        turn. Raises ``InvalidRequest`` when the template refuses the conversation (its
        ``raise_exception``, for instance roles that do not alternate) or reaches for
        something the sandbox forbids. ``tools`` (OpenAI function definitions) reach a template
        that ``takes_tools``.
        """
        return self._checked_render(self._messages(turns), add_generation_prompt, tools)

    def render_pieces(
        self,
        turns: Sequence[ChatTurn | Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[str | int]:
        """The prompt of ``render`` as the engine should read it: the control tokens the
        template itself writes (``<start_of_turn>``, ``<|im_start|>``) as token ids, and
        everything else as text to tokenize without parsing control tokens.

        The messages' text is never searched for control tokens, so no text a user sends can
        become one, whatever the model's vocabulary. To tell the template's text from the
        messages', the template is rendered a second time with a random marker in place of each
        message; if putting the messages back does not give ``render``'s text (a template that
        rewrites or inspects the content), the whole prompt is text (no control tokens: safe,
        but the model reads its markers spelled out), with a warning.
        """
        messages = self._messages(turns)
        text = self._checked_render(messages, add_generation_prompt, tools)
        marks = {f"\ue000{secrets.token_hex(8)}\ue001": m["content"] for m in messages}
        masked = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
        try:
            shape = self._render(masked, add_generation_prompt, tools)
        except TemplateError:
            shape = None
        parts: list[tuple[str, bool]] = []  # (text, written by the template)
        if shape is not None:
            if self._strip_bos and shape.startswith(self.bos_token):
                shape = shape[len(self.bos_token) :]
            split = re.split("(" + "|".join(map(re.escape, marks)) + ")", shape) if marks else [shape]
            parts = [(marks.get(p, p), p not in marks) for p in split if p]
        if shape is None or "".join(p for p, _ in parts) != text:
            if not self._unsplit_warned:
                self._unsplit_warned = True
                log.warning(
                    "chat template %s changes the messages' text as it renders them: its control "
                    "tokens are read as plain text (user text cannot forge them either way)",
                    self.name,
                )
            return [text] if text else []
        pieces: list[str | int] = []
        for part, by_template in parts:
            for piece in self._split_control(part) if by_template else [part]:
                if isinstance(piece, str) and pieces and isinstance(pieces[-1], str):
                    pieces[-1] += piece  # one run of text, as llama.cpp tokenizes it
                elif piece != "":
                    pieces.append(piece)
        return pieces

    def _split_control(self, text: str) -> list[str | int]:
        if self._control_re is None:
            return [text]
        out: list[str | int] = []
        at = 0
        for m in self._control_re.finditer(text):
            out += [text[at : m.start()], self._control[m.group()]]
            at = m.end()
        out.append(text[at:])
        return out

    def _messages(self, turns: Sequence[ChatTurn | Mapping[str, str]]) -> list[dict[str, str]]:
        messages = [_as_message(t) for t in turns]
        return messages if self.supports_system else _fold_system(messages)

    def _checked_render(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        try:
            out = self._render(messages, add_generation_prompt, tools)
        except SecurityError as exc:
            raise InvalidRequest(
                f"chat template {self.name} tried something the sandbox forbids ({exc}); fix the template"
            ) from None
        except TemplateError as exc:
            raise InvalidRequest(f"chat template {self.name} refused the conversation: {exc}") from None
        if self._strip_bos and out.startswith(self.bos_token):
            # llama.cpp puts BOS before the prompt itself; a second one confuses the model.
            out = out[len(self.bos_token) :]
        return out

    def _render(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        extra = {"tools": [dict(t) for t in tools]} if tools and self.takes_tools else {}
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **extra,
        )

    def _probe_system(self) -> bool:
        """Whether the template shows a system message (itself, or folded into a user turn)."""
        probe = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hi"}]
        try:
            return _SYSTEM_PROBE in self._render(probe, True)
        except TemplateError:
            return False


def _as_message(t: ChatTurn | Mapping[str, str]) -> dict[str, str]:
    if isinstance(t, ChatTurn):
        return {"role": t.role, "content": t.content}
    return {"role": str(t["role"]), "content": str(t["content"])}


def _fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if not system:
        return rest
    lead = "\n\n".join(s.strip() for s in system if s.strip())
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{lead}\n\n{m['content']}" if lead else m["content"]
            return rest
    return [{"role": "user", "content": lead}, *rest]


def _missing_template_message(agent: str, info: ModelChatInfo) -> str:
    model = Path(info.path).name
    hint = ""
    if info.architecture.startswith("gemma"):
        hint = f" For this {info.architecture} model: chat_template: gemma."
    return (
        f"agent {agent}: prompt_format is chat, but its model {model} ({info.architecture or 'unknown'}) "
        f"carries no tokenizer.chat_template in its GGUF metadata. Set chat_template to a named "
        f"template ({', '.join(sorted(NAMED_TEMPLATES))}) or to an inline Jinja template, or set "
        f"prompt_format: completion.{hint}"
    )


def chat_template_for(cfg: AgentConfig, info: ModelChatInfo) -> ChatTemplate:
    """The agent's chat template, checked: its ``chat_template`` (a name or inline Jinja), else
    the model's own. Raises ``ConfigError`` naming the agent when there is none or it cannot
    render a conversation."""
    choice = cfg.chat_template
    if choice is None:
        if not info.template:
            raise ConfigError(_missing_template_message(cfg.name, info))
        name, source, stop = f"{Path(info.path).name}:tokenizer.chat_template", info.template, ()
    elif choice in NAMED_TEMPLATES:
        named = NAMED_TEMPLATES[choice]
        name, source, stop = choice, named.source, named.stop
    else:
        name, source, stop = "inline", choice, ()
    try:
        tpl = ChatTemplate(
            source,
            name=name,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
            stop=stop,
            strip_bos=info.add_bos,
            eog_ids=info.eog_ids,
            control_tokens=info.control_tokens,
        )
        sample = [
            ChatTurn(role="system", content="You are terse."),
            ChatTurn(role="user", content="Hi."),
            ChatTurn(role="assistant", content="Hello."),
            ChatTurn(role="user", content="What is 2+2?"),
        ]
        with_prompt = tpl.render(sample, add_generation_prompt=True)
        without = tpl.render(sample, add_generation_prompt=False)
    except (ValueError, InvalidRequest) as exc:
        msg = exc.message if isinstance(exc, InvalidRequest) else str(exc)
        raise ConfigError(f"agent {cfg.name}: {msg}") from None
    if with_prompt == without:
        log.warning(
            "agent %s: chat template %s ignores add_generation_prompt; replies may not start "
            "an assistant turn",
            cfg.name,
            name,
        )
    if not info.eog_ids:
        log.warning("agent %s: model %s names no end-of-generation token", cfg.name, info.path)
    return tpl
