"""A llama.cpp that runs on any x86-64 host: how ``pip install .`` builds llama-cpp-python.

pip builds llama-cpp-python from source with llama.cpp's default ``GGML_NATIVE=ON``
(``-march=native``). That build runs only on CPUs like the build host, and on a VM whose CPUID
lists AMX without the hypervisor enabling its register state it dies with SIGILL at the first
decode (ggml's AMX kernels). pip gives a dependency no way to receive CMake flags from the
project that depends on it, and its wheel cache would hand back a native wheel built earlier.

So this module is also Legion's PEP 517 build backend (``[build-system]`` in pyproject.toml,
wrapping setuptools): before Legion's metadata is written it builds llama-cpp-python once with
the flags below, into a cache of its own keyed by those flags, and makes Legion require that
very wheel (``llama-cpp-python @ file://...``). A plain ``pip install .`` therefore installs the
portable build, and a changed flag set is a new cache entry, never a stale wheel.

Environment, read at install time:

- ``LEGION_LLAMA_BUILD``: ``portable`` (default: x86-64-v3, i.e. AVX2/FMA/F16C/BMI2, no
  AVX-512, no AMX), ``native`` (``-march=native`` for this host only), or ``external`` (require
  ``llama-cpp-python==VERSION`` from the index and build nothing: for a llama-cpp-python you
  manage yourself, such as a prebuilt CUDA wheel).
- ``CMAKE_ARGS``: appended to the flags (``-DGGML_CUDA=on`` for CUDA) and part of the cache key.
- ``LEGION_WHEEL_CACHE``: the cache folder (default ``$XDG_CACHE_HOME/legion/wheels``).

``python -m legion.engine.llama_build --reinstall`` builds (or takes from the cache) the wheel and
reinstalls it into the running environment: the fix that ``legion doctor`` and the start-up
check print for a llama.cpp built for another CPU.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # the one version Legion's engine is written and tested against

# x86-64-v3 (Haswell, 2013, and every x86-64 server CPU since): the level the measurements in
# docs/benchmarks.md chose. The ISA switches are explicit because GGML_NATIVE=OFF alone leaves
# them to a default that turns them all off when SOURCE_DATE_EPOCH is set (reproducible builds).
PORTABLE_X86_64 = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_SSE42=ON",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
    "-DGGML_AVX_VNNI=OFF",
    "-DGGML_AVX512=OFF",
    "-DGGML_AVX512_VBMI=OFF",
    "-DGGML_AVX512_VNNI=OFF",
    "-DGGML_AVX512_BF16=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
)
MODES = ("portable", "native", "external")
BUILD_INFO = "legion-build.json"  # beside each cached wheel: the flags it was built with


class BuildError(RuntimeError):
    """llama-cpp-python could not be built; the message says why and what to do."""


def build_mode() -> str:
    mode = os.environ.get("LEGION_LLAMA_BUILD", "portable").strip().lower() or "portable"
    if mode not in MODES:
        raise BuildError(f"LEGION_LLAMA_BUILD={mode!r} is not one of {', '.join(MODES)}")
    return mode


def cmake_args(mode: str | None = None, machine: str | None = None) -> list[str]:
    """The CMake flags llama-cpp-python is built with for ``mode`` on ``machine``."""
    mode = mode or build_mode()
    machine = (machine or platform.machine()).lower()
    if mode == "native":
        base: tuple[str, ...] = ("-DGGML_NATIVE=ON",)
    elif machine in ("x86_64", "amd64"):
        base = PORTABLE_X86_64
    else:  # aarch64 and others: the architecture's baseline
        base = ("-DGGML_NATIVE=OFF",)
    return [*base, *shlex.split(os.environ.get("CMAKE_ARGS", ""))]


def cache_root() -> Path:
    if os.environ.get("LEGION_WHEEL_CACHE"):
        return Path(os.environ["LEGION_WHEEL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "legion" / "wheels"


def _host_cpu() -> str:
    """What a native build depends on: the CPU's feature flags (empty off Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cache_key(args: list[str], mode: str) -> str:
    parts = {
        "llama_cpp_python": LLAMA_CPP_PYTHON,
        "cmake_args": args,
        "machine": platform.machine(),
        "python": f"{sys.implementation.name}{sys.version_info.major}{sys.version_info.minor}",
        "cpu": _host_cpu() if mode == "native" else "",
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"llama_cpp_python-{LLAMA_CPP_PYTHON}-{mode}-{digest}"


def _say(message: str) -> None:
    # pip shows a build backend's output with -v, or when the build fails.
    print(f"legion: {message}", file=sys.stderr, flush=True)


def portable_wheel() -> Path:
    """The llama-cpp-python wheel for this environment's flags: from the cache, or built now
    (once; a lock keeps two concurrent installs from building it twice)."""
    mode = build_mode()
    args = cmake_args(mode)
    folder = cache_root() / cache_key(args, mode)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = sorted(folder.glob("llama_cpp_python-*.whl")) if folder.is_dir() else []
        if found:
            return found[0]
        return _build(folder, args, mode)


def _build(folder: Path, args: list[str], mode: str) -> Path:
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
    _say(
        f"building llama-cpp-python {LLAMA_CPP_PYTHON} ({mode}: {' '.join(args)}) with {jobs} jobs; "
        f"once per flag set, about 7 minutes on 2 cores; cached in {folder}"
    )
    env = dict(os.environ, CMAKE_ARGS=" ".join(args), FORCE_CMAKE="1", CMAKE_BUILD_PARALLEL_LEVEL=jobs)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", dir=folder.parent))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        # pip's wheel cache keys a built wheel by the sdist alone, not by CMAKE_ARGS: it would
        # hand back whatever was built before (a native wheel, say). This cache replaces it.
        "--no-cache-dir",
        "--no-binary",
        "llama-cpp-python",
        "--disable-pip-version-check",
        "-w",
        str(tmp),
        f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
    ]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wheels = sorted(tmp.glob("llama_cpp_python-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = "\n".join(proc.stdout.splitlines()[-40:])
            raise BuildError(
                f"building llama-cpp-python {LLAMA_CPP_PYTHON} failed (exit {proc.returncode}); it needs "
                f"a C/C++ compiler and cmake (Debian: apt-get install build-essential cmake).\n"
                f"command: {shlex.join(cmd)}\nCMAKE_ARGS={env['CMAKE_ARGS']}\n{tail}"
            )
        info = {
            "llama_cpp_python": LLAMA_CPP_PYTHON,
            "mode": mode,
            "cmake_args": args,
            "machine": platform.machine(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - t0, 1),
        }
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if folder.exists():  # an unfinished earlier attempt
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _say(f"built llama-cpp-python in {time.monotonic() - t0:.0f} s")
    return folder / wheels[0].name


def llama_requirement() -> str:
    """The requirement line Legion's metadata carries for llama-cpp-python."""
    if build_mode() == "external":
        return f"llama-cpp-python=={LLAMA_CPP_PYTHON}"
    return f"llama-cpp-python @ {portable_wheel().resolve().as_uri()}"


def installed_build() -> dict | None:
    """The build record of the installed llama-cpp-python, if it came from this module's cache."""
    from importlib import metadata

    try:
        raw = metadata.distribution("llama-cpp-python").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not raw:
        return None
    url = json.loads(raw).get("url", "")
    if not url.startswith("file://"):
        return None
    info = Path(url.removeprefix("file://")).parent / BUILD_INFO
    try:
        return json.loads(info.read_text())
    except (OSError, ValueError):
        return None


def reinstall_command() -> str:
    """The one command that puts a portable llama-cpp-python into the running environment."""
    return f"{shlex.quote(sys.executable)} -m legion.engine.llama_build --reinstall"


# PEP 517 hooks: setuptools does the work; the metadata gains the llama-cpp-python requirement.


def _setuptools():
    from setuptools import build_meta

    return build_meta


def _add_requirement(metadata_text: str) -> str:
    """METADATA with the llama-cpp-python requirement added to its headers."""
    head, sep, body = metadata_text.partition("\n\n")
    # setuptools may build the wheel from metadata this hook already patched: keep one line.
    lines = [ln for ln in head.splitlines() if not ln.startswith("Requires-Dist: llama-cpp-python")]
    lines.append(f"Requires-Dist: {llama_requirement()}")
    head = "\n".join(lines)
    return f"{head}{sep}{body}" if sep else f"{head}\n"


def _patch_wheel(wheel: Path) -> None:
    """Rewrite the wheel's METADATA (and its RECORD line) with the requirement added."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        names = src.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        new_meta = _add_requirement(src.read(meta).decode()).encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(new_meta).digest()).rstrip(b"=").decode()
        rows = []
        for row in src.read(record).decode().splitlines():
            if row.split(",", 1)[0] == meta:
                row = f"{meta},sha256={digest},{len(new_meta)}"
            rows.append(row)
        for info in src.infolist():
            if info.filename == meta:
                dst.writestr(info, new_meta)
            elif info.filename == record:
                dst.writestr(info, "\n".join(rows) + "\n")
            else:
                dst.writestr(info, src.read(info.filename))
    tmp.replace(wheel)


def _patch_metadata_dir(directory: str, dist_info: str) -> str:
    path = Path(directory) / dist_info / "METADATA"
    path.write_text(_add_requirement(path.read_text()))
    return dist_info


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools().get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _setuptools().get_requires_for_build_editable(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    return _setuptools().get_requires_for_build_sdist(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    name = _setuptools().prepare_metadata_for_build_wheel(metadata_directory, config_settings)
    return _patch_metadata_dir(metadata_directory, name)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    name = _setuptools().prepare_metadata_for_build_editable(metadata_directory, config_settings)
    return _patch_metadata_dir(metadata_directory, name)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools().build_wheel(wheel_directory, config_settings, metadata_directory)
    _patch_wheel(Path(wheel_directory) / name)
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools().build_editable(wheel_directory, config_settings, metadata_directory)
    _patch_wheel(Path(wheel_directory) / name)
    return name


def build_sdist(sdist_directory, config_settings=None):
    return _setuptools().build_sdist(sdist_directory, config_settings)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m legion.engine.llama_build",
        description="Build llama-cpp-python for any x86-64 host (the flags Legion's install uses).",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--print-cmake-args", action="store_true", help="print the CMake flags and exit")
    g.add_argument(
        "--wheel", action="store_true", help="build (or find in the cache) the wheel; print its path"
    )
    g.add_argument(
        "--reinstall",
        action="store_true",
        help="build (or find) the wheel and reinstall it into this Python environment",
    )
    args = p.parse_args(argv)
    try:
        if args.print_cmake_args:
            print(" ".join(cmake_args()))
            return 0
        wheel = portable_wheel()
    except BuildError as exc:
        print(f"legion: {exc}", file=sys.stderr)
        return 1
    if args.wheel:
        print(wheel)
        return 0
    cmd = [sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps", str(wheel)]
    print(f"legion: {shlex.join(cmd)}")
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
