#!/usr/bin/env bash
# Run HERE (where PyPI is reachable), before a GPU session's device calls: puts what the
# device machine lacks into the two ignored folders a `run` carries, ["./.whl", "./.device"]:
#   .whl/    wheels (Python 3.12, manylinux x86_64) of the packages its image does not have,
#            at the versions installed here, for the engine, bench/ and tests/engine;
#   .device/llama-src.tar.gz   llama.cpp's tree from the llama-cpp-python sdist, trimmed of
#            models, docs, tests, examples and the server UI (~8 MB; the sdist is 77 MB,
#            over the 64 MiB a call may carry). bench/llama_cpp.py builds llama-bench from it.
# Then see bench/DEVICE.md for the calls.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PYTHON=0.3.36
# The device image has torch, triton, transformers, numpy, aiohttp, pytest, ... (KINDS.md);
# these are what it lacks (and what they need that it lacks too).
PACKAGES=(gguf pydantic pydantic_core annotated-types typing-inspection typing_extensions
  platformdirs openai anthropic jiter sniffio docstring_parser httpx2 httpcore2 truststore
  opentelemetry-api pytest-asyncio pytest-aiohttp
  llguidance jsonschema jsonschema-specifications referencing rpds-py attrs tqdm)

version_here() {
  python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}

rm -rf .whl && mkdir -p .whl .device
for name in "${PACKAGES[@]}"; do
  spec="$name==$(version_here "$name")"
  platforms=()
  for p in manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$spec"
done

# The tree keeps tools/server and tools/ui's build files (not its sources: the server is
# built without the web UI), so bench/serve.py can run llama-server for the second turn.
if [ ! -f .device/llama-src.tar.gz ] || ! tar -tzf .device/llama-src.tar.gz ./tools/server/main.cpp >/dev/null 2>&1; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download -q --no-deps --no-binary :all: -d "$work" \
    "llama-cpp-python==$LLAMA_CPP_PYTHON"
  tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
  tree=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
  tar -czf .device/llama-src.tar.gz -C "$tree" \
    --exclude=./models --exclude=./docs --exclude=./tests --exclude=./examples \
    --exclude=./benches --exclude=./media --exclude=./tools/server/tests \
    --exclude=./tools/server/bench --exclude=./tools/ui/src --exclude=./tools/ui/tests \
    --exclude=./tools/ui/static --exclude=./tools/ui/package-lock.json .
fi
du -sh .whl .device
