"""Reading and chunking documents for retrieval, and ``legion ingest``'s two paths.

Documents are .txt, .md and .html files (or folders of them). Each is split into
overlapping chunks whose ids derive from the source and the chunk's position, so
ingesting the same file again updates its points instead of adding copies.
``ingest_local`` writes to the store directly; ``upload`` sends the files to a running
Legion (``POST /v1/documents``), which holds the store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterable
from html.parser import HTMLParser
from pathlib import Path

from pydantic import BaseModel

from legion.errors import InvalidRequest, LegionError
from legion.messages import Document, IngestReport

log = logging.getLogger(__name__)

FORMATS = {".txt": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html"}
# Fixed namespace: chunk ids are the same on every machine and in every version.
_CHUNK_NAMESPACE = uuid.UUID("6f1c2b0e-8d4a-5b7e-9c3f-1a2b3c4d5e6f")
_BLOCK_TAGS = frozenset("p div br li tr table section article h1 h2 h3 h4 h5 h6".split())


class Chunk(BaseModel):
    source: str
    index: int
    text: str
    digest: str | None = None  # the document's (``document_digest``), stored with each chunk

    @property
    def id(self) -> str:
        return chunk_id(self.source, self.index)


def chunk_id(source: str, index: int) -> str:
    """The point id of chunk ``index`` of ``source``: a UUID derived from both."""
    return str(uuid.uuid5(_CHUNK_NAMESPACE, f"{source}\x00{index}"))


class _TextOfHtml(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in ("script", "style", "template"):
            self._skip += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "template"):
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def plain_text(doc: Document) -> str:
    """The document's text without markup, paragraphs separated by blank lines."""
    text = doc.text
    if doc.format == "html":
        parser = _TextOfHtml()
        parser.feed(text)
        parser.close()
        text = "".join(parser.parts)
    text = text.replace("\r\n", "\n")
    paragraphs = [re.sub(r"[ \t\f\v]*\n[ \t\f\v]*", "\n", p).strip() for p in re.split(r"\n\s*\n", text)]
    paragraphs = [re.sub(r"[ \t\f\v]+", " ", p) for p in paragraphs if p]
    return "\n\n".join(paragraphs)


def _cut(text: str, start: int, end: int) -> int:
    """Where to end a chunk in ``text[start:end]``: the last paragraph, sentence or word break
    in its second half, else ``end``."""
    if end >= len(text):
        return len(text)
    half = start + (end - start) // 2
    for sep in ("\n\n", ". ", "? ", "! ", "\n", " "):
        at = text.rfind(sep, half, end)
        if at != -1:
            return at + len(sep)
    return end


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """Overlapping chunks of about ``size`` characters, cut at paragraph, sentence or word breaks;
    neighbours share about ``overlap`` characters."""
    if overlap >= size:
        raise ValueError(f"overlap ({overlap}) must be smaller than size ({size})")
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end = _cut(text, start, start + size)
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        if end >= len(text):
            break
        nxt = max(end - overlap, start + 1)
        # Start the next chunk on a word boundary.
        space = text.find(" ", nxt, end)
        start = space + 1 if overlap and space != -1 else nxt
    return chunks


def document_digest(doc: Document, size: int, overlap: int) -> str:
    """What a document's stored chunks depend on: its text, format and the chunking."""
    h = hashlib.sha256(f"{doc.format}\x00{size}\x00{overlap}\x00".encode())
    h.update(doc.text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def chunk_document(doc: Document, size: int, overlap: int) -> list[Chunk]:
    return [
        Chunk(source=doc.source, index=i, text=t)
        for i, t in enumerate(chunk_text(plain_text(doc), size, overlap))
    ]


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


def progress_bar(total: int, unit: str, desc: str) -> Callable[[int], None]:
    """A callback advancing a tqdm bar when stderr is a terminal; a no-op otherwise."""
    if not sys.stderr.isatty():
        return lambda _n: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, leave=True)

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return advance


def ingest_local(paths: list[str], cfg, collection: str | None = None) -> IngestReport:
    """Read ``paths`` and write their chunks to the store of ``cfg`` (local folder or QDRANT_URL)."""
    from legion.vectorstore import Retriever, open_store, store_location

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
