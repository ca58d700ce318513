"""``legion bench --llama-builds``: llama.cpp builds of different ISA levels, side by side.

Each build is a llama-cpp-python wheel (or a folder it was installed into with ``pip install
--target``). Every measurement runs Legion's own engine in a child process whose
``llama_cpp`` is that build, so one build crashing (SIGILL on a CPU it was not built for) is
reported, not fatal. Builds alternate within each repeat, in a rotating order, and the figures
are medians over the repeats with ratios to the first build, all from one run on one host.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_PROMPT = "Question: Why is the sky blue on a clear day?\nAnswer:"
_LONG_PROMPT = (
    " ".join(f"Fact {i}: the number {i} follows {i - 1}." for i in range(1, 60))
    + "\nQuestion: what follows 7?\nAnswer:"
)

# The child: Legion's engine on the bundled model, timed three ways; prints one JSON line.
_CHILD = """
import json, sys, time
from legion.engine.llama import LlamaEngine, SamplingParams, bundled_model_path
import llama_cpp
threads, tokens, rounds, prompt, long_prompt = json.loads(sys.argv[1])
engine = LlamaEngine(bundled_model_path(), n_ctx=1024, n_threads=threads, n_parallel=8)
greedy = SamplingParams(max_tokens=tokens, temperature=0.0, stop=())
engine.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
t0 = time.perf_counter(); n = 0
for _ in range(rounds):
    g = engine.generate(prompt, greedy); n += g.completion_tokens; text = g.text
single = n / (time.perf_counter() - t0)
reqs = [(f"{prompt} ({i})", greedy) for i in range(8)]
t0 = time.perf_counter(); n = 0
for _ in range(rounds):
    n += sum(g.completion_tokens for g in engine.generate_batch(reqs))
batched = n / (time.perf_counter() - t0)
one = SamplingParams(max_tokens=1, temperature=0.0, stop=())
t0 = time.perf_counter(); n = 0
for _ in range(rounds):
    n += engine.generate(long_prompt, one).prompt_tokens
prefill = n / (time.perf_counter() - t0)
engine.close()
info = llama_cpp.llama_print_system_info().decode(errors="replace")
print(json.dumps({"single": single, "batched8": batched, "prefill": prefill, "text": text,
                  "system_info": info.strip()}))
"""

METRICS = ("single", "batched8", "prefill")


def _prepare(name: str, source: str, work: Path) -> Path:
    """A folder whose ``llama_cpp`` is the build: the folder itself, or the wheel installed."""
    src = Path(source).expanduser()
    if src.is_dir():
        if not (src / "llama_cpp").is_dir():
            raise SystemExit(f"legion: --llama-builds {name}={src}: no llama_cpp package in that folder")
        return src
    if not (src.is_file() and src.suffix == ".whl"):
        raise SystemExit(f"legion: --llama-builds {name}={src}: give a llama-cpp-python wheel or a folder")
    target = work / name
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(src)],
        check=True,
    )
    return target


def _run_child(path: Path, threads: int, tokens: int, rounds: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(path), *sys.path[1:]]))
    args = json.dumps([threads, tokens, rounds, _PROMPT, _LONG_PROMPT])
    proc = subprocess.run([sys.executable, "-c", _CHILD, args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        how = (
            f"killed by {signal.Signals(-proc.returncode).name}"
            if proc.returncode < 0
            else f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
        )
        return {"error": how}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_builds(spec: str) -> list[tuple[str, str]]:
    """``name=path,name=path`` in order (the first is the baseline of the ratios)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, path = part.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"legion: --llama-builds wants NAME=WHEEL_OR_FOLDER[,...]; got {part!r}")
        out.append((name, path))
    if len({n for n, _ in out}) != len(out):
        raise SystemExit("legion: --llama-builds names must differ")
    return out


def compare_builds(
    builds: list[tuple[str, str]], threads: int, tokens: int, rounds: int, repeats: int
) -> dict:
    """Median tokens/s of each build per metric over ``repeats`` rotations, and ratios to the first."""
    with tempfile.TemporaryDirectory(prefix="legion-builds-") as tmp:
        paths = {name: _prepare(name, src, Path(tmp)) for name, src in builds}
        runs: dict[str, list[dict]] = {name: [] for name, _ in builds}
        names = [n for n, _ in builds]
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]  # each build goes first in turn
            for name in order:
                print(
                    f"legion bench: build {name}, repeat {r + 1}/{repeats} ...", file=sys.stderr, flush=True
                )
                runs[name].append(_run_child(paths[name], threads, tokens, rounds))
    out: dict = {"threads": threads, "max_tokens": tokens, "rounds": rounds, "repeats": repeats, "builds": {}}
    base = names[0]
    for name in names:
        ok = [x for x in runs[name] if "error" not in x]
        if not ok:
            out["builds"][name] = {"error": runs[name][0]["error"]}
            continue
        row = {m: round(statistics.median(x[m] for x in ok), 1) for m in METRICS}
        row["system_info"] = ok[0]["system_info"]
        row["greedy_text"] = ok[0]["text"]
        out["builds"][name] = row
    first = out["builds"].get(base, {})
    for name in names:
        row = out["builds"][name]
        if "error" in row or "error" in first:
            continue
        for m in METRICS:
            row[f"{m}_ratio_to_{base}"] = round(row[m] / first[m], 3)
        row[f"same_greedy_text_as_{base}"] = row["greedy_text"] == first["greedy_text"]
    return out


def print_table(result: dict) -> None:
    names = list(result["builds"])
    base = names[0]
    print(
        f"llama.cpp builds, one engine in a child process each, {result['threads']} threads, "
        f"median of {result['repeats']} rotations (ratios to {base}):"
    )
    head = f"  {'build':<12} {'decode tok/s':>13} {'8 batched':>10} {'prefill':>9}"
    print(f"{head}   ratios (decode, batched, prefill)")
    for name, row in result["builds"].items():
        if "error" in row:
            print(f"  {name:<12} failed: {row['error']}")
            continue
        ratios = ", ".join(str(row[f"{m}_ratio_to_{base}"]) for m in METRICS)
        print(f"  {name:<12} {row['single']:>13} {row['batched8']:>10} {row['prefill']:>9}   {ratios}")
