"""Documents split into chunks for retrieval.

Each document is split into overlapping chunks whose ids derive from the source and the
chunk's position, so ingesting the same file again updates its points instead of adding copies.
The vector stores (``legion.state.vectorstore``) store chunks; ``legion.state.ingest`` reads
files and hands them over.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from html.parser import HTMLParser

from pydantic import BaseModel

from legion.messages import Document

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
