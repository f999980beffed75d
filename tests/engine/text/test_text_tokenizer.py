"""Tokenizer: the HF path against transformers, the GGUF path against the HF one, and
stream decoding that never splits a character."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from transformers import PreTrainedTokenizerFast

from assets.make_demo_model import QWEN_ADDED_TOKENS
from helexa.engine.checkpoint.errors import CheckpointError
from helexa.engine.checkpoint.gguf import load_gguf
from helexa.engine.text.tokenizer import (
    Tokenizer,
    TokenizerError,
    TokenType,
    tokenizer_to_gguf_fields,
)
from tests.engine.factories import make_tiny_hf_model
from tests.engine.gguf_factories import write_model_gguf
from tests.engine.tiny_tokenizer import make_tiny_tokenizer_config, make_tiny_tokenizer_json

TEXTS = [
    "Hello world",
    "The weather in Paris is sunny today.",
    "  leading and trailing spaces  ",
    "line one\nline two\r\n\n\nthree\ttabs\t\there",
    "Unicode: café naïve résumé ÜBER straße, Ελληνικά, русский, العربية",
    "Decomposed e\u0301 and precomposed é",  # NFC makes these the same
    "CJK: 你好，世界。日本語のテキスト。한국어",
    "Emoji: 🌍🚀 family 👨‍👩‍👧 flags 🇫🇷 skin 👍🏽",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))\n",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    "Numbers 1234567890 3.14159 -42 1e10, it's I'M we'LL",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\nok<|im_end|>",
    "<tool_call>\n{}\n</tool_call><tool_response>x</tool_response><|endoftext|>",
    "almost special: <|im_start and <think > and </tool_call",
    "",
]


@pytest.fixture(scope="module")
def hf_tokenizer() -> Tokenizer:
    return Tokenizer.from_checkpoint(
        {
            "tokenizer_json": make_tiny_tokenizer_json(),
            "tokenizer_config": make_tiny_tokenizer_config(),
        }
    )


@pytest.fixture(scope="module")
def gguf_fields() -> dict:
    return tokenizer_to_gguf_fields(make_tiny_tokenizer_json(), make_tiny_tokenizer_config())


def test_tiny_tokenizer_is_qwen_shaped(hf_tokenizer: Tokenizer) -> None:
    assert 400 <= hf_tokenizer.vocab_size <= 600
    for content, _ in QWEN_ADDED_TOKENS:
        ids = hf_tokenizer.encode(content)
        assert len(ids) == 1, content
        assert hf_tokenizer.decode(ids) == content
    data = json.loads(make_tiny_tokenizer_json())
    special = {t["content"] for t in data["added_tokens"] if t["special"]}
    assert special == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}


@pytest.mark.parametrize("text", TEXTS)
def test_hf_path_encodes_like_transformers(hf_tokenizer: Tokenizer, text: str) -> None:
    reference = PreTrainedTokenizerFast(
        tokenizer_object=RustTokenizer.from_str(make_tiny_tokenizer_json())
    )
    ids = hf_tokenizer.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert hf_tokenizer.decode(ids) == reference.decode(ids)


def test_hf_special_tokens(hf_tokenizer: Tokenizer) -> None:
    im_end = hf_tokenizer.token_to_id("<|im_end|>")
    endoftext = hf_tokenizer.token_to_id("<|endoftext|>")
    assert hf_tokenizer.eos_token == "<|im_end|>"
    assert hf_tokenizer.bos_token is None
    assert hf_tokenizer.eos_token_ids == {im_end, endoftext}
    # tokenizer_config.json may write tokens as AddedToken dicts.
    tok = Tokenizer.from_checkpoint(
        {
            "tokenizer_json": make_tiny_tokenizer_json(),
            "tokenizer_config": {
                "eos_token": {"content": "<|endoftext|>"},
                "bos_token": "<|im_start|>",
            },
        }
    )
    assert (tok.eos_token, tok.bos_token) == ("<|endoftext|>", "<|im_start|>")


def test_gguf_fields_are_llama_cpp_shaped(gguf_fields: dict) -> None:
    data = json.loads(make_tiny_tokenizer_json())
    vocab = data["model"]["vocab"]
    tokens = gguf_fields["tokenizer.ggml.tokens"]
    types = gguf_fields["tokenizer.ggml.token_type"]
    assert gguf_fields["tokenizer.ggml.model"] == "gpt2"
    assert gguf_fields["tokenizer.ggml.pre"] == "qwen2"
    assert len(tokens) == len(types) == len(vocab) + len(QWEN_ADDED_TOKENS)
    assert all(tokens[i] == t for t, i in vocab.items())
    by_content = {tokens[i]: types[i] for i in range(len(tokens))}
    assert by_content["<|im_end|>"] == TokenType.CONTROL
    assert by_content["<think>"] == TokenType.USER_DEFINED
    assert by_content["Ġt"] == TokenType.NORMAL
    first = data["model"]["merges"][0]
    assert gguf_fields["tokenizer.ggml.merges"][0] == " ".join(first)
    assert tokens[gguf_fields["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert tokens[gguf_fields["tokenizer.ggml.padding_token_id"]] == "<|endoftext|>"
    assert "tokenizer.ggml.bos_token_id" not in gguf_fields
    assert gguf_fields["tokenizer.ggml.add_bos_token"] is False


def _assert_same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    for text in TEXTS:
        ids = a.encode(text)
        assert b.encode(text) == ids, text
        assert b.decode(ids) == a.decode(ids), text
    assert b.eos_token_ids == a.eos_token_ids
    assert b.eos_token == a.eos_token


def test_gguf_fields_rebuild_an_identical_tokenizer(
    hf_tokenizer: Tokenizer, gguf_fields: dict
) -> None:
    rebuilt = Tokenizer.from_checkpoint(gguf_fields)
    _assert_same_tokenizer(hf_tokenizer, rebuilt)
    assert rebuilt.vocab_size == hf_tokenizer.vocab_size


def test_tokenizer_survives_a_gguf_file(hf_tokenizer: Tokenizer, tmp_path: Path) -> None:
    """Through gguf_write and load_gguf: field types (uint32 ids, int32 types, string
    arrays) must come back as the rebuild expects them."""
    model = make_tiny_hf_model(hf_tokenizer.vocab_size)
    path = write_model_gguf(
        tmp_path / "tiny.gguf",
        model,
        tokenizer_fields=tokenizer_to_gguf_fields(
            make_tiny_tokenizer_json(), make_tiny_tokenizer_config()
        ),
    )
    rebuilt = Tokenizer.from_checkpoint(load_gguf(path).tokenizer)
    _assert_same_tokenizer(hf_tokenizer, rebuilt)


def test_gguf_vocab_padded_to_the_model(hf_tokenizer: Tokenizer) -> None:
    size = hf_tokenizer.vocab_size + 6
    fields = tokenizer_to_gguf_fields(make_tiny_tokenizer_json(), vocab_size=size)
    assert fields["tokenizer.ggml.tokens"][-1] == f"[PAD{size - 1}]"
    assert fields["tokenizer.ggml.token_type"][-1] == TokenType.UNUSED
    rebuilt = Tokenizer.from_checkpoint(fields)
    assert rebuilt.vocab_size == size
    for text in TEXTS:
        assert rebuilt.encode(text) == hf_tokenizer.encode(text)
    # Without a tokenizer_config, <|endoftext|> is the EOS, as in Qwen's base models.
    assert rebuilt.eos_token == "<|endoftext|>"
    with pytest.raises(ValueError, match="smaller"):
        tokenizer_to_gguf_fields(make_tiny_tokenizer_json(), vocab_size=10)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer.ggml.model": "llama"}, "model 'llama' is not supported"),
        ({"tokenizer.ggml.pre": "falcon"}, "pre-tokenizer 'falcon' is not supported"),
        ({"tokenizer.ggml.merges": ["nospace"]}, "not 'left right'"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "token types"),
    ],
)
def test_unusable_gguf_tokenizer_is_a_clear_error(
    gguf_fields: dict, change: dict, message: str
) -> None:
    with pytest.raises(TokenizerError, match=message) as err:
        Tokenizer.from_checkpoint({**gguf_fields, **change})
    assert isinstance(err.value, CheckpointError)  # preflight reports it as a bad checkpoint


def test_missing_or_unreadable_tokenizer() -> None:
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.from_checkpoint({})
    with pytest.raises(TokenizerError, match="cannot be read"):
        Tokenizer.from_checkpoint({"tokenizer_json": "{not json"})


def test_only_qwen2_byte_level_bpe_converts_to_gguf() -> None:
    data = json.loads(make_tiny_tokenizer_json())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+"
    with pytest.raises(ValueError, match="unsupported pre-tokenizer"):
        tokenizer_to_gguf_fields(json.dumps(data))
    data = json.loads(make_tiny_tokenizer_json())
    data["decoder"] = {
        "type": "Metaspace",
        "replacement": "▁",
        "prepend_scheme": "always",
        "split": True,
    }
    with pytest.raises(ValueError, match="byte-level BPE"):
        tokenizer_to_gguf_fields(json.dumps(data))


# -- stream decoding ------------------------------------------------------------------------------

STREAM_TEXTS = [
    "Emoji 🌍🚀 and 👨‍👩‍👧 done",
    "中文字符：你好世界",
    "mixed é 你 🌍 <think>x</think> end",
    "🇫🇷🇩🇪",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decoder_emits_whole_characters(hf_tokenizer: Tokenizer, text: str) -> None:
    ids = hf_tokenizer.encode(text)
    # The test means something only if some token holds part of a character.
    assert any("\ufffd" in hf_tokenizer.decode([i]) for i in ids)
    decoder = hf_tokenizer.stream_decoder()
    pieces = [decoder.add(i) for i in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + decoder.flush() == text
    assert "" in pieces  # something was held back


def test_stream_decoder_flushes_a_truncated_character(hf_tokenizer: Tokenizer) -> None:
    ids = hf_tokenizer.encode("ok 🌍")
    decoder = hf_tokenizer.stream_decoder()
    emitted = "".join(decoder.add(i) for i in ids[:-1])
    assert emitted == "ok "
    assert decoder.flush().startswith("\ufffd")
    assert decoder.flush() == ""


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_the_grammar_engine_reads_the_tokens_as_they_spell_the_text(
    hf_tokenizer: Tokenizer, gguf_fields: dict, source: str
) -> None:
    """llguidance indexes the vocabulary from ``to_json``: each id must stand for the bytes
    it decodes to, a GGUF-rebuilt tokenizer's as an HF one's, or masks would be wrong."""
    from helexa.engine.grammar import grammar_tokenizer

    tok = hf_tokenizer if source == "hf" else Tokenizer.from_checkpoint(gguf_fields)
    seen = grammar_tokenizer(tok.to_json(), tok.vocab_size, tok.eos_token_ids)
    assert seen.vocab_size == tok.vocab_size
    for text in (t for t in TEXTS if "<" not in t):
        ids = tok.encode(text)
        assert seen.decode_bytes(ids) == unicodedata.normalize("NFC", text).encode()
    for special in ("<|im_end|>", "<|im_start|>", "<think>", "<tool_call>"):
        (token_id,) = tok.encode(special)
        assert seen.is_special_token(token_id)  # never part of text a grammar spells out


def test_a_qwen3_5_tokenizer_round_trips_through_gguf_as_qwen35() -> None:
    """Qwen3.5's split keeps combining marks with their letters: its tokenizer.json is
    written as llama.cpp's "qwen35" pre-tokenizer and rebuilt from it to the same ids as
    the tokenizers library gives from the JSON (text with marks Qwen2's split would cut)."""
    from helexa.engine.text.tokenizer import (
        QWEN2_PRE_TOKENIZER_REGEX,
        QWEN35_PRE_TOKENIZER_REGEX,
    )

    data = json.loads(make_tiny_tokenizer_json())
    split = data["pre_tokenizer"]["pretokenizers"][0]["pattern"]
    assert split["Regex"] == QWEN2_PRE_TOKENIZER_REGEX
    split["Regex"] = QWEN35_PRE_TOKENIZER_REGEX
    qwen35_json = json.dumps(data)
    fields = tokenizer_to_gguf_fields(qwen35_json, make_tiny_tokenizer_config())
    assert fields["tokenizer.ggml.pre"] == "qwen35"
    rebuilt = Tokenizer.from_checkpoint(fields)
    reference = RustTokenizer.from_str(qwen35_json)
    marked = ["na\u0308ive", "नमस्ते दुनिया", "e\u0301\u0302 x\u0327", *TEXTS]
    for text in marked:
        assert rebuilt.encode(text) == reference.encode(text, add_special_tokens=False).ids, text
    qwen2 = RustTokenizer.from_str(make_tiny_tokenizer_json())
    assert any(
        qwen2.pre_tokenizer.pre_tokenize_str(t) != reference.pre_tokenizer.pre_tokenize_str(t)
        for t in marked
    )
