"""The install's llama.cpp build (legion.engine.llama_build) and start-up check (legion.engine.preflight)."""

from __future__ import annotations

import base64
import hashlib
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from legion.engine import llama_build, preflight
from legion.errors import LlamaUnusable
from legion.service.health import service_health
from legion_cli import cli

ROOT = Path(__file__).resolve().parents[2]
SIGILL_CHILD = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]


def test_portable_flags_turn_native_and_amx_off_and_keep_avx2(monkeypatch):
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    args = llama_build.cmake_args("portable", "x86_64")
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX2=ON" in args and "-DGGML_FMA=ON" in args
    for off in ("AVX512", "AMX_TILE", "AMX_INT8", "AMX_BF16"):
        assert f"-DGGML_{off}=OFF" in args
    assert not any(a.endswith("=ON") and ("AVX512" in a or "AMX" in a) for a in args)
    assert llama_build.cmake_args("portable", "aarch64") == ["-DGGML_NATIVE=OFF"]
    assert llama_build.cmake_args("native", "x86_64") == ["-DGGML_NATIVE=ON"]


def test_user_cmake_args_are_appended_and_change_the_cache_key(monkeypatch):
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    plain = llama_build.cmake_args("portable", "x86_64")
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_CUDA=on")
    cuda = llama_build.cmake_args("portable", "x86_64")
    assert cuda == [*plain, "-DGGML_CUDA=on"]
    assert llama_build.cache_key(plain, "portable") != llama_build.cache_key(cuda, "portable")
    assert llama_build.cache_key(plain, "portable") == llama_build.cache_key(list(plain), "portable")


def test_an_unknown_build_mode_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("LEGION_LLAMA_BUILD", "fast")
    with pytest.raises(llama_build.BuildError, match="LEGION_LLAMA_BUILD='fast'"):
        llama_build.build_mode()


def _fake_llama_wheel(monkeypatch, tmp_path: Path) -> Path:
    """A stand-in for the 7-minute llama-cpp-python build: a tiny wheel in the cache slot that
    the current flags map to (the build itself runs in the install test and in CI)."""
    monkeypatch.setenv("LEGION_WHEEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    monkeypatch.delenv("LEGION_LLAMA_BUILD", raising=False)
    folder = llama_build.cache_root() / llama_build.cache_key(llama_build.cmake_args(), "portable")
    folder.mkdir(parents=True)
    wheel = folder / f"llama_cpp_python-{llama_build.LLAMA_CPP_PYTHON}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llama_cpp/__init__.py", "")
    return wheel


def test_legion_wheel_requires_the_cached_portable_llama_wheel_with_a_valid_record(monkeypatch, tmp_path):
    wheel = _fake_llama_wheel(monkeypatch, tmp_path)
    out, src = tmp_path / "out", tmp_path / "src"
    # A copy of the project: setuptools builds in the source tree (build/, *.egg-info).
    junk = shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "tests", "docs", "data"
    )
    shutil.copytree(ROOT, src, ignore=junk)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        check=True,
        cwd=tmp_path,
    )
    (built,) = out.glob("legion-*.whl")
    with zipfile.ZipFile(built) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name)
        record = z.read(meta_name.replace("METADATA", "RECORD")).decode()
    headers = meta.decode().partition("\n\n")[0].splitlines()
    llama = [h for h in headers if h.startswith("Requires-Dist: llama-cpp-python")]
    assert llama == [f"Requires-Dist: llama-cpp-python @ {wheel.resolve().as_uri()}"]
    digest = base64.urlsafe_b64encode(hashlib.sha256(meta).digest()).rstrip(b"=").decode()
    assert f"{meta_name},sha256={digest},{len(meta)}" in record.splitlines()


def test_external_mode_requires_the_index_version_and_builds_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("LEGION_LLAMA_BUILD", "external")
    monkeypatch.setenv("LEGION_WHEEL_CACHE", str(tmp_path / "empty"))
    assert llama_build.llama_requirement() == f"llama-cpp-python=={llama_build.LLAMA_CPP_PYTHON}"
    assert not (tmp_path / "empty").exists()


def test_a_child_killed_by_sigill_is_reported_with_the_cause_and_the_rebuild_command(tmp_path):
    model = tmp_path / "m.gguf"
    result = preflight.check_model(str(model), command=SIGILL_CHILD)
    assert not result.ok and result.returncode == -signal.SIGILL and result.signal == "SIGILL"
    assert "SIGILL" in result.message and "built for another CPU" in result.message
    assert llama_build.reinstall_command() in result.message


def test_a_child_that_fails_without_a_signal_shows_its_last_line(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('no such tensor'); sys.exit(3)"]
    result = preflight.check_model("x.gguf", command=cmd)
    assert not result.ok and result.signal is None and result.returncode == 3
    assert "exit status 3" in result.message and "no such tensor" in result.message


def test_a_missing_model_file_is_named_without_starting_a_child(tmp_path):
    missing = tmp_path / "nope.gguf"
    result = preflight.check_model(str(missing))
    assert not result.ok and result.returncode is None
    assert str(missing) in result.message and "fix model_path" in result.message


def test_legion_eval_stops_with_the_signal_and_fix_when_the_check_child_dies(monkeypatch, tmp_path, capsys):
    # The child really dies by SIGILL; what stands in is only which program the child runs.
    monkeypatch.setattr(preflight, "_child_command", lambda path: SIGILL_CHILD)
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "1", "context": "Q", "choices": ["a", "b"], "answer": 0}\n')
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    config = tmp_path / "legion.yaml"
    config.write_text(f"agents:\n  - name: solo\n    model_path: {model}\n")
    code = cli.main(["eval", "--data", str(data), "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert "SIGILL" in err and "legion.engine.llama_build --reinstall" in err
    with pytest.raises(LlamaUnusable):
        preflight.require_runnable(["a.gguf"])


def _agent(name: str, state: str, error: str | None = None) -> dict:
    return {
        "name": name,
        "health": {"name": name, "loaded": state == "ready", "state": state, "error": error},
    }


@pytest.mark.parametrize(
    ("states", "code", "status"),
    [
        (["ready", "ready"], 200, "ok"),
        (["ready", "loading"], 503, "loading"),
        (["ready", "failed"], 200, "degraded"),
        (["failed", "failed"], 503, "failed"),
        (["loading", "failed"], 503, "loading"),
    ],
)
def test_health_follows_the_agents_states(states, code, status):
    agents = [
        _agent(f"a{i}", s, "llama.cpp died with SIGILL" if s == "failed" else None)
        for i, s in enumerate(states)
    ]
    got_code, body = service_health(agents)
    assert (got_code, body.status) == (code, status)
    assert {n: h.state for n, h in body.agents.items()} == {f"a{i}": s for i, s in enumerate(states)}
    assert ("SIGILL" in (body.error or "")) == (status == "failed")
