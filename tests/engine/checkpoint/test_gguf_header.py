"""gguf_header against gguf-py's GGUFReader, field by field, and on broken files."""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from helexa.engine.checkpoint.errors import CheckpointError
from helexa.engine.checkpoint.gguf import load_gguf, read_gguf_info
from helexa.engine.checkpoint.gguf_header import (
    GGUFHeader,
    parse_gguf_header,
    read_gguf_header,
)
from tests.engine.gguf_factories import make_kquant_hf_model, write_model_gguf

Q = GGMLQuantizationType
V = GGUFValueType
TOKENIZER_FIELDS = {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.tokens": [f"tok{i}" for i in range(126)] + ["<|im_end|>", "é 你好"],
    "tokenizer.ggml.token_type": [1] * 126 + [3, 3],
    "tokenizer.ggml.merges": ["t o", "to k"],
    "tokenizer.ggml.eos_token_id": 126,
    "tokenizer.ggml.add_bos_token": False,
}
# (value type, smallest, largest) of every fixed-size GGUF type.
NUMBERS: list[tuple[GGUFValueType, Any, Any]] = [
    (V.UINT8, 0, 255),
    (V.INT8, -128, 127),
    (V.UINT16, 0, 65535),
    (V.INT16, -32768, 32767),
    (V.UINT32, 0, 2**32 - 1),
    (V.INT32, -(2**31), 2**31 - 1),
    (V.UINT64, 0, 2**64 - 1),
    (V.INT64, -(2**63), 2**63 - 1),
    (V.FLOAT32, -3.4028234663852886e38, 1.5),  # f32 extremes survive; 0.1 would not
    (V.FLOAT64, -1.7976931348623157e308, 0.1),
    (V.BOOL, False, True),
]


def flat(value: Any) -> list[Any]:
    """A nested list as gguf-py's ReaderField.contents() returns it: flattened."""
    if not isinstance(value, list):
        return [value]
    return [leaf for item in value for leaf in flat(item)]


def assert_matches_reader(path: Path) -> GGUFHeader:
    """Every field, tensor info and offset as gguf-py reads the same file."""
    ours = read_gguf_header(path)
    reader = GGUFReader(path)
    theirs = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.version == reader.fields["GGUF.version"].contents()
    assert list(ours.fields) == list(theirs)  # file order kept
    for key, field in theirs.items():
        got = ours.fields[key]
        assert got.type == field.types[0], key
        if got.type == V.ARRAY:
            assert got.item_type == field.types[1], key
            assert flat(got.value) == field.contents(), key
        else:
            assert got.item_type is None
            assert got.value == field.contents(), key
        assert type(flat(got.value)[0]) is type(flat(field.contents())[0]), key
    assert ours.alignment == reader.alignment
    assert ours.data_offset == reader.data_offset
    assert len(ours.tensors) == len(reader.tensors)
    data = path.read_bytes()
    for t, rt in zip(ours.tensors, reader.tensors, strict=True):
        assert t.name == rt.name
        assert t.dims == tuple(rt.shape.tolist())
        assert t.ggml_type == rt.tensor_type
        assert (t.n_elements, t.n_bytes) == (rt.n_elements, rt.n_bytes)
        start = ours.data_offset + t.offset
        assert start == rt.data_offset
        assert data[start : start + t.n_bytes] == rt.data.tobytes(), t.name
    return ours


def write_all_types(
    path: Path, *, alignment: int | None = None, n_strings: int = 3000
) -> dict[str, Any]:
    """A GGUF with every value type as scalar, array and nested array; returns the values."""
    rng = random.Random(0)
    alphabet = "abcxyzĠĊé你好🙂 <>|"
    values: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] = {}
    for vtype, low, high in NUMBERS:
        name = vtype.name.lower()
        values[f"scalar.{name}.low"] = (low, vtype, None)
        values[f"scalar.{name}.high"] = (high, vtype, None)
        values[f"array.{name}"] = ([low, high, low], V.ARRAY, vtype)
    values["scalar.string"] = ("héllo, 世界 🙂", V.STRING, None)
    values["scalar.string.empty"] = ("", V.STRING, None)
    strings = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9))) for _ in range(n_strings)
    ]
    values["array.string"] = (strings, V.ARRAY, V.STRING)
    values["nested.int32"] = ([[1, 2, 3], [4], [5, 6]], V.ARRAY, None)
    values["nested.string"] = ([["a", "bc"], ["", "你好"]], V.ARRAY, None)
    values["nested.deep"] = ([[[1.5], [2.5, 3.5]], [[4.5]]], V.ARRAY, None)

    writer = GGUFWriter(path, "test-arch")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, (value, vtype, sub_type) in values.items():
        writer.add_key_value(key, value, vtype, sub_type)
    writer.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("f16", np.arange(7, dtype=np.float16))  # 14 bytes: the next is padded
    writer.add_tensor("i8", np.arange(-4, 4, dtype=np.int8).reshape(2, 2, 2))
    q8 = np.arange(2 * 34, dtype=np.uint8).reshape(2, 34)  # 2 rows of one Q8_0 block
    writer.add_tensor("q8_0", q8, raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {key: value for key, (value, _, _) in values.items()}


def test_every_value_type_matches_gguf_py(tmp_path: Path) -> None:
    path = tmp_path / "all.gguf"
    written = write_all_types(path)
    header = assert_matches_reader(path)
    for key, value in written.items():
        assert header.get(key) == value, key  # nested arrays keep their structure
    assert header.fields["nested.int32"].item_type == V.ARRAY
    assert header.get("general.architecture") == "test-arch"
    assert header.get("no.such.key", "fallback") == "fallback"
    assert [t.shape for t in header.tensors] == [(3, 4), (7,), (2, 2, 2), (2, 32)]


def test_custom_alignment(tmp_path: Path) -> None:
    path = tmp_path / "aligned.gguf"
    write_all_types(path, alignment=256)
    header = assert_matches_reader(path)
    assert header.alignment == 256 and header.data_offset % 256 == 0
    assert all(t.offset % 256 == 0 for t in header.tensors)


def test_version_2_reads_the_same(tmp_path: Path) -> None:
    path = tmp_path / "v2.gguf"
    write_all_types(path)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 and v3 lay out little-endian files identically
    path.write_bytes(data)
    header = assert_matches_reader(path)
    assert header.version == 2


@pytest.mark.parametrize("quant", ["F32", "Q4_K_M"])
def test_files_from_write_gguf_match_gguf_py(tmp_path: Path, quant: str) -> None:
    hf = make_kquant_hf_model(128, tie=False)
    path = write_model_gguf(
        tmp_path / "m.gguf",
        hf,
        quant=quant,
        tokenizer_fields=TOKENIZER_FIELDS,
        chat_template="{% for m in messages %}{{ m.content }}{% endfor %}",
    )
    header = assert_matches_reader(path)
    assert header.get("tokenizer.ggml.tokens") == TOKENIZER_FIELDS["tokenizer.ggml.tokens"]
    assert header.fields["tokenizer.ggml.token_type"].item_type == V.INT32


def test_a_header_read_before_is_reused_only_while_its_file_is_unchanged(tmp_path: Path) -> None:
    """Preflight's header serves the load without a second parse; a file replaced in
    between (a new download renamed over it) is parsed afresh, never mistaken for it."""
    path = write_model_gguf(tmp_path / "m.gguf", make_kquant_hf_model(128), quant="Q8_0")
    first = read_gguf_header(path)
    assert read_gguf_header(path, known=first) is first
    replacement = write_model_gguf(tmp_path / "new.gguf", make_kquant_hf_model(128), quant="F32")
    replacement.replace(path)
    again = read_gguf_header(path, known=first)
    assert again is not first
    assert again == read_gguf_header(path)
    assert {t.ggml_type for t in again.tensors} != {t.ggml_type for t in first.tensors}


# A hand-built GGUF, for what gguf-py's writer refuses to produce.


def gguf_string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def gguf_kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", vtype) + payload


def gguf_tensor(name: str, dims: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    packed_dims = struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
    return gguf_string(name) + packed_dims + struct.pack("<IQ", ggml_type, offset)


def gguf_file(
    kvs: Sequence[bytes], tensors: Sequence[bytes] = (), *, version: int = 3, data: bytes = b""
) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    head += b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % 32) + data


def test_empty_arrays_keep_their_item_type(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(
        gguf_file(
            [
                gguf_kv("empty.u32", V.ARRAY, struct.pack("<IQ", V.UINT32, 0)),
                gguf_kv("empty.str", V.ARRAY, struct.pack("<IQ", V.STRING, 0)),
            ]
        )
    )
    header = read_gguf_header(path)
    assert header.get("empty.u32") == [] == header.get("empty.str")
    assert header.fields["empty.str"].item_type == V.STRING
    assert GGUFReader(path).fields["empty.str"].contents() == []
    assert header.tensors == [] and header.data_offset == GGUFReader(path).data_offset


def test_every_truncation_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "all.gguf"
    write_all_types(path, n_strings=10)  # every type, in a file small enough to cut everywhere
    data = path.read_bytes()
    header = parse_gguf_header(data)
    needed = max(header.data_offset + t.offset + t.n_bytes for t in header.tensors)
    for cut in range(needed):
        with pytest.raises(CheckpointError, match=r"^<buffer>: not a readable GGUF file: "):
            parse_gguf_header(data[:cut])
    for cut in range(needed, len(data) + 1):  # what is left out is padding
        assert parse_gguf_header(data[:cut]) == header
    (tmp_path / "cut.gguf").write_bytes(data[: header.data_offset + 8])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: .*tensor 'f32': ends at .*truncated"):
        read_gguf_header(tmp_path / "cut.gguf")


U32 = struct.pack("<I", 7)
CORRUPT: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "it is empty"),
    "bad magic": (b"GGML" + bytes(20), r"magic: the file does not begin with GGUF \(at byte 0\)"),
    "version 1": (
        gguf_file([], version=1),
        r"version: 1 is not supported, only \(2, 3\) \(at byte 4\)",
    ),
    "version 4": (gguf_file([], version=4), "version: 4 is not supported"),
    "big-endian": (
        b"GGUF" + struct.pack(">IQQ", 3, 0, 0),
        "version: big-endian GGUF files are not",
    ),
    "unknown value type": (
        gguf_file([gguf_kv("k", 13, U32)]),
        r"metadata 'k': unknown value type 13 \(at byte 24\)",
    ),
    "unknown array item type": (
        gguf_file([gguf_kv("k", V.ARRAY, struct.pack("<IQ", 99, 1))]),
        "metadata 'k': unknown value type 99",
    ),
    "duplicate key": (
        gguf_file([gguf_kv("k", V.UINT32, U32)] * 2),
        r"metadata 'k': duplicate key \(at byte 41\)",
    ),
    "key not utf-8": (
        gguf_file([gguf_kv(b"\xff", V.UINT32, U32)]),
        "metadata key 0: 'utf-8' codec",
    ),
    "value not utf-8": (
        gguf_file([gguf_kv("k", V.STRING, gguf_string(b"\xc3"))]),
        "metadata 'k': 'utf-8' codec",
    ),
    "string array overruns": (
        gguf_file([gguf_kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 2**60))]),
        "metadata 'k': truncated: 1152921504606846976 strings overrun the file",
    ),
    "int64 array overruns": (
        gguf_file([gguf_kv("k", V.ARRAY, struct.pack("<IQ", V.INT64, 2**40))]),
        "metadata 'k': truncated: 1099511627776 INT64 items overrun the file",
    ),
    "string overruns": (
        gguf_file([gguf_kv("k", V.STRING, struct.pack("<Q", 2**40) + b"abc")]),
        "metadata 'k': truncated: 1099511627776 bytes wanted, 19 left",
    ),
    "alignment not a power of two": (
        gguf_file([gguf_kv("general.alignment", V.UINT32, struct.pack("<I", 48))]),
        "metadata 'general.alignment': must be a power of two, not 48",
    ),
    "alignment not uint32": (
        gguf_file([gguf_kv("general.alignment", V.UINT64, struct.pack("<Q", 64))]),
        "metadata 'general.alignment': must be UINT32, not UINT64",
    ),
    "unknown ggml type": (
        gguf_file([], [gguf_tensor("t", (4,), 99, 0)], data=bytes(16)),
        "tensor info 't': unknown ggml type 99",
    ),
    "five dims": (
        gguf_file([], [gguf_tensor("t", (1, 1, 1, 1, 1), Q.F32, 0)], data=bytes(4)),
        "tensor info 't': 5 dimensions",
    ),
    "partial block": (
        gguf_file([], [gguf_tensor("t", (16, 2), Q.Q8_0, 0)], data=bytes(64)),
        "tensor info 't': rows of 16 are not whole Q8_0 blocks of 32",
    ),
    "duplicate tensor": (
        gguf_file([], [gguf_tensor("t", (4,), Q.F32, 0)] * 2, data=bytes(16)),
        "tensor info 't': duplicate tensor name",
    ),
    "misaligned tensor": (
        gguf_file([], [gguf_tensor("t", (4,), Q.F32, 8)], data=bytes(64)),
        "tensor 't': data offset 8 is not 32-byte aligned",
    ),
    "tensor data truncated": (
        gguf_file([], [gguf_tensor("t", (4,), Q.F32, 0)], data=bytes(15)),
        r"tensor 't': ends at byte 80 of a 79-byte file \(truncated\)",
    ),
}


@pytest.mark.parametrize(("data", "message"), CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_files_get_clear_errors(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=f"bad.gguf: not a readable GGUF file: {message}"):
        read_gguf_header(path)


def test_the_hand_built_file_is_valid_when_not_broken(tmp_path: Path) -> None:
    """The hand-built files are well formed where not broken on purpose: CORRUPT fails
    for the reason each case names, not for a flaw of the builder."""
    path = tmp_path / "good.gguf"
    values = np.arange(4, dtype=np.float32)
    kvs = [
        gguf_kv("general.alignment", V.UINT32, struct.pack("<I", 32)),
        gguf_kv("k", V.STRING, gguf_string("é")),
    ]
    path.write_bytes(
        gguf_file(kvs, [gguf_tensor("t", (4,), Q.F32, 0)], data=values.tobytes()),
    )
    assert_matches_reader(path)


def test_loader_refuses_a_truncated_file(tmp_path: Path) -> None:
    path = write_model_gguf(tmp_path / "m.gguf", make_kquant_hf_model(128), quant="Q8_0")
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="m.gguf: not a readable GGUF file.*truncated"):
        load_gguf(path)
    with pytest.raises(CheckpointError, match="truncated"):
        read_gguf_info(path)
