"""``legion bench --rag-scale``: the embedded vector stores at 10k, 100k (and 1M) chunks.

For each size and each embedded backend (qdrant-client's local mode, Qdrant Edge), in one run on
the same vectors: upsert throughput (chunks/s; Edge's index build timed apart), query latency
p50/p95 for top-10, and recall@10 against exact search (a NumPy dot product over every vector).
Embedding throughput (chunks/s) is measured on its own, on the real embedding model.

The chunks are generated text (seeded: every run makes the same ones). Embedding a million of
them would take hours on a few cores, so the model embeds ``embed_sample`` chunks for real and
the stores get those embeddings jittered into ``size`` distinct unit vectors: clustered as real
embeddings are (unlike uniform random vectors, on which any approximate index looks worse than
it is), at no model cost. ``embed_all`` embeds every chunk instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from legion.state.chunking import Chunk, chunk_id
from legion.state.vectorstore import StoreLocation, open_store

_WORDS = (
    "harbour lantern ledger orchard granite ferry mill quarry archive beacon tide meadow forge "
    "bridge cellar spire canal loom furnace vineyard glacier marsh citadel causeway foundry "
    "parish tannery observatory aqueduct granary"
).split()
_VERBS = "records lists describes repairs inspects ships stores measures guards maps".split()
_K = 10


def _progress(msg: str) -> None:
    print(f"[bench --rag-scale] {msg}", file=sys.stderr, flush=True)


def generated_chunks(n: int, seed: int = 0) -> list[Chunk]:
    """``n`` chunks of generated text (about 300 characters each), the same for a given seed."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = rng.choice(_WORDS, size=24)
        verbs = rng.choice(_VERBS, size=4)
        sentences = [
            f"The {words[4 * j]} of {words[4 * j + 1]} {verbs[j]} the {words[4 * j + 2]} "
            f"near the {words[4 * j + 3]}, entry {int(rng.integers(1, 10_000))}."
            for j in range(4)
        ]
        out.append(Chunk(source=f"generated/doc-{i // 20:06d}.txt", index=i % 20, text=" ".join(sentences)))
    return out


def jittered(base: np.ndarray, n: int, sigma: float, seed: int) -> np.ndarray:
    """``n`` unit vectors: rows of ``base`` (cycled) plus Gaussian noise of ``sigma`` per
    dimension, renormalised; row ``i < len(base)`` is ``base[i]`` itself."""
    rng = np.random.default_rng(seed)
    reps = base[np.arange(n) % len(base)].astype(np.float32)
    noise = rng.standard_normal(reps.shape, dtype=np.float32) * sigma
    noise[: min(n, len(base))] = 0.0
    v = reps + noise
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> list[set[int]]:
    """The indices of each query's ``k`` nearest vectors by cosine (vectors are unit length)."""
    out = []
    for q in queries:
        scores = vectors @ q
        top = np.argpartition(-scores, k)[:k]
        out.append({int(i) for i in top})
    return out


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _folder_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1)


def measure_backend(
    backend: str,
    chunks: list[Chunk],
    vectors: np.ndarray,
    queries: np.ndarray,
    truth: list[set[int]],
    root: Path,
    batch: int = 256,
    threads: int = 1,
    hnsw_efs: tuple[int | None, ...] = (None,),
) -> list[dict]:
    """Upsert every chunk, then search each query: throughput, latency and recall@10; for Edge
    once per ``hnsw_efs`` value on the one index (None: the engine's default), a row each."""
    folder = root / backend
    store = open_store(StoreLocation(path=str(folder), backend=backend), threads=threads)
    index_of = {c.id: i for i, c in enumerate(chunks)}
    rows = []
    try:
        store.ensure_collection("scale", vectors.shape[1])
        t0 = time.perf_counter()
        for i in range(0, len(chunks), batch):
            store.upsert("scale", chunks[i : i + batch], vectors[i : i + batch].tolist())
        upsert_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        store.finish("scale")  # Edge builds its HNSW index here; local mode has nothing to do
        finish_s = time.perf_counter() - t1
        assert store.count("scale") == len(chunks)
        for q in queries:  # warm-up, not timed: the first searches load the segments from disk
            store.search("scale", q.tolist(), _K, -1.0)
        for ef in hnsw_efs if backend == "edge" else (None,):
            if backend == "edge":
                store.hnsw_ef = ef
            latencies, hits = [], 0
            for q, want in zip(queries, truth, strict=True):
                t = time.perf_counter()
                found = store.search("scale", q.tolist(), _K, -1.0)
                latencies.append((time.perf_counter() - t) * 1000)
                hits += len({index_of[chunk_id(f.source, f.chunk)] for f in found} & want)
            rows.append(
                {
                    "backend": backend,
                    "hnsw_ef": ef,
                    "chunks": len(chunks),
                    "upsert_chunks_per_s": round(len(chunks) / upsert_s, 1),
                    "index_build_s": round(finish_s, 2),
                    "query_p50_ms": round(_percentile(latencies, 50), 2),
                    "query_p95_ms": round(_percentile(latencies, 95), 2),
                    f"recall_at_{_K}": round(hits / (len(queries) * _K), 4),
                }
            )
    finally:
        store.close()
    for r in rows:
        r["disk_mb"] = _folder_mb(folder)
    return rows


def run_rag_scale(
    sizes: list[int],
    backends: list[str],
    *,
    queries: int = 200,
    embed_sample: int = 2000,
    embed_all: bool = False,
    sigma: float = 0.02,
    threads: int | None = None,
    hnsw_efs: tuple[int | None, ...] = (None,),
    work_dir: str | None = None,
) -> dict:
    """Every backend at every size; see the module docstring."""
    from legion.engine.embedding import Embedder

    # The bench has the machine to itself (run it under the CPU lock): every core, for the
    # embedding model and for Edge's indexing and search alike.
    threads = threads or max(1, len(os.sched_getaffinity(0)))
    biggest = max(sizes)
    _progress(f"generating {biggest} chunks")
    chunks = generated_chunks(biggest)
    embedder = Embedder(threads=threads)
    n_embed = biggest if embed_all else min(embed_sample, biggest)
    _progress(f"embedding {n_embed} chunks with the real model ({threads} thread(s))")
    t0 = time.perf_counter()
    sample = np.asarray(embedder.embed([c.text for c in chunks[:n_embed]], batch_size=64), dtype=np.float32)
    embed_rate = n_embed / (time.perf_counter() - t0)
    # Queries: the embeddings of other generated chunks (another seed), not stored ones.
    q_texts = [c.text for c in generated_chunks(queries, seed=1)]
    q_vectors = np.asarray(embedder.embed(q_texts, batch_size=64), dtype=np.float32)
    all_vectors = sample if embed_all else jittered(sample, biggest, sigma, seed=3)
    rows = []
    root = Path(work_dir or tempfile.mkdtemp(prefix="legion-rag-scale-"))
    try:
        for size in sorted(sizes):
            vectors = all_vectors[:size]
            truth = exact_top_k(vectors, q_vectors, _K)
            for backend in backends:
                _progress(f"{backend}: {size} chunks")
                folder = root / f"{size}"
                got = measure_backend(
                    backend,
                    chunks[:size],
                    vectors,
                    q_vectors,
                    truth,
                    folder,
                    threads=threads,
                    hnsw_efs=hnsw_efs,
                )
                rows.extend(got)
                shutil.rmtree(folder / backend, ignore_errors=True)
                for r in got:
                    _progress(json.dumps(r))
    finally:
        if work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "threads": threads,
        "embed_chunks_per_s": round(embed_rate, 1),
        "embedded_for_real": n_embed,
        "jitter_sigma": None if embed_all else sigma,
        "queries": queries,
        "rows": rows,
    }


def format_table(result: dict) -> str:
    lines = [
        f"embedding: {result['embed_chunks_per_s']} chunks/s "
        f"({result['embedded_for_real']} chunks through the real model, {result['threads']} threads)",
        f"{'backend':8} {'ef':>5} {'chunks':>9} {'upsert/s':>10} {'index s':>8} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'recall@10':>9} {'disk MB':>8}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['backend']:8} {r['hnsw_ef'] or '-':>5} {r['chunks']:>9} {r['upsert_chunks_per_s']:>10} "
            f"{r['index_build_s']:>8} "
            f"{r['query_p50_ms']:>8} {r['query_p95_ms']:>8} {r['recall_at_10']:>9} {r['disk_mb']:>8}"
        )
    return "\n".join(lines)


def run_rag_scale_bench(args: argparse.Namespace) -> int:
    """The CLI's ``legion bench --rag-scale``."""
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        sizes = []
    backends = args.backends.split(",")
    bad = [b for b in backends if b not in ("local", "edge")]
    if bad or not sizes or any(s < _K + 1 for s in sizes):
        print(
            f"--backends takes local and/or edge (got {bad}); --sizes needs numbers above {_K}",
            file=sys.stderr,
        )
        return 2
    try:
        efs = tuple(None if e == "default" else int(e) for e in args.hnsw_ef.split(","))
    except ValueError:
        print("--hnsw-ef takes numbers (and 'default'), comma-separated", file=sys.stderr)
        return 2
    result = run_rag_scale(
        sizes, backends, queries=args.queries, embed_sample=args.embed_sample, sigma=args.sigma, hnsw_efs=efs
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
