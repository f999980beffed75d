"""The smoke-test model helexa serves when nothing else is configured.

``assets/helexa-demo.gguf`` (built by ``assets/make_demo_model.py``) is a ~1M parameter
Qwen3 that only knows a few dozen chats; it lets a fresh install answer its first request
with no network and no GPU. It lives in the repository, not the package, so it is found
from a checkout or an editable install and is absent from a plain wheel install.
"""

from __future__ import annotations

from pathlib import Path

from helexa.config import ModelProfile, Settings

DEMO_MODEL_ID = "helexa-demo"
_DEMO_GGUF = Path(__file__).resolve().parents[1] / "assets" / f"{DEMO_MODEL_ID}.gguf"


def demo_model_path() -> Path | None:
    """The demo GGUF when this is a repository checkout that has it, else None."""
    return _DEMO_GGUF if _DEMO_GGUF.is_file() else None


def with_demo(settings: Settings) -> Settings:
    """``settings`` with the demo as its catalogue when no catalogue was given at all (no
    models.toml read, no ``[[models]]`` in helexa.toml); an empty models.toml stays empty."""
    path = demo_model_path()
    if settings.models or settings.models_file is not None or path is None:
        return settings
    demo = ModelProfile(id=DEMO_MODEL_ID, path=str(path))
    return settings.model_copy(update={"models": [demo]})
