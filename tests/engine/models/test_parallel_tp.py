"""Tensor parallelism on the CPU: weight splits, two gloo ranks against one unsharded model,
the step watchdog on a wedged collective, and the layer-split plan."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gguf import GGMLQuantizationType

from helexa.engine.checkpoint.safetensors import load_checkpoint
from helexa.engine.models.cuda_graph import decode_step, kv_bucket
from helexa.engine.models.parallel import (
    EXIT_WEDGED,
    StepWatchdog,
    all_reduce,
    plan_layer_split,
    shard_qwen3,
    split_cols,
    split_rows,
)
from helexa.engine.models.qwen3 import Qwen3
from helexa.engine.quant.quantize import quantize
from helexa.engine.quant.tensor import QuantizedTensor
from tests.engine.factories import make_tiny_hf_model
from tests.engine.gguf_factories import write_model_gguf

Q = GGMLQuantizationType
REPO = Path(__file__).resolve().parents[3]
STEPS = 8


def quantized(qtype: GGMLQuantizationType, n: int, k: int) -> QuantizedTensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))
    return QuantizedTensor(quantize(w, qtype).reshape(n, -1), qtype, (n, k))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_quantized_splits_reassemble_exactly(qtype: GGMLQuantizationType) -> None:
    w = quantized(qtype, 8, 1024)
    dense = w.dequantize()
    rows = [split_rows(w, r, 2) for r in range(2)]
    cols = [split_cols(w, r, 4) for r in range(4)]
    assert all(isinstance(p, QuantizedTensor) for p in rows + cols)
    assert torch.equal(torch.cat([p.dequantize() for p in rows], 0), dense)
    assert torch.equal(torch.cat([p.dequantize() for p in cols], 1), dense)


def test_splits_refuse_partial_blocks_and_uneven_shares() -> None:
    with pytest.raises(ValueError, match="Q4_K blocks hold 256 weights"):
        split_cols(quantized(Q.Q4_K, 4, 256), 0, 2)
    with pytest.raises(ValueError, match="cannot split 6 output rows over 4 ranks"):
        split_rows(torch.zeros(6, 8), 0, 4)


def _rank(rank: int, world: int, gguf: str, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        full = Qwen3.from_checkpoint(load_checkpoint(gguf), "cpu", torch.float32)
        shard = shard_qwen3(full, rank, world)
        # Each shard decodes with its own fused gate/up and leading q/k/v, as the model did.
        assert all(blk.mlp.fused and blk.attn.fused for blk in shard.layers)
        shard.setup_cache(1, 16)
        logits = []
        token = torch.tensor([[3]])
        for pos in range(STEPS):
            step = decode_step(
                shard, token, torch.tensor([pos]), kv_bucket(pos, 16, 4), reduce=all_reduce()
            )
            logits.append(step)
            token = step[:, -1].argmax(-1, keepdim=True)
        torch.save(torch.cat(logits), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_the_unsharded_model(tmp_path: Path) -> None:
    gguf = write_model_gguf(tmp_path / "m.gguf", make_tiny_hf_model(seed=3), quant="Q8_0")
    mp.spawn(_rank, args=(2, str(gguf), str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2)

    model = Qwen3.from_checkpoint(load_checkpoint(gguf), "cpu", torch.float32)
    model.setup_cache(1, 16)
    expected, token = [], torch.tensor([[3]])
    for pos in range(STEPS):
        step = decode_step(model, token, torch.tensor([pos]), kv_bucket(pos, 16, 4))
        expected.append(step)
        token = step[:, -1].argmax(-1, keepdim=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_watchdog_reports_the_wedged_step() -> None:
    fired = threading.Event()
    messages: list[str] = []

    def on_timeout(message: str) -> None:
        messages.append(message)
        fired.set()

    dog = StepWatchdog(0.05, rank=1, world=2, on_timeout=on_timeout)
    with dog.step("decode step 7"):
        assert fired.wait(timeout=30)  # stands in for a collective that never returns
    assert messages == [
        "helexa: tensor-parallel decode step 7 on rank 1 of 2 did not finish in 0.05 s "
        "(a peer died or hung in a collective); aborting"
    ]


WEDGED_RANK = textwrap.dedent(
    """
    import sys, threading, torch, torch.distributed as dist
    from helexa.engine.models.parallel import StepWatchdog
    rank, rdzv = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    print("ready", flush=True)
    if rank == 1:
        threading.Event().wait()  # alive, but never joins the all-reduce
    with StepWatchdog(1.0, rank=rank, world=2).step("all-reduce"):
        dist.all_reduce(torch.ones(4))
    """
)


def test_watchdog_exits_a_process_stuck_in_an_all_reduce(tmp_path: Path) -> None:
    def start(rank: int) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-c", WEDGED_RANK, str(rank), str(tmp_path / "rdzv")]
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    ranks = [start(0), start(1)]
    try:
        _, err = ranks[0].communicate(timeout=120)
        assert ranks[0].returncode == EXIT_WEDGED
        assert "all-reduce on rank 0 of 2 did not finish in 1 s" in err
    finally:
        for proc in ranks:
            proc.kill()
            proc.communicate()


def test_layer_split_follows_budgets() -> None:
    layers = [10] * 8
    assert plan_layer_split(layers, [100]) == [range(0, 8)]
    assert plan_layer_split(layers, [50, 50]) == [range(0, 4), range(4, 8)]
    assert plan_layer_split(layers, [60, 20]) == [range(0, 6), range(6, 8)]
    assert plan_layer_split(layers, [0, 80]) == [range(0, 0), range(0, 8)]
    with pytest.raises(ValueError, match="layers need 80 bytes, devices offer 70"):
        plan_layer_split(layers, [35, 35])


def test_tp_bench_reports_parity_on_two_gloo_ranks(tmp_path: Path) -> None:
    """bench/tp.py at CI size, so the script the GPU run depends on keeps working."""
    import json

    from bench.tp import main

    gguf = write_model_gguf(tmp_path / "m.gguf", make_tiny_hf_model(seed=5), quant="Q4_K_M")
    args = ["--gguf", str(gguf), "--world", "2", "--device", "cpu", "--steps", "6"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())["tp"]
    assert report["top-1 agree"] == 1.0 and report["rel err"] < 1e-5
    assert report["tok/s world 1"] > 0 and report["tok/s world 2"] > 0
