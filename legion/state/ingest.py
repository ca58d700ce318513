"""Reading documents for retrieval, and ``legion ingest``'s two paths.

Documents are .txt, .md and .html files (or folders of them), chunked by
``legion.state.chunking``.
``ingest_local`` writes to the store directly; ``upload`` sends the files to a running
Legion (``POST /v1/documents``), which holds the store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from legion.errors import InvalidRequest, LegionError
from legion.messages import Document, IngestReport
from legion.progress import progress_bar
from legion.state.vectorstore import Retriever, open_store, store_location

log = logging.getLogger(__name__)

FORMATS = {".txt": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html"}


def find_files(paths: Iterable[str]) -> list[Path]:
    """The files to ingest: each path itself or, for a folder, its supported files (recursively)."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FORMATS))
        elif p.is_file():
            if p.suffix.lower() not in FORMATS:
                raise InvalidRequest(
                    f"{p} is a {p.suffix or 'suffix-less'} file; ingest reads {', '.join(sorted(FORMATS))}"
                )
            found.append(p)
        else:
            raise InvalidRequest(f"{p} does not exist: give files or folders to ingest")
    if not found:
        raise InvalidRequest(f"no {', '.join(sorted(FORMATS))} files under {', '.join(map(str, paths))}")
    return list(dict.fromkeys(f.resolve() for f in found))


def read_document(path: Path) -> Document:
    """The file as a ``Document`` whose source is its absolute path."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{path} is not UTF-8 text: convert it or leave it out") from None
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror}") from None
    return Document(source=str(path.resolve()), text=text, format=FORMATS[path.suffix.lower()])


def ingest_local(paths: list[str], cfg, collection: str | None = None) -> IngestReport:
    """Read ``paths`` and write their chunks to the store of ``cfg`` (local folder or QDRANT_URL)."""
    files = find_files(paths)
    location = store_location(cfg)
    # Nothing else uses this machine's cores for the store now (a running Legion would hold it).
    threads = max(1, len(os.sched_getaffinity(0)))
    store = open_store(location, timeout_s=cfg.rag.timeout_s, threads=threads, hnsw_ef=cfg.rag.edge_hnsw_ef)
    store.probe()  # fail before the embedding model takes its seconds to load
    retriever = Retriever(cfg.rag, location, store=store, load_in_background=False, threads=threads)
    try:
        # One file read at a time: the corpus never sits in memory whole.
        docs = (read_document(p) for p in files)
        return retriever.ingest(docs, collection=collection, progress=True, total=len(files))
    finally:
        retriever.close()


def _batches(docs: Iterable[Document], max_chars: int) -> Iterable[list[Document]]:
    batch: list[Document] = []
    size = 0
    for d in docs:
        if batch and size + len(d.text) > max_chars:
            yield batch
            batch, size = [], 0
        batch.append(d)
        size += len(d.text)
    if batch:
        yield batch


def upload(
    paths: list[str],
    url: str,
    collection: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float = 600.0,
    max_request_chars: int = 1_000_000,
) -> IngestReport:
    """Send the files under ``paths`` to a running Legion at ``url`` in batches."""
    import httpx

    files = find_files(paths)
    docs = (read_document(p) for p in files)  # read as the batches go, not all first
    advance = progress_bar(len(files), "file", "uploading")
    total = None
    endpoint = f"{url.rstrip('/')}/v1/documents"
    with httpx.Client(timeout=timeout_s, headers=headers) as client:
        for batch in _batches(docs, max_request_chars):
            body = {"documents": [d.model_dump() for d in batch]}
            if collection:
                body["collection"] = collection
            try:
                r = client.post(endpoint, json=body)
            except httpx.HTTPError as exc:
                raise LegionError(
                    f"cannot reach Legion at {url} ({exc}): start it with `legion serve` or fix --url"
                ) from None
            if r.status_code != 200:
                try:
                    message = r.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = r.text[:500]
                raise LegionError(f"{endpoint} answered {r.status_code}: {message}")
            got = IngestReport.model_validate(r.json())
            if total is None:
                total = got
            else:
                total.documents += got.documents
                total.chunks += got.chunks
                total.removed += got.removed
                total.skipped += got.skipped
                total.seconds += got.seconds
            advance(len(batch))
    assert total is not None  # find_files never returns an empty list
    return total
