"""Write a Qwen3 or Qwen3-MoE GGUF from an HF config and state dict, quantized with our
own encoders.

For tests and demos: any tiny random model becomes a real GGUF (F32 up to Q4_K_M) that
load_gguf, gguf-py and llama.cpp can read, with no downloaded weights. The per-tensor
type choice follows llama.cpp's llama_tensor_get_type in spirit: norms and the MoE router
stay F32, the ``_M`` mixes give attn_v, ffn_down(_exps) and the output projection Q6_K,
and rows too short for a block format fall back to the nearest format that fits.

A MoE's experts are written as llama.cpp's converter writes them: stacked into one
(n_expert, out, in) tensor per projection (ne = [in, out, n_expert]), each expert's rows
quantized like any matrix's. Its metadata are the converter's ``{arch}.expert_*`` keys;
``expert_weights_norm`` is added only for ``norm_topk_prob: false``, which llama.cpp's
qwen3moe (always renormalising) does not read. Dense layers in a MoE config
(``mlp_only_layers``) are written as ffn_gate/up/down, which gguf-py and load_gguf read
and llama.cpp's qwen3moe refuses, as it refuses such a model converted by its own script.

The hybrid generation (qwen3next, qwen35, qwen35moe) gets the converter's transforms
(Qwen3NextModel.modify_tensors and, for Qwen3.5, _LinearAttentionVReorderBase's): MTP
heads dropped; Qwen3-Next's in_proj_qkvz split into attn_qkv (all q, all k, all v) and
attn_gate, its in_proj_ba kept fused as ssm_ba; Qwen3.5's value heads reordered from
grouped to tiled when there are fewer key heads; A_log written as ssm_a = -exp(A_log),
dt_bias as ssm_dt.bias, conv1d squeezed to (channels, kernel), and every norm but the
DeltaNet's as 1 + w. Its metadata are the converter's ssm.* keys, full_attention_interval
and rope.dimension_count (the rotated part of a head).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from gguf import (
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
)

from helexa.engine.checkpoint.errors import UnsupportedArchitecture
from helexa.engine.checkpoint.gguf import (
    CONFIG_KEYS,
    HYBRID_ARCHITECTURES,
    SAMPLING_KEYS,
    gguf_tensor_name,
    is_offset_norm,
)
from helexa.engine.checkpoint.safetensors import stack_experts
from helexa.engine.quant.formats import block_format
from helexa.engine.quant.quantize import quantize

Q = GGMLQuantizationType

# File-level quant name -> (type of most 2-D weights, llama.cpp file type).
QUANTS: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "F32": (Q.F32, LlamaFileType.ALL_F32),
    "F16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "BF16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "Q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q6_K": (Q.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "Q5_K_M": (Q.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "Q4_K_M": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
}
# Tensors the _M mixes keep at Q6_K: the ones quantization error hurts most.
_MORE_BITS = ("attn_v.weight", "ffn_down.weight", "ffn_down_exps.weight")
# Tensors llama.cpp never quantizes whatever the file type (the MoE router, the
# DeltaNet's conv kernel).
_ALWAYS_F32 = ("ffn_gate_inp.weight", "ssm_conv1d.weight")
# What llama.cpp uses when a row is not a whole number of blocks of the wanted type.
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.Q8_0: Q.F16}


def tensor_qtype(
    gguf_name: str, shape: tuple[int, ...], quant: str, *, has_output: bool
) -> GGMLQuantizationType:
    """The type one tensor is stored as in a file written with ``quant``."""
    if len(shape) < 2 or gguf_name.endswith(_ALWAYS_F32):
        return Q.F32
    qtype = QUANTS[quant][0]
    is_output = gguf_name == "output.weight" or (
        not has_output and gguf_name == "token_embd.weight"
    )
    if quant.endswith("_M") and (is_output or gguf_name.endswith(_MORE_BITS)):
        qtype = Q.Q6_K
    while shape[-1] % block_format(qtype).block_size:
        qtype = _FALLBACK[qtype]
    return qtype


def write_gguf(
    path: str | Path,
    *,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    quant: str = "F32",
    tokenizer_fields: Mapping[str, Any] | None = None,
    chat_template: str | None = None,
    name: str = "helexa-tiny",
    generation_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``tensors`` (HF names, e.g. a Qwen3ForCausalLM or Qwen3MoeForCausalLM
    state_dict, experts in any layout stack_experts reads) as a qwen3 / qwen3moe GGUF.

    ``tokenizer_fields`` are ``tokenizer.ggml.*`` keys (see
    helexa.engine.text.tokenizer.tokenizer_to_gguf_fields). With ``tie_word_embeddings`` the
    lm_head is left out, as llama.cpp's converter does. ``generation_config`` (HF
    generation_config.json keys) becomes ``general.sampling.*``.
    """
    if quant not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    arch = _architecture(config)
    tied = bool(config.get("tie_word_embeddings", False))
    hf_tensors = stack_experts(dict(tensors))
    if arch in HYBRID_ARCHITECTURES:
        hf_tensors = _hybrid_tensors(hf_tensors, config, arch)
    named = {
        gguf_tensor_name(hf, arch): tensor
        for hf, tensor in hf_tensors.items()
        if not (tied and hf == "lm_head.weight")
    }
    has_output = "output.weight" in named

    path = Path(path)
    writer = GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_file_type(QUANTS[quant][1])
    writer.add_quantization_version(GGML_QUANT_VERSION)
    for key, value, vtype in _config_fields(config, arch):
        writer.add_key_value(key, value, vtype)
    sampling = generation_config or {}
    for gguf_key, hf_key, vtype in SAMPLING_KEYS:
        if sampling.get(hf_key) is not None:
            writer.add_key_value(f"general.sampling.{gguf_key}", sampling[hf_key], vtype)
    for key, value in (tokenizer_fields or {}).items():
        writer.add_key_value(key, *_typed(value))
    if chat_template:
        writer.add_chat_template(chat_template)
    for gguf_name, tensor in named.items():
        qtype = tensor_qtype(gguf_name, tuple(tensor.shape), quant, has_output=has_output)
        data = quantize(tensor, qtype).cpu().numpy()
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# GGUF architecture <- (HF architecture, HF model_type)
_ARCHITECTURES = {
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "qwen3next": ("Qwen3NextForCausalLM", "qwen3_next"),
    "qwen35": ("Qwen3_5ForCausalLM", "qwen3_5_text"),
    "qwen35moe": ("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text"),
}


def _hybrid_config(config: Mapping[str, Any]) -> Any:
    from helexa.engine.models.architectures import model_class

    return model_class(dict(config)).config_class.from_hf(dict(config))


def _tiled(t: torch.Tensor, dim: int, k_heads: int, head_dim: int) -> torch.Tensor:
    """Value heads along ``dim`` (n_k groups of r heads of ``head_dim``) from grouped
    order (k0v0, k0v1, k1v0, ...) to tiled (k0v0, k1v0, k0v1, ...), as the converter's
    _reorder_v_heads does for ggml's broadcasting."""
    shape = list(t.shape)
    grouped = t.reshape(*shape[:dim], k_heads, -1, head_dim, *shape[dim + 1 :])
    return grouped.transpose(dim, dim + 1).reshape(shape).contiguous()


def _hybrid_tensors(
    tensors: dict[str, torch.Tensor], config: Mapping[str, Any], arch: str
) -> dict[str, torch.Tensor]:
    """The converter's value transforms, tensor by tensor (HF names in and out; the
    suffix-less ssm_a / dt_bias names are gguf.HYBRID_BARE_NAMES')."""
    from helexa.engine.models.qwen3_next import split_qkvz

    cfg = _hybrid_config(config)
    nk, dv = cfg.linear_num_key_heads, cfg.linear_value_head_dim
    reorder = arch != "qwen3next" and cfg.linear_num_value_heads != nk
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith("mtp."):
            continue  # the converter drops the multi-token-prediction head
        # Stacked experts keep their dtype (quantize takes any): an 80B-A3B's in float32
        # would be 310 GB. The transforms below all work on float32.
        t = t.detach() if t.dim() == 3 else t.detach().float()
        stem = name.rpartition(".linear_attn.")[0] + ".linear_attn."
        if reorder and ".linear_attn." in name:
            t = _tile_v(name, t, cfg, nk, dv)
        if name.endswith(".in_proj_qkvz.weight"):
            qkv, z = split_qkvz(t, cfg)
            out[stem + "in_proj_qkv.weight"], out[stem + "in_proj_z.weight"] = qkv, z
            continue
        if name.endswith(".A_log"):
            name, t = stem + "ssm_a", -torch.exp(t)
        elif name.endswith(".conv1d.weight"):
            t = t.squeeze()
        elif is_offset_norm(name):
            t = t + 1
        out[name] = t
    return out


def _tile_v(name: str, t: torch.Tensor, cfg: Any, nk: int, dv: int) -> torch.Tensor:
    """One Qwen3.5 DeltaNet tensor with its value heads tiled (see :func:`_tiled`)."""
    v_start = 2 * cfg.key_dim  # q and k rows/channels come first in in_proj_qkv and conv1d
    if name.endswith((".in_proj_qkv.weight", ".conv1d.weight")):
        t = t.reshape(t.shape[0], -1) if name.endswith(".conv1d.weight") else t
        return torch.cat([t[:v_start], _tiled(t[v_start:], 0, nk, dv)])
    if name.endswith(".in_proj_z.weight"):
        return _tiled(t, 0, nk, dv)
    if name.endswith((".in_proj_b.weight", ".in_proj_a.weight", ".A_log", ".dt_bias")):
        return _tiled(t, 0, nk, 1)
    if name.endswith(".out_proj.weight"):
        return _tiled(t, 1, nk, dv)
    return t


def _architecture(config: Mapping[str, Any]) -> str:
    model_type = config.get("model_type") or ""
    archs = config.get("architectures") or ()
    for gguf_arch, (hf_arch, hf_type) in _ARCHITECTURES.items():
        if model_type == hf_type or hf_arch in archs:
            return gguf_arch
    raise UnsupportedArchitecture(
        model_type or str(config.get("architectures")), supported=tuple(_ARCHITECTURES)
    )


def _config_fields(config: Mapping[str, Any], arch: str) -> list[tuple[str, Any, GGUFValueType]]:
    """``{arch}.*`` metadata from HF config keys, filling what HF leaves implicit."""
    values = dict(config)
    heads = config["num_attention_heads"]
    values["head_dim"] = config.get("head_dim") or config["hidden_size"] // heads
    values["num_key_value_heads"] = config.get("num_key_value_heads") or heads
    # Older configs say rope_theta/rope_scaling, transformers 5 nests both in rope_parameters.
    rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    values["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    # transformers 5 saves num_experts under its attribute-map name.
    values.setdefault("num_experts", config.get("num_local_experts"))
    fields = [
        (f"{arch}.{key}", values[hf_key], vtype)
        for hf_key, key, vtype in CONFIG_KEYS
        if values.get(hf_key) is not None
    ]
    fields.append((f"{arch}.attention.value_length", values["head_dim"], GGUFValueType.UINT32))
    if arch in HYBRID_ARCHITECTURES:
        fields += _hybrid_fields(config, arch)
    # Qwen3.5-MoE has no norm_topk_prob (it always renormalises); Qwen3-Next says true.
    raw_topk = (arch == "qwen3moe" and not config.get("norm_topk_prob", False)) or (
        arch in HYBRID_ARCHITECTURES and config.get("norm_topk_prob") is False
    )
    if raw_topk:
        fields.append((f"{arch}.expert_weights_norm", False, GGUFValueType.BOOL))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        fields.append((f"{arch}.rope.scaling.type", rope_type, GGUFValueType.STRING))
        fields.append((f"{arch}.rope.scaling.factor", rope["factor"], GGUFValueType.FLOAT32))
        if "original_max_position_embeddings" in rope:
            original = rope["original_max_position_embeddings"]
            key = f"{arch}.rope.scaling.original_context_length"
            fields.append((key, original, GGUFValueType.UINT32))
    return fields


def _hybrid_fields(config: Mapping[str, Any], arch: str) -> list[tuple[str, Any, GGUFValueType]]:
    """The converter's Qwen3NextModel.set_gguf_parameters keys that are not plain copies of
    a config key: all value heads' width, the attention layers' period (llama.cpp derives
    the layer types from it), the rotated part of a head."""
    from helexa.engine.models.qwen3_next import FULL, LINEAR

    cfg = _hybrid_config(config)
    layers = cfg.num_hidden_layers
    interval = next(
        (
            n
            for n in range(1, layers + 1)
            if cfg.layer_types == tuple(FULL if (i + 1) % n == 0 else LINEAR for i in range(layers))
        ),
        None,
    )
    if interval is None:
        raise ValueError(f"layer_types {cfg.layer_types} are not every n-th layer full attention")
    u32 = GGUFValueType.UINT32
    fields = [
        (f"{arch}.ssm.inner_size", cfg.value_dim, u32),
        (f"{arch}.rope.dimension_count", cfg.rotary_dim, u32),
    ]
    if not config.get("full_attention_interval"):
        fields.append((f"{arch}.full_attention_interval", interval, u32))
    # Qwen3.5's M-RoPE sections, padded to four as the converter's TextModel does (text
    # positions are the same on every axis, so they change nothing for text).
    sections = (config.get("rope_parameters") or {}).get("mrope_section")
    if sections:
        padded = [*sections, 0, 0, 0, 0][:4] if len(sections) < 4 else list(sections[:4])
        fields.append((f"{arch}.rope.dimension_sections", padded, GGUFValueType.ARRAY))
    return fields


def _typed(value: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """(value, type, array item type) as llama.cpp's converter writes tokenizer fields:
    ids and counts uint32, token types int32, scores float32."""
    if isinstance(value, bool):
        return value, GGUFValueType.BOOL, None
    if isinstance(value, int):
        return value, GGUFValueType.UINT32, None
    if isinstance(value, float):
        return value, GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return value, GGUFValueType.STRING, None
    items = list(value)
    if not items:
        raise ValueError("GGUF cannot store an empty array")
    first = items[0]
    if isinstance(first, str):
        item_type = GGUFValueType.STRING
    elif isinstance(first, float):
        item_type = GGUFValueType.FLOAT32
    else:
        item_type = GGUFValueType.INT32
    return items, GGUFValueType.ARRAY, item_type
