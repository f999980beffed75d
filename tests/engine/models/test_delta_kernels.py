"""The Gated DeltaNet decode step's Triton kernels against the torch step they replace
(qwen3_next's ``_delta_step``): output, conv state and delta-rule state over consecutive
steps, grouped and tiled key heads, the int8 activations they write for out_proj; the
graph-captured hybrid decode step with them against the eager torch step; and a build for
sm_90 on a CPU-only host.

On CUDA they run as compiled; with ``TRITON_INTERPRET=1`` the comparisons also run on the
CPU through Triton's interpreter, in float32 and float16 (it garbles bfloat16, which runs
on CUDA only). Without Triton (CI) everything here skips.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from helexa.engine.checkpoint.safetensors import load_safetensors_dir
from helexa.engine.models import qwen3_next
from helexa.engine.models.architectures import model_class
from helexa.engine.models.cuda_graph import GraphDecoder, kv_bucket
from helexa.engine.models.qwen3_next import GatedDeltaNet, Qwen3Next, decode_step
from helexa.engine.models.recurrent_state import RecurrentState
from tests.engine.factories import make_tiny_hybrid_hf_model, save_model_dir
from tests.engine.kernel_device import DEVICE, HAS_TRITON, INTERPRET, needs_kernels

pytestmark = pytest.mark.cuda
# bfloat16 runs compiled only: the interpreter's bfloat16 is not the GPU's.
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter garbles bfloat16"),
    ),
]
# Relative to the largest magnitude compared: a rounding of an intermediate (k, beta, the
# conv's output) that flips one unit in the last place moves everything after it.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Through a whole model, where each layer's differences feed the next (bfloat16 as
# test_decode_kernels allows the dense model's fused step).
MODEL_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Case:
    """A tiny hybrid model whose linear layers have ``value_heads`` = ratio x
    ``key_heads``; ``tiled`` reads key head j % n_k for value head j (a Qwen3.5 GGUF)."""

    kind: str
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    tiled: bool = False

    @property
    def id(self) -> str:
        order = "tiled" if self.tiled else "grouped"
        heads = f"{self.key_heads}x{self.value_heads}"
        return f"{self.kind}-{heads}-{self.key_dim}x{self.value_dim}-{order}"


CASES = [
    Case("qwen3_next", 2, 4, 16, 32),  # 192 channels: one conv block, partly masked
    Case("qwen3_5", 2, 8, 16, 32),  # 320 channels: two conv blocks
    Case("qwen3_5", 2, 8, 16, 32, tiled=True),
    Case("qwen3_5", 2, 4, 24, 24),  # heads not a power of two: padded tiles, no int8
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def case_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    case: Case = request.param
    hf = make_tiny_hybrid_hf_model(
        case.kind,
        seed=7,
        linear_num_key_heads=case.key_heads,
        linear_num_value_heads=case.value_heads,
        linear_key_head_dim=case.key_dim,
        linear_value_head_dim=case.value_dim,
    )
    return case, save_model_dir(tmp_path_factory.mktemp(case.id), hf)


def load(case: Case, path: Path, dtype: torch.dtype) -> Qwen3Next:
    ckpt = load_safetensors_dir(path)
    model = model_class(ckpt.config).from_checkpoint(ckpt, device=DEVICE, dtype=dtype)
    assert isinstance(model, Qwen3Next)
    model.config = replace(model.config, linear_value_heads_tiled=case.tiled)
    model.setup_cache(max_batch=2, max_seq=16)
    return model


def kernels() -> ModuleType:
    from helexa.engine.models import delta_kernels

    return delta_kernels


@torch.inference_mode()
def twin_layers(model: Qwen3Next, seed: int) -> tuple[GatedDeltaNet, GatedDeltaNet]:
    """The first linear layer, and a copy of it sharing its weights but with its own
    state; both states start from the same random (non-zero) values."""
    net = next(b.mixer for b in model.layers if isinstance(b.mixer, GatedDeltaNet))
    assert net.state is not None
    gen = torch.Generator().manual_seed(seed)
    conv, ssm = net.state.tensors
    conv.copy_(torch.randn(conv.shape, generator=gen))
    ssm.copy_(torch.randn(ssm.shape, generator=gen) / ssm.shape[-2] ** 0.5)
    cfg = model.config
    twin = replace(
        net,
        state=RecurrentState(conv.shape[0], *cfg.state_shape, dtype=conv.dtype, device=conv.device),
    )
    assert twin.state is not None
    for mine, theirs in zip(twin.state.tensors, net.state.tensors, strict=True):
        mine.copy_(theirs)
    return net, twin


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = want.abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=0)


@needs_kernels
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@torch.inference_mode()
def test_the_kernels_step_as_the_torch_step(
    case_dir: Any, dtype: torch.dtype, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five consecutive steps from a random state: the layer's output (out_proj of the
    kernels' y), the conv history (copies: exact) and the delta-rule memory."""
    # cuDNN's float32 conv would otherwise run in TF32 (10 bits), the kernel's in float32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    case, path = case_dir
    model = load(case, path, dtype)
    net, twin = twin_layers(model, seed=batch)
    assert net.state is not None and twin.state is not None
    gen = torch.Generator().manual_seed(100 + batch)
    tol = TOL[dtype]
    for _ in range(5):
        x = torch.randn(batch, 1, model.config.hidden_size, generator=gen).to(DEVICE, dtype)
        got = model._delta_step(net, x, kernels())
        want = model._delta_step(twin, x)
        close(got, want, tol)
        assert torch.equal(net.state.conv, twin.state.conv)
        close(net.state.ssm, twin.state.ssm, tol)
    # Rows past the batch are another sequence's: never touched.
    if batch == 1:
        assert torch.equal(net.state.conv[1:], twin.state.conv[1:])
        assert torch.equal(net.state.ssm[1:], twin.state.ssm[1:])


@needs_kernels
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d is not torch.float32])
@torch.inference_mode()
def test_the_int8_activations_are_those_of_the_output(case_dir: Any, dtype: torch.dtype) -> None:
    """With ``quantize`` the delta kernel also writes out_proj's int8 activations: bit for
    bit what quantize_rows makes of its output (None where a head is not whole 32-blocks
    of a power-of-two tile: out_proj's matvec then quantizes y itself)."""
    from helexa.engine.quant.triton_kernels import quantize_rows

    case, path = case_dir
    model = load(case, path, dtype)
    net, _ = twin_layers(model, seed=3)
    assert net.state is not None
    cfg = model.config
    x = torch.randn(2, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    mixed, z, b, a = model._delta_projections(net, x.to(DEVICE, dtype))
    states = [t.clone() for t in net.state.tensors]
    step = kernels().gated_delta_step

    def run(quantize: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        for live, start in zip(net.state.tensors, states, strict=True):
            live.copy_(start)
        return step(
            mixed, z, b, a, net.conv, net.neg_a, net.dt_bias, net.norm, *net.state.tensors,
            key_heads=cfg.linear_num_key_heads, tiled=cfg.linear_value_heads_tiled,
            l2_eps=qwen3_next.L2_EPS, eps=cfg.rms_norm_eps, quantize=quantize,
        )  # fmt: skip

    y, quantized = run(True)
    plain, none = run(False)
    assert none is None and torch.equal(y, plain)
    if case.value_dim % 32:
        assert quantized is None
        return
    assert quantized is not None
    for got, want, name in zip(quantized, quantize_rows(y.reshape(2, -1)), "qds", strict=True):
        assert torch.equal(got, want), name


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_bad_shapes_are_named() -> None:
    """Checked on the host before any launch (a captured step would fail at replay)."""
    step = kernels().gated_delta_step
    heads, dk, dv, kh = 4, 16, 32, 2
    channels = 2 * kh * dk + heads * dv
    mixed = torch.zeros(1, 1, channels)
    z = torch.zeros(1, 1, heads * dv)
    ba = torch.zeros(1, 1, heads)
    conv_w, conv = torch.zeros(channels, 4), torch.zeros(1, channels, 3)
    vec, norm, ssm = torch.zeros(heads), torch.ones(dv), torch.zeros(1, heads, dk, dv)
    common = dict(key_heads=kh, tiled=False, l2_eps=1e-6, eps=1e-6)
    with pytest.raises(ValueError, match="float32"):
        step(mixed, z, ba, ba, conv_w, vec, vec, norm, conv, ssm.half(), **common)
    with pytest.raises(ValueError, match="key heads expects"):
        step(mixed[..., 1:], z, ba, ba, conv_w, vec, vec, norm, conv, ssm, **common)
    with pytest.raises(ValueError, match="not a multiple of 3 key heads"):
        step(mixed, z, ba, ba, conv_w, vec, vec, norm, conv, ssm, **{**common, "key_heads": 3})
    with pytest.raises(ValueError, match="at most 1 rows"):
        step(mixed.expand(2, 1, -1), z, ba, ba, conv_w, vec, vec, norm, conv, ssm, **common)
    with pytest.raises(ValueError, match=r"z must be \[B, 1, 128\]"):
        step(mixed, z[..., 1:], ba, ba, conv_w, vec, vec, norm, conv, ssm, **common)


def aligned(signature: dict[str, str]) -> dict[tuple[int, ...], list[list[Any]]]:
    """The specialization a launch gets for torch's allocations: every pointer 16-byte
    aligned (what lets the state tile load as vectors; the kernel is built for that)."""
    pointers = (i for i, kind in enumerate(signature.values()) if kind.startswith("*"))
    return {(i,): [["tt.divisibility", 16]] for i in pointers}


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (compiles ahead of time, no GPU)")
@pytest.mark.skipif(INTERPRET, reason="the interpreter cannot compile")
@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("tiled", [False, True])
def test_the_kernels_compile_for_hopper(tiled: bool, quant: bool) -> None:
    """The interpreter accepts code the compiler may not: both kernels, at a Qwen3.5-9B
    layer's shapes (16 key heads of 128, 32 value heads of 128, a conv of 4), must build
    to sm_90 machine code with the launch options the wrappers pick."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    dk = kernels()
    target = GPUTarget("cuda", 90, 32)
    conv = ASTSource(
        fn=dk._conv_step_kernel,
        signature={"Mixed": "*bf16", "State": "*bf16", "W": "*bf16", "Out": "*bf16",
                   "stride_m": "i32", "channels": "i32", "KERNEL": "constexpr",
                   "BLOCK": "constexpr", "PDL": "constexpr"},
        constexprs={"KERNEL": 4, "BLOCK": dk.CONV_BLOCK, "PDL": True},
    )  # fmt: skip
    conv.attrs = aligned(conv.signature)
    built = triton.compile(conv, target=target, options={"num_warps": 4})
    assert built.asm["cubin"] and "griddepcontrol.wait" in built.asm["ptx"]
    pointers = {"Conv": "*bf16", "A": "*bf16", "Beta": "*bf16", "NegA": "*fp32",
                "DtBias": "*fp32", "Z": "*bf16", "NormW": "*bf16", "State": "*fp32",
                "Out": "*bf16", "Q": "*i8", "D": "*fp32", "S": "*fp32"}  # fmt: skip
    ints = dict.fromkeys(("stride_a", "stride_beta", "stride_z", "value_heads", "key_heads"), "i32")
    floats = dict.fromkeys(("scale", "l2_eps", "eps"), "fp32")
    heads = dict(DK=128, DV=128, BK=128, BV=128, GROUP=2)
    constants = dict(**heads, TILED=tiled, ROUND_SCALED=True, QUANT=quant, PDL=True)
    kinds = {**pointers, **ints, **floats, **dict.fromkeys(constants, "constexpr")}
    fn = dk._delta_rule_kernel
    signature = {n: kinds[n] for n in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=aligned(signature))
    kernel = triton.compile(source, target=target, options={"num_warps": dk.delta_warps(128, 128)})
    assert kernel.asm["cubin"] and "griddepcontrol.wait" in kernel.asm["ptx"]


@needs_kernels
@pytest.mark.parametrize("kind", ["qwen3_next", "qwen3_5"])
def test_the_hybrid_decode_step_with_the_kernels_matches_the_torch_step(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qwen3_next.decode_step with the kernels against it in torch, batch 2, logits and
    every layer's states over 10 steps across a kv_len bucket. On CUDA in bfloat16, Q8_0
    weights, and captured (GraphDecoder replays it; out_proj's int8 matvec reads the
    activations the delta kernel wrote); under the interpreter in float32 (the CPU's
    float16 conv1d takes ~1 s a call), eagerly, the kernels (and the dense glue that
    comes with them) forced on the CPU."""
    from helexa.engine.checkpoint.safetensors import load_checkpoint
    from tests.engine.gguf_factories import write_model_gguf

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    hf = make_tiny_hybrid_hf_model(kind, seed=9, linear_value_head_dim=32)
    quant = "Q8_0" if DEVICE == "cuda" else "F32"  # the CPU would expand Q8_0 each step
    path = write_model_gguf(tmp_path / "m.gguf", hf, quant=quant)

    def load_gguf() -> Qwen3Next:
        ckpt = load_checkpoint(path, DEVICE)
        model = model_class(ckpt.config).from_checkpoint(ckpt, DEVICE, dtype)
        assert isinstance(model, Qwen3Next)
        model.setup_cache(2, 64)
        return model

    fused, plain = load_gguf(), load_gguf()
    if DEVICE == "cpu":
        monkeypatch.setattr(qwen3_next, "delta_kernels", lambda model: kernels())
    assert qwen3_next.delta_kernels(fused) is not None
    decoder = GraphDecoder(fused, min_kv_len=16, step=decode_step)
    prompt = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    prompt = prompt.to(DEVICE)
    for model in (fused, plain):
        model.forward(prompt, torch.arange(10, device=DEVICE))
    token = prompt[:, -1:]
    tol = MODEL_TOL[dtype]
    for pos in range(10, 20):
        got = decoder(token, pos)
        with monkeypatch.context() as patch:
            patch.setattr(qwen3_next, "delta_kernels", lambda model: None)
            step = torch.tensor([pos], device=DEVICE)
            want = decode_step(plain, token, step, kv_bucket(pos, 64, 16))
        close(got, want, tol)
        token = want[:, -1].argmax(-1, keepdim=True)
    if DEVICE == "cuda":
        assert sorted(kv for _, kv in decoder._graphs) == [16, 32]
    for mine, theirs in zip(fused.recurrent_states(), plain.recurrent_states(), strict=True):
        close(mine.conv, theirs.conv, tol)
        close(mine.ssm, theirs.ssm, tol)
