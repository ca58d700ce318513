#!/usr/bin/env bash
# The GPU check on a lent device machine (one without network): Legion's own build backend
# (legion.engine.llama_build) builds llama-cpp-python with CUDA, offline, then
# scripts/gpu_check.py runs the engine with every layer offloaded and compares it with the CPU.
#
# Prepare .gpu/ here first (ignored: echo /.gpu/ >> .git/info/exclude), then carry it:
#   the llama-cpp-python sdist (pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36;
#   drop vendor/llama.cpp/{models/*.gguf*,docs,benches} and re-pack it, or it exceeds the 64 MiB
#   a call carries), and wheels for the device's Python (3.12) that its image lacks: pydantic,
#   pydantic-core, annotated-types, typing-inspection, gguf, diskcache.
# The first run builds (298 s with 16 jobs for sm_90 on an H200, 2026-12-04) into .gpu/cache.
# A rerun on the still-warm machine must NOT carry .gpu again: carrying replaces the folder
# there, cached build included. Write to $OUT directly: a pipe through grep hides everything
# when the call times out.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 --version
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
  .gpu/pydantic*.whl .gpu/annotated_types*.whl .gpu/typing_inspection*.whl .gpu/gguf*.whl .gpu/diskcache*.whl ||
  exit 3
export PYTHONPATH=/tmp/site:$PWD
# PIP_NO_BUILD_ISOLATION=0 turns build isolation off (pip reads the negated option so): the
# image's own scikit-build-core and cmake build it; an isolated build asks an index for cmake.
export PIP_NO_BUILD_ISOLATION=0 PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/.gpu LEGION_WHEEL_CACHE=$PWD/.gpu/cache
export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 ${EXTRA_CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL=16
python3 -c "from legion.engine import llama_build as b; print(b.portable_wheel())" || exit 4
cp .gpu/cache/*/legion-build.json "$OUT/"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
  .gpu/cache/*/llama_cpp_python-*.whl || exit 5
python3 scripts/gpu_check.py --out "$OUT/gpu_check.json"
