"""Preflight: refuse a model load before it touches device memory, with a reason a client
can act on.

Three questions, in order: are the files there, can the engine run this architecture, and
does it fit? The fit estimate is weights (as they will sit on the device: quantized GGUF
blocks at file size, float safetensors in the compute dtype) plus the static KV cache plus a
small overhead. Failures are :class:`PreflightError`, whose body is
``{"error": {"type": "preflight", "code", "message", "needed_mb", "free_mb"}}`` so it
crosses the neuron HTTP API and reaches the gateway's client unchanged.

Engine modules (and so torch) are imported lazily: the gateway and ``helexa status`` never
pay for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from helexa.neuron.interface import DeviceHealth, DeviceInfo, NeuronError

if TYPE_CHECKING:
    from helexa.engine.checkpoint.gguf_header import GGUFHeader

MB = 1024 * 1024
OVERHEAD_BASE_MB = 256  # activations, logits and allocator slack at batch 1
DeviceKind = Literal["cuda", "cpu"]
# The engine computes in bfloat16 on CUDA and float32 on CPU (helexa.engine.generate).
COMPUTE_DTYPE_BYTES: dict[DeviceKind, int] = {"cuda": 2, "cpu": 4}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}


class PreflightError(NeuronError):
    """A load refused before any device memory was touched."""

    def __init__(
        self, message: str, *, code: str, status: int, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, status=status, type="preflight", code=code, extra=extra)


@dataclass(frozen=True)
class Plan:
    """Where the model goes and what it will cost there, in MiB."""

    devices: list[int]
    weights_mb: int
    kv_mb: int
    needed_mb: int
    context_length: int = 0
    architecture: str = ""
    state_mb: int = 0  # a hybrid model's recurrent state (fixed, whatever the context)
    layers: int = 0  # decoder layers a layer split shares out; 0: it cannot be split
    # A layer split's MiB on each of ``devices`` (empty: one device holds it all).
    device_mb: tuple[int, ...] = ()
    # What it was estimated from, for the load (a GGUF's header: not parsed twice).
    facts: ModelFacts | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs from a checkpoint, read without loading a weight."""

    architecture: str
    config: dict[str, Any]
    weight_bytes: int
    quantized: bool  # GGUF blocks stay as they are; float weights are cast to the compute dtype
    header: GGUFHeader | None = field(default=None, compare=False, repr=False)  # a GGUF's


# -- pure estimates --------------------------------------------------------------------------


def kv_cache_mb(layers: int, kv_heads: int, head_dim: int, context: int, dtype_bytes: int) -> int:
    """K and V for every layer at full context, batch 1."""
    return math.ceil(2 * layers * kv_heads * head_dim * context * dtype_bytes / MB)


def weights_mb(
    weight_bytes: int, *, stored_dtype_bytes: int | None, compute_dtype_bytes: int
) -> int:
    """Weights as they will sit on the device; None ``stored_dtype_bytes`` means as stored."""
    scale = compute_dtype_bytes / stored_dtype_bytes if stored_dtype_bytes else 1.0
    return math.ceil(weight_bytes * scale / MB)


def overhead_mb(weights: int) -> int:
    return OVERHEAD_BASE_MB + weights // 20


def stored_dtype_bytes(config: dict[str, Any]) -> int | None:
    name = config.get("torch_dtype") or config.get("dtype")
    return _DTYPE_BYTES.get(str(name).removeprefix("torch.")) if name else None


def default_context(config: dict[str, Any], requested: int | None) -> int:
    """The KV length the engine will allocate: the request's, else the model's capped default."""
    if requested:
        return requested
    from helexa.engine.generate import DEFAULT_CONTEXT

    return min(int(config.get("max_position_embeddings") or DEFAULT_CONTEXT), DEFAULT_CONTEXT)


def estimate(facts: ModelFacts, context: int, kind: DeviceKind) -> Plan:
    """Memory for ``facts`` at ``context`` on a ``kind`` device (``devices`` left empty)."""
    cfg = facts.config
    try:
        heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise PreflightError(
            f"model config lacks {exc} needed to size the KV cache",
            code="invalid_checkpoint",
            status=422,
        ) from None
    compute = COMPUTE_DTYPE_BYTES[kind]
    w = weights_mb(
        facts.weight_bytes,
        stored_dtype_bytes=None if facts.quantized else stored_dtype_bytes(cfg),
        compute_dtype_bytes=compute,
    )
    attention_layers, state_bytes = _layer_caches(cfg, layers, compute)
    kv = kv_cache_mb(attention_layers, kv_heads, head_dim, context, compute)
    state = math.ceil(state_bytes / MB)
    needed = w + kv + state + overhead_mb(w)
    splittable = not state_bytes and _splittable(cfg)
    return Plan(
        [], w, kv, needed, context, facts.architecture, state, layers * splittable, facts=facts
    )


def _splittable(cfg: dict[str, Any]) -> bool:
    """Whether the engine's layer split runs this architecture (Qwen3 and Qwen3-MoE)."""
    from helexa.engine.checkpoint.errors import CheckpointError
    from helexa.engine.models.architectures import model_class
    from helexa.engine.models.qwen3 import Qwen3

    try:
        return issubclass(model_class(cfg), Qwen3)
    except CheckpointError:
        return False


def _layer_caches(cfg: dict[str, Any], layers: int, dtype_bytes: int) -> tuple[int, int]:
    """(layers with a KV cache, bytes of recurrent state): a hybrid model's linear-attention
    layers keep a fixed-size state instead of K/V, as its config class counts them."""
    if "linear_num_value_heads" not in cfg:
        return layers, 0
    from helexa.engine.checkpoint.errors import CheckpointError
    from helexa.engine.models.architectures import model_class
    from helexa.engine.models.qwen3_next import Qwen3NextConfig

    try:
        hybrid = model_class(cfg).config_class.from_hf(cfg)
    except CheckpointError as exc:
        raise PreflightError(str(exc), code="invalid_checkpoint", status=422) from None
    if not isinstance(hybrid, Qwen3NextConfig):
        return layers, 0
    return hybrid.attention_layers, hybrid.recurrent_state_bytes(dtype_bytes)


def split_plan(plan: Plan, devices: list[tuple[DeviceInfo, DeviceHealth]]) -> Plan | None:
    """``plan`` split by layers over ``devices`` (GPUs, in their order), each taking a
    share of the layers' weights and KV cache in proportion to its free memory and an
    overhead of its own (helexa.engine.models.layer_split.layer_counts, in MiB); None
    when it does not fit or cannot be split."""
    from helexa.engine.models.layer_split import SplitError, layer_counts

    if plan.layers < len(devices) or len(devices) < 2:
        return None
    if any(info.kind != "cuda" for info, _ in devices):
        return None
    per_layer = math.ceil((plan.weights_mb + plan.kv_mb) / plan.layers)
    extra = overhead_mb(plan.weights_mb // len(devices))
    room = [health.vram_free_mb - extra for _, health in devices]
    try:
        counts = layer_counts(room, [per_layer] * plan.layers)
    except SplitError:
        return None
    device_mb = tuple(count * per_layer + extra for count in counts)
    return replace(
        plan,
        devices=[info.index for info, _ in devices],
        needed_mb=sum(device_mb),
        device_mb=device_mb,
    )


def choose_device(
    devices: list[tuple[DeviceInfo, DeviceHealth]],
    plan_for: dict[DeviceKind, Plan],
    requested: list[int] | None = None,
    min_devices: int = 1,
) -> Plan:
    """The allowed device with the most free memory that fits; else (or when the
    catalogue asks for ``min_devices`` > 1) a layer split over the fewest allowed GPUs,
    most free first, that holds it; else a structured refusal."""
    known = {info.index for info, _ in devices}
    unknown = sorted(set(requested or ()) - known)
    if unknown:
        raise PreflightError(
            f"device(s) {unknown} do not exist on this node (devices: {sorted(known)})",
            code="unknown_device",
            status=422,
        )
    allowed = [(i, h) for i, h in devices if requested is None or i.index in requested]
    ranked = sorted(allowed, key=lambda d: d[1].vram_free_mb, reverse=True)
    for info, health in ranked if min_devices <= 1 else ():
        if plan_for[info.kind].needed_mb <= health.vram_free_mb:
            return replace(plan_for[info.kind], devices=[info.index])
    gpus = [d for d in ranked if d[0].kind == "cuda"]
    for count in range(max(2, min_devices), len(gpus) + 1):
        chosen = sorted(gpus[:count], key=lambda d: d[0].index)
        split = split_plan(plan_for["cuda"], chosen) if "cuda" in plan_for else None
        if split is not None:
            return split
    if ranked:
        plan, free = plan_for[ranked[0][0].kind], ranked[0][1].vram_free_mb
    else:
        plan, free = min(plan_for.values(), key=lambda p: p.needed_mb), 0
    state = f", recurrent state {plan.state_mb}" if plan.state_mb else ""
    across = ""
    if len(gpus) > 1 and plan.layers:
        total = sum(h.vram_free_mb for _, h in gpus)
        across = f", {total} MiB across {len(gpus)} GPUs for a layer split"
    elif len(gpus) > 1:
        across = " (and this architecture cannot be split by layers)"
    if min_devices > len(gpus):
        across += f"; the catalogue asks for {min_devices} devices, {len(gpus)} are allowed"
    raise PreflightError(
        f"needs {plan.needed_mb} MiB (weights {plan.weights_mb}, KV cache {plan.kv_mb} at "
        f"{plan.context_length} tokens{state}) but the most free on an allowed device is "
        f"{free} MiB{across}",
        code="insufficient_vram",
        status=507,
        extra={"needed_mb": plan.needed_mb, "free_mb": free},
    )


# -- reading checkpoints ---------------------------------------------------------------------


def _architecture_error(exc: Exception) -> PreflightError:
    arch = getattr(exc, "architecture", None)
    return PreflightError(
        str(exc),
        code="unsupported_architecture",
        status=422,
        extra={"architecture": arch} if arch else None,
    )


def read_facts(path: Path) -> ModelFacts:
    """Architecture, config and weight size of a GGUF file or HF directory; refuses early."""
    from helexa.engine.checkpoint.errors import CheckpointError, UnsupportedArchitecture

    if not path.exists():
        raise PreflightError(f"{path}: no such file or directory", code="missing_files", status=404)
    try:
        if path.is_file():
            from helexa.engine.checkpoint.gguf import read_gguf_info, require_loadable

            info = read_gguf_info(path)
            require_loadable(info.architecture, str(path))
            facts = ModelFacts(
                info.architecture, info.config, info.tensor_bytes, True, header=info.header
            )
        else:
            from helexa.engine.checkpoint.safetensors import read_config, safetensors_files

            config = read_config(path)
            _check(config, str(path))
            files = safetensors_files(path)
            arch = ",".join(config.get("architectures") or []) or str(config.get("model_type"))
            weight_bytes = sum(f.stat().st_size for f in files)
            return ModelFacts(arch, config, weight_bytes, quantized=False)
        _check(facts.config, str(path))
        return facts
    except UnsupportedArchitecture as exc:
        raise _architecture_error(exc) from None
    except FileNotFoundError as exc:
        raise PreflightError(str(exc), code="missing_files", status=422) from None
    except CheckpointError as exc:
        raise PreflightError(str(exc), code="invalid_checkpoint", status=422) from None


def _check(config: dict[str, Any], source: str) -> None:
    from helexa.engine.models.architectures import model_class

    model_class(config, source)


def check(
    path: Path,
    *,
    devices: list[tuple[DeviceInfo, DeviceHealth]],
    context_length: int | None,
    requested_devices: list[int] | None = None,
    min_devices: int = 1,
) -> Plan:
    """Refuse ``path`` (files, architecture, fit) or say which device(s) it goes on and why."""
    facts = read_facts(Path(path))
    context = default_context(facts.config, context_length)
    kinds: set[DeviceKind] = {info.kind for info, _ in devices} or {"cuda"}
    plans = {kind: estimate(facts, context, kind) for kind in sorted(kinds)}
    return choose_device(devices, plans, requested_devices, min_devices)
