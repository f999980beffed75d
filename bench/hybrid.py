"""helexa vs llama.cpp on a hybrid model: a Qwen3.5-9B-shaped GGUF with random weights,
driven in-process (bench/serve.py runs the same file through the server).

Writes the GGUF (bench/synthetic.py: helexa's own writer, llama.cpp's converter's layout)
unless it exists, then measures helexa's prefill tok/s at each ``--prompts`` length (in
forwards of generate.prefill_chunk tokens, as the server sizes them: the whole prompt when
half the GPU's free memory holds its activations, 2048 on a CPU) and batch-1 decode tok/s
over ``--gen`` tokens (CUDA-graph steps of qwen3_next.decode_step, argmax synced every
token). With ``--llama-bench`` the same file goes through llama-bench (bench/llama_cpp.py
builds it) and the table shows both.

    python bench/hybrid.py --gguf /tmp/hx/q35-9b.gguf --out $OUT               # on the GPU
    python bench/hybrid.py --preset qwen3.5-tiny --quant F32 --gguf /tmp/t.gguf --device cpu \
        --prompts 80 --gen 8                                                   # a smoke run

Nothing here asserts a speed: it prints what it measured (and writes hybrid.json to --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import timed  # noqa: E402
from bench.synthetic import HYBRID_PRESETS, write_model  # noqa: E402
from helexa.engine.checkpoint.safetensors import load_checkpoint  # noqa: E402
from helexa.engine.generate import prefill_chunk  # noqa: E402
from helexa.engine.models.architectures import model_class  # noqa: E402
from helexa.engine.models.cuda_graph import GraphDecoder  # noqa: E402
from helexa.engine.models.qwen3_next import Qwen3Next, decode_step  # noqa: E402


def helexa(path: Path, device: torch.device, prompts: list[int], gen: int) -> dict[str, float]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ckpt = load_checkpoint(path, device)
    model = model_class(ckpt.config).from_checkpoint(ckpt, device, dtype)
    assert isinstance(model, Qwen3Next)
    model.setup_cache(1, max(prompts) + gen)
    vocab = model.vocab_size
    out: dict[str, float] = {}
    for length in sorted(prompts):
        tokens = torch.randint(0, vocab, (1, length), device=device)

        def prefill(tokens: torch.Tensor = tokens, length: int = length) -> int:
            step = prefill_chunk(model, length)  # as the server sizes it, free memory and all
            for start in range(0, length, step):
                chunk = tokens[:, start : start + step]
                pos = torch.arange(start, start + chunk.shape[1], device=device)
                logits = model.forward(chunk, pos, last_only=True)
            return int(logits[0, -1].argmax())

        timed(device, prefill)  # first-call kernels and allocations
        first, seconds = timed(device, prefill)
        out[f"pp{length} tok/s"] = length / seconds
    decoder = GraphDecoder(model, step=decode_step)

    def decode() -> None:
        token, start = first, max(prompts)
        for pos in range(start, start + gen):
            logits = decoder(torch.tensor([[token]], device=device), pos)
            token = int(logits[0, -1].argmax())

    timed(device, prefill)
    timed(device, decode)  # captures the graphs of the kv buckets it crosses
    timed(device, prefill)
    out[f"tg{gen} tok/s"] = gen / timed(device, decode)[1]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gguf", type=Path, required=True, help="written here unless it exists")
    ap.add_argument("--preset", choices=sorted(HYBRID_PRESETS), default="qwen3.5-9b")
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 16384])
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--llama-bench", type=Path, help="a built llama-bench binary")
    ap.add_argument("--out", type=Path, help="directory for hybrid.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    write_model(args.gguf, args.preset, args.quant, args.device)
    print(f"GGUF ready in {time.perf_counter() - start:.1f} s: {args.gguf}", file=sys.stderr)
    results = {"helexa": helexa(args.gguf, device, args.prompts, args.gen)}
    if args.llama_bench:
        from bench.llama_cpp import run_bench, summarise

        records = run_bench(args.llama_bench, args.gguf, prompts=tuple(args.prompts), gen=args.gen)
        results["llama.cpp"] = summarise(records)
    for name, row in results.items():
        print(name, "  ".join(f"{k} {v:.1f}" for k, v in row.items()))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "hybrid.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
