"""The ``legion`` command: serve, ask, bench, eval, calibrate, ingest, cache, audit, doctor, config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from legion.errors import LegionError


def _model_paths(cfg) -> list[str]:
    from legion.engine.llama import model_file

    return list(dict.fromkeys(model_file(a) for a in cfg.agents))


def _preflight(paths: list[str]) -> None:
    """Before any agent loads: llama.cpp loads each model and decodes a token in a child
    process; a crash there (SIGILL: a build for another CPU) stops the command with the fix."""
    from legion.engine.preflight import require_runnable

    print("Legion: checking that llama.cpp runs on this CPU ...", file=sys.stderr)
    require_runnable(paths)


def _serve(args: argparse.Namespace) -> int:
    from legion.config import load_config
    from legion.logging_setup import LOG_FORMAT_ENV, LOG_LEVEL_ENV, configure_logging

    cfg = load_config(args.config)
    configure_logging(cfg.log_level, cfg.log_format)
    if not os.environ.get("RAY_ADDRESS"):  # on a cluster each agent checks on its own node
        _preflight(_model_paths(cfg))
    # Ray workers (ingress, Arbiter, agents) take the log settings from their environment: this
    # one for a local cluster, the job's runtime_env for a cluster at RAY_ADDRESS. JSON lines
    # forwarded to this stdout must not get Ray's "(pid=...)" prefix, read when ray is imported.
    log_env = {LOG_FORMAT_ENV: cfg.log_format, LOG_LEVEL_ENV: cfg.log_level}
    os.environ.update(log_env)
    if cfg.log_format == "json":
        os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")

    import ray
    from ray import serve

    from actors import stop_actors
    from serve_app import build_app

    host = args.host or cfg.serve.host
    port = args.port or cfg.serve.port
    cfg.serve.host, cfg.serve.port = host, port
    http_options, scheme = _http_options(args, cfg, host, port)
    address = os.environ.get("RAY_ADDRESS")
    ctx = ray.init(
        address=address,
        namespace=cfg.ray_namespace,
        include_dashboard=args.dashboard,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": log_env},
    )
    serve.start(http_options=http_options, proxy_location=cfg.serve.proxy_location)
    shown = ", ".join(f"{a.name} ({len(a.members())} views)" if a.views else a.name for a in cfg.agents)
    print(f"Legion: starting {len(cfg.agents)} agents, a panel of {len(cfg.panel)}: {shown} ...")
    if cfg.arbiter.profile:
        print(f"Legion: profile {cfg.arbiter.profile}")
    serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix, blocking=False)
    url = f"{scheme}://{host}:{port}{cfg.serve.route_prefix.rstrip('/')}"
    print(f"Legion: serving at {url}  (health: {url}/healthz, API docs: {url}/docs)")
    if cfg.security.api_keys:
        print(f"  {len(cfg.security.api_keys)} API keys: send 'Authorization: Bearer <key>'")
    dash = getattr(ctx, "dashboard_url", None)
    if dash:
        print(f"Ray dashboard: http://{dash}")
        print(
            "  Ray 2.60 requires its auth token: the dashboard asks for the token in "
            "~/.ray/auth_token; CLI tools need RAY_AUTH_MODE=token."
        )
    link = f"?dashboard=http://{dash}" if dash else ""  # the console's link to the Ray dashboard
    print(f"Legion console: {url}/ui/{link}")
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


def _http_options(args: argparse.Namespace, cfg, host: str, port: int) -> tuple[dict, str]:
    """Serve's HTTP options (TLS when both files are given) and the URL scheme; refuses an open
    non-loopback bind (no API keys) unless --insecure."""
    from legion.errors import ConfigError
    from legion.service.security import check_bind

    check_bind(host, bool(cfg.security.api_keys), args.insecure)
    options = {"host": host, "port": port}
    if not (args.ssl_certfile or args.ssl_keyfile):
        return options, "http"
    if not (args.ssl_certfile and args.ssl_keyfile):
        raise ConfigError("--ssl-certfile and --ssl-keyfile go together: pass both")
    for flag, path in (("--ssl-certfile", args.ssl_certfile), ("--ssl-keyfile", args.ssl_keyfile)):
        if not os.path.isfile(path):
            raise ConfigError(f"{flag} {path} does not exist")
    options.update(
        ssl_certfile=os.path.abspath(args.ssl_certfile), ssl_keyfile=os.path.abspath(args.ssl_keyfile)
    )
    return options, "https"


def _asked(data: dict) -> str:
    """ ", 4 of 9 views asked (adaptive; skipped: ...)" for an adaptive answer, else ""."""
    if data.get("fanout") != "adaptive" or data.get("agents_asked") is None:
        return ""
    skipped = data.get("skipped_agents") or []
    total = data["agents_asked"] + len(skipped)
    names = ", ".join(skipped) or "none"
    return f", {data['agents_asked']} of {total} views asked (adaptive; skipped: {names})"


def _ask(args: argparse.Namespace) -> int:
    import httpx

    body = {"task": args.question}
    if args.strategy:
        body["strategy"] = args.strategy
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    if args.choices is not None:
        body["choices"] = args.choices
    if args.min_confidence is not None:
        body["min_confidence"] = args.min_confidence
    if args.fanout is not None:
        body["fanout"] = args.fanout
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = f"{args.url.rstrip('/')}/v1/tasks"
    try:
        r = httpx.post(url, json=body, headers=headers, timeout=args.timeout, verify=args.cacert or True)
    except httpx.TimeoutException:
        raise LegionError(
            f"no answer from {url} within --timeout {args.timeout:g} s; raise --timeout"
        ) from None
    except httpx.TransportError as exc:
        raise LegionError(
            f"cannot reach Legion at {url} ({type(exc).__name__}): start it with `legion serve`, "
            "or point --url (or LEGION_URL) at the server"
        ) from None
    try:
        data = r.json()
    except ValueError:
        raise LegionError(f"{url} answered {r.status_code} without JSON: is --url a Legion server?") from None
    if r.status_code != 200:
        print(f"error {r.status_code}: {data.get('error', {}).get('message', data)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    choice = data.get("choice")
    if choice is not None:
        if data["answer"] is None:
            print(f"(no answer: {choice['abstained']})")
        else:
            print(data["answer"])
        source = choice["probability_source"]
        asked = _asked(data)
        print(f"\n[{data['strategy']}, {data['latency_ms']:.0f} ms, probabilities from {source}{asked}]")
        for i, (text, p) in enumerate(zip(choice["choices"], choice["probabilities"], strict=True)):
            picked = [m for m, j in choice["picks"].items() if j == i]
            mark = "*" if i == choice["index"] else " "
            print(f" {mark} {p:6.3f}  {text}" + (f"   picked by {', '.join(picked)}" if picked else ""))
        return 0
    print(data["answer"])
    print(f"\n[{data['strategy']}, {data['latency_ms']:.0f} ms, votes {data['votes']}{_asked(data)}]")
    for c in data["candidates"]:
        if c.get("error"):
            print(f"  {c['agent']:>10}: (failed) {c['error']}")
        else:
            print(f"  {c['agent']:>10}: {c['text']!r}  score={c['score']}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    # --views (and --fanout) have their own defaults (short answers, more tasks); every other 48 and 3.
    if args.max_tokens is None:
        args.max_tokens = 24 if args.views or args.fanout else 48
    if args.repeats is None:
        args.repeats = 8 if args.views else 3
    if args.choices and not args.views:
        from legion.errors import ConfigError

        raise ConfigError("--choices goes with --views: pass both")
    if args.fanout:
        from legion.config import load_config
        from legion_cli.fanout_bench import run_fanout_bench

        cfg = load_config(args.config)
        _preflight(_model_paths(cfg))
        return run_fanout_bench(
            cfg, args.data, args.limit, args.concurrency, args.free_text, args.max_tokens, args.json
        )
    if args.views:
        from legion.config import load_config
        from legion_cli.views_bench import run_views_bench

        cfg = load_config(args.config)
        _preflight(_model_paths(cfg))
        return run_views_bench(cfg.agents, args.repeats, args.max_tokens, args.json, args.choices)
    if args.rag_scale:
        from legion_cli.rag_scale import run_rag_scale_bench

        return run_rag_scale_bench(args)
    if args.llama_builds:
        from legion_cli.build_bench import compare_builds, parse_builds, print_table

        result = compare_builds(
            parse_builds(args.llama_builds), args.threads, args.max_tokens, args.rounds, args.repeats
        )
        print(json.dumps(result, indent=2)) if args.json else print_table(result)
        return 0
    from legion.engine.llama import bundled_model_path

    _preflight([bundled_model_path()])
    if args.model_memory:
        from legion_cli.model_memory import run_model_memory

        return run_model_memory(args.model_path, args.json)
    if args.rag:
        from legion_cli.rag_bench import run_rag_bench

        return run_rag_bench(args)
    from legion_cli.bench import run_bench

    return run_bench(args)


def _ingest(args: argparse.Namespace) -> int:
    from legion.state.ingest import ingest_local, upload

    if args.url:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
        report = upload(args.paths, args.url, args.collection, headers=headers)
    else:
        from legion.config import load_config

        report = ingest_local(args.paths, load_config(args.config), args.collection)
    print(
        f"ingested {report.documents} documents as {report.chunks} chunks into collection "
        f"{report.collection!r} ({report.location}) in {report.seconds:.1f}s"
        + (f"; removed {report.removed} stale chunks" if report.removed else "")
        + (f"; {report.skipped} unchanged documents skipped" if report.skipped else "")
    )
    return 0


def _cache(args: argparse.Namespace) -> int:
    from legion.config import load_config
    from legion.state.cache import ResultCache

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


def _eval(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        print("legion: --limit must be at least 1", file=sys.stderr)
        return 2
    from legion.config import load_config

    if args.dump_candidates and not args.free_text:
        print("legion: --dump-candidates goes with --free-text", file=sys.stderr)
        return 2
    if not (args.free_text and args.rejudge):  # judging saved answers loads no model
        _preflight(_model_paths(load_config(args.config)))
    if args.free_text:
        from legion.evaluation.freetext import run_freetext_cli

        args.threads = args.threads or 1  # the agents answer at once: one thread each
        return run_freetext_cli(args)
    from legion.evaluation.multiple_choice import run_eval_cli

    args.threads = args.threads or 2
    return run_eval_cli(args)


def _calibrate(args: argparse.Namespace) -> int:
    from legion.config import load_config
    from legion.evaluation.calibrate import run_calibrate_cli

    if args.limit is not None and args.limit < 1:
        print("legion: --limit must be at least 1", file=sys.stderr)
        return 2
    if args.folds < 2:
        print("legion: --folds must be at least 2", file=sys.stderr)
        return 2
    if sum(bool(x) for x in (args.data, args.candidates, args.answers)) != 1:
        print(
            "legion: give --data (items to score), --candidates (a free-text dump) or --answers "
            "(free-text answers to add to a profile), one of them",
            file=sys.stderr,
        )
        return 2
    if args.profile and not args.answers:
        print("legion: --profile goes with --answers", file=sys.stderr)
        return 2
    saved = "--answers" if args.answers else "--candidates" if args.candidates else None
    if saved is not None:  # --answers reads saved answers, --candidates saved scores: no model runs
        given = [f"--{n}" for n in ("limit", "agents", "shots", "scores") if getattr(args, n) is not None]
        given += ["--unlabelled"] if args.unlabelled else []
        if given:
            print(f"legion: {', '.join(given)} go with --data, not {saved}", file=sys.stderr)
            return 2
        return run_calibrate_cli(args)
    _preflight(_model_paths(load_config(args.config)))
    return run_calibrate_cli(args)


def _doctor(args: argparse.Namespace) -> int:
    from legion.config import load_config
    from legion.engine.llama import bundled_model_path
    from legion_cli.doctor import diagnose, print_report

    try:
        paths, config_error = _model_paths(load_config(args.config)), None
    except LegionError as exc:  # still report the rest, on the bundled model
        paths, config_error = [bundled_model_path()], exc.message
    report = diagnose(paths, config_error)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print_report(report)
    return 0 if report.ok else 1


def _audit(args: argparse.Namespace) -> int:
    from datetime import datetime

    from legion.config import load_config
    from legion.service.audit import AuditLog

    cfg = load_config(args.config)
    log = AuditLog(cfg.data_path / cfg.security.audit_file)
    entries = log.tail(args.n)
    if args.json:
        for e in entries:
            print(json.dumps(e.__dict__))
        return 0
    if not entries:
        print(f"no audit records in {log.path} yet")
        return 0
    for e in entries:
        when = datetime.fromtimestamp(e.ts).isoformat(timespec="seconds")
        task = (e.task_hash or "-")[:12]
        print(
            f"{when}  {e.status}  {e.method:<6} {e.route:<24} {e.key_id or '-':<14} "
            f"{e.latency_ms:>9.1f} ms  task {task}  {e.client or '-'}  {e.request_id}"
        )
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
    s.add_argument(
        "--insecure",
        action="store_true",
        help="serve on a non-loopback address without API keys (anyone who reaches it can use it)",
    )
    s.add_argument("--ssl-certfile", help="TLS certificate (PEM); with --ssl-keyfile, serve HTTPS")
    s.add_argument("--ssl-keyfile", help="TLS private key (PEM) of --ssl-certfile")
    s.set_defaults(func=_serve)

    a = sub.add_parser("ask", help="ask a running Legion a question")
    a.add_argument("question", help="the question or instruction, quoted")
    a.add_argument(
        "--url",
        default=os.environ.get("LEGION_URL", "http://127.0.0.1:8000"),
        help="the running Legion (default: $LEGION_URL or http://127.0.0.1:8000)",
    )
    a.add_argument("--strategy", help="arbitration strategy, e.g. debate (default: the server's own)")
    a.add_argument("--max-tokens", type=int, help="reply length in tokens (default: each agent's)")
    a.add_argument(
        "--choices",
        nargs="+",
        metavar="CHOICE",
        help="the answer is one of these: each view scores each, and each one's probability is printed",
    )
    a.add_argument(
        "--min-confidence",
        type=float,
        help="with --choices: no answer when the decided choice's probability is below this (0 to 1)",
    )
    a.add_argument(
        "--fanout",
        choices=["all", "adaptive"],
        help="ask every view (all), or in waves until the vote is settled (adaptive); default: the server's",
    )
    a.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for an answer (default: 300)"
    )
    a.add_argument("--json", action="store_true", help="print the whole response")
    a.add_argument(
        "--api-key", default=os.environ.get("LEGION_API_KEY"), help="API key (default: $LEGION_API_KEY)"
    )
    a.add_argument("--cacert", help="CA certificate (PEM) to trust for an HTTPS --url")
    a.set_defaults(func=_ask)

    b = sub.add_parser("bench", help="measure tokens/s (bare vs actor) and HTTP overhead")
    b.add_argument("--config", help="YAML config whose first agent (--views: every agent) is benchmarked")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--max-tokens", type=int, help="tokens per generation (default 48; --views, --fanout 24)")
    b.add_argument("--rounds", type=int, default=3, help="generations per agent per measure")
    b.add_argument(
        "--repeats",
        type=int,
        help="alternated pairs per comparison (bare/actor per number of agents, agent/llama-server; "
        "default 3), or tasks per side with --views (default 8)",
    )
    b.add_argument("--http-requests", type=int, default=20, help="requests for the HTTP overhead")
    b.add_argument(
        "--prefix-cache",
        action="store_true",
        help="only: time to first token after a ~500-token fixed prefix, with and without the prefix cache",
    )
    b.add_argument(
        "--constrained",
        action="store_true",
        help="only: tokens/s of 8 generations under a JSON-schema grammar against 8 free ones, and the ratio",
    )
    b.add_argument(
        "--rag",
        action="store_true",
        help="instead: recall@5 and accuracy with/without retrieval on the shipped documents, "
        "and cached vs uncached /v1/tasks latency",
    )
    b.add_argument(
        "--rag-scale",
        action="store_true",
        help="instead: the embedded vector stores (local, edge) at --sizes chunks: upsert and "
        "embedding chunks/s, query p50/p95, recall@10 against exact search",
    )
    b.add_argument("--sizes", default="10000,100000", help="with --rag-scale: chunk counts, comma-separated")
    b.add_argument("--backends", default="local,edge", help="with --rag-scale: local and/or edge")
    b.add_argument("--queries", type=int, default=200, help="with --rag-scale: queries per measure")
    b.add_argument(
        "--embed-sample", type=int, default=2000, help="with --rag-scale: chunks the real model embeds"
    )
    b.add_argument("--hnsw-ef", default="default,64,128,256", help="with --rag-scale: Edge search ef values")
    b.add_argument(
        "--sigma", type=float, default=0.02, help="with --rag-scale: jitter of the generated vectors"
    )
    b.add_argument(
        "--llama-builds",
        metavar="NAME=WHEEL,...",
        help="instead: decode, 8-batched and prefill tokens/s of llama-cpp-python builds (wheels or "
        "pip --target folders) side by side, ratios to the first",
    )
    b.add_argument("--threads", type=int, default=2, help="with --llama-builds: llama.cpp threads")
    b.add_argument(
        "--model-memory",
        action="store_true",
        help="instead: RSS and PSS of two agent processes on one GGUF file against two on two files "
        "(the model and a copy of it), side by side",
    )
    b.add_argument("--model-path", help="with --model-memory: the GGUF (default: the bundled Gemma)")
    b.add_argument(
        "--views",
        action="store_true",
        help="instead: the config's agents speaking as their views in one engine each, against one "
        "agent process per member on the same CPUs: task latency p50/p95, tokens/s, RSS and PSS",
    )
    b.add_argument(
        "--choices",
        action="store_true",
        help="with --views: then the same questions as multiple-choice tasks (one score_choices call "
        "per actor, every member it answers for): task latency p50/p95, tasks/s, the same scores",
    )
    b.add_argument(
        "--fanout",
        action="store_true",
        help="instead: one served Legion (the config's line-up) answers the same uncached tasks with "
        "fanout all and adaptive, alternated in blocks: tasks/s, latency p50/p95, agents asked per task, "
        "the ratios adaptive/all",
    )
    b.add_argument(
        "--data",
        help="with --fanout: multiple-choice JSONL items (legion eval's format; default the ARC-Easy dev "
        "set in /work/shared/benchdata when present, else built-in questions)",
    )
    b.add_argument("--limit", type=int, default=40, help="with --fanout: the first N items (default 40)")
    b.add_argument(
        "--concurrency", type=int, default=4, help="with --fanout: requests in flight at once (default 4)"
    )
    b.add_argument(
        "--free-text",
        action="store_true",
        help="with --fanout: the questions without their choices (the free-text default strategy)",
    )
    b.set_defaults(func=_bench)

    i = sub.add_parser("ingest", help="chunk, embed and store documents (.txt, .md, .html) for retrieval")
    i.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    i.add_argument("--collection", help="Qdrant collection (default from config: rag.collection)")
    i.add_argument(
        "--url", help="upload to this running Legion (POST /v1/documents) instead of writing the store"
    )
    i.add_argument(
        "--api-key",
        default=os.environ.get("LEGION_API_KEY"),
        help="with --url: API key (default: $LEGION_API_KEY)",
    )
    i.add_argument("--config", help="YAML config (where the store is, chunk sizes)")
    i.set_defaults(func=_ingest)

    k = sub.add_parser("cache", help="show or clear the result cache")
    k.add_argument("action", choices=["stats", "clear"])
    k.add_argument("--config", help="YAML config (where the cache file is)")
    k.add_argument("--json", action="store_true", help="print stats as JSON")
    k.set_defaults(func=_cache)

    e = sub.add_parser("eval", help="multiple-choice accuracy of every strategy and every single agent")
    e.add_argument("--data", required=True, help="JSONL items: context, choices, answer (index)")
    e.add_argument("--limit", type=int, help="only the first N items (file order)")
    e.add_argument("--strategies", help="comma-separated strategies (default: every one that scores choices)")
    e.add_argument("--agents", help="comma-separated agent names (default: every configured agent)")
    e.add_argument(
        "--shots",
        help="JSONL for few-shot exemplars (default: each member's own, as legion serve draws them)",
    )
    e.add_argument("--config", help="YAML config whose agents are evaluated")
    e.add_argument(
        "--threads", type=int, help="llama.cpp threads of each in-process engine (default 2; --free-text 1)"
    )
    e.add_argument("--json", action="store_true", help='print {strategy: {"accuracy", "n", "seconds"}}')
    e.add_argument("--out", help="also write the results (with the config used) to this JSON file")
    e.add_argument("--scores", help="JSONL cache of scored choices: reused when present, extended otherwise")
    e.add_argument("--plot", help="write an SVG of accuracy against the number of agents (first k agents)")
    e.add_argument(
        "--baseline-items",
        type=int,
        default=10,
        help="also time a plain one-at-a-time llama-cpp-python scorer on this many items per agent "
        "and print the ratio (0: skip)",
    )
    e.add_argument(
        "--profile", help="an Arbiter profile (legion calibrate) for the learned and equilibrium strategies"
    )
    e.add_argument(
        "--fanout",
        choices=["all", "adaptive"],
        default="all",
        help="adaptive: also decide every item with adaptive fan-out (the config's adaptive_* settings) "
        "and report, per strategy, its accuracy, agents asked and cost beside the full panel's",
    )
    e.add_argument("--adaptive-risk", type=float, help="override arbiter.adaptive_risk for --fanout adaptive")
    e.add_argument(
        "--adapt",
        choices=["off", "agreement"],
        help="agreement: also decide every item with learned over the profile adapted online, as "
        "arbiter.adapt: agreement does when served (items in file order, no labels), in a "
        "'learned@adapted' row (default: the config's arbiter.adapt)",
    )
    ft = e.add_argument_group(
        "free text",
        "--free-text: the items as short-answer tasks, answered by every strategy that writes answers",
    )
    ft.add_argument(
        "--free-text", action="store_true", help="generated answers judged against the right choice"
    )
    ft.add_argument(
        "--form",
        choices=["listed", "open"],
        default="listed",
        help="the question with or without its choices",
    )
    ft.add_argument("--max-tokens", type=int, default=32, help="most tokens per answer")
    ft.add_argument("--samples", type=int, default=3, help="self-consistency samples (0: none)")
    ft.add_argument("--sc-agent", help="the agent sampled for self-consistency (default: the first)")
    ft.add_argument("--sc-temperature", type=float, default=0.7, help="self-consistency sampling temperature")
    ft.add_argument("--concurrency", type=int, default=2, help="items answered at once")
    ft.add_argument(
        "--judge",
        choices=["rules", "embedding"],
        default="rules",
        help="how an answer is judged to state the reference: the vote's rules, or the rules then "
        "embedding similarity where no rule decides",
    )
    ft.add_argument("--min-similarity", type=float, default=0.8, help="--judge embedding: the threshold")
    ft.add_argument("--rejudge", help="judge the answers saved in this --out file again (no model runs)")
    ft.add_argument(
        "--dump-candidates",
        metavar="FILE",
        help="write, per item, the answers learned chose between, every member's scores of them and which "
        "the judge holds right (JSON; needs learned among the strategies): legion calibrate --candidates",
    )
    e.set_defaults(func=_eval)

    cb = sub.add_parser(
        "calibrate",
        help="fit how the Arbiter weighs its agents on labelled items; write a profile (arbiter.profile)",
    )
    cb.add_argument("--data", help="training JSONL file(s), comma-separated")
    cb.add_argument(
        "--candidates",
        metavar="FILE",
        help="instead of --data: fit on free-text candidates, the file(s) of legion eval --free-text "
        "--dump-candidates (comma-separated; no model runs)",
    )
    cb.add_argument(
        "--answers",
        metavar="FILE",
        help="instead of fitting: add the members' free-text answer patterns, read from the --out file(s) "
        "of legion eval --free-text (comma-separated; no model runs), to --profile, for adaptive fan-out",
    )
    cb.add_argument(
        "--profile", help="with --answers: the profile to add them to (default: the config's arbiter.profile)"
    )
    cb.add_argument("--config", help="YAML config whose agents are fitted")
    cb.add_argument("--out", required=True, help="the profile (JSON) to write")
    cb.add_argument("--limit", type=int, help="only the first N items of each file (file order)")
    cb.add_argument("--agents", help="comma-separated agent names (default: every configured agent)")
    cb.add_argument(
        "--shots",
        help="JSONL for few-shot exemplars (default: each member's own, as legion serve draws them)",
    )
    cb.add_argument("--scores", help="JSONL cache of scored choices, as for legion eval")
    cb.add_argument("--threads", type=int, default=2, help="llama.cpp threads of the in-process engines")
    cb.add_argument("--folds", type=int, default=5, help="cross-validation folds choosing the L2 penalty")
    cb.add_argument(
        "--unlabelled",
        action="store_true",
        help="ignore the answers: fit to Dawid-Skene posteriors over the agents' picks (weak supervision)",
    )
    cb.set_defaults(func=_calibrate)

    au = sub.add_parser("audit", help="show the audit log (one record per HTTP request)")
    au.add_argument("action", choices=["tail"])
    au.add_argument("-n", type=int, default=20, help="how many records, newest last")
    au.add_argument("--config", help="YAML config (where the audit file is)")
    au.add_argument("--json", action="store_true", help="one JSON object per record")
    au.set_defaults(func=_audit)

    d = sub.add_parser(
        "doctor",
        help="print what a bug report needs (llama.cpp build and CPU, versions, model, memory, GPU) "
        "and check that legion serve can start; exit status 1 if not",
    )
    d.add_argument("--config", help="YAML config whose agents' models are checked")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=_doctor)

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
