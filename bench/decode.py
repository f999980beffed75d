"""Batch-1 latency of the engine's Qwen3: load time, time to first token, prefill and decode
throughput, and the weight bandwidth decode achieves.

    python bench/decode.py --model /models/Qwen3-0.6B-Q8_0.gguf --device cuda
    python bench/decode.py --synthetic --preset small --quant Q8_0 --device cpu

``--synthetic`` writes a random-weight GGUF of the given shape (with helexa's own
quantizers) to a temp dir first, so the benchmark needs no downloaded model. Tokens are
random ids and the next token is the argmax, synced every step as real generation is:
this measures the model loop, not the tokenizer.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic import QWEN3_PRESETS, preset_shape, shape_keys, write_shape  # noqa: E402
from helexa.engine.checkpoint.safetensors import load_checkpoint  # noqa: E402
from helexa.engine.models.architectures import model_class  # noqa: E402
from helexa.engine.models.cuda_graph import GraphDecoder  # noqa: E402
from helexa.engine.models.qwen3 import Qwen3  # noqa: E402

# decode.py benches the dense step (GraphDecoder's default): the Qwen3 family's presets.
SHAPE_KEYS = shape_keys(QWEN3_PRESETS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def run(
    path: Path, device: torch.device, dtype: torch.dtype, prompt: int, new: int, repeat: int = 1
) -> dict:
    """Best of ``repeat`` timed runs (after one warm-up): on a shared machine the fastest
    run is the one least disturbed by neighbours."""

    def load() -> Qwen3:
        ckpt = load_checkpoint(path, device)
        model = model_class(ckpt.config, ckpt.source).from_checkpoint(ckpt, device, dtype)
        model.setup_cache(1, prompt + new)
        return model

    model, load_s = timed(device, load)
    vocab = model.vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (1, prompt), generator=gen).to(device)

    def prefill() -> int:
        logits = model.forward(tokens, torch.arange(prompt, device=device), last_only=True)
        return int(logits[0, -1].argmax())

    # Decode steps as generation runs them: CUDA-graph replays on CUDA, forward elsewhere.
    graphs = GraphDecoder(model) if device.type == "cuda" else None

    def decode() -> int:
        token = first
        for pos in range(prompt, prompt + new - 1):
            step = torch.tensor([[token]], device=device)
            if graphs is not None:
                logits = graphs(step, pos)
            else:
                logits = model.forward(step, torch.tensor([pos], device=device), last_only=True)
            token = int(logits[0, -1].argmax())  # a host sync per token, as in generation
        return token

    timed(device, prefill)  # warm-up: first-call allocations and kernel selection
    ttft_s = decode_s = float("inf")
    for _ in range(repeat):
        first, seconds = timed(device, prefill)
        ttft_s = min(ttft_s, seconds)
        decode_s = min(decode_s, timed(device, decode)[1])
    decode_tps = (new - 1) / decode_s if new > 1 else float("nan")
    return {
        "load s": load_s,
        "TTFT ms": ttft_s * 1e3,
        "prefill tok/s": prompt / ttft_s,
        "decode tok/s": decode_tps,
        "weights MB": model.weight_bytes / 2**20,
        "weight GB/s": model.weight_bytes * decode_tps / 1e9,
    }


def table(rows: list[tuple[str, dict[str, float]]]) -> str:
    cols = list(rows[0][1])
    name_w = max(len("model"), *(len(n) for n, _ in rows))
    head = f"{'model':<{name_w}}  " + "  ".join(f"{c:>13}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, row in rows:
        lines.append(f"{name:<{name_w}}  " + "  ".join(f"{row[c]:>13.2f}" for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a .gguf file or HF model directory")
    src.add_argument("--synthetic", action="store_true", help="write and bench a random GGUF")
    ap.add_argument("--preset", choices=sorted(QWEN3_PRESETS), default="small")
    for key in SHAPE_KEYS:
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"override the preset's {key}")
    ap.add_argument(
        "--quant", default="Q8_0", help="synthetic file quant (F32, F16, Q8_0, Q4_K_M...)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--dtype", choices=sorted(DTYPES), help="activations (bfloat16 on CUDA, else float32)"
    )
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--repeat", type=int, default=1, help="report the best of N runs")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        if args.synthetic:
            shape = preset_shape(args.preset, **{k: getattr(args, k) for k in SHAPE_KEYS})
            path = Path(tmp) / "synthetic.gguf"
            write_s = write_shape(path, shape, args.quant, device)
            name = f"synthetic {args.preset} {args.quant}"
            print(
                f"wrote {path.stat().st_size / 2**20:.1f} MB GGUF in {write_s:.1f} s",
                file=sys.stderr,
            )
        else:
            path, name = args.model, args.model.name
        result = run(path, device, dtype, args.prompt_tokens, args.new_tokens, args.repeat)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"# {where}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}, "
        f"threads {torch.get_num_threads()}, prompt {args.prompt_tokens}, new {args.new_tokens}, "
        f"best of {args.repeat}"
    )
    print(table([(name, result)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
