"""Where a request's prefill goes: torch.profiler over ``LoadedModel.tokens`` (the path a
request takes, prompt cache and sampler included) for prompts of the given lengths, each
the first token of a fresh prompt, after one unprofiled run of the same length.

Prints the wall time per length and the ops that take the most device and host time, so a
fixed cost (a host sync, a copy to the host, a Python loop of small launches) shows up
beside the matmuls. A diagnostic, not a benchmark: nothing goes to RESULTS.md.

    python3 bench/prefill_profile.py --gguf /tmp/hx/q35-9b.gguf --lengths 64,512
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from threading import Event

import torch
from torch.profiler import ProfilerActivity, profile

from helexa.engine.generate import LoadedModel
from helexa.engine.sampling import SamplingParams


def first_token(model: LoadedModel, prompt: list[int]) -> float:
    """Seconds to the first sampled token of ``prompt`` (greedy), synchronised."""
    params = SamplingParams(temperature=0.0)
    start = time.perf_counter()
    next(model.tokens(prompt, params, Event()))
    if model.model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--lengths", default="64,512")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=25, help="ops per table")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    model = LoadedModel.load(args.gguf, args.device, context_length=args.context)
    print(f"# load {time.perf_counter() - start:.1f} s")
    rng = random.Random(0)
    vocab = model.tokenizer.vocab_size
    for n in (int(s) for s in args.lengths.split(",")):
        model.prompt_cache.clear()
        first_token(model, [rng.randrange(vocab) for _ in range(n)])  # unprofiled
        model.prompt_cache.clear()
        prompt = [rng.randrange(vocab) for _ in range(n)]
        activities = [ProfilerActivity.CPU]
        if args.device == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            seconds = first_token(model, prompt)
        print(f"\n## {n} tokens: first token in {seconds * 1e3:.1f} ms")
        averages = prof.key_averages()
        if args.device == "cuda":
            print(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows))
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
