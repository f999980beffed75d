"""A tiny Qwen-style byte-level BPE tokenizer, trained in milliseconds, for engine tests.

It is built the way Qwen2/Qwen3's tokenizer.json is (NFC normalizer, Qwen2 split regex,
ByteLevel without its own regex, ByteLevel decoder, Qwen's added tokens), only with a few
hundred merges, so code that handles the real tokenizer handles this one. It is trained
by the demo model's recipe (assets/make_demo_model.py), on text of its own. The training
text deliberately leaves out CJK and most emoji: those stay split across several byte
tokens, which is what the stream-decoding tests need.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from assets.make_demo_model import TOKENIZER_CONFIG, train_tokenizer
from helexa.engine.text.chat_template import QWEN3_TEMPLATE

TINY_VOCAB_SIZE = 512

_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. The weather in Paris is sunny today.
Hello world, hello there! What is the capital of France? The answer is Paris.
You are a helpful assistant. Think step by step, then give the answer.
Let me think about this: one, two, three, four, five, six, seven, eight, nine, ten.
def add(a, b):
    return a + b

for i in range(10):
    print(i * 2)

{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
Numbers 0 1 2 3 4 5 6 7 8 9 and 3.14159, 2024-01-01, 100%.
Café, naïve, résumé, über, straße. It's, I'm, we'll, they've, you'd, don't.
"""


@cache
def make_tiny_tokenizer_json() -> str:
    """The tokenizer.json string (cached: training is deterministic, tests share it)."""
    return train_tokenizer(_TRAINING_TEXT.splitlines(keepends=True) * 4, TINY_VOCAB_SIZE)


def make_tiny_tokenizer_config() -> dict[str, Any]:
    """tokenizer_config.json as Qwen3's instruct models ship it (no BOS, EOS <|im_end|>)."""
    return {**TOKENIZER_CONFIG, "chat_template": QWEN3_TEMPLATE}
