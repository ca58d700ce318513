"""``RetrieverActor``: the one owner of Legion's vector store in a running cluster.

Qdrant's local mode admits one client per folder, so the store is opened by this one
named, detached actor (``<app>-retriever``) and every ingress replica calls it; with a
Qdrant server it also keeps the embedding model in one place instead of one per replica.
"""

from __future__ import annotations

import math

import ray

from legion.config import LegionConfig
from legion.logging_setup import configure_logging
from legion.messages import Document, IngestReport, Retrieval
from legion.state.vectorstore import Retriever, StoreLocation, agent_free_threads


class RetrieverActor:
    """Thin shell over ``legion.state.vectorstore.Retriever`` (threaded; the store is serialised inside)."""

    def __init__(self, config: dict, location: dict):
        cfg = LegionConfig(**config)
        configure_logging(cfg.log_level, cfg.log_format)  # this worker's log format
        threads = max(1, math.floor(cfg.rag.num_cpus))
        self._rag = cfg.rag
        self._retriever = Retriever(cfg.rag, StoreLocation(**location), threads=threads)

    def search(
        self,
        query: str,
        collection: str | None = None,
        top_k: int | None = None,
        threshold: float | None = None,
    ) -> Retrieval:
        return self._retriever.search(query, collection=collection, top_k=top_k, threshold=threshold)

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        return self._retriever.embed(texts)

    def ingest(self, documents: list[Document], collection: str | None = None) -> IngestReport:
        return self._retriever.ingest(documents, collection=collection, threads=self._ingest_threads())

    def _ingest_threads(self) -> int:
        # Embedding runs on the cores nobody reserved now (agents keep theirs). The cluster's
        # free CPUs stand in for this node's: exact on one node, an upper bound on several,
        # capped by this node's core count.
        if self._rag.ingest_threads:
            return self._rag.ingest_threads
        node = ray.get_runtime_context().get_node_id()
        node_cpus = next((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["NodeID"] == node), 1.0)
        return agent_free_threads(node_cpus, ray.available_resources().get("CPU", 0.0), self._rag.num_cpus)

    def count(self, collection: str | None = None) -> int:
        return self._retriever.count(collection)

    def health(self) -> dict:
        return self._retriever.health()


def retriever_actor_name(cfg: LegionConfig) -> str:
    return f"{cfg.serve.app_name}-retriever"


def start_retriever(cfg: LegionConfig, location: StoreLocation):
    """Create (or find) the named retriever actor; it loads its model and opens the store itself."""
    return (
        ray.remote(RetrieverActor)
        .options(
            name=retriever_actor_name(cfg),
            namespace=cfg.ray_namespace,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=cfg.rag.num_cpus,
            max_restarts=-1,
            max_task_retries=0,
            max_concurrency=8,
        )
        .remote(cfg.model_dump(mode="json"), location.model_dump())
    )


def stop_retriever(cfg: LegionConfig) -> bool:
    """Kill the retriever actor of ``cfg``'s app (releasing a local store's folder)."""
    try:
        ray.kill(ray.get_actor(retriever_actor_name(cfg), namespace=cfg.ray_namespace), no_restart=True)
    except ValueError:
        return False
    return True
