"""The GPU path of the engine, checked on a machine with an NVIDIA GPU: the llama.cpp build (is
GPU offload compiled in), ``n_gpu_layers`` (does the model land on the GPU), and whether batched
generation and scoring on the GPU agree with the CPU.

It runs the tiny model the tests build (tests/tiny_gguf.py; its greedy chat reply is known in
advance), once with ``n_gpu_layers=0`` and once with every layer offloaded, and prints one JSON
object. Nothing here needs Ray. Run from the repository root, with llama-cpp-python installed:

    python scripts/gpu_check.py [--out FILE]

Exit status 0 when offload is compiled in and every GPU check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from legion.engine.llama import LlamaEngine, SamplingParams
from tests.tiny_gguf import build_tiny_gguf

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, stop=())


def _gpu_memory_mib() -> list[int] | None:
    """Memory in use on each GPU, from nvidia-smi (None without one)."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    )
    return [int(x) for x in out.stdout.split()] if out.returncode == 0 else None


def _run(path: str, reply: str, n_gpu_layers: int) -> dict:
    before = _gpu_memory_mib()
    t0 = time.perf_counter()
    engine = LlamaEngine(path, n_ctx=256, n_batch=64, n_parallel=8, n_threads=2, n_gpu_layers=n_gpu_layers)
    loaded_s = time.perf_counter() - t0
    during = _gpu_memory_mib()
    try:
        one = engine.generate("User: What is two plus two?\n", GREEDY)
        # Eight prompts decoded together in one llama_batch per step.
        batch = engine.generate_batch([(f"User: question {i}?\n", GREEDY) for i in range(8)])
        noise = engine.generate("Question: What is the capital of France?\nAnswer:", GREEDY)
        scores = engine.score("Question: pick one\nAnswer:", [" alpha", " beta", " gamma delta"])
    finally:
        engine.close()
    return {
        "n_gpu_layers": n_gpu_layers,
        "load_seconds": round(loaded_s, 3),
        "gpu_memory_mib_before_load": before,
        "gpu_memory_mib_loaded": during,
        "reply": one.text,
        "reply_is_the_scripted_one": one.text.strip() == reply.strip() and one.finish_reason == "stop",
        "batched_replies_scripted": sum(
            g.text.strip() == reply.strip() and g.finish_reason == "stop" for g in batch
        ),
        "noise_text": noise.text,
        "noise_tokens": noise.completion_tokens,
        "score_logprobs": [s.logprob for s in scores],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    import llama_cpp as lc

    report: dict = {
        "llama_cpp_python": lc.__version__,
        "supports_gpu_offload": bool(lc.llama_supports_gpu_offload()),
        "max_devices": int(lc.llama_max_devices()),
    }
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_gguf(Path(tmp) / "tiny-chat.gguf")
        cpu = _run(str(model.path), model.reply, 0)
        gpu = _run(str(model.path), model.reply, -1)
    diff = max(abs(a - b) for a, b in zip(cpu["score_logprobs"], gpu["score_logprobs"], strict=True))
    loaded = (gpu["gpu_memory_mib_loaded"] or [0])[0] - (gpu["gpu_memory_mib_before_load"] or [0])[0]
    report.update(
        cpu=cpu,
        gpu=gpu,
        gpu_memory_mib_taken_by_the_offloaded_engine=loaded,
        score_max_abs_diff_cpu_vs_gpu=diff,
        noise_text_same_on_cpu_and_gpu=cpu["noise_text"] == gpu["noise_text"],
    )
    checks = {
        "offload compiled in": report["supports_gpu_offload"],
        "the offloaded engine took GPU memory": loaded > 0,
        "GPU greedy reply is the scripted one": gpu["reply_is_the_scripted_one"],
        "GPU batched replies are all scripted": gpu["batched_replies_scripted"] == 8,
        "GPU scores within 1e-2 of the CPU's": math.isfinite(diff) and diff < 1e-2,
    }
    report["checks"] = checks
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
