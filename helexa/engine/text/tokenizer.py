"""Text <-> token ids, from an HF tokenizer.json or from the tokenizer a GGUF file carries.

Both paths end in a Rust ``tokenizers.Tokenizer``: the HF one is read as is; the GGUF one is
rebuilt from ``tokenizer.ggml.*`` (vocabulary, merges, token types and the name of the
pre-tokenizer) the way llama.cpp interprets those fields. ``tokenizer_to_gguf_fields`` is
the inverse, written like llama.cpp's converter, so tests can round-trip one through the other.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import IntEnum
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _RustTokenizer

from helexa.engine.checkpoint.errors import CheckpointError

# Qwen2/Qwen3's split regex (tokenizer.json pre_tokenizer; llama.cpp pre "qwen2").
QWEN2_PRE_TOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3.5's (llama.cpp pre "qwen35"): Qwen2's, with combining marks (\p{M}) kept with the
# letters they modify instead of split off into punctuation runs.
QWEN35_PRE_TOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.json split regex <-> llama.cpp's tokenizer.ggml.pre name.
_PRE_NAMES = {QWEN2_PRE_TOKENIZER_REGEX: "qwen2", QWEN35_PRE_TOKENIZER_REGEX: "qwen35"}

# Tokens Qwen's generation_config lists as end of generation besides the tokenizer's EOS.
QWEN_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


class TokenType(IntEnum):
    """llama.cpp's tokenizer.ggml.token_type values."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class TokenizerError(CheckpointError):
    """The checkpoint's tokenizer is missing or of a kind this engine cannot rebuild."""


def _qwen_pre_tokenizer(regex: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


# tokenizer.ggml.pre -> (normalizer, pre-tokenizer) factories. Qwen's tokenizer.json has an
# NFC normalizer; adding another family means one entry here and one in _gguf_pre_name.
_GGUF_PRE: dict[str, Any] = {
    name: (normalizers.NFC, _qwen_pre_tokenizer(regex)) for regex, name in _PRE_NAMES.items()
}


class Tokenizer:
    """Encode/decode plus the special tokens generation needs.

    ``encode`` never adds BOS/EOS itself: chat templates put every special token in the
    prompt text, and added tokens written there (``<|im_start|>``, ``<think>``) are matched
    as single ids.
    """

    def __init__(
        self,
        tokenizer: _RustTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        self._tok = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # Highest id + 1, not the entry count: ids may have holes, and logits are indexed by id.
        self.vocab_size: int = max(vocab.values()) + 1 if vocab else 0
        ends = [eos_token, *QWEN_END_TOKENS]
        self.eos_token_ids: set[int] = {vocab[t] for t in ends if t is not None and t in vocab}

    @classmethod
    def from_checkpoint(cls, tok: Mapping[str, Any]) -> Tokenizer:
        """From ``Checkpoint.tokenizer``: {"tokenizer_json", "tokenizer_config"} of an HF
        directory, or the ``tokenizer.ggml.*`` fields of a GGUF file."""
        if "tokenizer_json" in tok:
            return cls.from_hf(tok["tokenizer_json"], tok.get("tokenizer_config"))
        if "tokenizer.ggml.tokens" in tok:
            return cls.from_gguf_fields(tok)
        raise TokenizerError(
            "the checkpoint has no tokenizer (no tokenizer.json, no tokenizer.ggml.tokens)"
        )

    @classmethod
    def from_hf(
        cls, tokenizer_json: str, tokenizer_config: Mapping[str, Any] | None = None
    ) -> Tokenizer:
        try:
            tok = _RustTokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises bare Exception on bad JSON
            raise TokenizerError(f"tokenizer.json cannot be read: {exc}") from exc
        config = tokenizer_config or {}
        return cls(
            tok,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
        )

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """Rebuild a byte-level BPE tokenizer from ``tokenizer.ggml.*`` fields."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(
                f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')"
            )
        pre = fields.get("tokenizer.ggml.pre")
        if pre not in _GGUF_PRE:
            raise TokenizerError(
                f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(_GGUF_PRE)}"
            )
        tokens: list[str] = list(fields["tokenizer.ggml.tokens"])
        types = list(fields.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise TokenizerError(
                f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types"
            )
        vocab: dict[str, int] = {}
        for i, token in enumerate(tokens):
            vocab.setdefault(token, i)
        merges = [_merge_pair(m) for m in fields.get("tokenizer.ggml.merges") or []]
        tok = _RustTokenizer(models.BPE(vocab=vocab, merges=merges))
        normalizer, pre_tokenizer = _GGUF_PRE[pre]
        tok.normalizer = normalizer()
        tok.pre_tokenizer = pre_tokenizer()
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [
                _added(t, special=True)
                for t, k in zip(tokens, types, strict=True)
                if k == TokenType.CONTROL
            ]
        )
        tok.add_tokens(
            [
                _added(t, special=False)
                for t, k in zip(tokens, types, strict=True)
                if k == TokenType.USER_DEFINED
            ]
        )

        def role(name: str) -> str | None:
            token_id = fields.get(f"tokenizer.ggml.{name}_token_id")
            return (
                tokens[token_id]
                if isinstance(token_id, int) and 0 <= token_id < len(tokens)
                else None
            )

        return cls(tok, bos_token=role("bos"), eos_token=role("eos"))

    # -- text -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (HF's, or the one rebuilt from GGUF fields):
        what the grammar engine indexes the vocabulary from."""
        return self._tok.to_str()


class StreamDecoder:
    """Incremental detokenization that only ever emits whole characters.

    One token may hold part of a UTF-8 character (byte-level BPE splits an emoji into up to
    four tokens) and some decoders change how a token reads depending on its neighbours, so
    text is produced by decoding a short window of recent ids and emitting what the newest
    id added, holding back while the window ends in a partial character (U+FFFD). This is
    the scheme TGI and vLLM use.
    """

    # Ids before the new ones kept as decoding context (enough for any decoder's lookbehind).
    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: context ids already emitted
        self._read = 0  # ids before this are emitted

    def add(self, token_id: int) -> str:
        """The text ``token_id`` completes; "" while a character is still partial."""
        self._ids.append(token_id)
        before, window = self._decode_window()
        if len(window) <= len(before) or window.endswith("\ufffd"):
            return ""
        self._advance()
        return window[len(before) :]

    def flush(self) -> str:
        """Whatever is held back (a truncated character decodes as U+FFFD)."""
        before, window = self._decode_window()
        self._advance()
        return window[len(before) :]

    def _decode_window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        return decode(self._ids[self._prefix : self._read]), decode(self._ids[self._prefix :])

    def _advance(self) -> None:
        self._prefix = max(len(self._ids) - self.CONTEXT, 0)
        self._read = len(self._ids)


# -- HF tokenizer.json -> GGUF fields ---------------------------------------------------------


def tokenizer_to_gguf_fields(
    tokenizer_json: str,
    tokenizer_config: Mapping[str, Any] | None = None,
    *,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` fields llama.cpp's converter writes for a byte-level BPE
    tokenizer.json: every id gets a token (holes and ids up to ``vocab_size``, the model's
    embedding rows, become ``[PAD{i}]`` UNUSED tokens), added tokens are CONTROL when
    special or looking like ``<|...|>`` and USER_DEFINED otherwise, merges as "a b".

    Special token ids come from tokenizer_config.json; without one, EOS and padding are
    ``<|endoftext|>`` when the vocabulary has it.
    """
    data = json.loads(tokenizer_json)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError("only byte-level BPE tokenizers can be converted to GGUF ('gpt2')")
    pre = _gguf_pre_name(data.get("pre_tokenizer"))

    ids: dict[str, int] = dict(model.get("vocab") or {})
    added: dict[int, Mapping[str, Any]] = {}
    for entry in data.get("added_tokens") or []:
        ids[entry["content"]] = entry["id"]
        added[entry["id"]] = entry
    by_id = {i: t for t, i in ids.items()}
    count = max([*by_id, -1]) + 1
    if vocab_size is not None:
        if vocab_size < count:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {count} ids")
        count = vocab_size

    tokens: list[str] = []
    types: list[int] = []
    for i in range(count):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            special = added[i].get("special") or _looks_special(token)
            tokens.append(token)
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)

    fields: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [int(t) for t in types],
        "tokenizer.ggml.merges": [_merge_text(m) for m in model.get("merges") or []],
    }
    config = tokenizer_config
    if config is None:
        config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    for role, key in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token")):
        content = _token_content(config.get(key))
        if content is not None and content in ids:
            fields[f"tokenizer.ggml.{role}_token_id"] = ids[content]
    fields["tokenizer.ggml.add_bos_token"] = bool(config.get("add_bos_token", False))
    return fields


def _gguf_pre_name(pre_tokenizer: Mapping[str, Any] | None) -> str:
    """llama.cpp's name for the pre-tokenizer (it hashes a probe's tokenization; here the
    structure is compared directly, which is exact for the families we support)."""
    parts = (pre_tokenizer or {}).get("pretokenizers") or []
    if (
        len(parts) == 2
        and parts[0].get("type") == "Split"
        and (parts[0].get("pattern") or {}).get("Regex") in _PRE_NAMES
        and parts[0].get("behavior") == "Isolated"
        and parts[1].get("type") == "ByteLevel"
        and parts[1].get("use_regex") is False
    ):
        return _PRE_NAMES[parts[0]["pattern"]["Regex"]]
    raise ValueError(f"unsupported pre-tokenizer for GGUF conversion: {json.dumps(pre_tokenizer)}")


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def _merge_text(merge: str | Sequence[str]) -> str:
    return merge if isinstance(merge, str) else " ".join(merge)


def _merge_pair(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep:
        raise TokenizerError(f"GGUF tokenizer merge {merge!r} is not 'left right'")
    return left, right


def _added(content: str, *, special: bool) -> AddedToken:
    return AddedToken(content, special=special, normalized=False)


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None
