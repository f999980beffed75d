"""The smoke-test model helexa serves when nothing else is configured.

``assets/helexa-demo.gguf`` (built by ``assets/make_demo_model.py``) is a ~1M parameter
Qwen3 that only knows a few dozen chats; it lets a fresh install answer its first request
with no network and no GPU. It lives in the repository, not the package, so it is found
from a checkout or an editable install and is absent from a plain wheel install.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_ID = "helexa-demo"
_DEMO_GGUF = Path(__file__).resolve().parents[2] / "assets" / f"{DEMO_MODEL_ID}.gguf"


def demo_model_path() -> Path | None:
    """The demo GGUF when this is a repository checkout that has it, else None."""
    return _DEMO_GGUF if _DEMO_GGUF.is_file() else None
