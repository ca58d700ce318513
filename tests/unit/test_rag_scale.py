"""The harness of ``legion bench --rag-scale`` on small sizes (no model: generated vectors)."""

from __future__ import annotations

import numpy as np
import pytest

from legion_cli.rag_scale import exact_top_k, generated_chunks, jittered, measure_backend


def test_generated_chunks_are_the_same_for_a_seed_and_distinct():
    a, b = generated_chunks(200), generated_chunks(200)
    assert [c.text for c in a] == [c.text for c in b]
    assert len({c.id for c in a}) == 200  # distinct (source, index) pairs
    assert [c.text for c in generated_chunks(5, seed=1)] != [c.text for c in a[:5]]


def test_jittered_vectors_are_unit_length_and_keep_the_base_rows():
    base = np.eye(4, 8, dtype=np.float32)
    v = jittered(base, 40, 0.05, seed=0)
    assert v.shape == (40, 8)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.allclose(v[:4], base)
    assert len({tuple(np.round(r, 6)) for r in v}) == 40
    # Each jittered row stays nearest its base row: the clusters are there.
    assert (np.argmax(v @ base.T, axis=1) == np.arange(40) % 4).all()


def test_exact_top_k_matches_a_full_sort():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((300, 12)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    q = v[:5] + 0.01
    got = exact_top_k(v, q, 10)
    for qi, s in zip(q, got, strict=True):
        assert s == set(np.argsort(-(v @ qi))[:10].tolist())


@pytest.mark.parametrize("backend", ["local", "edge"])
def test_measure_backend_reports_recall_against_exact_search(backend, tmp_path):
    chunks = generated_chunks(600)
    base = np.random.default_rng(1).standard_normal((60, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    vectors = jittered(base, 600, 0.1, seed=2)
    queries = jittered(base, 20, 0.2, seed=3)
    rows = measure_backend(
        backend, chunks, vectors, queries, exact_top_k(vectors, queries, 10), tmp_path, hnsw_efs=(None, 32)
    )
    assert len(rows) == (2 if backend == "edge" else 1)  # one row per ef, on Edge only
    row = rows[-1]
    assert row["backend"] == backend and row["chunks"] == 600
    # 600 points: both stores search exactly (Edge indexes only past its threshold).
    assert row["recall_at_10"] == 1.0
    assert row["upsert_chunks_per_s"] > 0 and row["query_p95_ms"] >= row["query_p50_ms"] > 0
    assert row["disk_mb"] > 0


def test_cli_rejects_unknown_backends_and_tiny_sizes_before_any_work(capsys):
    from legion_cli.cli import main

    assert main(["bench", "--rag-scale", "--backends", "local,faiss"]) == 2
    assert "local and/or edge" in capsys.readouterr().err
    for sizes in ("5", "10k"):
        assert main(["bench", "--rag-scale", "--sizes", sizes]) == 2
        assert "above 10" in capsys.readouterr().err
