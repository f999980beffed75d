"""Fixtures shared by the engine tests."""

from __future__ import annotations

import pytest

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
