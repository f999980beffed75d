"""HF model directories (config.json + *.safetensors + tokenizer files) -> Checkpoint.

Only safetensors are read, never pickles: a downloaded model must not be able to run code.
``load_checkpoint`` is the one entry point the engine uses, whatever the format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from helexa.engine.checkpoint.errors import CheckpointError
from helexa.engine.checkpoint.types import ByteProgress, Checkpoint, Progress, Weight

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", progress: Progress | None = None
) -> Checkpoint:
    """A ``.gguf`` file or an HF directory, tensors placed on ``device``."""
    if is_gguf(path):
        from helexa.engine.checkpoint.gguf import load_gguf

        return load_gguf(path, device=device, progress=progress)
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
    return _read_json(root / CONFIG)


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
    files = safetensors_files(root)
    tensors: dict[str, Weight] = {}
    placed = ByteProgress(sum(f.stat().st_size for f in files), progress)
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensors[name] = f.get_tensor(name)
                    placed.add(tensors[name].nbytes)
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None

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
