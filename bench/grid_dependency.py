"""Decode under each programmatic-dependent-launch mode (quant.grid_dependency: ``off``,
``launch``) through ``LoadedModel.tokens``, the path a request takes, beside llama-bench's
tg on the same file in the same run.

Each mode loads the model afresh (the CUDA graphs capture the mode's launches), decodes
``--gen`` tokens after a short prompt ``--repeat`` times and keeps the best rate; the
kernel choices and compiled kernels of the first mode serve the others, so only the first
load pays for tuning (the default runs the default mode first and last: the drift). On a
CPU (``--device cpu``, a smoke run) every mode launches alike. Prints one table;
``--results`` appends it to bench/RESULTS.md::

    python3 bench/grid_dependency.py --gguf /tmp/hx/q8b.gguf --llama-work /tmp/llama
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import time
from pathlib import Path
from threading import Event

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helexa.engine.generate import LoadedModel  # noqa: E402
from helexa.engine.sampling import SamplingParams  # noqa: E402

try:  # the kernels, and so their launches, exist only where Triton does
    from helexa.engine.quant import grid_dependency
except ImportError:
    grid_dependency = None  # type: ignore[assignment]


def decode_rate(model: LoadedModel, prompt: list[int], gen: int) -> float:
    """Tokens/s of ``gen`` greedy tokens after ``prompt``'s first, timed from that first
    token to the last (the prompt cache cleared first, so each run prefills alike)."""
    model.prompt_cache.clear()
    stream = model.tokens(prompt, SamplingParams(temperature=0.0), Event())
    next(stream)
    start = time.perf_counter()
    taken = sum(1 for _ in zip(range(gen), stream, strict=False))
    seconds = time.perf_counter() - start
    stream.close()
    return taken / seconds


def run_mode(gguf: Path, device: str, mode: str, prompt_len: int, gen: int, repeat: int) -> dict:
    if grid_dependency is not None:
        grid_dependency.MODE = mode  # read at each launch: this load's graphs capture it
    start = time.perf_counter()
    model = LoadedModel.load(gguf, device, context_length=max(4096, prompt_len + gen + 64))
    load = time.perf_counter() - start
    rng = random.Random(0)
    prompt = [rng.randrange(model.tokenizer.vocab_size) for _ in range(prompt_len)]
    rates = [decode_rate(model, prompt, gen) for _ in range(repeat)]
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"mode": mode, "load s": load, "best tok/s": max(rates), "rates": rates}


def llama_tg(work: Path, gguf: Path, gen: int) -> float:
    from bench.llama_cpp import build, run_bench

    binary = build(Path(".device/llama-src.tar.gz"), work)
    records = run_bench(binary, gguf, prompts=(0,), gen=gen, reps=5)
    return next(float(r["avg_ts"]) for r in records if r["n_gen"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default="launch,off,launch")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--llama-work", type=Path, help="llama.cpp build dir: llama-bench tg too")
    ap.add_argument("--out", type=Path, help="write modes.json here")
    ap.add_argument("--results", action="store_true", help="append the table to RESULTS.md")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    runs = [run_mode(args.gguf, args.device, m, args.prompt, args.gen, args.repeat) for m in modes]
    llama = llama_tg(args.llama_work, args.gguf, args.gen) if args.llama_work else None
    device = torch.device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"a CPU ({platform.machine()})"
    )
    lines = [
        f"`{args.gguf.name}` on {name}, tg{args.gen} after a {args.prompt}-token prompt, best of "
        f"{args.repeat} (`python3 bench/grid_dependency.py --gguf {args.gguf} --modes "
        f"{args.modes}`; {platform.node()}):",
        "",
        "| HELEXA_PDL | load (s) | tok/s | vs llama-bench |",
        "|---|---:|---:|---:|",
    ]
    for r in runs:
        ratio = f"{r['best tok/s'] / llama:.2f}x" if llama else ""
        lines.append(f"| {r['mode']} | {r['load s']:.1f} | {r['best tok/s']:.1f} | {ratio} |")
    if llama:
        lines.append(f"| llama-bench tg{args.gen} | | {llama:.1f} | 1.00x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "modes.json").write_text(json.dumps({"runs": runs, "llama": llama}, indent=1))
    if args.results:
        with (ROOT / "bench" / "RESULTS.md").open("a") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
