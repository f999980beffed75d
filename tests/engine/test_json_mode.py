"""JSON mode's prefix automaton against Python's json parser, and token choice under it.

Random documents (nesting, escapes, non-ASCII, every number form) must be accepted at every
prefix and complete exactly at their end; random one-byte edits of them must be accepted as
whole documents exactly when ``json.loads`` accepts them."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch

from helexa.engine.json_mode import MAX_WHITESPACE_RUN, JsonConstraint, JsonPrefix

SEEDS = range(300)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "int", "float", "bool", "null"] + (["list", "dict"] * 2 if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        alphabet = 'ab "\\/\b\f\n\r\t\x01é€😀\u2028'
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
    if kind == "int":
        return rng.choice([0, -0, 7, -13, 10**20, -(10**15)])
    if kind == "float":
        return rng.choice([0.5, -2.25, 1e-7, 6.02e23, -1.5e300, 3.0])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        f"k{i}{rng.choice('xé')}": random_value(rng, depth + 1) for i in range(rng.randrange(4))
    }


def random_document(seed: int, *, top_object: bool = True) -> bytes:
    rng = random.Random(seed)
    value = {"root": random_value(rng)} if top_object else random_value(rng)
    text = json.dumps(
        value,
        ensure_ascii=rng.random() < 0.3,
        indent=rng.choice([None, 1, 2]),
        separators=rng.choice([None, (",", ":"), (" , ", " : ")]),
    )
    return text.encode()


def strict_loads(data: bytes) -> bool:
    def refuse(name: str) -> None:
        raise ValueError(name)  # Python accepts NaN / Infinity; JSON does not

    try:
        json.loads(data, parse_constant=refuse)
    except (ValueError, RecursionError):
        return False
    return True


def whole(data: bytes, *, object_only: bool) -> bool:
    prefix = JsonPrefix(object_only=object_only)
    return prefix.feed_bytes(data) and prefix.complete


@pytest.mark.parametrize("top_object", [True, False])
def test_every_prefix_of_a_valid_document_is_accepted(top_object: bool) -> None:
    for seed in SEEDS:
        doc = random_document(seed, top_object=top_object)
        prefix = JsonPrefix(object_only=top_object)
        for i, byte in enumerate(doc):
            assert prefix.feed(byte), (doc, i)
            # An object or array is complete only at its last byte; a bare number may be
            # complete early (12 is a prefix of 123), a string or literal at its end.
            if i < len(doc) - 1 and doc[:1] in (b"{", b"["):
                assert not prefix.complete, (doc, i)
        assert prefix.complete, doc


def test_one_byte_edits_agree_with_json_loads() -> None:
    rng = random.Random(7)
    alphabet = b'{}[]:,"\\ -+.0123456789eEtrufalsn\n\xc3\xa9\xff\x80\xed\xa0'
    checked = 0
    for seed in SEEDS:
        doc = bytearray(random_document(seed, top_object=False))
        for _ in range(10):
            edited = bytearray(doc)
            at = rng.randrange(len(edited) + 1)
            op = rng.choice(["insert", "delete", "replace"])
            if op == "insert":
                edited.insert(at, rng.choice(alphabet))
            elif at < len(edited):
                if op == "delete":
                    del edited[at]
                else:
                    edited[at] = rng.choice(alphabet)
            data = bytes(edited)
            if max((len(r) for r in data.split(b'"')[::2]), default=0) > 4 * MAX_WHITESPACE_RUN:
                continue
            assert whole(data, object_only=False) == strict_loads(data), data
            checked += 1
    assert checked > 2000


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (b"{}", True),
        (b' { "a" : [1, -0.5e+3, true, null, "x\\u00e9"] } ', True),
        (b"[1]", False),  # not an object
        (b'{"a":01}', False),
        (b'{"a":1,}', False),
        (b'{"a" 1}', False),
        (b'{"a":"\x01"}', False),
        (b'{"a":"\\x"}', False),
        (b'{"a":tru}', False),
        (b'{"a":1}}', False),
        (b'{"a":"\xed\xa0\x80"}', False),  # a UTF-16 surrogate in UTF-8
    ],
)
def test_object_mode_cases(text: bytes, ok: bool) -> None:
    assert whole(text, object_only=True) is ok


def test_blank_runs_are_capped() -> None:
    prefix = JsonPrefix()
    assert prefix.feed_bytes(b"{" + b" " * MAX_WHITESPACE_RUN)
    assert not prefix.copy().feed(ord(" "))
    assert prefix.feed_bytes(b'"a": "' + b" " * 100)  # inside a string, spaces are text


# -- token choice -------------------------------------------------------------------------------

VOCAB = [b"{", b"}", b'"', b"a", b":", b" ", b"1", b"hello", b"<eos>", b"}\n"]
EOS = 8


def token_bytes(token: int) -> bytes | None:
    return None if token == EOS else VOCAB[token]


def greedy(logits: torch.Tensor, generated: Any) -> int:
    return int(torch.argmax(logits))


def run(preferences: list[list[int]]) -> list[int]:
    """Greedy decoding where step k prefers tokens in the order preferences[k]."""
    constraint = JsonConstraint(token_bytes, frozenset({EOS}))
    out: list[int] = []
    for order in preferences:
        logits = torch.full((len(VOCAB),), -10.0)
        for rank, token in enumerate(order):
            logits[token] = 10.0 - rank
        token = constraint.pick(greedy, logits, out)
        constraint.advance(token)
        out.append(token)
        if constraint.closed:
            break
    return out


def test_invalid_preferences_are_skipped_and_the_value_closes() -> None:
    # Each step the model's favourite is invalid there (prose first, EOS mid-key, prose
    # after the key, a closer after the colon, prose after the value): the next one wins,
    # and generation stops when the object closes, whatever would come after.
    tokens = run([[7, 0], [8, 2], [3], [8, 2], [7, 4], [1, 6], [7, 9], [7, 8]])
    assert b"".join(VOCAB[t] for t in tokens) == b'{"a":1}\n'


def test_eos_only_once_complete() -> None:
    constraint = JsonConstraint(token_bytes, frozenset({EOS}))
    assert not constraint.allows(EOS)
    for token in (0, 1):
        constraint.advance(token)
    assert constraint.allows(EOS) and constraint.closed
    with pytest.raises(ValueError, match="not valid JSON"):
        constraint.advance(0)


def test_a_tail_follows_the_value() -> None:
    # A forced call's arguments: the token that closes them may go on into the call's own
    # closing text (after a blank, as JSON allows), and what is left of it is `rest`.
    vocab = [b'{"a":1', b"}", b"}}\n", b"}\n", b"} }", b"}}}", b"}x", b"<eos>"]
    tail = b"}\n</tool_call>"

    def constraint_after_value() -> JsonConstraint:
        constraint = JsonConstraint(lambda t: vocab[t], frozenset({7}), tail=tail)
        constraint.advance(0)
        return constraint

    allowed = [t for t in range(len(vocab)) if constraint_after_value().allows(t)]
    assert [vocab[t] for t in allowed] == [b"}", b"}}\n", b"}\n", b"} }"]
    for token, rest in [(1, tail), (2, b"</tool_call>"), (3, tail), (4, b"\n</tool_call>")]:
        constraint = constraint_after_value()
        assert not constraint.closed and constraint.rest == tail.decode()
        constraint.advance(token)
        assert constraint.closed and constraint.rest == rest.decode(), vocab[token]
