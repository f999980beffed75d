"""A tiny Qwen-style byte-level BPE tokenizer, trained in milliseconds, for engine tests.

It is built the way Qwen2/Qwen3's tokenizer.json is (NFC normalizer, Qwen2 split regex,
ByteLevel without its own regex, ByteLevel decoder, Qwen's added tokens), only with a few
hundred merges, so code that handles the real tokenizer handles this one. The training
text deliberately leaves out CJK and most emoji: those stay split across several byte
tokens, which is what the stream-decoding tests need.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from helexa.engine.text.chat_template import QWEN3_TEMPLATE
from helexa.engine.text.tokenizer import QWEN2_PRE_TOKENIZER_REGEX

# (content, special): special ones are control tokens; the others are plain added tokens
# that still encode as one id, as in Qwen3's tokenizer.json.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
)

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
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRE_TOKENIZER_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE - len(QWEN_ADDED_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT.splitlines(keepends=True) * 4, trainer=trainer)
    # Added after training, so they take the ids after the BPE vocab, as in Qwen's file.
    tok.add_tokens(
        [
            AddedToken(content, special=special, normalized=False)
            for content, special in QWEN_ADDED_TOKENS
        ]
    )
    return tok.to_str()


def make_tiny_tokenizer_config() -> dict[str, Any]:
    """tokenizer_config.json as Qwen3's instruct models ship it (no BOS, EOS <|im_end|>)."""
    return {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": QWEN3_TEMPLATE,
    }
