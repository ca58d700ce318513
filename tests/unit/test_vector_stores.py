"""Both embedded vector stores, qdrant-client's local mode and Qdrant Edge, pass the same
retrieval tests: deterministic ids, re-ingest without duplicates, deletion, filters by source,
collections, one owner per folder, and survival of a restart and of a SIGKILL during ingest.

The stores are real; the vectors are generated (the embedding model is not under test here, see
tests/integration/test_retrieval.py for the real model).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from legion.errors import InvalidRequest
from legion.state.chunking import Chunk, chunk_id
from legion.state.vectorstore import (
    CollectionMissing,
    StoreLocation,
    StoreUnavailable,
    agent_free_threads,
    open_store,
)

DIM = 16
BACKENDS = ["local", "edge"]


def _vectors(n: int, seed: int) -> list[list[float]]:
    v = np.random.default_rng(seed).standard_normal((n, DIM))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).tolist()


def _chunks(source: str, n: int) -> list[Chunk]:
    return [Chunk(source=source, index=i, text=f"{source} chunk {i}") for i in range(n)]


@pytest.fixture(params=BACKENDS)
def location(request, tmp_path) -> StoreLocation:
    return StoreLocation(path=str(tmp_path / request.param), backend=request.param)


def test_upsert_search_and_deterministic_ids(location):
    store = open_store(location)
    store.ensure_collection("docs", DIM)
    chunks, vecs = _chunks("a.md", 20), _vectors(20, 1)
    store.upsert("docs", chunks, vecs)
    assert store.count("docs") == 20
    hits = store.search("docs", vecs[7], k=5, threshold=-1.0)
    assert (hits[0].source, hits[0].chunk, hits[0].text) == ("a.md", 7, "a.md chunk 7")
    assert hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # A threshold drops what scores below it.
    assert all(h.score >= 0.5 for h in store.search("docs", vecs[7], k=20, threshold=0.5))
    # Ids come from (source, index): the same chunk again replaces its point.
    assert chunks[3].id == chunk_id("a.md", 3)
    store.upsert("docs", chunks[:5], _vectors(5, 2))
    assert store.count("docs") == 20
    store.close()


def test_reingest_removes_stale_chunks_of_that_source_only(location):
    store = open_store(location)
    store.ensure_collection("docs", DIM)
    store.upsert("docs", _chunks("a.md", 10), _vectors(10, 1))
    store.upsert("docs", _chunks("b.md", 6), _vectors(6, 2))
    # a.md shrank to 4 chunks: 6 stale ones go, b.md keeps all of its own.
    assert store.remove_from("docs", "a.md", 4) == 6
    assert store.count("docs") == 4 + 6
    assert store.remove_from("docs", "a.md", 4) == 0
    assert store.remove_from("docs", "b.md", 0) == 6
    assert store.count("docs") == 4
    store.close()


def test_collections_are_separate_and_a_missing_one_says_what_to_do(location):
    store = open_store(location)
    store.ensure_collection("one", DIM)
    store.ensure_collection("two", DIM)
    store.upsert("one", _chunks("a.md", 3), _vectors(3, 1))
    assert (store.count("one"), store.count("two")) == (3, 0)
    assert store.collection_exists("one") and not store.collection_exists("three")
    with pytest.raises(CollectionMissing, match="legion ingest"):
        store.search("three", _vectors(1, 1)[0], k=3, threshold=0.0)
    with pytest.raises(InvalidRequest, match="holds 16-dimensional vectors, the embedder makes 8"):
        store.ensure_collection("one", 8)
    store.close()


def test_one_process_owns_the_folder(location):
    owner = open_store(location)
    owner.ensure_collection("docs", DIM)
    owner.upsert("docs", _chunks("a.md", 2), _vectors(2, 1))
    with pytest.raises(StoreUnavailable, match="another process"):
        second = open_store(location)
        second.count("docs")  # Edge opens a collection's shard on first use
    owner.close()


def test_survives_a_restart(location):
    store = open_store(location)
    store.ensure_collection("docs", DIM)
    vecs = _vectors(50, 3)
    store.upsert("docs", _chunks("a.md", 50), vecs)
    store.finish("docs")
    before = store.search("docs", vecs[10], k=3, threshold=0.0)
    store.close()
    again = open_store(location)
    assert again.count("docs") == 50
    assert again.search("docs", vecs[10], k=3, threshold=0.0) == before
    again.close()


_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from legion.state.chunking import Chunk
    from legion.state.vectorstore import StoreLocation, open_store
    store = open_store(StoreLocation(path=sys.argv[1], backend=sys.argv[2]))
    store.ensure_collection("docs", 16)
    rng = np.random.default_rng(0)
    for b in range(100000):
        v = rng.standard_normal((50, 16)); v /= np.linalg.norm(v, axis=1, keepdims=True)
        chunks = [Chunk(source="big.md", index=b * 50 + i, text="x") for i in range(50)]
        store.upsert("docs", chunks, v.tolist())
        print(b + 1, flush=True)
    """
)


def test_a_sigkill_during_ingest_leaves_a_store_that_opens(location):
    """Killed between upserts, the store opens again with at least every acknowledged batch."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, location.path, location.backend],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    acknowledged = 0
    while acknowledged < 20:
        line = proc.stdout.readline()
        assert line, f"the writer died (rc {proc.wait()})"
        acknowledged = int(line)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.2)
    store = open_store(location)
    n = store.count("docs")
    assert n >= acknowledged * 50 and n % 50 == 0, (n, acknowledged)
    assert len(store.search("docs", _vectors(1, 9)[0], k=10, threshold=-1.0)) == 10
    store.ensure_collection("docs", DIM)  # still the same collection, still writable
    store.upsert("docs", _chunks("after.md", 5), _vectors(5, 4))
    assert store.count("docs") == n + 5
    store.close()


def test_edge_collection_records_its_vector_size(tmp_path):
    store = open_store(StoreLocation(path=str(tmp_path), backend="edge"))
    store.ensure_collection("docs", DIM)
    assert json.loads((tmp_path / "docs" / "collection.json").read_text()) == {"dim": DIM}
    store.close()


class _CountingEmbedder:
    """Stands in for the embedding model (not under test): a vector per text from its hash."""

    dim = DIM

    def __init__(self):
        self.texts = 0

    def embed(self, texts: list[str], batch_size: int = 32, threads: int | None = None) -> list[list[float]]:
        self.texts += len(texts)
        out = []
        for t in texts:
            v = np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(DIM)
            out.append((v / np.linalg.norm(v)).tolist())
        return out


def _retriever(tmp_path, backend: str, batch: int = 4):
    from legion.config import config_from_dict
    from legion.state.vectorstore import Retriever, store_location

    cfg = config_from_dict(
        {
            "data_dir": str(tmp_path),
            "rag": {
                "chunk_chars": 60,
                "chunk_overlap": 10,
                "upsert_batch_size": batch,
                "vector_store": backend,
            },
        }
    )
    embedder = _CountingEmbedder()
    return Retriever(cfg.rag, store_location(cfg), embedder=embedder), embedder


def _doc(i: int, words: int = 30, edit: str = ""):
    from legion.messages import Document

    text = " ".join(f"word{i}-{j}{edit}" for j in range(words))
    return Document(source=f"/corpus/doc{i}.txt", text=text)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ingest_streams_documents_a_batch_at_a_time(tmp_path, backend):
    r, _ = _retriever(tmp_path, backend)

    def docs():
        for i in range(8):
            if i >= 3:  # earlier documents are stored before later ones are even read
                assert r.count() > 0
            yield _doc(i)

    report = r.ingest(docs(), total=8)
    assert (report.documents, report.skipped) == (8, 0)
    assert r.count() == report.chunks > 8
    r.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ingest_skips_stored_documents_and_resumes_after_a_crash(tmp_path, backend):
    r, embedder = _retriever(tmp_path, backend, batch=1)  # each document stored as it is read
    first = r.ingest([_doc(i) for i in range(5)])
    embedded = embedder.texts
    assert embedded == first.chunks

    # The same documents again: nothing embedded, nothing written, the same points.
    again = r.ingest([_doc(i) for i in range(5)])
    assert (again.skipped, again.removed, embedder.texts) == (5, 0, embedded)
    assert r.count() == first.chunks

    # One changed (and shorter) document is redone; its stale chunks go.
    changed = r.ingest([_doc(0), _doc(1, words=10, edit="x"), *(_doc(i) for i in range(2, 5))])
    assert changed.skipped == 4 and changed.removed > 0
    assert embedder.texts == embedded + changed.chunks - sum(
        len(_chunks_of(r, _doc(i))) for i in (0, 2, 3, 4)
    )

    # A run that dies after three new documents, then the whole run again: it resumes.
    def crashing():
        for i in range(10, 13):
            yield _doc(i)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        r.ingest(crashing())
    before = embedder.texts
    resumed = r.ingest([_doc(i) for i in range(10, 16)])
    assert resumed.skipped == 3
    assert embedder.texts - before == sum(len(_chunks_of(r, _doc(i))) for i in range(13, 16))
    r.close()


def _chunks_of(r, doc):
    from legion.state.chunking import chunk_document

    return chunk_document(doc, r.rag.chunk_chars, r.rag.chunk_overlap)


@pytest.mark.parametrize(
    ("node", "available", "own", "threads"),
    [
        (2, 0.15, 0.05, 1),  # the default agents hold 1.8 of 2 cores: one thread
        (16, 10.0, 0.05, 10),  # ten cores nobody reserved
        (16, 40.0, 0.05, 16),  # other nodes' free CPUs never give more than this node has
        (8, 0.0, 2.0, 2),  # its own reservation is its to use
        (4, 0.0, 0.0, 1),  # always at least one
    ],
)
def test_ingest_embeds_on_the_cores_nobody_reserved(node, available, own, threads):
    assert agent_free_threads(node, available, own) == threads
