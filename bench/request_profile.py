"""Where a request's time goes: torch.profiler over ``LoadedModel.tokens`` (the path a
request takes, prompt cache, sampler and decode graphs included) for prompts of the given
lengths: each prompt's first token, after one unprofiled run of the same length (its time
printed too: a kernel compiled on a request shows there), with ``--extend N`` a second turn
of N more tokens on the cached prompt, and with ``--decode N`` the N tokens decoded after
it. ``--load-profile`` runs the load under cProfile and prints where its host time went
(a warm restart's seconds are host work: imports, kernels read from Triton's cache, graph
captures), then exits.

Prints the wall time per length, the kernels launched and the device time per decoded
token, and the ops that take the most device and host time, so a fixed cost (a host sync,
a copy to the host, a Python loop of small launches) shows up beside the matmuls. A
diagnostic, not a benchmark: nothing goes to RESULTS.md.

    python3 bench/request_profile.py --gguf /tmp/hx/q35-9b.gguf --lengths 64,512 --decode 32
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import random
import time
from pathlib import Path
from threading import Event

import torch
from torch.autograd import DeviceType
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


def decode(model: LoadedModel, prompt: list[int], n: int, activities: list) -> None:
    """Profile the ``n`` tokens decoded after ``prompt``'s first (greedy), and print what a
    token costs: wall time, kernels launched and their device time."""
    stream = model.tokens(prompt, SamplingParams(temperature=0.0), Event())
    next(stream)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        decoded = sum(1 for _ in zip(range(n), stream, strict=False))
        if model.model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    stream.close()
    averages = prof.key_averages()
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA]
    launches = sum(e.count for e in kernels) / max(decoded, 1)
    device_us = sum(e.self_device_time_total for e in kernels) / max(decoded, 1)
    print(
        f"\n## decode after {len(prompt)} tokens: {decoded} tokens, "
        f"{seconds * 1e3 / max(decoded, 1):.2f} ms/token wall, {launches:.0f} kernels and "
        f"{device_us / 1e3:.2f} ms device time per token"
    )
    if kernels:
        print(averages.table(sort_by="self_cuda_time_total", row_limit=40))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--lengths", default="64,512")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=25, help="ops per table")
    ap.add_argument("--decode", type=int, default=0, help="tokens to decode and profile")
    ap.add_argument(
        "--extend", type=int, default=0, help="a turn 2: this many tokens after each prompt"
    )
    ap.add_argument(
        "--load-profile", action="store_true", help="cProfile the load, print it, and exit"
    )
    args = ap.parse_args(argv)
    start = time.perf_counter()
    profiler = cProfile.Profile() if args.load_profile else None
    if profiler is not None:
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # the load's steps
        profiler.enable()
    model = LoadedModel.load(args.gguf, args.device, context_length=args.context)
    print(f"# load {time.perf_counter() - start:.1f} s")
    if profiler is not None:
        profiler.disable()
        stats = pstats.Stats(profiler).strip_dirs()
        stats.sort_stats("cumulative").print_stats(args.rows * 3)
        stats.sort_stats("tottime").print_stats(args.rows * 2)
        return 0
    rng = random.Random(0)
    vocab = model.tokenizer.vocab_size
    for n in (int(s) for s in args.lengths.split(",")):
        model.prompt_cache.clear()
        unprofiled = first_token(model, [rng.randrange(vocab) for _ in range(n)])
        model.prompt_cache.clear()
        prompt = [rng.randrange(vocab) for _ in range(n)]
        activities = [ProfilerActivity.CPU]
        if args.device == "cuda":
            activities.append(ProfilerActivity.CUDA)
        cases = [(f"{n} tokens", prompt)]
        if args.extend:  # the same prompt grown, its first n tokens cached by the case before
            more = [rng.randrange(vocab) for _ in range(args.extend)]
            cases.append((f"turn 2, {n} cached + {args.extend}", [*prompt, *more]))
        for name, tokens in cases:
            with profile(activities=activities) as prof:
                seconds = first_token(model, tokens)
            print(f"\n## {name}: first token in {seconds * 1e3:.1f} ms", end="")
            print(f" (unprofiled, uncached: {unprofiled * 1e3:.1f} ms)" if tokens is prompt else "")
            averages = prof.key_averages()
            if args.device == "cuda":
                print(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows))
            print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
        if args.decode:
            decode(model, prompt, args.decode, activities)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
