"""The retriever on the real embedding model and both real embedded Qdrant stores, Edge and
local mode (no Ray)."""

from __future__ import annotations

import socket

import pytest
import yaml

from legion.config import config_from_dict
from legion.engine.embedding import Embedder
from legion.messages import Document
from legion.state.vectorstore import (
    Retriever,
    StoreLocation,
    StoreUnavailable,
    open_store,
    store_location,
)
from legion_cli.cli import main

_FACTS = """# Brenmoor Island

The lighthouse on Brenmoor Island is kept by Pepperwick Sallis, who rows to the mainland every
second Tuesday for oil and bread.

The island's only tree is a crooked rowan that islanders call the Grey Widow. It was planted in 1871.

Brenmoor's ferry, the Saucy Gull, makes one crossing a day when the sea allows it.
"""


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(params=["edge", "local"])
def cfg(tmp_path, request):
    """Both embedded stores: Qdrant Edge (the default) and qdrant-client's local mode."""
    rag = {"chunk_chars": 160, "chunk_overlap": 30, "vector_store": request.param}
    return config_from_dict({"data_dir": str(tmp_path), "rag": rag})


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_ingest_search_and_reingest_without_duplicates(cfg, embedder):
    r = Retriever(cfg.rag, store_location(cfg), embedder=embedder)
    missing = r.search("Who keeps the lighthouse?")
    assert not missing.info.used and "does not exist" in missing.info.reason

    doc = Document(source="/notes/brenmoor.md", text=_FACTS, format="md")
    first = r.ingest([doc])
    assert first.chunks >= 3 and first.removed == 0
    assert r.count() == first.chunks

    got = r.search("Who keeps the lighthouse on Brenmoor Island?")
    assert got.info.used
    assert "Pepperwick Sallis" in got.chunks[0].text
    assert got.chunks[0].source == "/notes/brenmoor.md"
    assert [c.score for c in got.chunks] == sorted((c.score for c in got.chunks), reverse=True)
    assert all(c.score >= cfg.rag.score_threshold for c in got.chunks)

    # The same file again updates its points instead of adding copies.
    assert r.ingest([doc]).chunks == first.chunks
    assert r.count() == first.chunks
    # A shorter version drops the chunks it no longer has.
    short = r.ingest([Document(source="/notes/brenmoor.md", text=_FACTS[:150], format="md")])
    assert short.chunks < first.chunks and short.removed == first.chunks - short.chunks
    assert r.count() == short.chunks
    r.close()


def test_embedding_on_more_threads_gives_the_same_vectors_and_gives_the_threads_back(embedder):
    import torch

    texts = [p for p in _FACTS.split("\n\n") if p.strip()]
    before = torch.get_num_threads()
    one = embedder.embed(texts, 2, threads=1)
    two = embedder.embed(texts, 2, threads=2)
    assert torch.get_num_threads() == before
    for a, b in zip(one, two, strict=True):
        assert sum(x * y for x, y in zip(a, b, strict=True)) > 0.9999  # unit vectors: cosine


@pytest.mark.parametrize("backend", ["edge", "local"])
def test_local_folder_has_one_owner_and_a_second_says_what_to_do(tmp_path, backend, embedder):
    cfg = config_from_dict({"data_dir": str(tmp_path), "rag": {"vector_store": backend}})
    owner = open_store(store_location(cfg))
    with pytest.raises(StoreUnavailable, match="--url"):
        open_store(store_location(cfg))
    # The retriever retries opening, so it answers once the folder is free.
    r = Retriever(cfg.rag, store_location(cfg), embedder=embedder)
    assert "another process" in r.search("anything").info.reason
    owner.close()
    assert "does not exist" in r.search("anything").info.reason
    r.close()


def test_unreachable_server_flags_search_and_fails_ingest(cfg, embedder):
    location = StoreLocation(url=_closed_port_url())
    r = Retriever(cfg.rag, location, embedder=embedder)
    got = r.search("Who keeps the lighthouse?")
    assert not got.info.used and location.url in got.info.reason and got.chunks == []
    with pytest.raises(StoreUnavailable, match="QDRANT_URL"):
        r.ingest([Document(source="a.txt", text="some text")])


def test_cli_ingest_writes_the_store_and_fails_clearly(tmp_path, monkeypatch, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "brenmoor.md").write_text(_FACTS, encoding="utf-8")
    config = tmp_path / "legion.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data")}), encoding="utf-8")

    monkeypatch.setenv("QDRANT_URL", _closed_port_url())
    assert main(["ingest", str(docs), "--config", str(config)]) == 2
    assert "Qdrant server" in capsys.readouterr().err
    monkeypatch.delenv("QDRANT_URL")

    assert main(["ingest", str(docs / "nothing.md"), "--config", str(config)]) == 2
    assert "does not exist" in capsys.readouterr().err

    assert main(["ingest", str(docs), "--config", str(config), "--collection", "notes"]) == 0
    out = capsys.readouterr().out
    assert "into collection 'notes'" in out and str(tmp_path / "data" / "qdrant") in out
