#!/usr/bin/env bash
# Run ON the device machine (see bench/DEVICE.md), carrying [".whl", ".device"] made by
# bench/device_prep.sh. Two stages, each one `run` call well inside its 10-minute limit;
# call the second within the machine's warm window so the build and the GGUF are still there.
#   bash bench/device_run.sh 1   start the llama.cpp build (detached), the CUDA tests, helexa's
#                                side of bench/gpu.py (writes the 8B-shaped Q4_K_M GGUF) and
#                                of bench/serve.py (the same file through helexa --serve)
#   bash bench/device_run.sh 2   bench/tp.py over every GPU (when there are 2+), then wait
#                                for the build and run llama.cpp on the same file; the table
# Everything worth keeping lands in $OUT (logs, results.json).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?stage 1 or 2}
OUT=${OUT:-/tmp/helexa-out}
mkdir -p "$OUT" /tmp/hx
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD
GGUF=/tmp/hx/q8b.gguf
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpus.csv"

if [ "$stage" = 1 ]; then
  setsid python3 bench/llama_cpp.py --src .device/llama-src.tar.gz --work /tmp/llama \
    --jobs "$(nproc)" --server >/tmp/llama-build.log 2>&1 </dev/null &
  # Issue 3's CUDA run: every test marked cuda (parity with transformers, quant kernels,
  # GGUF loads, CUDA-graph replay), without Triton autotuning (fixed configs, fast).
  HELEXA_TRITON_AUTOTUNE=0 timeout 240 python3 -m pytest -q -m cuda -p no:cacheprovider \
    tests/engine -rs 2>&1 | tee "$OUT/cuda-tests.log" | tail -15
  timeout 300 python3 bench/gpu.py --gguf "$GGUF" --helexa --out "$OUT" 2>&1 |
    tee "$OUT/gpu-helexa.log" | tail -25
  # What a request feels: helexa --serve over HTTP on the same file (bench/serve.py).
  timeout 360 python3 bench/serve.py --gguf "$GGUF" --out "$OUT" 2>&1 |
    tee "$OUT/serve-helexa.log" | tail -20
elif [ "$stage" = 2 ]; then
  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    timeout 240 python3 bench/tp.py --gguf "$GGUF" --world 2 --out "$OUT" 2>&1 |
      tee "$OUT/tp.log" | tail -8
  fi
  # The build was started in stage 1; bench/llama_cpp.py's build() reuses it when done.
  for _ in $(seq 60); do  # at most 5 minutes more: a hung build must not eat the call
    pgrep -f "bench/llama_cpp.py --src" >/dev/null || break
    sleep 5
  done
  cp /tmp/llama-build.log /tmp/llama/build.log "$OUT/" 2>/dev/null
  timeout 300 python3 bench/gpu.py --gguf "$GGUF" --llama-work /tmp/llama --out "$OUT" 2>&1 |
    tee "$OUT/gpu-llama.log" | tail -30
  timeout 240 python3 bench/serve.py --gguf "$GGUF" --llama-work /tmp/llama --out "$OUT" 2>&1 |
    tee "$OUT/serve-llama.log" | tail -20
else
  echo "stage must be 1 or 2" >&2
  exit 2
fi
