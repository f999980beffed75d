"""The GGUF v2/v3 header: metadata, tensor infos and where the tensor data starts.

gguf-py's GGUFReader builds a numpy array for every part of every value, so a real
tokenizer (~152k tokens and ~151k merges) costs it seconds before a single weight moves.
This reader walks the same bytes with struct over one read-only map of the file: numeric
arrays are decoded in one numpy call and string arrays in one tight loop, so parsing the
header is a fraction of the time the disk needs for the weights. Tensor data is not read.

Layout (all little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count    x (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
    padding to general.alignment (default 32) | tensor data

where a string is (u64 length, UTF-8 bytes) and an array value is (u32 item type, u64
count, items). Anything truncated or inconsistent raises CheckpointError.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, replace
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from helexa.engine.checkpoint.errors import CheckpointError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

V = GGUFValueType
# struct format of each fixed-size value type; numpy reads the same codes for arrays.
_FORMATS: dict[GGUFValueType, str] = {
    V.UINT8: "B",
    V.INT8: "b",
    V.UINT16: "H",
    V.INT16: "h",
    V.UINT32: "I",
    V.INT32: "i",
    V.UINT64: "Q",
    V.INT64: "q",
    V.FLOAT32: "f",
    V.FLOAT64: "d",
    V.BOOL: "?",
}
_SCALARS = {vtype: struct.Struct("<" + code) for vtype, code in _FORMATS.items()}
_DTYPES = {vtype: np.dtype("<" + code) for vtype, code in _FORMATS.items()}
_U32 = _SCALARS[V.UINT32]
_U64 = _SCALARS[V.UINT64]


@dataclass(frozen=True)
class GGUFField:
    """One metadata value, decoded to Python (nested arrays become nested lists).

    ``item_type`` is the array's declared item type (ARRAY for an array of arrays), known
    even when the array is empty; None for scalars and strings.
    """

    value: Any
    type: GGUFValueType
    item_type: GGUFValueType | None = None


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor's bytes are, as the header describes them."""

    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the innermost, contiguous dimension
    ggml_type: GGMLQuantizationType
    offset: int  # from the start of the data section

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy/torch order (outermost first)."""
        return self.dims[::-1]

    @property
    def n_elements(self) -> int:
        return prod(self.dims)

    @property
    def n_bytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        return self.n_elements // block_size * type_size


@dataclass(frozen=True)
class GGUFHeader:
    """Everything before the tensor data: all a preflight needs, and a loader's map."""

    version: int
    fields: dict[str, GGUFField]
    tensors: list[GGUFTensorInfo]
    alignment: int
    data_offset: int  # absolute file offset of the (aligned) tensor data section
    # The file it was read from, as (device, inode, size, mtime in ns); None when parsed
    # from a buffer. A header parsed once (by preflight) is reused only while this holds.
    file_id: tuple[int, int, int, int] | None = None

    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata ``key``, or ``default`` when the file has none."""
        field = self.fields.get(key)
        return default if field is None else field.value


def read_gguf_header(path: str | Path, known: GGUFHeader | None = None) -> GGUFHeader:
    """Parse the header of the GGUF file at ``path``; only the header's pages are read.

    ``known``, a header read from ``path`` before (preflight's, moments before the load),
    is returned as it is while the file is the one it was read from: parsing a real
    tokenizer's metadata twice costs a tenth of a second each time, and a file replaced
    in between (a new download renamed over it) is parsed afresh."""
    with open(path, "rb") as f:
        file_id = _file_id(os.fstat(f.fileno()))
        if known is not None and known.file_id == file_id:
            return known
        if f.seek(0, 2) == 0:
            raise CheckpointError(f"{path}: not a readable GGUF file: it is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return replace(parse_gguf_header(buf, source=str(path)), file_id=file_id)


def _file_id(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def parse_gguf_header(buf: bytes | mmap.mmap, source: str = "<buffer>") -> GGUFHeader:
    """Parse a whole GGUF file's bytes (a map or a bytes object).

    The buffer's length is taken as the file size: every tensor must lie inside it.
    """
    cursor = _Cursor(buf)
    try:
        header = cursor.header()
    except (_Corrupt, struct.error, UnicodeDecodeError) as e:
        reason = "truncated" if isinstance(e, struct.error) else str(e)
        raise CheckpointError(
            f"{source}: not a readable GGUF file: {cursor.where}: {reason} (at byte {cursor.start})"
        ) from None
    for t in header.tensors:
        if problem := _misplaced(t, header, len(buf)):
            raise CheckpointError(
                f"{source}: not a readable GGUF file: tensor {t.name!r}: {problem}"
            )
    return header


class _Corrupt(Exception):
    """Bytes that cannot be a GGUF header; the message says what was wrong."""


class _Cursor:
    """Reads values front to back, remembering what it reads and where that began."""

    def __init__(self, buf: bytes | mmap.mmap) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.where = ""
        self.start = 0

    def at(self, where: str) -> None:
        """Begin reading ``where``: an error names it and the byte it starts at."""
        self.where, self.start = where, self.pos

    def header(self) -> GGUFHeader:
        self.at("magic")
        if self.take(4) != MAGIC:  # what it holds instead is not echoed: it may be any file
            raise _Corrupt(f"the file does not begin with {MAGIC.decode()}")
        self.at("version")
        version = self.unpack(_U32)
        if version & 0xFFFF == 0:  # as gguf-py tells: a version written the other way round
            raise _Corrupt("big-endian GGUF files are not supported")
        if version not in SUPPORTED_VERSIONS:
            raise _Corrupt(f"{version} is not supported, only {SUPPORTED_VERSIONS}")
        self.at("counts")
        tensor_count = self.unpack(_U64)
        kv_count = self.unpack(_U64)

        fields: dict[str, GGUFField] = {}
        alignment = DEFAULT_ALIGNMENT
        for i in range(kv_count):
            self.at(f"metadata key {i}")
            key = self.string()
            self.where = f"metadata {key!r}"
            if key in fields:
                raise _Corrupt("duplicate key")
            fields[key] = self.field(self.value_type())
            if key == "general.alignment":
                alignment = _alignment(fields[key])

        tensors: list[GGUFTensorInfo] = []
        names: set[str] = set()
        for i in range(tensor_count):
            self.at(f"tensor info {i}")
            tensor = self.tensor_info()
            if tensor.name in names:
                raise _Corrupt("duplicate tensor name")
            names.add(tensor.name)
            tensors.append(tensor)

        data_offset = -(-self.pos // alignment) * alignment
        return GGUFHeader(version, fields, tensors, alignment, data_offset)

    def take(self, n: int) -> bytes:
        data = self.buf[self.pos : self.pos + n]
        if len(data) != n:
            raise _Corrupt(f"truncated: {n} bytes wanted, {len(data)} left")
        self.pos += n
        return data

    def unpack(self, fmt: struct.Struct) -> Any:
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def string(self) -> str:
        return self.take(self.unpack(_U64)).decode("utf-8")

    def value_type(self) -> GGUFValueType:
        raw = self.unpack(_U32)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise _Corrupt(f"unknown value type {raw}") from None

    def field(self, vtype: GGUFValueType) -> GGUFField:
        if vtype != V.ARRAY:
            return GGUFField(self.value(vtype), vtype)
        item_type = self.value_type()
        return GGUFField(self.items(item_type, self.unpack(_U64)), vtype, item_type)

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype == V.STRING:
            return self.string()
        if vtype == V.ARRAY:
            return self.items(self.value_type(), self.unpack(_U64))
        return self.unpack(_SCALARS[vtype])

    def items(self, item_type: GGUFValueType, count: int) -> list[Any]:
        """``count`` values of ``item_type``: numbers in one numpy call, strings in a loop
        that does nothing but find and decode each one."""
        if item_type in _DTYPES:
            dtype = _DTYPES[item_type]
            if count * dtype.itemsize > self.size - self.pos:
                raise _Corrupt(f"truncated: {count} {item_type.name} items overrun the file")
            values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
            self.pos += count * dtype.itemsize
            return values
        if item_type == V.STRING:
            return self.strings(count)
        return [self.value(item_type) for _ in range(count)]  # arrays of arrays

    def strings(self, count: int) -> list[str]:
        if count > (self.size - self.pos) // _U64.size:  # each takes at least its length
            raise _Corrupt(f"truncated: {count} strings overrun the file")
        buf, pos, length_at = self.buf, self.pos, _U64.unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(count):
            (n,) = length_at(buf, pos)
            pos += 8
            append(buf[pos : pos + n].decode("utf-8"))  # a short slice is caught below
            pos += n
        if pos > self.size:
            raise _Corrupt("truncated: a string overruns the file")
        self.pos = pos
        return out

    def tensor_info(self) -> GGUFTensorInfo:
        name = self.string()
        self.where = f"tensor info {name!r}"
        n_dims = self.unpack(_U32)
        if n_dims > MAX_DIMS:
            raise _Corrupt(f"{n_dims} dimensions (at most {MAX_DIMS})")
        dims = tuple(self.unpack(_U64) for _ in range(n_dims))
        raw_type = self.unpack(_U32)
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise _Corrupt(f"unknown ggml type {raw_type}") from None
        block_size = GGML_QUANT_SIZES[ggml_type][0]
        if dims and dims[0] % block_size:
            raise _Corrupt(
                f"rows of {dims[0]} are not whole {ggml_type.name} blocks of {block_size}"
            )
        return GGUFTensorInfo(name, dims, ggml_type, self.unpack(_U64))


def _alignment(field: GGUFField) -> int:
    if field.type != V.UINT32:
        raise _Corrupt(f"must be UINT32, not {field.type.name}")
    alignment = field.value
    if alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"must be a power of two, not {alignment}")
    return alignment


def _misplaced(t: GGUFTensorInfo, header: GGUFHeader, file_size: int) -> str:
    """Why ``t``'s data cannot be where the header says, or "" when it can."""
    if t.offset % header.alignment:
        return f"data offset {t.offset} is not {header.alignment}-byte aligned"
    end = header.data_offset + t.offset + t.n_bytes
    if end > file_size:
        return f"ends at byte {end} of a {file_size}-byte file (truncated)"
    return ""
