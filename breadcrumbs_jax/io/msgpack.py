"""Flax msgpack checkpoints (``flax.serialization.to_bytes`` / ``msgpack_restore``), read lazily.

The file is memory-mapped and its msgpack structure walked once, recording where each
array's bytes lie; a leaf is read by copying only its bytes. Flax stores an array as an
extension value (code 1, or 3 for numpy scalars) holding the msgpack triple (shape, dtype
name, raw bytes), and splits arrays over 2**30 bytes into a ``__msgpack_chunked_array__``
dict. The writer streams the same encoding leaf by leaf in tree order.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import MergeError
from ..paths import SEP
from .base import Index, LeafInfo, checked, filled, nest, nested_order, read_array
from .write_behind import WriteBehind

EXT_NDARRAY, EXT_NPSCALAR = 1, 3
CHUNKED = "__msgpack_chunked_array__"
MAX_CHUNK_SIZE = 2**30  # flax.serialization.MAX_CHUNK_SIZE


@dataclasses.dataclass(frozen=True)
class _Bytes:
    offset: int
    length: int


@dataclasses.dataclass(frozen=True)
class _Ext:
    code: int
    offset: int
    length: int


@dataclasses.dataclass(frozen=True)
class _Array:
    """Where one array lies: its chunks (offset, element count) in order."""

    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[tuple[int, int], ...]


class _Walker:
    """A msgpack decoder over a buffer that records bin/ext payloads by position instead of copying."""

    _FIXED = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i",
              0xD3: ">q", 0xCA: ">f", 0xCB: ">d"}

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> int:
        start = self.pos
        self.pos += n
        if self.pos > len(self.buf):
            raise EOFError
        return start

    def unpack(self, fmt: str):
        start = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, start)[0]

    def value(self):
        b = self.unpack(">B")
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F)
        if 0x90 <= b <= 0x9F:
            return [self.value() for _ in range(b & 0x0F)]
        if 0xA0 <= b <= 0xBF:
            return self.str(b & 0x1F)
        if b in self._FIXED:
            return self.unpack(self._FIXED[b])
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        if b in (0xD9, 0xDA, 0xDB):
            return self.str(self.unpack(">" + "BHI"[b - 0xD9]))
        if b in (0xC4, 0xC5, 0xC6):
            n = self.unpack(">" + "BHI"[b - 0xC4])
            return _Bytes(self.take(n), n)
        if b in (0xDC, 0xDD):
            return [self.value() for _ in range(self.unpack(">" + "HI"[b - 0xDC]))]
        if b in (0xDE, 0xDF):
            return self.map(self.unpack(">" + "HI"[b - 0xDE]))
        if 0xD4 <= b <= 0xD8:
            return self.ext(1 << (b - 0xD4))
        if b in (0xC7, 0xC8, 0xC9):
            return self.ext(self.unpack(">" + "BHI"[b - 0xC7]))
        raise ValueError(f"invalid msgpack byte 0x{b:02x} at offset {self.pos - 1}")

    def str(self, n: int) -> str:
        start = self.take(n)
        return bytes(self.buf[start : start + n]).decode()

    def map(self, n: int) -> dict:
        return {self.value(): self.value() for _ in range(n)}

    def ext(self, n: int) -> _Ext:
        code = self.unpack(">b")
        return _Ext(code, self.take(n), n)


def _array(buf, ext: _Ext) -> _Array:
    w = _Walker(memoryview(buf)[ext.offset : ext.offset + ext.length])
    shape, dtype, data = w.value()
    if isinstance(dtype, _Bytes):
        dtype = bytes(buf[ext.offset + dtype.offset : ext.offset + dtype.offset + dtype.length]).decode()
    n = math.prod(shape)
    if data.length != n * np.dtype(dtype).itemsize:
        raise ValueError(f"array of shape {shape} and dtype {dtype} holds {data.length} bytes")
    return _Array(tuple(int(s) for s in shape), str(np.dtype(dtype)), ((ext.offset + data.offset, n),))


def _leaves(buf, node, prefix: str, out: dict) -> None:
    if isinstance(node, dict) and node.get(CHUNKED):
        shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
        parts = [_array(buf, node["chunks"][str(i)]) for i in range(len(node["chunks"]))]
        chunks = tuple(c for p in parts for c in p.chunks)
        if sum(n for _, n in chunks) != math.prod(shape):
            raise ValueError(f"chunked array of shape {shape} has {sum(n for _, n in chunks)} entries")
        out[prefix] = _Array(shape, parts[0].dtype, chunks)
    elif isinstance(node, (dict, list)):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            _leaves(buf, v, f"{prefix}{SEP}{k}" if prefix else str(k), out)
    elif isinstance(node, _Ext) and node.code in (EXT_NDARRAY, EXT_NPSCALAR):
        out[prefix] = _array(buf, node)
    elif isinstance(node, (bool, int, float)):
        out[prefix] = np.asarray(node)
    elif node is not None:
        raise ValueError(f"leaf {prefix!r} is not an array ({type(node).__name__})")


class MsgpackSource:
    """A Flax msgpack checkpoint file; paths join the nested dict keys with '/'."""

    format = "msgpack"
    layout = "flax"
    reads_into = True

    def __init__(self, path: str | os.PathLike):
        self.name = str(path)
        with open(path, "rb") as f:  # mapped while walking the structure only; arrays are read with pread
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
        walker = _Walker(buf)
        self._arrays: dict[str, _Array | np.ndarray] = {}
        try:
            tree = walker.value()
            if walker.pos != len(buf):
                raise ValueError(f"{len(buf) - walker.pos} bytes after the end of the msgpack object")
            _leaves(buf, tree, "", self._arrays)
        except EOFError:
            raise MergeError("truncated msgpack file", source=self.name) from None
        except (ValueError, TypeError, KeyError, UnicodeDecodeError, AttributeError) as e:
            raise MergeError(f"corrupt msgpack checkpoint: {e}", source=self.name) from None
        self._infos = {p: LeafInfo(p, tuple(a.shape), str(a.dtype)) for p, a in self._arrays.items()}

    def leaves(self) -> dict[str, LeafInfo]:
        return dict(self._infos)

    def read(self, path: str, index: Index | None = None, out: np.ndarray | None = None) -> np.ndarray:
        a = self._arrays[path]
        if not isinstance(a, _Array):  # a plain msgpack number
            return filled(out, checked(self, self._infos[path], np.array(a if index is None else a[index]), index))
        if len(a.chunks) == 1:
            return checked(self, self._infos[path], read_array(self.name, a.chunks[0][0], a.shape, a.dtype, index, out), index)
        # flax's chunks of a flattened array over 2**30 bytes
        flat = np.concatenate([read_array(self.name, off, (n,), a.dtype) for off, n in a.chunks])
        array = flat.reshape(a.shape) if index is None else flat.reshape(a.shape)[index].copy()
        return filled(out, checked(self, self._infos[path], array, index))

    def close(self) -> None:
        pass


def _header(forms: Sequence[tuple[int, int]], n: int) -> bytes:
    """The first msgpack length header of `forms` ((type byte, length bits), ...) that holds n."""
    for code, bits in forms:
        if n < (1 << bits):
            return struct.pack(">B" + {8: "B", 16: "H", 32: "I"}[bits], code, n)
    raise ValueError(f"msgpack length {n} too large")


def _map(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else _header(((0xDE, 16), (0xDF, 32)), n)


def _str(s: str) -> bytes:
    b = s.encode()
    head = bytes([0xA0 | len(b)]) if len(b) < 32 else _header(((0xD9, 8), (0xDA, 16), (0xDB, 32)), len(b))
    return head + b


def _int(i: int) -> bytes:
    return bytes([i]) if 0 <= i < 128 else struct.pack(">BQ", 0xCF, i)


def _ndarray_ext(shape, dtype_name: str, nbytes: int) -> bytes:
    """The bytes of a flax ndarray extension value up to (not including) its raw data."""
    dims = bytes([0x90 | len(shape)]) if len(shape) < 16 else struct.pack(">BH", 0xDC, len(shape))
    payload = b"\x93" + dims + b"".join(_int(int(s)) for s in shape) + _str(dtype_name)
    payload += _header(((0xC4, 8), (0xC5, 16), (0xC6, 32)), nbytes)
    length = len(payload) + nbytes
    return _header(((0xC7, 8), (0xC8, 16), (0xC9, 32)), length) + struct.pack(">b", EXT_NDARRAY) + payload


class MsgpackSink:
    """Writes a Flax msgpack file. Leaves must arrive in `order` (subtrees contiguous)."""

    in_order = True

    def __init__(self, staging: Path, infos: Sequence[LeafInfo]):
        self._infos = {i.path: i for i in infos}
        self.order = nested_order([i.path for i in infos])
        self._prefix: dict[str, bytes] = {}
        tree = nest(self.order)
        pending = [_map(len(tree))]

        def walk(node):
            for key, value in node.items():
                pending.append(_str(key))
                if isinstance(value, dict):
                    pending.append(_map(len(value)))
                    walk(value)
                else:
                    self._prefix[value] = b"".join(pending)
                    pending.clear()

        walk(tree)
        self._tail = b"".join(pending)
        self._next = 0
        self._file = open(staging, "xb")
        self._behind = WriteBehind()

    def write(self, path: str, array: np.ndarray) -> None:
        if self._next >= len(self.order) or path != self.order[self._next]:
            raise ValueError(f"msgpack leaves must be written in tree order: got {path!r}")
        info = self._infos[path]
        array = np.asarray(array, order="C")
        if tuple(array.shape) != info.shape or str(array.dtype) != info.dtype:
            raise ValueError(f"{path}: got {array.dtype}{list(array.shape)}, declared {info.dtype}{list(info.shape)}")
        f = self._file
        f.write(self._prefix[path])
        flat = array.reshape(-1)
        if array.nbytes <= MAX_CHUNK_SIZE:
            f.write(_ndarray_ext(array.shape, array.dtype.name, array.nbytes))
            f.write(memoryview(flat.view(np.uint8)))
        else:  # flax's chunked form: {CHUNKED: True, 'shape': {'0': ..}, 'chunks': {'0': ..}}
            step = max(1, MAX_CHUNK_SIZE // array.dtype.itemsize)
            chunks = [flat[i : i + step] for i in range(0, flat.size, step)]
            f.write(_map(3) + _str(CHUNKED) + b"\xc3" + _str("shape") + _map(array.ndim))
            f.write(b"".join(_str(str(i)) + _int(s) for i, s in enumerate(array.shape)))
            f.write(_str("chunks") + _map(len(chunks)))
            for i, c in enumerate(chunks):
                f.write(_str(str(i)) + _ndarray_ext(c.shape, c.dtype.name, c.nbytes))
                f.write(memoryview(c.view(np.uint8)))
        self._next += 1
        self._behind.wrote(f.fileno(), array.nbytes)

    def commit(self) -> None:
        if self._next != len(self.order):
            raise RuntimeError(f"{len(self.order) - self._next} leaves never written, e.g. {self.order[self._next]}")
        self._file.write(self._tail)
        self._file.flush()
        self._behind.wait()
        os.fsync(self._file.fileno())
        self._file.close()
