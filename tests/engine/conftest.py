"""Fixtures shared by the engine tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from helexa.engine.generate import LoadedModel
from helexa.engine.text.tokenizer import Tokenizer
from tests.engine.tiny_tokenizer import make_tiny_tokenizer_config, make_tiny_tokenizer_json


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """The tiny Qwen-shaped tokenizer, as the engine builds it from tokenizer.json."""
    return Tokenizer.from_checkpoint(
        {
            "tokenizer_json": make_tiny_tokenizer_json(),
            "tokenizer_config": make_tiny_tokenizer_config(),
        }
    )


@pytest.fixture
def stream_chat_cancels(monkeypatch: pytest.MonkeyPatch) -> list[threading.Event]:
    """The cancel events ``LoadedModel.stream_chat`` is called with during the test, in
    order: how a test sees that closing a stream reached the generation loop."""
    cancels: list[threading.Event] = []
    real_stream_chat = LoadedModel.stream_chat

    def spy(
        self: LoadedModel, request: dict[str, Any], cancel: threading.Event
    ) -> Iterator[dict[str, Any]]:
        cancels.append(cancel)
        return real_stream_chat(self, request, cancel)

    monkeypatch.setattr(LoadedModel, "stream_chat", spy)
    return cancels
