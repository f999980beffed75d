"""GGUF file -> Checkpoint: HF config and names, weights still in their ggml encoding.

The header is parsed by helexa.engine.checkpoint.gguf_header (gguf-py's GGUFReader
spends seconds on a real tokenizer's metadata), the tensor data is memory-mapped with
numpy, and each tensor is copied once, straight from the map to the target device;
quantized tensors stay quantized (QuantizedTensor), so a Q4_K_M model takes about its
file size in memory.
Everything that can be refused (an architecture we cannot run, an unknown tensor name or
type, a truncated file) is refused before the first copy, so preflight failures never
cost device memory.

Qwen2/Qwen3 GGUFs use NEOX rope and are converted without llama.cpp's Q/K permutation, so
names map one to one and no tensor is rearranged. A qwen3moe file's experts are 3-D
(n_expert, out, in) tensors and load as such, quantized ones as a stack of block rows.

The hybrid generation (qwen3next, qwen35, qwen35moe) is stored as llama.cpp's converter
writes it: the DeltaNet's projections already split (attn_qkv, attn_gate, and ssm_ba or
ssm_beta/ssm_alpha), ``ssm_a`` = -exp(A_log) (loaded as ``linear_attn.ssm_a``, which the
model takes as it is), ``ssm_dt.bias`` = dt_bias, ``ssm_conv1d`` squeezed to (channels,
kernel), and every zero-centred norm stored as 1 + w (loaded back as w). A qwen35 file
with fewer key than value heads has its value heads tiled, which the config says.
"""

from __future__ import annotations

import os
import re
from bisect import bisect_right
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType

from helexa.engine.checkpoint.errors import CheckpointError, UnsupportedArchitecture
from helexa.engine.checkpoint.gguf_header import GGUFHeader, GGUFTensorInfo, read_gguf_header
from helexa.engine.checkpoint.types import ByteProgress, Checkpoint, Progress, Weight
from helexa.engine.quant.formats import block_format
from helexa.engine.quant.tensor import QuantizedTensor

Q = GGMLQuantizationType

HYBRID_ARCHITECTURES: tuple[str, ...] = ("qwen3next", "qwen35", "qwen35moe")
LOADABLE_ARCHITECTURES: tuple[str, ...] = ("qwen3", "qwen3moe", *HYBRID_ARCHITECTURES)
# Readable for preflight (config, sizes) but without a model implementation yet: the
# architecture -> why, for the refusal's message.
NOT_YET: dict[str, str] = {}

# ggml float types and the torch dtype their bytes are.
_FLOAT_DTYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}

_HF_ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "qwen3next": "Qwen3NextForCausalLM",
    "qwen35": "Qwen3_5ForCausalLM",
    "qwen35moe": "Qwen3_5MoeForCausalLM",
}

# HF config key <- "{arch}.<GGUF key>", and the GGUF type a converter writes it as.
CONFIG_KEYS: tuple[tuple[str, str, GGUFValueType], ...] = (
    ("num_hidden_layers", "block_count", GGUFValueType.UINT32),
    ("max_position_embeddings", "context_length", GGUFValueType.UINT32),
    ("hidden_size", "embedding_length", GGUFValueType.UINT32),
    ("intermediate_size", "feed_forward_length", GGUFValueType.UINT32),
    ("num_attention_heads", "attention.head_count", GGUFValueType.UINT32),
    ("num_key_value_heads", "attention.head_count_kv", GGUFValueType.UINT32),
    ("head_dim", "attention.key_length", GGUFValueType.UINT32),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon", GGUFValueType.FLOAT32),
    ("rope_theta", "rope.freq_base", GGUFValueType.FLOAT32),
    ("num_experts", "expert_count", GGUFValueType.UINT32),
    ("num_experts_per_tok", "expert_used_count", GGUFValueType.UINT32),
    ("moe_intermediate_size", "expert_feed_forward_length", GGUFValueType.UINT32),
    ("shared_expert_intermediate_size", "expert_shared_feed_forward_length", GGUFValueType.UINT32),
    # The hybrid generation's DeltaNet (llama.cpp's ssm.* names for it).
    ("linear_conv_kernel_dim", "ssm.conv_kernel", GGUFValueType.UINT32),
    ("linear_key_head_dim", "ssm.state_size", GGUFValueType.UINT32),
    ("linear_num_key_heads", "ssm.group_count", GGUFValueType.UINT32),
    ("linear_num_value_heads", "ssm.time_step_rank", GGUFValueType.UINT32),
    ("full_attention_interval", "full_attention_interval", GGUFValueType.UINT32),
)

# general.sampling.<key> (recent llama.cpp converters) -> generation_config key, GGUF type.
SAMPLING_KEYS: tuple[tuple[str, str, GGUFValueType], ...] = (
    ("temp", "temperature", GGUFValueType.FLOAT32),
    ("top_k", "top_k", GGUFValueType.INT32),
    ("top_p", "top_p", GGUFValueType.FLOAT32),
    ("min_p", "min_p", GGUFValueType.FLOAT32),
    ("penalty_repeat", "repetition_penalty", GGUFValueType.FLOAT32),
)

# GGUF tensor name parts <-> HF parameter name parts (suffix .weight/.bias kept as is).
GLOBAL_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # Qwen3-MoE: the router, and the experts stacked (n_expert, out, in) as llama.cpp's
    # converter writes them (ggml ne = [in, out, n_expert]).
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
# The hybrid generation's layers (gguf's MODEL_TENSORS for qwen3next / qwen35 / qwen35moe):
# the post-attention norm has its own name, the DeltaNet's tensors are llama.cpp's ssm_*.
HYBRID_LAYER_NAMES: dict[str, str] = {
    **{k: v for k, v in LAYER_NAMES.items() if k != "ffn_norm"},
    "post_attention_norm": "post_attention_layernorm",
    "attn_qkv": "linear_attn.in_proj_qkv",
    "attn_gate": "linear_attn.in_proj_z",
    "ssm_ba": "linear_attn.in_proj_ba",  # qwen3next: b and a interleaved per key head
    "ssm_in": "linear_attn.in_proj_qkvz",  # qwen3next files from before the split
    "ssm_beta": "linear_attn.in_proj_b",
    "ssm_alpha": "linear_attn.in_proj_a",
    "ssm_conv1d": "linear_attn.conv1d",
    "ssm_norm": "linear_attn.norm",
    "ssm_out": "linear_attn.out_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
# Layer tensors whose names have no .weight/.bias on one side: llama.cpp's suffix-less
# ssm_a (-exp(A_log), which the model reads as it is) and dt_bias, stored as ssm_dt's bias.
HYBRID_BARE_NAMES: dict[str, str] = {
    "ssm_a": "linear_attn.ssm_a",
    "ssm_dt.bias": "linear_attn.dt_bias",
}
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)")
_GGUF_BARE = re.compile(r"blk\.(\d+)\.(ssm_a|ssm_dt\.bias)")
_HF_BARE = re.compile(r"model\.layers\.(\d+)\.(linear_attn\.ssm_a|linear_attn\.dt_bias)")
_HF_TO_GLOBAL = {hf: gguf for gguf, hf in GLOBAL_NAMES.items()}


def _layer_names(arch: str) -> dict[str, str]:
    return HYBRID_LAYER_NAMES if arch in HYBRID_ARCHITECTURES else LAYER_NAMES


def _rename(
    name: str,
    layer: re.Pattern[str],
    layer_names: dict[str, str],
    global_names: dict[str, str],
    layer_prefix: str,
) -> str | None:
    """``name`` in the other convention (one direction's tables), None if it has no match."""
    if m := layer.fullmatch(name):
        index, part, kind = m.groups()
        if part in layer_names:
            return f"{layer_prefix}.{index}.{layer_names[part]}.{kind}"
    else:
        stem, _, kind = name.rpartition(".")
        if stem in global_names and kind in ("weight", "bias"):
            return f"{global_names[stem]}.{kind}"
    return None


def hf_tensor_name(gguf_name: str, arch: str = "qwen3") -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if arch in HYBRID_ARCHITECTURES and (m := _GGUF_BARE.fullmatch(gguf_name)):
        return f"model.layers.{m[1]}.{HYBRID_BARE_NAMES[m[2]]}"
    hf = _rename(gguf_name, _GGUF_LAYER, _layer_names(arch), GLOBAL_NAMES, "model.layers")
    if hf is None:
        raise CheckpointError(f"unexpected tensor {gguf_name!r} for a {arch} GGUF")
    return hf


def gguf_tensor_name(hf_name: str, arch: str = "qwen3") -> str:
    """Inverse of :func:`hf_tensor_name`."""
    if arch in HYBRID_ARCHITECTURES and (m := _HF_BARE.fullmatch(hf_name)):
        return f"blk.{m[1]}." + {v: k for k, v in HYBRID_BARE_NAMES.items()}[m[2]]
    to_layer = {hf: gguf for gguf, hf in _layer_names(arch).items()}
    gguf = _rename(hf_name, _HF_LAYER, to_layer, _HF_TO_GLOBAL, "blk")
    if gguf is None:
        raise ValueError(f"no GGUF name for tensor {hf_name!r}")
    return gguf


def is_offset_norm(hf_name: str) -> bool:
    """A zero-centred norm of the hybrid generation, which llama.cpp's converter stores as
    1 + w: every ``*norm.weight`` but the DeltaNet's gated one."""
    return hf_name.endswith("norm.weight") and not hf_name.endswith("linear_attn.norm.weight")


@dataclass
class GGUFInfo:
    """What preflight needs from a GGUF without loading a single weight."""

    path: str
    architecture: str
    name: str | None
    config: dict[str, Any]
    tensor_bytes: int  # sum of the tensors' sizes: the memory weights will take
    qtype_counts: dict[str, int] = field(default_factory=dict)  # e.g. {"Q4_K": 197, "F32": 113}
    # The parsed header itself, for a load to take instead of parsing it again.
    header: GGUFHeader | None = field(default=None, repr=False, compare=False)

    @property
    def loadable(self) -> bool:
        return self.architecture in LOADABLE_ARCHITECTURES


def read_gguf_info(path: str | Path) -> GGUFInfo:
    """Architecture, HF-style config, weight bytes and type mix of any GGUF file."""
    header = _open(path)
    arch = _architecture(header, path)
    counts: dict[str, int] = {}
    for t in header.tensors:
        counts[t.ggml_type.name] = counts.get(t.ggml_type.name, 0) + 1
    return GGUFInfo(
        path=str(path),
        architecture=arch,
        name=header.get("general.name"),
        config=_config(header, arch),
        tensor_bytes=sum(t.n_bytes for t in header.tensors),
        qtype_counts=counts,
        header=header,
    )


def require_loadable(architecture: str, source: str = "") -> None:
    """Raise UnsupportedArchitecture unless the engine can run ``architecture``."""
    if architecture not in LOADABLE_ARCHITECTURES:
        raise UnsupportedArchitecture(
            architecture,
            source=source,
            supported=LOADABLE_ARCHITECTURES,
            detail=NOT_YET.get(architecture, ""),
        )


def load_gguf(
    path: str | Path,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    header: GGUFHeader | None = None,
) -> Checkpoint:
    """Load a qwen3 / qwen3moe GGUF onto ``device``: one copy per tensor, quantized ones
    as blocks. ``header``: the file's, as preflight read it (used while the file is
    unchanged, see read_gguf_header)."""
    began = perf_counter()
    header = _open(path, header)
    arch = _architecture(header, path)
    require_loadable(arch, str(path))
    config = _config(header, arch)
    names = {t.name: hf_tensor_name(t.name, arch) for t in header.tensors}
    for t in header.tensors:
        _check_tensor(t, path)
    target = torch.device(device)
    placed = ByteProgress(sum(t.n_bytes for t in header.tensors), progress)
    tensors: dict[str, Weight] = {}
    hybrid = arch in HYBRID_ARCHITECTURES
    reader = _Reader(path, header.data_offset, target)
    raws = reader.read([(t.offset, t.n_bytes) for t in header.tensors], placed)
    for t, raw in zip(header.tensors, raws, strict=True):
        name = names[t.name]
        tensors[name] = _to_torch(t, raw)
        if hybrid and is_offset_norm(name):
            tensors[name] = _float(tensors[name], t.name, path) - 1  # back to HF's w
    seconds = reader.seconds
    seconds["header and views"] = perf_counter() - began - sum(seconds.values())
    if n := reader.threads:  # what the calling thread waited on, the readers' time summed
        seconds[f"preadv summed over {n} thread{'s' * (n > 1)}"] = reader.pread_seconds
    return Checkpoint(
        config=config,
        tensors=tensors,
        tokenizer=_tokenizer(header),
        chat_template=header.get("tokenizer.chat_template"),
        generation_config=_generation_config(header),
        source=str(path),
        file_bytes=sum(t.n_bytes for t in header.tensors),
        read_seconds=seconds,
    )


def _float(t: Weight, name: str, path: str | Path) -> torch.Tensor:
    if isinstance(t, QuantizedTensor):
        raise CheckpointError(f"{path}: tensor {name} is {t.qtype.name}; a norm must be float")
    return t.float()


def _open(path: str | Path, known: GGUFHeader | None = None) -> GGUFHeader:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    return read_gguf_header(path, known)


def _architecture(header: GGUFHeader, path: str | Path) -> str:
    arch = header.get("general.architecture")
    if not isinstance(arch, str):
        raise CheckpointError(f"{path}: GGUF has no general.architecture")
    return arch


def _decimal(value: float) -> float:
    """GGUF stores f32; recover the short decimal the converter started from (1e-06)."""
    return float(str(np.float32(value)))


def _config(header: GGUFHeader, arch: str) -> dict[str, Any]:
    """HF config.json keys from ``{arch}.*`` metadata and the tensor shapes."""
    config: dict[str, Any] = {"model_type": arch}
    if arch in _HF_ARCHITECTURES:
        config["architectures"] = [_HF_ARCHITECTURES[arch]]
    for hf_key, gguf_key, vtype in CONFIG_KEYS:
        value = header.get(f"{arch}.{gguf_key}")
        if value is not None:
            config[hf_key] = _decimal(value) if vtype == GGUFValueType.FLOAT32 else int(value)
    if "num_attention_heads" in config:
        config.setdefault("num_key_value_heads", config["num_attention_heads"])
        if "hidden_size" in config:
            config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    shapes = {t.name: t.shape for t in header.tensors}
    if "token_embd.weight" in shapes:  # rows of the table; converters pad tokens to match
        config["vocab_size"] = shapes["token_embd.weight"][0]
    elif (tokens := header.get("tokenizer.ggml.tokens")) is not None:
        config["vocab_size"] = len(tokens)
    config["tie_word_embeddings"] = "output.weight" not in shapes
    config["attention_bias"] = "blk.0.attn_q.bias" in shapes
    config["hidden_act"] = "silu"
    rope = {"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)}
    scaling = header.get(f"{arch}.rope.scaling.type")
    if scaling and scaling != "none":
        rope_scaling = {
            "rope_type": scaling,
            "factor": _decimal(header.get(f"{arch}.rope.scaling.factor", 1.0)),
        }
        original = header.get(f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            rope_scaling["original_max_position_embeddings"] = int(original)
        config["rope_scaling"] = rope_scaling
        rope |= rope_scaling
    # Qwen's config.json says rope_theta/rope_scaling; transformers 5 says rope_parameters.
    config["rope_parameters"] = rope
    if arch in HYBRID_ARCHITECTURES:
        config.update(_hybrid_config(header, arch, config))
        rope["partial_rotary_factor"] = config.pop("partial_rotary_factor")
    if arch == "qwen3moe" or (arch in HYBRID_ARCHITECTURES and "num_experts" in config):
        config.update(_moe_config(header, arch, shapes, config.get("num_hidden_layers", 0)))
    return config


def _hybrid_config(header: GGUFHeader, arch: str, config: dict[str, Any]) -> dict[str, Any]:
    """What the converter stores only indirectly: the value head size (ssm.inner_size is
    all value heads), the RoPE fraction (rope.dimension_count of head_dim), and whether the
    value heads were tiled (qwen35/qwen35moe with fewer key heads than value heads)."""
    out: dict[str, Any] = {}
    inner = header.get(f"{arch}.ssm.inner_size")
    heads = config.get("linear_num_value_heads")
    if inner is not None and heads:
        out["linear_value_head_dim"] = int(inner) // heads
    rope_dim = header.get(f"{arch}.rope.dimension_count")
    head_dim = config.get("head_dim")
    out["partial_rotary_factor"] = rope_dim / head_dim if rope_dim and head_dim else 0.25
    out["linear_value_heads_tiled"] = (
        arch != "qwen3next" and heads is not None and heads != config.get("linear_num_key_heads")
    )
    return out


def _moe_config(
    header: GGUFHeader, arch: str, shapes: dict[str, tuple[int, ...]], layers: int
) -> dict[str, Any]:
    """What llama.cpp's qwen3moe leaves implicit: it renormalises the chosen experts'
    weights (norm_topk_prob) unless ``expert_weights_norm`` says otherwise, and a layer
    without a router is a dense one (llama.cpp itself requires every layer sparse)."""
    return {
        "norm_topk_prob": bool(header.get(f"{arch}.expert_weights_norm", True)),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [
            i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in shapes
        ],
    }


def _check_tensor(t: GGUFTensorInfo, path: str | Path) -> None:
    try:
        fmt = block_format(t.ggml_type)
    except ValueError as e:
        raise CheckpointError(f"{path}: tensor {t.name}: {e}") from None
    if not fmt.is_float and len(t.dims) not in (2, 3):  # a matrix, or a stack of experts
        raise CheckpointError(
            f"{path}: tensor {t.name}: quantized tensors of {len(t.shape)} dims are not supported"
        )


def _to_torch(t: GGUFTensorInfo, raw: torch.Tensor) -> Weight:
    """The tensor from its bytes ``raw`` (uint8, already where it goes)."""
    if t.ggml_type in _FLOAT_DTYPES:
        return raw.view(_FLOAT_DTYPES[t.ggml_type]).reshape(t.shape)
    return QuantizedTensor(raw.reshape(*t.shape[:-1], -1), t.ggml_type, t.shape)


# Bytes per host-to-GPU copy (one pinned buffer): large enough for the copy engine's full
# rate, small enough that the buffers cost nothing.
STAGE_BYTES = 32 << 20
# Reads in flight, each into its own pinned buffer: one thread copying from the page cache
# manages ~3.5 GB/s (18.9 GB in 5.4 s on the H200's host), a seventh of the bus.
STAGE_READERS = 4


class _Reader:
    """A GGUF's tensor data onto one device, each byte copied once.

    To the CPU: views of a copy-on-write memory map, copied out (writable tensors, the
    file never written nor read ahead). To a GPU: the data section streamed front to back
    in :data:`STAGE_BYTES` chunks, :data:`STAGE_READERS` of them read at once by threads
    (``os.preadv`` releases the GIL) into pinned buffers, each sent on with an
    asynchronous copy into the tensors it overlaps, as llama.cpp loads. Copying from the
    map instead lets the driver stage pageable memory through its own buffers, page
    fault by page fault, at a fraction of the bus's rate."""

    def __init__(
        self, path: str | Path, data_offset: int, device: torch.device, staged: bool | None = None
    ) -> None:
        self.path, self.data_offset, self.device = path, data_offset, device
        self.cuda = device.type == "cuda"
        self.staged = self.cuda if staged is None else staged  # staged to the CPU: tests
        # The calling thread's seconds by what it did (they add up to its read), and the
        # reader threads' seconds in preadv, summed: the load log's split of the read.
        self.seconds: dict[str, float] = {}
        self.pread_seconds, self.threads = 0.0, 0

    def _took(self, part: str, since: float) -> float:
        """Add the seconds since ``since`` to ``part``; now."""
        now = perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - since
        return now

    def read(self, spans: list[tuple[int, int]], placed: ByteProgress) -> list[torch.Tensor]:
        """The bytes of each (offset, n_bytes) span of the data section, on the device,
        all there (copies finished) when this returns."""
        began = perf_counter()
        if not self.staged:
            data = np.memmap(self.path, np.uint8, "c", self.data_offset) if spans else None
            outs = []
            for offset, n_bytes in spans:
                assert data is not None
                outs.append(
                    torch.from_numpy(data[offset : offset + n_bytes]).to(self.device, copy=True)
                )
                placed.add(n_bytes)
            self._took("copies from the map", began)
            return outs
        outs = [torch.empty(n, dtype=torch.uint8, device=self.device) for _, n in spans]
        order = sorted(range(len(spans)), key=lambda i: spans[i][0])  # file order
        offsets = [spans[i][0] for i in order]
        end = max((o + n for o, n in spans), default=0)
        chunks = list(range(min(offsets, default=0), end, STAGE_BYTES))
        buffers = [
            torch.empty(STAGE_BYTES, dtype=torch.uint8, pin_memory=self.cuda)
            for _ in range(min(STAGE_READERS, len(chunks)))
        ]
        events = [torch.cuda.Event() for _ in buffers] if self.cuda else []
        self.threads = len(buffers)
        parts = ["waiting on reads", "queueing copies"] + ["waiting on copies"] * bool(events)
        # Each part named from the start, so the log lists them in this order.
        self.seconds = {"allocating": perf_counter() - began, **dict.fromkeys(parts, 0.0)}

        def send(read: Future[float], slot: int, start: int, stop: int) -> None:
            """Once read, copy buffer ``slot`` (file bytes start..stop) into every tensor
            it overlaps, the first of them the last to begin at or before ``start``."""
            waited = perf_counter()
            self.pread_seconds += read.result()
            queued = self._took("waiting on reads", waited)
            for i in order[max(0, bisect_right(offsets, start) - 1) :]:
                offset, n_bytes = spans[i]
                if offset >= stop:
                    break
                lo, hi = max(offset, start), min(offset + n_bytes, stop)
                if lo < hi:
                    src = buffers[slot][lo - start : hi - start]
                    outs[i][lo - offset : hi - offset].copy_(src, non_blocking=True)
                    placed.add(hi - lo)
            if events:
                events[slot].record()
            self._took("queueing copies", queued)

        fd = os.open(self.path, os.O_RDONLY)
        try:
            with ThreadPoolExecutor(len(buffers) or 1, thread_name_prefix="helexa-gguf") as pool:
                pending: deque[tuple[Future[float], int, int, int]] = deque()
                for n, start in enumerate(chunks):
                    slot = n % len(buffers)
                    if len(pending) == len(buffers):  # the slot's last chunk: copy it out
                        send(*pending.popleft())
                    if events:
                        waited = perf_counter()
                        events[slot].synchronize()  # its previous copy has left it
                        self._took("waiting on copies", waited)
                    stop = min(start + STAGE_BYTES, end)
                    read = pool.submit(self._pread, fd, buffers[slot][: stop - start], start)
                    pending.append((read, slot, start, stop))
                while pending:
                    send(*pending.popleft())
            waited = perf_counter()
            for event in events:  # the tensors are whole, and the buffers free
                event.synchronize()
            if events:
                self._took("waiting on copies", waited)
        finally:
            os.close(fd)
        return outs

    def _pread(self, fd: int, buffer: torch.Tensor, start: int) -> float:
        """Fill ``buffer`` from data-section byte ``start`` (a read may return fewer); the
        seconds it took."""
        began = perf_counter()
        view = memoryview(buffer.numpy())
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], self.data_offset + start + done)
            if not got:
                raise CheckpointError(f"{self.path}: the tensor data ends early")
            done += got
        return perf_counter() - began


def _tokenizer(header: GGUFHeader) -> dict[str, Any]:
    """The raw ``tokenizer.ggml.*`` fields, plus the special tokens' strings by name."""
    fields = {key: f.value for key, f in header.fields.items() if key.startswith("tokenizer.ggml.")}
    tokens = fields.get("tokenizer.ggml.tokens", [])
    for role, key in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token")):
        token_id = fields.get(f"tokenizer.ggml.{role}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            fields[key] = tokens[token_id]
    return fields


def _generation_config(header: GGUFHeader) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for gguf_key, hf_key, vtype in SAMPLING_KEYS:
        value = header.get(f"general.sampling.{gguf_key}")
        if value is not None:
            config[hf_key] = _decimal(value) if vtype == GGUFValueType.FLOAT32 else int(value)
    return config
