"""A small GGUF reader: the header, every metadata value, the tensor table, and fp32 tensors.

Written from the GGUF format description (ggml's ``docs/gguf.md``), for versions 2 and 3, little-endian:

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x   (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
    padding to `general.alignment` (default 32), then the tensor data; each tensor at data_start + offset.

A string is a u64 byte count then UTF-8 bytes; an array is a u32 item type, a u64 count, then the items.
``dims[0]`` is the fastest-moving dimension, so a tensor with dims ``(in, out)`` is the numpy array
``(out, in)``. Arrays of numbers are read in bulk with numpy; arrays of strings with one pass over the bytes
(the vocabulary and merges of a tokenizer: ~100k strings in a few tens of ms).

Dequantization (blocks of 32 along ``dims[0]``), computed in float32 exactly as ggml defines it:

    F32:  the bytes as float32
    F16:  the bytes as float16, widened to float32
    Q8_0: 34-byte blocks (f16 scale d, int8 q[32]):            x = q * d
    Q4_1: 20-byte blocks (f16 scale d, f16 min m, u8 qs[16]):  x = d * q + m, where q[j] = qs[j] & 15 and
          q[j + 16] = qs[j] >> 4 (two float32 roundings: the product, then the sum)

Any other type is refused with :class:`UnsupportedGGUF` (the caller falls back to another converter).
Anything malformed (bad magic, a count or length running past the end of the file, a tensor whose data
does not fit) raises :class:`PeftkitError` naming the file, the offset and what was expected.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peftkit.train.errors import PeftkitError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# metadata value types -> (struct format, size); 8 = string and 9 = array are handled apart
_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
STRING, ARRAY = 8, 9

# ggml type -> (name, elements per block, bytes per block) of the types this reader dequantizes
F32, F16, Q4_1, Q8_0 = 0, 1, 3, 8
GGML_TYPES = {F32: ("F32", 1, 4), F16: ("F16", 1, 2), Q4_1: ("Q4_1", 32, 20), Q8_0: ("Q8_0", 32, 34)}


class UnsupportedGGUF(Exception):
    """A well-formed GGUF this reader (or a converter using it) does not handle; the message says what."""


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. ``shape`` is numpy order (``dims`` reversed); ``start`` is the absolute
    file offset of the data and ``nbytes`` its length."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    start: int
    nbytes: int


class GGUFFile:
    """A memory-mapped GGUF file: ``metadata`` (key -> value; arrays of numbers as numpy arrays, arrays of
    strings as lists of str) and ``tensors`` (name -> :class:`TensorInfo`, in file order).

    Use as a context manager, or call :meth:`close`; arrays from :meth:`tensor` do not outlive it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            self._mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        self._buf = memoryview(self._mmap) if self._mmap is not None else memoryview(b"")
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._mmap is not None:
            self._buf.release()
            self._mmap.close()
            self._mmap = None

    # ---- parsing -------------------------------------------------------------------------------------
    def _fail(self, offset: int, what: str) -> PeftkitError:
        return PeftkitError(
            f"{self.path}: not a valid GGUF file: expected {what} at byte {offset}, "
            f"but the file is {self.size} bytes (truncated or corrupt?)"
        )

    def _unpack(self, fmt: str, size: int, pos: int, what: str) -> Any:
        if pos + size > self.size:
            raise self._fail(pos, what)
        return struct.unpack_from(fmt, self._buf, pos)[0]

    def _string(self, pos: int, what: str) -> tuple[str, int]:
        length = self._unpack("<Q", 8, pos, f"the byte length of {what}")
        end = pos + 8 + length
        if end > self.size:
            raise self._fail(pos + 8, f"{length} bytes of {what}")
        try:
            return bytes(self._buf[pos + 8 : end]).decode("utf-8"), end
        except UnicodeDecodeError as error:
            raise PeftkitError(f"{self.path}: {what} at byte {pos + 8} is not UTF-8 ({error})") from None

    def _value(self, kind: int, pos: int, what: str) -> tuple[Any, int]:
        if kind in _SCALARS:
            fmt, size = _SCALARS[kind]
            value = self._unpack(fmt, size, pos, f"a {fmt[1:]} value of {what}")
            return value, pos + size
        if kind == STRING:
            return self._string(pos, what)
        if kind == ARRAY:
            item = self._unpack("<I", 4, pos, f"the item type of array {what}")
            count = self._unpack("<Q", 8, pos + 4, f"the length of array {what}")
            pos += 12
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item])
                end = pos + count * dtype.itemsize
                if end > self.size:
                    raise self._fail(pos, f"{count} items of array {what}")
                values = np.frombuffer(self._buf, dtype=dtype, count=count, offset=pos).copy()
                return (values.astype(bool) if item == 7 else values), end
            if item == STRING:
                return self._strings(count, pos, what)
            if item == ARRAY:
                out = []
                for index in range(count):
                    value, pos = self._value(ARRAY, pos, f"{what}[{index}]")
                    out.append(value)
                return out, pos
            raise PeftkitError(f"{self.path}: array {what} at byte {pos - 12} has unknown item type {item}")
        raise PeftkitError(f"{self.path}: metadata {what} at byte {pos - 4} has unknown value type {kind}")

    def _strings(self, count: int, pos: int, what: str) -> tuple[list[str], int]:
        """``count`` strings from ``pos``: one pass reading each u64 length and slicing the bytes."""
        buf, size, unpack = self._buf, self.size, struct.Struct("<Q").unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                (length,) = unpack(buf, pos)
                end = pos + 8 + length
                if end > size:
                    raise self._fail(pos + 8, f"{length} bytes of string {len(out)} of {what}")
                append(str(buf[pos + 8 : end], "utf-8"))
                pos = end
        except struct.error:
            raise self._fail(pos, f"the byte length of string {len(out)} of {what}") from None
        except UnicodeDecodeError as error:
            raise PeftkitError(f"{self.path}: string {len(out)} of {what} is not UTF-8 ({error})") from None
        return out, pos

    def _parse(self) -> None:
        if self.size < 4 or bytes(self._buf[:4]) != MAGIC:
            found = bytes(self._buf[:4])
            raise PeftkitError(
                f"{self.path}: not a GGUF file: expected the magic bytes b'GGUF', found {found!r}"
            )
        version = self._unpack("<I", 4, 4, "the format version")
        if version not in (2, 3):
            raise UnsupportedGGUF(f"GGUF version {version} (this reader handles versions 2 and 3)")
        n_tensors = self._unpack("<Q", 8, 8, "the tensor count")
        n_kv = self._unpack("<Q", 8, 16, "the metadata count")
        pos = 24
        for index in range(n_kv):
            key, pos = self._string(pos, f"metadata key {index}")
            kind = self._unpack("<I", 4, pos, f"the value type of {key!r}")
            self.metadata[key], pos = self._value(kind, pos + 4, repr(key))
        infos = []
        for index in range(n_tensors):
            name, pos = self._string(pos, f"tensor name {index}")
            n_dims = self._unpack("<I", 4, pos, f"the dimension count of tensor {name!r}")
            if n_dims > 8:
                raise PeftkitError(f"{self.path}: tensor {name!r} at byte {pos} claims {n_dims} dimensions")
            if pos + 4 + 8 * n_dims + 12 > self.size:
                raise self._fail(pos + 4, f"the dimensions, type and offset of tensor {name!r}")
            dims = struct.unpack_from(f"<{n_dims}Q", self._buf, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", self._buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, dims, ggml_type, offset))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise PeftkitError(f"{self.path}: general.alignment is {alignment}, expected a power of two")
        data_start = -(-pos // alignment) * alignment
        for name, dims, ggml_type, offset in infos:
            shape = tuple(int(d) for d in reversed(dims))
            nbytes = self._nbytes(name, shape, ggml_type)
            start = data_start + offset
            if nbytes is not None and start + nbytes > self.size:
                raise self._fail(start, f"{nbytes} bytes of data of tensor {name!r} {list(shape)}")
            self.tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes or 0)

    def _nbytes(self, name: str, shape: tuple[int, ...], ggml_type: int) -> int | None:
        """Bytes of a tensor's data, or None for a type this reader does not know (refused on read)."""
        if ggml_type not in GGML_TYPES:
            return None
        _, block, block_bytes = GGML_TYPES[ggml_type]
        inner = shape[-1] if shape else 1
        if inner % block:
            raise PeftkitError(
                f"{self.path}: tensor {name!r} {list(shape)} has rows of {inner} values, "
                f"expected a multiple of the {block}-value blocks of {GGML_TYPES[ggml_type][0]}"
            )
        return int(np.prod(shape, dtype=np.int64)) // block * block_bytes

    # ---- tensors -------------------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor ``name`` as uint8 ``(rows, bytes_per_row)``, a view into the map."""
        info = self.tensors[name]
        if info.ggml_type not in GGML_TYPES:
            raise UnsupportedGGUF(
                f"tensor {name!r} has ggml type {info.ggml_type}, not one of F32/F16/Q4_1/Q8_0"
            )
        rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        data = np.frombuffer(self._buf, dtype=np.uint8, count=info.nbytes, offset=info.start)
        return data.reshape(rows, -1)

    def tensor(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Tensor ``name`` dequantized to a new float32 array of its ``shape``; with ``rows`` (int indices
        into the flattened leading dims), only those rows, in that order: ``(len(rows), shape[-1])``."""
        info = self.tensors[name]
        raw = self.raw(name)
        if rows is not None:
            raw = raw[rows]
        out = dequantize(raw, info.ggml_type)
        return out.reshape(info.shape) if rows is None else out


def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """uint8 ``(rows, bytes_per_row)`` of ``ggml_type`` -> new float32 ``(rows, values_per_row)``."""
    rows = raw.shape[0]
    if ggml_type == F32:
        return np.ascontiguousarray(raw).view(np.float32).copy()
    if ggml_type == F16:
        return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)
    if ggml_type == Q8_0:
        blocks = raw.reshape(-1, 34)  # (n_blocks, 34)
        scale = np.ascontiguousarray(blocks[:, :2]).view(np.float16).astype(np.float32)  # (n_blocks, 1)
        values = blocks[:, 2:].view(np.int8).astype(np.float32)  # (n_blocks, 32)
        np.multiply(values, scale, out=values)
        return values.reshape(rows, -1)
    if ggml_type == Q4_1:
        blocks = raw.reshape(-1, 20)  # (n_blocks, 20)
        scales = (
            np.ascontiguousarray(blocks[:, :4]).view(np.float16).astype(np.float32)
        )  # (n_blocks, 2): d, m
        packed = blocks[:, 4:]  # (n_blocks, 16)
        values = np.empty((blocks.shape[0], 32), dtype=np.float32)
        np.bitwise_and(packed, 15, out=values[:, :16], casting="unsafe")
        np.right_shift(packed, 4, out=values[:, 16:], casting="unsafe")
        np.multiply(values, scales[:, :1], out=values)
        np.add(values, scales[:, 1:], out=values)
        return values.reshape(rows, -1)
    raise UnsupportedGGUF(f"ggml type {ggml_type} is not one of F32/F16/Q4_1/Q8_0")
