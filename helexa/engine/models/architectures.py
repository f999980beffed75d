"""Which model implementation runs a checkpoint: the one table of architectures the
engine supports, read from the checkpoint's (HF-style) config.

Loading and preflight both ask here, so an architecture is refused, or its options
checked, by the same rule before any weight is read.
"""

from __future__ import annotations

from typing import Any

from helexa.engine.checkpoint.errors import UnsupportedArchitecture
from helexa.engine.models.qwen3 import Qwen3
from helexa.engine.models.qwen3_moe import Qwen3Moe
from helexa.engine.models.qwen3_next import Qwen3_5, Qwen3_5Moe, Qwen3Next

Model = type[Qwen3] | type[Qwen3Next]
MODELS: tuple[Model, ...] = (Qwen3, Qwen3Moe, Qwen3Next, Qwen3_5, Qwen3_5Moe)
SUPPORTED: tuple[str, ...] = tuple(m.config_class.ARCHITECTURE for m in MODELS)


def model_class(config: dict[str, Any], source: str = "") -> Model:
    """The model class for ``config``, after checking the options it uses; raises
    :class:`UnsupportedArchitecture` for anything the engine cannot run."""
    for model in MODELS:
        if model.config_class.describes(config):
            model.config_class.check(config, source)
            return model
    archs = config.get("architectures") or []
    found = ", ".join(archs) or f"model_type {config.get('model_type')!r}"
    raise UnsupportedArchitecture(found, source=source, supported=SUPPORTED)
