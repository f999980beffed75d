#!/usr/bin/env bash
# Run ON the device machine (see bench/DEVICE.md), carrying [".whl", ".device"] made by
# bench/device_prep.sh. Two stages, each one `run` call well inside its 10-minute limit;
# call the second within the machine's warm window so the build and the GGUF are still there.
#   bash bench/device_run.sh 1   start the llama.cpp build (detached), the CUDA tests, helexa's
#                                side of bench/gpu.py (writes the 8B-shaped Q4_K_M GGUF) and
#                                of bench/serve.py (the same file through helexa --serve)
#   bash bench/device_run.sh 2   bench/tp.py over every GPU (when there are 2+), then wait
#                                for the build and run llama.cpp on the same file; the table
#   bash bench/device_run.sh serve-helexa moe|hybrid [serve.py args]
#                                the Qwen3-30B-A3B-shaped MoE (issue 14) or the Qwen3.5-9B-
#                                shaped hybrid (issue 15): start the llama.cpp build unless it
#                                is built or building, write the Q4_K_M GGUF, helexa's side of
#                                bench/serve.py on it
#   bash bench/device_run.sh serve-llama moe|hybrid [serve.py args]
#                                wait for the build, llama-bench and llama-server on the same
#                                file; the side-by-side table (serve.json keeps both sides in
#                                /tmp/hx/serve-<model> between the calls; $OUT is new each call)
#   bash bench/device_run.sh pack-llama
#                                wait for the build and return its bin/ as $OUT/llamabin.txz.*
#                                (46 MB in 15 MB parts): copied into .device/lb/ here, a later
#                                lease's every stage unpacks it instead of building again
# Everything worth keeping lands in $OUT (logs, results.json, serve-<model>.json).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?stage: 1, 2, serve-helexa, serve-llama or pack-llama}
OUT=${OUT:-/tmp/helexa-out}
mkdir -p "$OUT" /tmp/hx
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD
GGUF=/tmp/hx/q8b.gguf
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpus.csv"

# A build carried from an earlier lease (pack-llama): bench/llama_cpp.py's build() returns
# an existing binary, and the RPATH is absolute, so it goes back to /tmp/llama/build/bin.
if [ ! -x /tmp/llama/build/bin/llama-server ] && ls .device/lb/llamabin.txz.* >/dev/null 2>&1; then
  mkdir -p /tmp/llama/build
  cat .device/lb/llamabin.txz.* | xz -d | tar xf - -C /tmp/llama/build
fi

start_llama_build() {  # detached: it overlaps helexa's side; build() reuses a finished one
  [ -x /tmp/llama/build/bin/llama-server ] && return
  pgrep -f "bench/llama_cpp.py --src" >/dev/null && return
  setsid python3 bench/llama_cpp.py --src .device/llama-src.tar.gz --work /tmp/llama \
    --jobs "$(nproc)" --server >/tmp/llama-build.log 2>&1 </dev/null &
}

wait_llama_build() {  # at most $1 seconds: a hung build must not eat the call
  for _ in $(seq $(($1 / 5))); do
    pgrep -f "bench/llama_cpp.py --src" >/dev/null || break
    sleep 5
  done
  cp /tmp/llama-build.log /tmp/llama/build.log "$OUT/" 2>/dev/null
}

if [ "$stage" = 1 ]; then
  start_llama_build
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
  wait_llama_build 300
  timeout 300 python3 bench/gpu.py --gguf "$GGUF" --llama-work /tmp/llama --out "$OUT" 2>&1 |
    tee "$OUT/gpu-llama.log" | tail -30
  timeout 240 python3 bench/serve.py --gguf "$GGUF" --llama-work /tmp/llama --out "$OUT" 2>&1 |
    tee "$OUT/serve-llama.log" | tail -20
elif [ "$stage" = serve-helexa ] || [ "$stage" = serve-llama ]; then
  model=${2:?model: moe or hybrid}
  shift 2
  # The lengths issues 14 and 15 ask for (tg128 comes with every length).
  case "$model" in
    moe) args=(--preset qwen3-30b-a3b --gguf /tmp/hx/q30b-a3b.gguf --lengths 512,4096) ;;
    hybrid) args=(--preset qwen3.5-9b --gguf /tmp/hx/q35-9b.gguf --lengths 512,16384) ;;
    *) echo "model must be moe or hybrid" >&2; exit 2 ;;
  esac
  args+=(--out "/tmp/hx/serve-$model" "$@")  # later arguments win: a smaller run, a file
  if [ "$stage" = serve-helexa ]; then
    start_llama_build
    timeout 540 python3 bench/serve.py "${args[@]}" 2>&1 |
      tee "$OUT/serve-$model-helexa.log" | tail -20
  else
    wait_llama_build 210
    timeout 330 python3 bench/serve.py "${args[@]}" --llama-work /tmp/llama 2>&1 |
      tee "$OUT/serve-$model-llama.log" | tail -20
  fi
  cp "/tmp/hx/serve-$model/serve.json" "$OUT/serve-$model.json"
elif [ "$stage" = pack-llama ]; then
  start_llama_build
  wait_llama_build 540
  (cd /tmp/llama/build && tar cf - bin | xz -1 -T"$(nproc)" | split -b 15M - "$OUT/llamabin.txz.")
  ls -la "$OUT"
else
  echo "stage must be 1, 2, serve-helexa, serve-llama or pack-llama" >&2
  exit 2
fi
