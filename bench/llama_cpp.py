"""Build llama.cpp's llama-bench (and llama-server) from source and run it on a GGUF: the
yardstick for bench/gpu.py and bench/serve.py.

The source is the llama.cpp tree vendored in the llama-cpp-python sdist (a bench-only
dependency), as a tarball whose root is llama.cpp's. Only the targets asked for are built,
for one CUDA architecture, so a 16-core machine builds them in minutes; the server is
built without its web UI (no npm, no download).

    python bench/llama_cpp.py --src .device/llama-src.tar.gz --work /tmp/llama \
        --model model.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

CMAKE_FLAGS = [
    "-DGGML_CUDA=ON",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_CCACHE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_APP=OFF",  # the trimmed tree has no app/
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
]


def build(
    src: Path,
    work: Path,
    *,
    cuda_arch: str = "90",
    jobs: int | None = None,
    target: str = "llama-bench",
) -> Path:
    """Unpack ``src`` under ``work`` and build ``target``; returns the binary. Reuses an
    earlier build in the same ``work``. The log goes to ``work/build.log``."""
    binary = work / "build" / "bin" / target
    if binary.exists():
        return binary
    tree = work / "src"
    if not (tree / "CMakeLists.txt").exists():
        tree.mkdir(parents=True, exist_ok=True)
        with tarfile.open(src) as tar:
            tar.extractall(tree, filter="data")
    jobs = jobs or os.cpu_count() or 4
    log = (work / "build.log").open("a")
    configure = ["cmake", "-S", str(tree), "-B", str(work / "build"), "-G", "Ninja"]
    configure += [*CMAKE_FLAGS, f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"]
    compile_ = ["cmake", "--build", str(work / "build"), "-j", str(jobs), "--target", target]
    for cmd in (configure, compile_):
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
        if done.returncode:
            tail = (work / "build.log").read_text()[-3000:]
            raise RuntimeError(f"{' '.join(cmd[:3])} failed ({done.returncode}):\n{tail}")
    return binary


def run_bench(
    binary: Path,
    model: Path,
    *,
    prompts: tuple[int, ...] = (512, 4096),
    gen: int = 128,
    reps: int = 5,
    extra: tuple[str, ...] = ("-ngl", "99", "-fa", "1"),
) -> list[dict[str, Any]]:
    """llama-bench's JSON records: one per test (pp<N> for each prompt, tg<gen>), each
    with ``n_prompt``, ``n_gen``, ``avg_ts`` (tokens/s) and ``stddev_ts``."""
    cmd = [str(binary), "-m", str(model), "-p", ",".join(map(str, prompts)), "-n", str(gen)]
    cmd += ["-r", str(reps), *extra, "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        # llama-bench hides the loader's log unless verbose: rerun a tiny test to show why.
        probe = [str(binary), "-m", str(model), "-p", "8", "-n", "0", "-r", "1", "-v"]
        why = subprocess.run(probe, capture_output=True, text=True, check=False)
        lines = [ln for ln in why.stderr.splitlines() if "error" in ln.lower() or "fail" in ln]
        detail = "\n".join(lines[-20:]) or why.stderr[-3000:]
        raise RuntimeError(f"llama-bench failed ({done.returncode}):\n{detail}")
    return json.loads(done.stdout)


def summarise(records: list[dict[str, Any]]) -> dict[str, float]:
    """{'pp512 tok/s': ..., 'tg128 tok/s': ...} from llama-bench records."""
    out = {}
    for r in records:
        test = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
        out[f"{test} tok/s"] = float(r["avg_ts"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--src", type=Path, required=True, help="llama.cpp source tarball")
    ap.add_argument("--work", type=Path, required=True, help="build directory (reused)")
    ap.add_argument("--model", type=Path, help="GGUF to bench (build only without it)")
    ap.add_argument("--cuda-arch", default="90")
    ap.add_argument("--jobs", type=int)
    ap.add_argument("--server", action="store_true", help="build llama-server too, after")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    binary = build(args.src, args.work, cuda_arch=args.cuda_arch, jobs=args.jobs)
    print(f"llama-bench ready in {time.perf_counter() - start:.0f} s: {binary}", file=sys.stderr)
    if args.server:
        server = build(
            args.src, args.work, cuda_arch=args.cuda_arch, jobs=args.jobs, target="llama-server"
        )
        print(
            f"llama-server ready in {time.perf_counter() - start:.0f} s: {server}", file=sys.stderr
        )
    if args.model:
        for name, value in summarise(run_bench(binary, args.model)).items():
            print(f"{name:>16}  {value:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
