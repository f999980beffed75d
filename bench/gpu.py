"""helexa vs llama.cpp on one GPU and one GGUF: a Qwen3-8B-shaped Q4_K_M with random blocks.

Measures, for helexa: decode tok/s (batch 1, CUDA-graph step, argmax synced every token),
eager decode tok/s, prefill tok/s at 512 and 4096 tokens, TTFT at 512, the device copy
bandwidth and the decode floor it implies (weight bytes read per token / bandwidth), and
each weight shape's matvec bandwidth. For llama.cpp: llama-bench on the same file
(-p 512,4096 -n 128 -ngl 99 -fa 1). Prints one side-by-side table with ratios.

Stages can run in separate invocations (the llama.cpp build overlaps other work):

    python bench/llama_cpp.py --src .device/llama-src.tar.gz --work /tmp/llama &
    python bench/gpu.py --gguf /tmp/hx/q8b.gguf --helexa --out $OUT
    wait; python bench/gpu.py --gguf /tmp/hx/q8b.gguf --llama-work /tmp/llama --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic import QWEN3_PRESETS, write_model  # noqa: E402
from helexa.engine.checkpoint.safetensors import load_checkpoint  # noqa: E402
from helexa.engine.models.architectures import model_class  # noqa: E402
from helexa.engine.models.cuda_graph import GraphDecoder  # noqa: E402
from helexa.engine.models.qwen3 import Qwen3  # noqa: E402
from helexa.engine.models.qwen3_moe import SparseMoE  # noqa: E402
from helexa.engine.quant.tensor import QuantizedTensor  # noqa: E402

PROMPTS = (512, 4096)
GEN = 128


def cuda_ms(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn`` between CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), reps=10, warmup=2)
    return 2 * nbytes / (ms / 1e3)


def bytes_per_token(model: Qwen3) -> int:
    """Weight bytes a decode step reads: all of them except the embedding table, of which
    it reads one row (unless the table is also the output projection)."""
    total = model.weight_bytes
    if model.embed_tokens is not model.lm_head:
        total -= model.embed_tokens.nbytes
    for blk in model.layers:  # a MoE layer reads only its top-k experts
        if isinstance(blk.mlp, SparseMoE):
            moe = blk.mlp
            stacks = sum(p.nbytes for p in (moe.gate_proj, moe.up_proj, moe.down_proj))
            total -= stacks * (moe.num_experts - moe.top_k) // moe.num_experts
    return total


def decode_weights(model: Qwen3) -> dict[str, list[QuantizedTensor]]:
    """Per projection, every layer's copy of the weight a decode step multiplies: the
    fused q/k/v and gate/up weights where the load fused them."""
    groups: dict[str, list[QuantizedTensor]] = {}
    for blk in model.layers:
        attn = blk.attn
        if attn.fused:
            parts = {"qkv": attn.fused}
        else:
            parts = {n: (getattr(attn, n),) for n in ("q_proj", "k_proj", "v_proj")}
        parts["o_proj"] = (attn.o_proj,)
        mlp = blk.mlp
        if not isinstance(mlp, SparseMoE):
            if mlp.fused:
                parts["gate_up"] = mlp.fused
            else:
                parts |= {n: (getattr(mlp, n),) for n in ("gate_proj", "up_proj")}
            parts["down_proj"] = (mlp.down_proj,)
        for name, weights in parts.items():
            for i, w in enumerate(weights):
                groups.setdefault(name if len(weights) == 1 else f"{name}.{i}", []).append(w)
    groups["lm_head"] = [model.lm_head]
    return groups


def matvec_table(model: Qwen3) -> list[dict[str, Any]]:
    """Per weight a decode step multiplies: each Triton matvec kernel (tuned) over all
    layers' copies (so nothing sits in L2), captured in one CUDA graph so launch overhead
    is out, and the one the autotuner picks; plus the pick's error vs dequant+matmul."""
    from helexa.engine.quant.triton_kernels import _KERNELS, dequantize_rows, matvec

    rows = []
    for name, weights in decode_weights(model).items():
        w0 = weights[0]
        if not isinstance(w0, QuantizedTensor) or len(w0.shape) != 2:
            continue  # dense, or a MoE's expert stack (the grouped matvec's, not timed here)
        x = torch.randn(1, w0.shape[1], device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ dequantize_rows(w0, dtype=torch.float32).double().T
        err = float((matvec(x, w0).double() - ref).norm() / ref.norm())
        nbytes = sum(w.nbytes for w in weights)
        row: dict[str, Any] = {
            "weight": name,
            "type": w0.qtype.name,
            "shape": f"{w0.shape[0]}x{w0.shape[1]}",
            "copies": len(weights),
            "rel err": err,
        }
        for kernel in (None, *_KERNELS):
            for w in weights:  # compile + tune outside the capture
                matvec(x, w, kernel=kernel)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for w in weights:
                    matvec(x, w, kernel=kernel)
            ms = cuda_ms(graph.replay, reps=20, warmup=3)
            label = kernel or "picked"
            row[f"{label} us"] = ms * 1e3 / len(weights)
            row[f"{label} GB/s"] = nbytes / (ms / 1e3) / 1e9
        rows.append(row)
    return rows


def kernels_per_step(model: Qwen3, device: torch.device) -> int:
    """CUDA kernels one decode step launches, run eagerly and counted by the profiler:
    what GraphDecoder's graph replays."""
    from torch.profiler import ProfilerActivity, profile

    from helexa.engine.models.cuda_graph import decode_step

    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    position = torch.tensor([8], device=device)
    decode_step(model, token, position, 256)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode_step(model, token, position, 256)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def bench_helexa(path: Path) -> dict[str, Any]:
    device = torch.device("cuda")
    start = time.perf_counter()
    ckpt = load_checkpoint(path, device)
    model = model_class(ckpt.config, ckpt.source).from_checkpoint(ckpt, device, torch.bfloat16)
    model.setup_cache(1, max(PROMPTS) + GEN)
    torch.cuda.synchronize()
    out: dict[str, Any] = {"load s": time.perf_counter() - start}
    vocab = model.vocab_size
    gen = torch.Generator().manual_seed(0)

    for n in PROMPTS:
        tokens = torch.randint(0, vocab, (1, n), generator=gen).to(device)
        positions = torch.arange(n, device=device)
        ms = cuda_ms(
            lambda t=tokens, p=positions: model.forward(t, p, last_only=True),  # type: ignore[misc]
            reps=3,
        )
        out[f"pp{n} tok/s"] = n / (ms / 1e3)
        if n == 512:
            ttft = []
            for _ in range(3):
                t0 = time.perf_counter()
                int(model.forward(tokens, positions, last_only=True)[0, -1].argmax())
                ttft.append(time.perf_counter() - t0)
            out["TTFT512 ms"] = statistics.median(ttft) * 1e3

    decoder = GraphDecoder(model)

    def generate(step: Callable[[torch.Tensor, int], torch.Tensor], count: int) -> float:
        token = torch.zeros(1, 1, dtype=torch.long, device=device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for pos in range(count):
            token = step(token, pos)[:, -1].argmax(-1, keepdim=True)
            int(token)  # a host sync per token, as sampling does
        return count / (time.perf_counter() - t0)

    generate(decoder, GEN)  # captures the graph(s)
    out[f"tg{GEN} tok/s"] = statistics.median(generate(decoder, GEN) for _ in range(3))

    def eager(token: torch.Tensor, pos: int) -> torch.Tensor:
        return model.forward(token, torch.tensor([pos], device=device), last_only=True)

    generate(eager, 4)
    out["eager tg tok/s"] = generate(eager, 32)
    out["weight bytes/token"] = bytes_per_token(model)
    out["kernels/step"] = kernels_per_step(model, device)
    out["matvec"] = matvec_table(model)
    return out


def table(helexa: dict[str, Any], llama: dict[str, float], bandwidth: float) -> str:
    floor = bandwidth / helexa.get("weight bytes/token", float("nan"))
    lines = [
        f"{'metric':<18}{'helexa':>12}{'llama.cpp':>12}{'ratio':>8}",
        "-" * 50,
    ]
    for key in [*(f"pp{n} tok/s" for n in PROMPTS), f"tg{GEN} tok/s"]:
        ours, theirs = helexa.get(key, float("nan")), llama.get(key, float("nan"))
        lines.append(f"{key:<18}{ours:>12.1f}{theirs:>12.1f}{ours / theirs:>8.2f}")
    tg = helexa.get(f"tg{GEN} tok/s", float("nan"))
    lines += [
        f"{'eager tg tok/s':<18}{helexa.get('eager tg tok/s', float('nan')):>12.1f}",
        f"{'TTFT512 ms':<18}{helexa.get('TTFT512 ms', float('nan')):>12.1f}",
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read+write); weights read per token "
        f"{helexa.get('weight bytes/token', 0) / 1e9:.2f} GB; floor {floor:.0f} tok/s; "
        f"helexa at {tg / floor:.0%} of it, llama.cpp at "
        f"{llama.get(f'tg{GEN} tok/s', float('nan')) / floor:.0%}",
    ]
    if helexa.get("kernels/step"):
        lines.append(f"CUDA kernels per eager decode step: {helexa['kernels/step']}")
    if helexa.get("matvec"):
        from helexa.engine.quant.triton_kernels import _KERNELS

        kinds = ("picked", *_KERNELS)
        lines += [
            "",
            f"{'matvec (us, GB/s)':<12}{'type':>6}{'shape':>13}"
            + "".join(f"{k:>15}" for k in kinds)
            + f"{'err':>9}",
        ]
        for r in helexa["matvec"]:
            cells = "".join(
                f"{r.get(f'{k} us', float('nan')):>7.1f}{r.get(f'{k} GB/s', float('nan')):>8.0f}"
                for k in kinds
            )
            lines.append(
                f"{r['weight']:<12}{r['type']:>6}{r['shape']:>13}{cells}{r['rel err']:>9.1e}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gguf", type=Path, required=True, help="written here unless it exists")
    ap.add_argument("--preset", default="qwen3-8b", choices=sorted(QWEN3_PRESETS))
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--helexa", action="store_true", help="run helexa's side")
    ap.add_argument("--llama-work", type=Path, help="llama.cpp build dir: run llama-bench")
    ap.add_argument("--llama-src", type=Path, default=Path(".device/llama-src.tar.gz"))
    ap.add_argument("--out", type=Path, default=Path("."), help="results.json goes here")
    args = ap.parse_args(argv)

    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    write_s = write_model(args.gguf, args.preset, args.quant)
    if write_s:
        results["gguf write s"] = write_s
    results["device"] = torch.cuda.get_device_name()
    results["torch"] = torch.__version__
    results["gguf MB"] = args.gguf.stat().st_size / 2**20
    if args.helexa:
        results["copy B/s"] = copy_bandwidth()
        results["helexa"] = bench_helexa(args.gguf)
        results_path.write_text(json.dumps(results, indent=1))
    if args.llama_work:
        from bench.llama_cpp import build, run_bench, summarise

        records = run_bench(build(args.llama_src, args.llama_work), args.gguf, prompts=PROMPTS)
        results["llama.cpp"] = summarise(records)
        results["llama.cpp records"] = records
        results_path.write_text(json.dumps(results, indent=1))
    print(f"# {results['device']}, torch {results['torch']}, {args.preset} {args.quant}, "
          f"{results['gguf MB']:.0f} MiB GGUF")  # fmt: skip
    print(
        table(
            results.get("helexa", {}),
            results.get("llama.cpp", {}),
            results.get("copy B/s", float("nan")),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
