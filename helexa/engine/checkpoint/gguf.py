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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
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

LOADABLE_ARCHITECTURES: tuple[str, ...] = ("qwen3", "qwen3moe")
# Readable for preflight (config, sizes) but without a model implementation yet: the
# architecture -> why, for the refusal's message.
NOT_YET: dict[str, str] = {}

# ggml float types and the torch dtype their bytes are.
_FLOAT_DTYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}

_HF_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}

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
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)")
_HF_TO_GLOBAL = {hf: gguf for gguf, hf in GLOBAL_NAMES.items()}
_HF_TO_LAYER = {hf: gguf for gguf, hf in LAYER_NAMES.items()}


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


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    hf = _rename(gguf_name, _GGUF_LAYER, LAYER_NAMES, GLOBAL_NAMES, "model.layers")
    if hf is None:
        raise CheckpointError(f"unexpected tensor {gguf_name!r} for a Qwen3 GGUF")
    return hf


def gguf_tensor_name(hf_name: str) -> str:
    """Inverse of :func:`hf_tensor_name`."""
    gguf = _rename(hf_name, _HF_LAYER, _HF_TO_LAYER, _HF_TO_GLOBAL, "blk")
    if gguf is None:
        raise ValueError(f"no GGUF name for tensor {hf_name!r}")
    return gguf


@dataclass
class GGUFInfo:
    """What preflight needs from a GGUF without loading a single weight."""

    path: str
    architecture: str
    name: str | None
    config: dict[str, Any]
    tensor_bytes: int  # sum of the tensors' sizes: the memory weights will take
    qtype_counts: dict[str, int] = field(default_factory=dict)  # e.g. {"Q4_K": 197, "F32": 113}

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
    path: str | Path, device: str | torch.device = "cpu", progress: Progress | None = None
) -> Checkpoint:
    """Load a qwen3 / qwen3moe GGUF onto ``device``: one copy per tensor, quantized ones
    as blocks."""
    header = _open(path)
    arch = _architecture(header, path)
    require_loadable(arch, str(path))
    config = _config(header, arch)
    names = {t.name: hf_tensor_name(t.name) for t in header.tensors}
    for t in header.tensors:
        _check_tensor(t, path)
    # Copy-on-write map: writable numpy views (so torch.from_numpy does not warn)
    # without ever writing to, or reading ahead of, the file.
    data = np.memmap(path, np.uint8, "c", header.data_offset) if header.tensors else np.empty(0)
    target = torch.device(device)
    placed = ByteProgress(sum(t.n_bytes for t in header.tensors), progress)
    tensors: dict[str, Weight] = {}
    for t in header.tensors:
        tensors[names[t.name]] = _to_torch(t, data, target)
        placed.add(t.n_bytes)
    return Checkpoint(
        config=config,
        tensors=tensors,
        tokenizer=_tokenizer(header),
        chat_template=header.get("tokenizer.chat_template"),
        generation_config=_generation_config(header),
        source=str(path),
        file_bytes=sum(t.n_bytes for t in header.tensors),
    )


def _open(path: str | Path) -> GGUFHeader:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    return read_gguf_header(path)


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
    if arch == "qwen3moe":
        config.update(_moe_config(header, arch, shapes, config.get("num_hidden_layers", 0)))
    return config


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


def _to_torch(t: GGUFTensorInfo, data: np.ndarray, device: torch.device) -> Weight:
    """The tensor's bytes as torch on ``device``, copied once from the memory map."""
    raw = torch.from_numpy(data[t.offset : t.offset + t.n_bytes])
    if t.ggml_type in _FLOAT_DTYPES:
        return raw.view(_FLOAT_DTYPES[t.ggml_type]).reshape(t.shape).to(device, copy=True)
    blocks = raw.reshape(*t.shape[:-1], -1).to(device, copy=True)
    return QuantizedTensor(blocks, t.ggml_type, t.shape)


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
