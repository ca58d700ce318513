"""``legion bench --model-memory``: what two agents on one GGUF file cost in memory against two
agents on two files holding the same weights.

Each agent runs in its own process (as each agent actor does), loads its model through
``legion.agent.Agent`` and decodes a few tokens, so the weights it reads are paged in. Then the
kernel's accounting is read from ``/proc/<pid>/smaps_rollup`` (RSS: the pages a process maps;
PSS: each shared page divided among the processes that map it) and from ``/proc/<pid>/smaps``
for the GGUF file's own mapping. The second file is a copy of the first at another path, so
no page of the page cache can be shared between the two agents.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_FIELDS = ("Rss", "Pss", "Shared_Clean", "Private_Clean", "Private_Dirty", "Anonymous")


def _kib(line: str) -> int:
    return int(line.split()[1])


def process_memory(pid: int, model_file: str) -> dict[str, float]:
    """MiB: the process's totals (``smaps_rollup``) and its mapping of ``model_file`` (``smaps``)."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key = line.split(":")[0]
        if key in _FIELDS:
            out[key.lower()] = round(_kib(line) / 1024, 1)
    file_rss = file_pss = 0
    in_file = False
    target = os.path.realpath(model_file)
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header
            in_file = len(head) >= 6 and os.path.realpath(head[-1]) == target
        elif in_file and line.startswith("Rss:"):
            file_rss += _kib(line)
        elif in_file and line.startswith("Pss:"):
            file_pss += _kib(line)
    out["model_file_rss"] = round(file_rss / 1024, 1)
    out["model_file_pss"] = round(file_pss / 1024, 1)
    return out


def _child(path: str) -> None:
    """One agent on ``path``: load, decode, say ready, wait for stdin to close."""
    from legion.agent import Agent
    from legion.config import AgentConfig
    from legion.messages import GenerateRequest

    agent = Agent(AgentConfig(name="memory", model_path=path), load_in_background=False)
    if agent.health().state != "ready":
        print(json.dumps({"error": agent.health().error}), flush=True)
        return
    agent.generate(GenerateRequest(task="Name a primary color.", max_tokens=8))
    print(json.dumps({"ready": os.getpid()}), flush=True)
    sys.stdin.read()


def _pair(paths: list[str]) -> list[dict]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "legion_cli.model_memory", p],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for p in paths
    ]
    try:
        rows = []
        for proc, path in zip(procs, paths, strict=True):
            line = proc.stdout.readline()
            said = json.loads(line) if line.strip() else {"error": "the agent process exited"}
            if "error" in said:
                raise RuntimeError(f"an agent on {path} did not load: {said['error']}")
        for proc, path in zip(procs, paths, strict=True):  # both loaded: measure together
            rows.append({"pid": proc.pid, "file": path, **process_memory(proc.pid, path)})
        return rows
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(timeout=60)


def measure(model_path: str, workdir: str | None = None) -> dict:
    """Two agents on ``model_path``, then one on it and one on a copy of it: each process's
    figures and the pair's sums (MiB)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        copy = str(Path(tmp) / ("copy-" + Path(model_path).name))
        shutil.copyfile(model_path, copy)
        result = {"model": model_path, "size_mib": round(os.path.getsize(model_path) / 2**20, 1)}
        for name, paths in (("one_file", [model_path, model_path]), ("two_files", [model_path, copy])):
            rows = _pair(paths)
            result[name] = {
                "agents": rows,
                "sum_rss": round(sum(r["rss"] for r in rows), 1),
                "sum_pss": round(sum(r["pss"] for r in rows), 1),
                "sum_model_file_pss": round(sum(r["model_file_pss"] for r in rows), 1),
            }
    return result


def print_table(r: dict) -> None:
    print(f"model: {r['model']} ({r['size_mib']} MiB on disk); two agent processes each; MiB")
    head = ("", "RSS a+b", "PSS a+b", "file-mapped RSS a / b", "file-mapped PSS a+b", "anon a+b")
    print(f"{head[0]:<22}{head[1]:>10}{head[2]:>10}{head[3]:>24}{head[4]:>22}{head[5]:>10}")
    for name, label in (("one_file", "same file"), ("two_files", "two files (a copy)")):
        s = r[name]
        a, b = s["agents"]
        mapped = f"{a['model_file_rss']} / {b['model_file_rss']}"
        anon = round(a["anonymous"] + b["anonymous"], 1)
        print(
            f"{label:<22}{s['sum_rss']:>10}{s['sum_pss']:>10}{mapped:>24}"
            f"{s['sum_model_file_pss']:>22}{anon:>10}"
        )
    saved = round(r["two_files"]["sum_pss"] - r["one_file"]["sum_pss"], 1)
    print(f"sharing one file saves {saved} MiB of PSS for the pair")


def run_model_memory(model_path: str | None, as_json: bool) -> int:
    from legion.engine.llama import bundled_model_path

    r = measure(model_path or bundled_model_path())
    print(json.dumps(r, indent=2)) if as_json else print_table(r)
    return 0


if __name__ == "__main__":
    _child(sys.argv[1])
