"""Tensor parallelism over N devices: parity with one device, and decode tok/s of each.

    python bench/tp.py --gguf /tmp/hx/q8b.gguf --world 2 --out $OUT        # NCCL, cuda:0..N-1
    python bench/tp.py --gguf tiny.gguf --world 2 --device cpu --steps 8    # gloo, CI-sized

One device runs first, in this process: greedy decode from a fixed token, keeping the
tokens and their logits. Then N ranks, one process each, every rank holding 1/N of every
layer (``helexa.engine.models.parallel``), decode the same tokens (teacher forcing), so the logits
compare step by step. On CUDA both decode from CUDA graphs, the ranks' all-reduces captured
in them. Prints tok/s per world size and the parity numbers; ``tp`` in results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helexa.engine.checkpoint.safetensors import load_checkpoint  # noqa: E402
from helexa.engine.models.cuda_graph import GraphDecoder, Reduce  # noqa: E402
from helexa.engine.models.parallel import all_reduce, shard_qwen3  # noqa: E402
from helexa.engine.models.qwen3 import Qwen3  # noqa: E402


def load(path: Path, device: torch.device) -> Qwen3:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return Qwen3.from_checkpoint(load_checkpoint(path, device), device, dtype)


def decode(
    model: Qwen3, steps: int, feed: list[int] | None = None, reduce: Reduce | None = None
) -> tuple[list[int], torch.Tensor, float]:
    """(tokens, logits [steps, vocab] on the CPU, tok/s) of ``steps`` decode steps: greedy,
    or fed ``feed`` (its first ``steps`` ids). A first pass captures the graphs; the second
    is timed, one host sync per token as generation does."""
    device = model.device
    decoder = GraphDecoder(model, reduce=reduce)

    def run() -> tuple[list[int], list[torch.Tensor]]:
        token = torch.zeros(1, 1, dtype=torch.long, device=device)
        tokens, logits = [], []
        for pos in range(steps):
            if feed is not None:
                token.fill_(feed[pos])
            tokens.append(int(token))
            step = decoder(token, pos)[0, -1]
            logits.append(step)
            token = step.argmax().view(1, 1)
        return tokens, logits

    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    tokens, logits = run()
    rate = steps / (time.perf_counter() - start)
    return tokens, torch.stack(logits).float().cpu(), rate


def _rank(rank: int, world: int, args: argparse.Namespace, work: str) -> None:
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{work}/rendezvous",
        rank=rank,
        world_size=world,
        **({"device_id": device} if cuda else {}),
    )
    try:
        full = load(args.gguf, device)
        shard = shard_qwen3(full, rank, world)
        del full
        if cuda:
            torch.cuda.empty_cache()
        shard.setup_cache(1, args.steps)
        feed = json.loads(Path(work, "tokens.json").read_text())
        _, logits, rate = decode(shard, args.steps, feed, all_reduce())
        if rank == 0:
            torch.save({"logits": logits, "tok/s": rate}, f"{work}/rank0.pt")
    finally:
        dist.destroy_process_group()


def parity(ours: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    diff = (ours - reference).abs()
    return {
        "max |dlogit|": float(diff.max()),
        "rel err": float((ours - reference).norm() / reference.norm()),
        "top-1 agree": float((ours.argmax(-1) == reference.argmax(-1)).float().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gguf", type=Path, required=True, help="the model (see bench/gpu.py)")
    ap.add_argument("--world", type=int, default=2, help="ranks (devices) to split over")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", type=int, default=128, help="decode steps (tg128 by default)")
    ap.add_argument("--out", type=Path, default=Path("."), help="results.json goes here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        print(f"need {args.world} CUDA devices, have {torch.cuda.device_count()}", file=sys.stderr)
        return 2

    single = load(
        args.gguf, torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    )
    single.setup_cache(1, args.steps)
    tokens, reference, single_rate = decode(single, args.steps)
    del single
    if args.device == "cuda":
        torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory() as work:
        Path(work, "tokens.json").write_text(json.dumps(tokens))
        mp.spawn(_rank, args=(args.world, args, work), nprocs=args.world)
        result = torch.load(f"{work}/rank0.pt", weights_only=True)

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "world": args.world,
        "steps": args.steps,
        "tok/s world 1": single_rate,
        f"tok/s world {args.world}": result["tok/s"],
        **parity(result["logits"], reference),
    }
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["tp"] = report
    results_path.write_text(json.dumps(results, indent=1))
    speedup = result["tok/s"] / single_rate
    print(f"# {report['device']} x{args.world}, {args.gguf.name}, {args.steps} decode steps")
    print(f"{'world':<8}{'tok/s':>10}{'ratio':>8}")
    print(f"{1:<8}{single_rate:>10.1f}{1.0:>8.2f}")
    print(f"{args.world:<8}{result['tok/s']:>10.1f}{speedup:>8.2f}")
    print(
        f"parity vs world 1 (same tokens): max |dlogit| {report['max |dlogit|']:.3g}, "
        f"rel err {report['rel err']:.2e}, top-1 agree {report['top-1 agree']:.1%}"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast (shared hosts)
    sys.exit(main())
