"""The ``legion`` command: serve, ask, bench, config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from legion.errors import LegionError


def _serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from actors import stop_actors
    from legion.config import load_config
    from serve_app import build_app

    cfg = load_config(args.config)
    host = args.host or cfg.serve.host
    port = args.port or cfg.serve.port
    cfg.serve.host, cfg.serve.port = host, port
    address = os.environ.get("RAY_ADDRESS")
    ctx = ray.init(
        address=address,
        namespace=cfg.ray_namespace,
        include_dashboard=args.dashboard,
        logging_level=logging.WARNING,
    )
    serve.start(http_options={"host": host, "port": port})
    print(f"Legion: starting {len(cfg.agents)} agents ({', '.join(a.name for a in cfg.agents)}) ...")
    serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix, blocking=False)
    url = f"http://{host}:{port}{cfg.serve.route_prefix.rstrip('/')}"
    print(f"Legion: serving at {url}  (health: {url}/healthz, API docs: {url}/docs)")
    dash = getattr(ctx, "dashboard_url", None)
    if dash:
        print(f"Ray dashboard: http://{dash}")
        print(
            "  Ray 2.60 requires its auth token: the dashboard asks for the token in "
            "~/.ray/auth_token; CLI tools need RAY_AUTH_MODE=token."
        )
    print("Press Ctrl+C to stop.")
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop["now"]:
            time.sleep(0.5)
    finally:
        print("Legion: stopping ...")
        serve.delete(cfg.serve.app_name)
        stop_actors(cfg)
        if not address:
            serve.shutdown()
            ray.shutdown()
    return 0


def _ask(args: argparse.Namespace) -> int:
    import httpx

    body = {"task": args.question}
    if args.strategy:
        body["strategy"] = args.strategy
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    r = httpx.post(f"{args.url.rstrip('/')}/v1/tasks", json=body, timeout=args.timeout)
    data = r.json()
    if r.status_code != 200:
        print(f"error {r.status_code}: {data.get('error', {}).get('message', data)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(data["answer"])
    print(f"\n[{data['strategy']}, {data['latency_ms']:.0f} ms, votes {data['votes']}]")
    for c in data["candidates"]:
        if c.get("error"):
            print(f"  {c['agent']:>10}: (failed) {c['error']}")
        else:
            print(f"  {c['agent']:>10}: {c['text']!r}  score={c['score']}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.rag:
        from legion.rag_bench import run_rag_bench

        return run_rag_bench(args)
    from legion.bench import run_bench

    return run_bench(args)


def _ingest(args: argparse.Namespace) -> int:
    from legion.ingest import ingest_local, upload

    if args.url:
        report = upload(args.paths, args.url, args.collection)
    else:
        from legion.config import load_config

        report = ingest_local(args.paths, load_config(args.config), args.collection)
    print(
        f"ingested {report.documents} documents as {report.chunks} chunks into collection "
        f"{report.collection!r} ({report.location}) in {report.seconds:.1f}s"
        + (f"; removed {report.removed} stale chunks" if report.removed else "")
    )
    return 0


def _cache(args: argparse.Namespace) -> int:
    from legion.cache import ResultCache
    from legion.config import load_config

    cache = ResultCache.from_config(load_config(args.config))
    if args.action == "clear":
        print(f"removed {cache.clear()} cached answers from {cache.path}")
        return 0
    stats = cache.stats()
    if args.json:
        print(stats.model_dump_json(indent=2))
        return 0
    print(f"cache      {stats.path}")
    print(f"entries    {stats.entries} (at most {stats.max_entries}, each valid {stats.ttl_s:.0f}s)")
    print(f"lookups    {stats.hits + stats.misses} ({stats.hits} hits, {stats.misses} misses)")
    print(f"hit rate   {stats.hit_rate:.1%}")
    print(f"size       {stats.bytes / 1024:.0f} KiB")
    return 0


def _config(args: argparse.Namespace) -> int:
    from legion.config import load_config

    cfg = load_config(args.config)
    import yaml

    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="legion", description="Multi-agent LLM service on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="start Ray (or join RAY_ADDRESS) and serve the HTTP API")
    s.add_argument("--config", help="YAML config (default: $LEGION_CONFIG or ./legion.yaml)")
    s.add_argument("--host", help="bind address (default from config: 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default from config: 8000)")
    s.add_argument(
        "--no-dashboard",
        dest="dashboard",
        action="store_false",
        help="do not start the Ray dashboard (local cluster only)",
    )
    s.set_defaults(func=_serve)

    a = sub.add_parser("ask", help="ask a running Legion a question")
    a.add_argument("question")
    a.add_argument("--url", default=os.environ.get("LEGION_URL", "http://127.0.0.1:8000"))
    a.add_argument("--strategy")
    a.add_argument("--max-tokens", type=int)
    a.add_argument("--timeout", type=float, default=300.0)
    a.add_argument("--json", action="store_true", help="print the whole response")
    a.set_defaults(func=_ask)

    b = sub.add_parser("bench", help="measure tokens/s (bare vs actor) and HTTP overhead")
    b.add_argument("--config", help="YAML config whose first agent is benchmarked")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--max-tokens", type=int, default=48, help="tokens per generation")
    b.add_argument("--rounds", type=int, default=3, help="generations per agent per measure")
    b.add_argument("--http-requests", type=int, default=20, help="requests for the HTTP overhead")
    b.add_argument(
        "--rag",
        action="store_true",
        help="instead: recall@5 and accuracy with/without retrieval on the shipped documents, "
        "and cached vs uncached /v1/tasks latency",
    )
    b.set_defaults(func=_bench)

    i = sub.add_parser("ingest", help="chunk, embed and store documents (.txt, .md, .html) for retrieval")
    i.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    i.add_argument("--collection", help="Qdrant collection (default from config: rag.collection)")
    i.add_argument(
        "--url", help="upload to this running Legion (POST /v1/documents) instead of writing the store"
    )
    i.add_argument("--config", help="YAML config (where the store is, chunk sizes)")
    i.set_defaults(func=_ingest)

    k = sub.add_parser("cache", help="show or clear the result cache")
    k.add_argument("action", choices=["stats", "clear"])
    k.add_argument("--config", help="YAML config (where the cache file is)")
    k.add_argument("--json", action="store_true", help="print stats as JSON")
    k.set_defaults(func=_cache)

    c = sub.add_parser("config", help="print the effective configuration")
    c.add_argument("--config")
    c.set_defaults(func=_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except LegionError as exc:
        print(f"legion: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
