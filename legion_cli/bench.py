"""``legion bench``: Ray's cost, measured side by side in one run on the same prompts.

1. Decode tokens/s of k bare engines (threads in this process, no Ray) against k
   ``AgentActor``s, for k = 1, 2, 3 agents sharing the machine's cores (each gets
   ``cores / k`` CPUs and the threads that share implies).
2. End-to-end latency of ``POST /v1/tasks`` against a direct ``ArbiterActor.run`` call,
   interleaved, on the same tasks; the HTTP overhead is the median of the paired differences.
   Beside it, a no-op POST through Serve's proxy: the part of that overhead any Serve app pays.
3. Batching: one agent under 8 concurrent requests against ``llama-server -np 8`` on the same
   model and threads when it is installed (``scripts/build_llama_server.sh``), alternated in
   ``--repeats`` pairs (median of the pair ratios), and 8 samples of one prompt against one.
4. The prefix cache: time to first token of prompts that share a ~500-token fixed prefix (a
   role prompt and exemplars), on an engine with the automatic prefix cache against one
   without, alternated (``--prefix-cache`` runs only this).
5. Constrained output (``--constrained`` runs only this): decode tokens/s of 8 concurrent
   generations under a JSON-schema grammar against 8 free ones on one engine, alternated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

_PROMPTS = [
    "Question: What is the boiling point of water at sea level?\nAnswer:",
    "Question: Name three primary colors.\nAnswer:",
    "Question: Why do leaves change color in autumn?\nAnswer:",
    "Question: What does a thermometer measure?\nAnswer:",
]


# No stop sequences and a fixed seed: every run decodes exactly max_tokens tokens.
_SAMPLING = {"temperature": 0.7, "seed": 7}


def _agent_config(name: str, max_tokens: int = 48, **fields):
    """The bench's agents: the template ``{task}``, no role prompt, the bench's sampling."""
    from legion.config import AgentConfig

    sampling = {**_SAMPLING, "stop": [], "max_tokens": max_tokens}
    return AgentConfig(name=name, prompt_template="{task}", sampling=sampling, **fields)


def _as_agent_sees(task: str) -> str:
    """The text the bench's agents decode for ``task`` (every prompt carries the data notice
    of ``legion.service.guard``). The bare engines and llama-server get exactly this text, so every
    side decodes the same tokens: until this, they got the shorter raw task (about 15 prompt
    tokens against 45), which made the agents look slower than they are."""
    from legion.agent import build_prompt

    return build_prompt(_agent_config("bench"), task, "")


@contextlib.contextmanager
def json_stdout(as_json: bool) -> Iterator[TextIO]:
    """Yields the stream a bench's result goes to. With ``--json`` that is stdout, which then
    carries the JSON alone: whatever else is printed meanwhile (Ray's processes' messages, at
    shutdown too) goes to stderr."""
    out = sys.stdout
    if not as_json:
        yield out
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield out


def _progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _params(max_tokens: int):
    from legion.engine.llama import SamplingParams

    return SamplingParams(max_tokens=max_tokens, stop=(), **_SAMPLING)


class _Bare:
    """k bare engines in this process (no Ray), one thread each to drive them."""

    def __init__(self, model_path: str, k: int, threads: int):
        from legion.engine.llama import LlamaEngine

        self.engines = [LlamaEngine(model_path, n_threads=threads) for _ in range(k)]
        self.prompts = [_as_agent_sees(p) for p in _PROMPTS]
        self.engines[0].generate(self.prompts[0], _params(4))  # warm-up

    def tokens_per_s(self, rounds: int, max_tokens: int) -> float:
        k = len(self.engines)
        counts = [0] * k

        def work(i: int) -> None:
            for r in range(rounds):
                g = self.engines[i].generate(self.prompts[(i + r) % len(self.prompts)], _params(max_tokens))
                counts[i] += g.completion_tokens

        t0 = time.perf_counter()
        ts = [threading.Thread(target=work, args=(i,)) for i in range(k)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return sum(counts) / (time.perf_counter() - t0)

    def close(self) -> None:
        for e in self.engines:
            e.close()


class _Actors:
    """k ``AgentActor``s, each with ``num_cpus`` (and the threads that implies)."""

    def __init__(self, model_path: str, k: int, num_cpus: float, max_tokens: int):
        import ray

        from actors.agent import AgentActor
        from legion.messages import GenerateRequest

        cls = ray.remote(AgentActor)
        self.actors = []
        for i in range(k):
            cfg = _agent_config(f"bench{i}", max_tokens, model_path=model_path, num_cpus=num_cpus)
            self.actors.append(cls.options(num_cpus=num_cpus, max_concurrency=4).remote(cfg.model_dump()))
        ray.get([a.wait_loaded.remote() for a in self.actors])
        ray.get(self.actors[0].generate.remote(GenerateRequest(task=_PROMPTS[0], max_tokens=4)))

    def tokens_per_s(self, rounds: int) -> float:
        import ray

        from legion.messages import GenerateRequest

        k = len(self.actors)
        t0 = time.perf_counter()
        # Same work as the bare run: agent i runs its rounds one after another.
        pending = [
            [GenerateRequest(task=_PROMPTS[(i + r) % len(_PROMPTS)]) for r in range(rounds)] for i in range(k)
        ]
        total = 0
        inflight = {a.generate.remote(pending[i].pop(0)): i for i, a in enumerate(self.actors)}
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1)
            i = inflight.pop(done[0])
            total += ray.get(done[0]).completion_tokens
            if pending[i]:
                inflight[self.actors[i].generate.remote(pending[i].pop(0))] = i
        return total / (time.perf_counter() - t0)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def _actor_vs_bare(model_path: str, k: int, cores: float, rounds: int, max_tokens: int, repeats: int) -> dict:
    """Bare and actor runs alternate ``repeats`` times with both sides loaded (idle engines cost
    nothing), so a slow spell of a shared machine hits both; the ratio is the median of the
    pairs' ratios."""
    share = cores / k
    threads = max(1, int(share))
    bare = _Bare(model_path, k, threads)
    actors = _Actors(model_path, k, share, max_tokens)
    try:
        pairs = []
        for _ in range(repeats):
            b = bare.tokens_per_s(rounds, max_tokens)
            a = actors.tokens_per_s(rounds)
            pairs.append((b, a))
            _progress(f"{k} agent(s): bare {b:.1f} tok/s, actors {a:.1f} tok/s")
    finally:
        bare.close()
        actors.close()
    return {
        "ratio": round(statistics.median(a / b for b, a in pairs), 3),
        "bare_tokens_per_s": round(statistics.median(b for b, _ in pairs), 1),
        "actor_tokens_per_s": round(statistics.median(a for _, a in pairs), 1),
        "threads_per_agent": threads,
        "pairs": len(pairs),
    }


def _find_llama_server() -> str | None:
    """``llama-server`` on PATH or beside this Python (where ``scripts/build_llama_server.sh`` puts it)."""
    import shutil

    found = shutil.which("llama-server")
    if found:
        return found
    beside = Path(sys.executable).parent / "llama-server"
    return str(beside) if beside.is_file() else None


class _LlamaServer:
    """``llama-server -np concurrency`` on the model, started once and measured on demand."""

    def __init__(self, binary: str, model_path: str, threads: int, n_ctx: int, concurrency: int):
        import socket
        import subprocess

        import httpx

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # -np N without --kv-unified: one KV stream per slot, as the engine uses.
        cmd = [binary, "-m", model_path, "-np", str(concurrency), "-t", str(threads), "-tb", str(threads)]
        cmd += ["-c", str(n_ctx * concurrency), "--host", "127.0.0.1", "--port", str(port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        self.concurrency = concurrency
        self.prompts = [_as_agent_sees(p) for p in _PROMPTS]
        for _ in range(600):
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with code {self.proc.returncode}: {' '.join(cmd)}")
            time.sleep(0.2)

    def _one(self, i: int, max_tokens: int, seed_offset: int = 0) -> int:
        import httpx

        body = {
            "prompt": self.prompts[i % len(self.prompts)],
            "n_predict": max_tokens,
            "temperature": _SAMPLING["temperature"],
            "seed": _SAMPLING["seed"] + i + seed_offset,
            "ignore_eos": True,
            "cache_prompt": False,
        }
        r = httpx.post(f"{self.url}/completion", json=body, timeout=600)
        r.raise_for_status()
        return int(r.json()["tokens_predicted"])

    def tokens_per_s(self, max_tokens: int) -> float:
        """Aggregate decode tokens/s under ``concurrency`` requests at once."""
        from concurrent.futures import ThreadPoolExecutor

        t0 = time.perf_counter()
        with ThreadPoolExecutor(self.concurrency) as ex:
            total = sum(ex.map(lambda i: self._one(i, max_tokens), range(self.concurrency)))
        return total / (time.perf_counter() - t0)

    def fanout_time_ratio(self, max_tokens: int, prompt: int, repeats: int) -> float:
        """Wall time of ``concurrency`` samples of one prompt (concurrent requests, one per
        slot, distinct seeds) over one sample: the same measure as the agent's fan-out, as
        llama-server gets it (it has no n-samples request, so each slot evaluates the prompt)."""
        from concurrent.futures import ThreadPoolExecutor

        one, many = [], []
        with ThreadPoolExecutor(self.concurrency) as ex:
            for _ in range(repeats):
                t0 = time.perf_counter()
                self._one(prompt, max_tokens)
                one.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                list(ex.map(lambda k: self._one(prompt, max_tokens, seed_offset=k), range(self.concurrency)))
                many.append(time.perf_counter() - t0)
        return statistics.median(many) / statistics.median(one)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _batching(model_path: str, cores: float, max_tokens: int, repeats: int, concurrency: int = 8) -> dict:
    """One agent actor on all the cores: 8 concurrent requests against ``llama-server -np 8``
    (alternating, ``repeats`` pairs, both started and idle while the other runs), and 8
    samples of one prompt against one."""
    import ray

    from actors.agent import AgentActor
    from legion.messages import GenerateRequest

    cfg = _agent_config("batch", max_tokens, model_path=model_path, num_cpus=cores, n_parallel=concurrency)
    actor = ray.remote(AgentActor).options(num_cpus=cores, max_concurrency=32).remote(cfg.model_dump())
    ray.get(actor.wait_loaded.remote())
    ray.get(actor.generate.remote(GenerateRequest(task=_PROMPTS[0], max_tokens=4)))
    out: dict = {"concurrency": concurrency, "threads": cfg.threads}

    def agent_tokens_per_s() -> float:
        t0 = time.perf_counter()
        seed = _SAMPLING["seed"]
        gens = ray.get(
            [
                actor.generate.remote(GenerateRequest(task=_PROMPTS[i % len(_PROMPTS)], seed=seed + i))
                for i in range(concurrency)
            ]
        )
        return sum(g.completion_tokens for g in gens) / (time.perf_counter() - t0)

    try:
        # Fan-out: N samples of one prompt against one sample, same prompt and length.
        single_s, fan_s = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            ray.get(actor.generate.remote(GenerateRequest(task=_PROMPTS[1])))
            single_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ray.get(actor.generate_n.remote(GenerateRequest(task=_PROMPTS[1], n=concurrency)))
            fan_s.append(time.perf_counter() - t0)
        out["single_sample_s"] = round(statistics.median(single_s), 3)
        out[f"fanout{concurrency}_s"] = round(statistics.median(fan_s), 3)
        out[f"fanout{concurrency}_vs_single_time_ratio"] = round(
            statistics.median(fan_s) / statistics.median(single_s), 3
        )
        binary = _find_llama_server()
        if binary is None:
            out["agent_tokens_per_s"] = round(agent_tokens_per_s(), 1)
            out["llama_server"] = "not installed (scripts/build_llama_server.sh builds it)"
            return out
        _progress(f"llama-server -np {concurrency} -t {cfg.threads}, alternating with the agent ...")
        server = _LlamaServer(binary, model_path, cfg.threads, cfg.n_ctx, concurrency)
        try:
            server._one(0, 4)  # warm-up
            agent, theirs = [], []
            for r in range(repeats):
                # The order alternates: whichever runs second in a pair must not be favoured.
                if r % 2 == 0:
                    agent.append(agent_tokens_per_s())
                    theirs.append(server.tokens_per_s(max_tokens))
                else:
                    theirs.append(server.tokens_per_s(max_tokens))
                    agent.append(agent_tokens_per_s())
            # The same fan-out measure on llama-server: how far the hardware lets any server go.
            out[f"llama_server_fanout{concurrency}_vs_single_time_ratio"] = round(
                server.fanout_time_ratio(max_tokens, 1, 3), 3
            )
        finally:
            server.close()
    finally:
        ray.kill(actor)
    out["pairs"] = repeats
    out["agent_tokens_per_s"] = round(statistics.median(agent), 1)
    out["llama_server_tokens_per_s"] = round(statistics.median(theirs), 1)
    ratios = [a / b for a, b in zip(agent, theirs, strict=True)]
    out["pair_ratios"] = [round(r, 3) for r in ratios]
    out["batched_vs_llama_server_ratio"] = round(statistics.median(ratios), 3)
    return out


def _fixed_prefix() -> str:
    """A role prompt and 24 worked exemplars: about 500 tokens of the bundled model's."""
    lines = ["You are a careful arithmetic tutor. Answer each question with the number only.\n\n"]
    for i in range(24):
        a, b = 17 + 7 * i, 5 + 3 * i
        lines.append(f"Question: What is {a} plus {b}?\nAnswer: {a + b}\n\n")
    return "".join(lines)


def _prefix_cache_ttft(model_path: str, threads: int, repeats: int) -> dict:
    """Time to first token (a one-token generation, prefill included) of ``prefix +
    question`` on an engine with the prefix cache and on one without, one question after
    another alternating between them; each engine first answers one warm-up question (which
    stores the prefix in the cached one: that is the steady state of an agent's role prompt)."""
    from legion.engine.llama import LlamaEngine, SamplingParams

    prefix = _fixed_prefix()
    one = SamplingParams(max_tokens=1, stop=())
    cached = LlamaEngine(model_path, n_threads=threads, prefix_cache_slots=2)
    plain = LlamaEngine(model_path, n_threads=threads, prefix_cache_slots=0)
    try:
        prefix_tokens = len(cached.tokenize(prefix))
        for e in (cached, plain):
            e.generate(prefix + "Question: What is 1 plus 1?\nAnswer:", one)
        with_cache, without = [], []
        for r in range(max(1, repeats) * 4):
            prompt = f"{prefix}Question: What is {300 + r} plus {40 + r}?\nAnswer:"
            # The order alternates: whichever runs second in a pair must not be favoured.
            for e, out in ((cached, with_cache), (plain, without))[:: 1 if r % 2 == 0 else -1]:
                t0 = time.perf_counter()
                e.generate(prompt, one)
                out.append(time.perf_counter() - t0)
        stats = cached.stats()["prefix_cache"]
    finally:
        cached.close()
        plain.close()
    on, off = statistics.median(with_cache), statistics.median(without)
    return {
        "prefix_tokens": prefix_tokens,
        "threads": threads,
        "requests": len(with_cache),
        "ttft_cached_ms_p50": round(on * 1000, 1),
        "ttft_uncached_ms_p50": round(off * 1000, 1),
        "ttft_cached_vs_uncached_ratio": round(on / off, 3),
        "tokens_reused": stats["tokens_reused"],
    }


def _print_prefix_cache(p: dict) -> None:
    print(
        f"time to first token after a {p['prefix_tokens']}-token fixed prefix ({p['threads']} threads, "
        f"{p['requests']} requests each): prefix cache {p['ttft_cached_ms_p50']} ms, without "
        f"{p['ttft_uncached_ms_p50']} ms, ratio {p['ttft_cached_vs_uncached_ratio']}"
    )


# A schema whose answers cannot end before max_tokens (the string is at least 2000 characters
# long): both sides decode exactly max_tokens tokens per sequence, at the same batch occupancy.
_LONG_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "minLength": 2000}},
    "required": ["answer"],
}


def _constrained_vs_free(model_path: str, threads: int, max_tokens: int, repeats: int, n: int = 8) -> dict:
    """Tokens/s of ``n`` concurrent generations under a JSON-schema grammar against ``n`` free
    ones on the same engine and prompts, alternated in ``repeats`` pairs (median of the pair
    ratios). The constrained sequences pay for the grammar: a check of every picked token,
    and a masked redraw where the grammar rejects the model's pick."""
    from dataclasses import replace

    from legion.engine.constrained import instruction, schema_spec
    from legion.engine.llama import LlamaEngine

    spec = schema_spec(_LONG_SCHEMA)
    grammar = spec.grammar
    # Both sides get the instruction a constrained agent adds to its task (legion.agent).
    prompts = [_as_agent_sees(f"{instruction(spec)}\n{p}") for p in _PROMPTS]
    free = _params(max_tokens)
    constrained = replace(free, grammar=grammar)
    engine = LlamaEngine(model_path, n_threads=threads, n_parallel=n)
    try:
        engine.generate(prompts[0], replace(constrained, max_tokens=4))  # warm-up

        def tokens_per_s(params) -> tuple[float, int]:
            batch = [(prompts[i % len(prompts)], replace(params, seed=params.seed + i)) for i in range(n)]
            t0 = time.perf_counter()
            gens = engine.generate_batch(batch)
            tokens = sum(g.completion_tokens for g in gens)
            return tokens / (time.perf_counter() - t0), tokens

        pairs, free_tps, con_tps = [], [], []
        for r in range(max(1, repeats)):
            sides = [(free, free_tps), (constrained, con_tps)][:: 1 if r % 2 == 0 else -1]
            got = {}
            for params, out in sides:
                tps, tokens = tokens_per_s(params)
                out.append(tps)
                got[params.grammar is not None] = (tps, tokens)
            if got[True][1] != got[False][1]:
                raise RuntimeError(f"the sides decoded {got[True][1]} and {got[False][1]} tokens")
            pairs.append(got[True][0] / got[False][0])
    finally:
        engine.close()
    return {
        "threads": threads,
        "sequences": n,
        "max_tokens": max_tokens,
        "pairs": len(pairs),
        "free_tokens_per_s": round(statistics.median(free_tps), 1),
        "constrained_tokens_per_s": round(statistics.median(con_tps), 1),
        "pair_ratios": [round(x, 3) for x in pairs],
        "constrained_vs_free_tokens_per_s_ratio": round(statistics.median(pairs), 3),
    }


def _print_constrained(c: dict) -> None:
    print(
        f"{c['sequences']} concurrent generations of {c['max_tokens']} tokens ({c['threads']} threads, "
        f"{c['pairs']} pairs): free {c['free_tokens_per_s']} tok/s, JSON-schema constrained "
        f"{c['constrained_tokens_per_s']} tok/s, ratio {c['constrained_vs_free_tokens_per_s_ratio']}"
    )


def _noop_app():
    """A Serve app that answers a POST with a constant: the floor any Serve HTTP request pays
    (Serve's proxy, its hop to a replica and back), measured beside Legion's own route."""
    from fastapi import FastAPI
    from ray import serve

    noop = FastAPI()

    @noop.post("/")
    async def answer(body: dict) -> dict:
        return {"answer": "ok", "echo": len(body)}

    @serve.deployment(
        name="Noop", ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False}
    )
    @serve.ingress(noop)
    class Noop:
        pass

    return Noop.bind()


def _http_overhead(rounds: int, cores: float) -> dict:
    import httpx
    import ray
    from ray import serve

    from legion.config import config_from_dict
    from legion.messages import TaskRequest
    from legion.service.api import new_id
    from serve_app import build_app

    port = int(os.environ.get("LEGION_BENCH_PORT", "8765"))
    cfg = config_from_dict(
        {
            "agents": [
                {"name": "b1", "num_cpus": cores / 2 - 0.1, "sampling": {"max_tokens": 8}},
                {"name": "b2", "num_cpus": cores / 2 - 0.1, "sampling": {"max_tokens": 8}},
            ],
            "serve": {"app_name": "legionbench", "port": port, "min_replicas": 1, "max_replicas": 1},
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix="/")
    serve.run(_noop_app(), name="legionbench-noop", route_prefix="/legionbench-noop")
    arbiter = ray.get_actor(f"{cfg.serve.app_name}-arbiter", namespace=cfg.ray_namespace)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(timeout=300) as client:
        for _ in range(600):
            if client.get(f"{url}/healthz").status_code == 200:
                break
            time.sleep(0.5)
        tasks = [p.split("Question: ", 1)[1].split("\n", 1)[0] for p in _PROMPTS]
        client.post(f"{url}/v1/tasks", json={"task": tasks[0], "max_tokens": 8})  # warm-up
        http_ms, direct_ms, noop_ms = [], [], []

        def over_http(task: str) -> None:
            t0 = time.perf_counter()
            r = client.post(f"{url}/v1/tasks", json={"task": task, "max_tokens": 8, "cache": False})
            http_ms.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()

        def direct(task: str) -> None:
            t0 = time.perf_counter()
            ray.get(
                arbiter.run.remote(TaskRequest(id=new_id(), task=task, strategy="plurality", max_tokens=8))
            )
            direct_ms.append((time.perf_counter() - t0) * 1000)

        for i in range(rounds):
            task = tasks[i % len(tasks)]
            # Alternate which goes first: the second of a pair finds the agents' threads awake
            # and ran ~20 ms faster here, whichever path it was.
            for run in (over_http, direct) if i % 2 == 0 else (direct, over_http):
                run(task)
            t0 = time.perf_counter()
            client.post(f"{url}/legionbench-noop/", json={"task": task, "max_tokens": 8}).raise_for_status()
            noop_ms.append((time.perf_counter() - t0) * 1000)
    serve.delete("legionbench-noop")
    serve.delete(cfg.serve.app_name)
    from actors import stop_actors

    stop_actors(cfg)
    diffs = [h - d for h, d in zip(http_ms, direct_ms, strict=True)]
    return {
        "http_p50_ms": round(statistics.median(http_ms), 2),
        "direct_p50_ms": round(statistics.median(direct_ms), 2),
        "http_overhead_ms_p50": round(statistics.median(diffs), 2),
        "serve_noop_post_ms_p50": round(statistics.median(noop_ms), 2),
        "requests": rounds,
    }


def run_bench(args: argparse.Namespace) -> int:
    from legion.engine.llama import bundled_model_path

    model_path = bundled_model_path()
    cores = float(os.cpu_count() or 1)
    if getattr(args, "constrained", False):
        _progress("constrained output: JSON-schema grammar against free generation ...")
        c = _constrained_vs_free(model_path, max(1, int(cores)), args.max_tokens, args.repeats)
        if args.json:
            print(json.dumps({"model": os.path.basename(model_path), "constrained": c}))
        else:
            _print_constrained(c)
        return 0
    if getattr(args, "prefix_cache", False):
        _progress("prefix cache: time to first token with and without it ...")
        p = _prefix_cache_ttft(model_path, max(1, int(cores)), args.repeats)
        if args.json:
            print(json.dumps({"model": os.path.basename(model_path), "prefix_cache": p}))
        else:
            _print_prefix_cache(p)
        return 0

    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING")
    cores = float(ray.cluster_resources().get("CPU", cores))
    result: dict = {"model": os.path.basename(model_path), "cores": cores, "max_tokens": args.max_tokens}
    ratios, detail = {}, {}
    for k in (1, 2, 3):
        _progress(f"{k} agent(s), num_cpus={cores / k:.2f} each: bare engines against actors ...")
        d = _actor_vs_bare(model_path, k, cores, args.rounds, args.max_tokens, args.repeats)
        ratios[str(k)] = d.pop("ratio")
        detail[str(k)] = d
        _progress(f"{k} agent(s): ratio {ratios[str(k)]} (median of {d['pairs']} pairs)")
    result["actor_vs_bare_tokens_per_s_ratio"] = ratios
    result["tokens_per_s"] = detail
    _progress("HTTP /v1/tasks against a direct ArbiterActor call ...")
    http = _http_overhead(args.http_requests, cores)
    result.update(http)
    _progress(
        f"HTTP overhead p50 {http['http_overhead_ms_p50']} ms; "
        f"a no-op POST through Serve alone p50 {http['serve_noop_post_ms_p50']} ms"
    )
    _progress("batching: one agent under 8 concurrent requests, 8 samples of one prompt ...")
    batching = _batching(model_path, cores, args.max_tokens, args.repeats)
    result["batching"] = batching
    for key in ("batched_vs_llama_server_ratio", "fanout8_vs_single_time_ratio"):
        if key in batching:
            result[key] = batching[key]
    _progress("prefix cache: time to first token with and without it ...")
    result["prefix_cache"] = _prefix_cache_ttft(model_path, max(1, int(cores)), args.repeats)
    result["ttft_cached_vs_uncached_ratio"] = result["prefix_cache"]["ttft_cached_vs_uncached_ratio"]
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model {result['model']} on {cores:g} cores, {args.max_tokens} tokens per generation")
    print(f"{'agents':>6} {'bare tok/s':>11} {'actor tok/s':>12} {'actor/bare':>11}")
    for k, d in detail.items():
        print(f"{k:>6} {d['bare_tokens_per_s']:>11.1f} {d['actor_tokens_per_s']:>12.1f} {ratios[k]:>11.3f}")
    b = batching
    print(
        f"one agent, {b['concurrency']} concurrent requests: {b['agent_tokens_per_s']} tok/s; "
        + (
            f"llama-server -np {b['concurrency']}: {b['llama_server_tokens_per_s']} tok/s, "
            f"ratio {b['batched_vs_llama_server_ratio']}"
            if "llama_server_tokens_per_s" in b
            else f"llama-server: {b['llama_server']}"
        )
    )
    fan_server = b.get(f"llama_server_fanout{b['concurrency']}_vs_single_time_ratio")
    print(
        f"{b['concurrency']} samples of one prompt: {b['fanout8_s']} s against {b['single_sample_s']} s "
        f"for one, ratio {b['fanout8_vs_single_time_ratio']}"
        + (f" (llama-server, the same measure: {fan_server})" if fan_server is not None else "")
    )
    print(
        f"/v1/tasks p50 {http['http_p50_ms']} ms, direct Arbiter p50 {http['direct_p50_ms']} ms, "
        f"HTTP overhead p50 {http['http_overhead_ms_p50']} ms over {http['requests']} requests "
        f"(a no-op POST through Serve alone: p50 {http['serve_noop_post_ms_p50']} ms)"
    )
    _print_prefix_cache(result["prefix_cache"])
    return 0
