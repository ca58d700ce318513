"""The start-up check: can this CPU run the installed llama.cpp on a model?

A llama.cpp built for another CPU does not fail politely: the first instruction this CPU (or
its OS) does not allow kills the process with SIGILL. So the check runs in a child process,
which loads the model and decodes one token; whatever kills the child cannot take the caller
down, and the caller turns the signal into a message that names the likely cause and the fix.
``legion serve``, ``legion eval`` and ``legion bench`` run it before any agent loads, and every
agent runs it on its own node before it loads its model in-process.

``python -m legion.engine.preflight MODEL`` is the child.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from legion.errors import LlamaUnusable

_WHY = {
    signal.SIGILL: (
        "an illegal instruction: the installed llama.cpp was built for another CPU (pip's default "
        "-march=native on a different host, or AMX/AVX-512 kernels this CPU or its hypervisor does "
        "not enable)"
    ),
    signal.SIGSEGV: (
        "a crash inside llama.cpp (a corrupt or incompatible GGUF file, or a build for another CPU)"
    ),
    signal.SIGBUS: "a bus error reading the model (a truncated GGUF file, or a full or removed disk)",
    signal.SIGKILL: "killed from outside, most often by the kernel's out-of-memory killer",
    signal.SIGABRT: "llama.cpp aborted (an assertion failed: an unsupported model or a broken build)",
}


@dataclass
class CheckResult:
    """What the child did: ``ok``, or how it failed (``signal`` names a fatal signal)."""

    model_path: str
    ok: bool
    seconds: float
    returncode: int | None = None
    signal: str | None = None
    output: str = ""  # the child's last lines (stderr and stdout)
    message: str = ""  # for a failure: what happened, the likely cause, the fix

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


def _child_command(model_path: str) -> list[str]:
    return [sys.executable, "-m", "legion.engine.preflight", model_path]


def check_model(
    model_path: str, *, timeout_s: float = 180.0, command: Sequence[str] | None = None
) -> CheckResult:
    """Load ``model_path`` and decode one token in a child process; never raises for a crash.

    ``command`` replaces the child (tests use a child that kills itself with a signal)."""
    from legion.engine.llama_build import reinstall_command

    t0 = time.monotonic()
    if command is None and not Path(model_path).is_file():
        return CheckResult(
            model_path,
            ok=False,
            seconds=0.0,
            message=f"model file {model_path} does not exist; fix model_path",
        )
    cmd = list(command) if command is not None else _child_command(model_path)
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return CheckResult(
            model_path,
            ok=False,
            seconds=round(time.monotonic() - t0, 2),
            message=(
                f"loading {model_path} and decoding one token took longer than {timeout_s:g} s in a "
                "child process; the machine may be out of memory or swapping"
            ),
        )
    seconds = round(time.monotonic() - t0, 2)
    tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
    if proc.returncode == 0:
        return CheckResult(model_path, ok=True, seconds=seconds, returncode=0, output=tail)
    result = CheckResult(model_path, ok=False, seconds=seconds, returncode=proc.returncode, output=tail)
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode)
        result.signal = sig.name
        why = _WHY.get(sig, "a fatal signal inside llama.cpp")
        result.message = (
            f"llama.cpp died with {sig.name} while loading {model_path} and decoding one token "
            f"(checked in a child process): {why}."
        )
        if sig in (signal.SIGILL, signal.SIGSEGV):
            result.message += (
                " Rebuild llama-cpp-python for any x86-64 CPU with: "
                f"{reinstall_command()}   (then check with: legion doctor)"
            )
    else:
        last = tail.splitlines()[-1] if tail else "no output"
        result.message = (
            f"llama.cpp could not load {model_path} and decode one token (exit status "
            f"{proc.returncode}): {last}"
        )
    return result


def require_runnable(model_paths: Iterable[str], *, timeout_s: float = 180.0) -> list[CheckResult]:
    """``check_model`` for each distinct path; raises ``LlamaUnusable`` at the first failure."""
    results = []
    for path in dict.fromkeys(model_paths):
        result = check_model(path, timeout_s=timeout_s)
        if not result.ok:
            raise LlamaUnusable(result.message, details=result.to_dict())
        results.append(result)
    return results


def _child(model_path: str) -> int:
    """Load the model and decode one token; print what was decoded as JSON."""
    import llama_cpp

    t0 = time.monotonic()
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=64, n_batch=16, n_threads=1, verbose=False)
    out = llm.create_completion("The capital of France is", max_tokens=1, temperature=0.0)
    print(
        json.dumps(
            {
                "ok": True,
                "text": out["choices"][0]["text"],
                "seconds": round(time.monotonic() - t0, 2),
                "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
                "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
            }
        )
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m legion.engine.preflight MODEL.gguf", file=sys.stderr)
        sys.exit(2)
    sys.exit(_child(sys.argv[1]))
