"""HF model directories (config.json + *.safetensors + tokenizer files) -> Checkpoint.

Only safetensors are read, never pickles: a downloaded model must not be able to run code.
``load_checkpoint`` is the one entry point the engine uses, whatever the format.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from helexa.engine.checkpoint.errors import CheckpointError
from helexa.engine.checkpoint.types import ByteProgress, Checkpoint, Progress, Weight

if TYPE_CHECKING:
    from helexa.engine.checkpoint.gguf_header import GGUFHeader

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
# One 2-D tensor per expert: what HF repos and transformers' save_pretrained hold.
_PER_EXPERT = re.compile(
    r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
)
# transformers 5's in-memory layout (a state_dict): gate and up fused, no ".weight".
_FUSED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")
# Multimodal checkpoints whose text model the engine runs on its own: the architecture
# their ``text_config`` describes (images are refused at the API until vision lands).
TEXT_MODELS = {
    "Qwen3_5ForConditionalGeneration": "Qwen3_5ForCausalLM",
    "Qwen3_5MoeForConditionalGeneration": "Qwen3_5MoeForCausalLM",
}
# Where such a checkpoint keeps the text model's tensors, and what is not the text model.
_TEXT_PREFIX = "model.language_model."
_NOT_TEXT = ("model.visual.", "mtp.")


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    header: GGUFHeader | None = None,
) -> Checkpoint:
    """A ``.gguf`` file or an HF directory, tensors placed on ``device``; ``header``: a
    GGUF's, as preflight parsed it (see read_gguf_header)."""
    if is_gguf(path):
        from helexa.engine.checkpoint.gguf import load_gguf

        return load_gguf(path, device=device, progress=progress, header=header)
    return load_safetensors_dir(path, device=device, progress=progress)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a model directory, for architecture checks before any tensor is read."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a model directory (and not a .gguf file)")
    if not (root / CONFIG).is_file():
        raise FileNotFoundError(f"{root}: no {CONFIG}")
    return text_model_config(_read_json(root / CONFIG))


def text_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` itself, or for a multimodal checkpoint of :data:`TEXT_MODELS` its
    ``text_config`` as the text model's own config.json would say it (the top level's
    dtype and tying carried over)."""
    archs = config.get("architectures") or []
    text = next((TEXT_MODELS[a] for a in archs if a in TEXT_MODELS), None)
    if text is None or not isinstance(config.get("text_config"), dict):
        return config
    inherited = {
        k: config[k] for k in ("torch_dtype", "dtype", "tie_word_embeddings") if k in config
    }
    own = {k: v for k, v in config["text_config"].items() if v is not None}
    return {**inherited, **own, "architectures": [text]}


def _text_name(name: str, multimodal: bool) -> str | None:
    """A multimodal checkpoint's tensor under the text model's name, None if it is not
    part of the text model."""
    if not multimodal:
        return name
    if name.startswith(_NOT_TEXT):
        return None
    return "model." + name.removeprefix(_TEXT_PREFIX) if name.startswith(_TEXT_PREFIX) else name


def safetensors_files(root: Path) -> list[Path]:
    """The weight files, from the shard index when there is one."""
    if (root / INDEX).is_file():
        weight_map = _read_json(root / INDEX).get("weight_map") or {}
        files = [root / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{root}: missing shards {', '.join(missing)}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{root}: no *.safetensors files")
    return files


def stack_experts(tensors: dict[str, Weight]) -> dict[str, Weight]:
    """``tensors`` with each MoE layer's experts as one (n_experts, out, in) tensor per
    projection, ``model.layers.N.mlp.experts.{gate,up,down}_proj.weight`` (the names
    llama.cpp's converter merges them under and the GGUF loader produces), whether they
    came one 2-D tensor per expert or as transformers 5's fused ``experts.gate_up_proj``
    (n_experts, 2 * ffn, hidden; gate first) and ``experts.down_proj``.

    Works in place: the per-expert tensors are popped as their stack is built, so a load
    holds at most one projection's experts twice. Returns ``tensors``.
    """
    groups: dict[tuple[str, str], dict[int, str]] = {}
    for name in list(tensors):
        if m := _PER_EXPERT.fullmatch(name):
            prefix, index, proj = m.groups()
            groups.setdefault((prefix, proj), {})[int(index)] = name
        elif m := _FUSED.fullmatch(name):
            prefix, kind = m.groups()
            fused = tensors.pop(name)
            if kind == "gate_up_proj":
                gate, up = fused.chunk(2, dim=1)
                tensors[f"{prefix}.gate_proj.weight"] = gate.contiguous()
                tensors[f"{prefix}.up_proj.weight"] = up.contiguous()
            else:
                tensors[f"{prefix}.down_proj.weight"] = fused
    for (prefix, proj), names in groups.items():
        if sorted(names) != list(range(len(names))):
            raise CheckpointError(f"{prefix}: {proj} experts {sorted(names)} are not 0..n-1")
        tensors[f"{prefix}.{proj}.weight"] = torch.stack(
            [tensors.pop(names[i]) for i in range(len(names))]
        )
    return tensors


def _chat_template(root: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """transformers 5 writes ``chat_template.jinja``; older repos keep it in
    tokenizer_config.json, sometimes as a list of named templates."""
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if template is None and (root / "chat_template.json").is_file():
        template = _read_json(root / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def load_safetensors_dir(
    path: str | Path, device: str | torch.device = "cpu", progress: Progress | None = None
) -> Checkpoint:
    root = Path(path)
    config = read_config(root)
    multimodal = any(a in TEXT_MODELS for a in _read_json(root / CONFIG).get("architectures") or [])
    files = safetensors_files(root)
    tensors: dict[str, Weight] = {}
    placed = ByteProgress(sum(f.stat().st_size for f in files), progress)
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    text_name = _text_name(name, multimodal)
                    if text_name is None:
                        continue  # a vision tower or MTP head the engine does not run
                    tensors[text_name] = f.get_tensor(name)
                    placed.add(tensors[text_name].nbytes)
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
    stack_experts(tensors)

    tokenizer: dict[str, Any] = {}
    if (root / "tokenizer.json").is_file():
        tokenizer["tokenizer_json"] = (root / "tokenizer.json").read_text(encoding="utf-8")
    tokenizer_config: dict[str, Any] = {}
    if (root / "tokenizer_config.json").is_file():
        tokenizer_config = _read_json(root / "tokenizer_config.json")
        tokenizer["tokenizer_config"] = tokenizer_config
    generation_config: dict[str, Any] = {}
    if (root / "generation_config.json").is_file():
        generation_config = _read_json(root / "generation_config.json")

    return Checkpoint(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        chat_template=_chat_template(root, tokenizer_config),
        generation_config=generation_config,
        source=str(root),
        file_bytes=sum(f.stat().st_size for f in files),
    )
