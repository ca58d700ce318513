"""``legion bench --rag``: retrieval and the result cache, measured in one run on a real app.

On a throwaway data dir it serves the configured agents, uploads the shipped Tallowmere
documents (``legion/corpus``) through ``POST /v1/documents``, then reports:

1. recall@5: the share of questions whose top 5 chunks hold one carrying the answer
   (and the share whose top 5 come from the right file);
2. end-to-end accuracy of ``POST /v1/tasks`` on the same questions without and with
   retrieval (an answer is right when it contains an accepted answer);
3. ``/v1/tasks`` latency uncached (``"cache": false``) against a cache hit of the same
   request, interleaved question by question, and the cache's hit rate over the run.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

import legion
from legion_cli.bench import json_stdout

CORPUS = Path(legion.__file__).resolve().parent / "corpus"
COLLECTION = "tallowmere"


def _progress(msg: str) -> None:
    print(f"[bench --rag] {msg}", file=sys.stderr, flush=True)


def load_questions() -> list[dict]:
    """The shipped questions: ``question``, accepted ``answers``, the ``source`` file."""
    return yaml.safe_load((CORPUS / "questions.yaml").read_text(encoding="utf-8"))


def is_correct(answer: str, accepted: list[str]) -> bool:
    text = answer.casefold()
    return any(a.casefold() in text for a in accepted)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(client, body: dict) -> tuple[dict, float, str]:
    t0 = time.perf_counter()
    r = client.post("/v1/tasks", json=body)
    ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"/v1/tasks answered {r.status_code}: {r.text[:300]}")
    return r.json(), ms, r.headers.get("x-legion-cache", "")


def _recall(retriever, questions: list[dict]) -> tuple[float, float]:
    import ray

    chunk_hits = file_hits = 0
    for q in questions:
        got = ray.get(retriever.search.remote(q["question"], COLLECTION, 5, -1.0))
        if not got.info.used:
            raise RuntimeError(f"retrieval failed: {got.info.reason}")
        from_file = [c for c in got.chunks if Path(c.source).name == q["source"]]
        file_hits += bool(from_file)
        chunk_hits += any(is_correct(c.text, q["answers"]) for c in from_file)
    return chunk_hits / len(questions), file_hits / len(questions)


def run_rag_bench(args: argparse.Namespace) -> int:
    import httpx
    import ray
    from ray import serve

    from actors import stop_actors
    from actors.retriever import retriever_actor_name
    from legion.config import config_from_dict, load_config
    from legion.state.ingest import upload
    from serve_app import build_app

    questions = load_questions()
    base = load_config(args.config).model_dump(mode="json")
    work = tempfile.TemporaryDirectory(prefix="legion-rag-bench-")
    base.update(data_dir=work.name)
    base["serve"].update(app_name="legionragbench", port=_free_port(), min_replicas=1, max_replicas=1)
    base["rag"].update(collection=COLLECTION, qdrant_url=None)
    base["cache"].update(enabled=True)
    cfg = config_from_dict(base, source="bench configuration")
    with json_stdout(args.json) as json_out:
        started = not ray.is_initialized()
        if started:
            ray.init(include_dashboard=False, logging_level="WARNING", namespace=cfg.ray_namespace)
        url = f"http://127.0.0.1:{cfg.serve.port}"
        result: dict = {
            "questions": len(questions),
            "agents": [a.name for a in cfg.agents],
            "max_tokens": args.max_tokens,
        }
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve.port})
            serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix="/")
            with httpx.Client(base_url=url, timeout=600) as client:
                _progress(f"waiting for {len(cfg.agents)} agents to load ...")
                deadline = time.monotonic() + 600
                while client.get("/healthz").status_code != 200:
                    if time.monotonic() > deadline:
                        raise RuntimeError("agents did not load within 600 s")
                    time.sleep(0.5)

                _progress(f"uploading {CORPUS / 'tallowmere'} through POST /v1/documents ...")
                report = upload([str(CORPUS / "tallowmere")], url, COLLECTION)
                result.update(documents=report.documents, chunks=report.chunks, ingest_s=report.seconds)
                retriever = ray.get_actor(retriever_actor_name(cfg), namespace=cfg.ray_namespace)

                _progress("recall@5 of retrieval ...")
                recall, file_recall = _recall(retriever, questions)
                result.update(recall_at_5=round(recall, 4), file_recall_at_5=round(file_recall, 4))

                _progress(f"accuracy without and with retrieval on {len(questions)} questions ...")
                right = {"without": 0, "with": 0}
                answers = []
                for i, q in enumerate(questions, 1):
                    row = {"question": q["question"]}
                    for name, rag in (("without", False), ("with", True)):
                        body = {
                            "task": q["question"],
                            "max_tokens": args.max_tokens,
                            "use_rag": rag,
                            "cache": False,
                        }
                        out, _, _ = _post(client, body)
                        ok = is_correct(out["answer"], q["answers"])
                        right[name] += ok
                        row[name] = {"answer": out["answer"], "correct": ok}
                    answers.append(row)
                    _progress(
                        f"  {i}/{len(questions)}: without {right['without']}, with {right['with']} right"
                    )
                result["accuracy_without_rag"] = round(right["without"] / len(questions), 4)
                result["accuracy_with_rag"] = round(right["with"] / len(questions), 4)

                n = min(args.http_requests, len(questions))
                _progress(f"/v1/tasks uncached vs cached, {n} questions interleaved ...")
                before = client.get("/v1/cache").json()
                uncached, cached, hits = [], [], 0
                for q in questions[:n]:
                    body = {"task": q["question"], "max_tokens": args.max_tokens, "use_rag": True}
                    _, ms, _ = _post(client, {**body, "cache": False})
                    uncached.append(ms)
                    _post(client, body)  # stores the answer (a miss)
                    _, ms, status = _post(client, body)
                    cached.append(ms)
                    hits += status == "hit"
                after = client.get("/v1/cache").json()
                looked_up = (after["hits"] - before["hits"]) + (after["misses"] - before["misses"])
                result.update(
                    uncached_p50_ms=round(statistics.median(uncached), 2),
                    cached_p50_ms=round(statistics.median(cached), 2),
                    uncached_over_cached=round(statistics.median(uncached) / statistics.median(cached), 1),
                    cached_requests_that_hit=f"{hits}/{n}",
                    cache_hit_rate=round((after["hits"] - before["hits"]) / looked_up, 4)
                    if looked_up
                    else 0.0,
                )
                result["answers"] = answers
        finally:
            try:
                serve.delete(cfg.serve.app_name)
                stop_actors(cfg)
            finally:
                if started:
                    serve.shutdown()
                    ray.shutdown()
                work.cleanup()
    if args.json:
        print(json.dumps(result), file=json_out)
        return 0
    r = result
    print(
        f"Tallowmere corpus: {r['documents']} documents, {r['chunks']} chunks (ingested in "
        f"{r['ingest_s']:.1f}s); {len(questions)} questions; agents {', '.join(r['agents'])}"
    )
    print(
        f"recall@5            {r['recall_at_5']:.1%} (answer-bearing chunk), "
        f"{r['file_recall_at_5']:.1%} (right file)"
    )
    print(
        f"accuracy            {r['accuracy_without_rag']:.1%} without retrieval, "
        f"{r['accuracy_with_rag']:.1%} with"
    )
    print(
        f"/v1/tasks p50       {r['uncached_p50_ms']} ms uncached, {r['cached_p50_ms']} ms cached "
        f"({r['uncached_over_cached']}x), {r['cached_requests_that_hit']} hits; "
        f"cache hit rate {r['cache_hit_rate']:.1%} over the latency run"
    )
    return 0
