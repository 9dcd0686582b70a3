"""Hugging Face safetensors: one file, or a folder of shards with ``model.safetensors.index.json``.

Leaf paths are the tensor names (``model.layers.0.self_attn.q_proj.weight``); weights are in
PyTorch layout ([out, in]). The writer streams: it knows every tensor's shape and dtype in
advance, so it writes each file's header first and each tensor at its offset as it arrives.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import MergeError
from .base import Index, LeafInfo, checked, read_array
from .write_behind import WriteBehind

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_MAX_HEADER = 100 << 20

DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
CODES = {v: k for k, v in DTYPES.items()}


def read_header(file: Path) -> tuple[dict, dict[str, tuple[LeafInfo, tuple[int, int]]], int]:
    """(metadata, {name: (LeafInfo, data offsets)}, where the data starts) of one file, checked
    against the file size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_HEADER):
            raise MergeError("not a safetensors file (bad header length)", source=str(file))
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MergeError(f"corrupt safetensors header: {e}", source=str(file)) from None
    if not isinstance(header, dict):
        raise MergeError("corrupt safetensors header", source=str(file))
    meta = header.pop("__metadata__", None) or {}
    tensors, end = {}, 0
    for name, t in header.items():
        try:
            dtype = DTYPES[t["dtype"]]
            shape = tuple(int(s) for s in t["shape"])
            begin, stop = (int(o) for o in t["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"corrupt safetensors header entry {t!r}", leaf=name, source=str(file)) from None
        info = LeafInfo(name, shape, dtype)
        if stop - begin != info.nbytes:
            raise MergeError("corrupt safetensors header: offsets do not match shape and dtype", leaf=name, source=str(file))
        tensors[name] = (info, (begin, stop))
        end = max(end, stop)
    if size != 8 + n + end:
        raise MergeError(f"truncated or corrupt: {size} bytes, the header describes {8 + n + end}", source=str(file))
    return meta, dict(sorted(tensors.items(), key=lambda kv: kv[1][1])), 8 + n


class SafetensorsSource:
    """A ``.safetensors`` file, or a folder of them (sharded with an index, or not)."""

    format = "safetensors"
    layout = "torch"
    reads_into = True

    def __init__(self, path: str | os.PathLike):
        self.name = str(path)
        root = Path(path)
        if root.is_dir():
            index = root / INDEX_NAME
            if not index.exists():
                found = sorted(root.glob("*.safetensors.index.json"))
                index = found[0] if len(found) == 1 else index
            if index.exists():
                weight_map = self._weight_map(index)
                files = [root / f for f in dict.fromkeys(weight_map.values())]
            else:
                weight_map, files = None, sorted(root.glob("*.safetensors"))
            if not files:
                raise MergeError("no .safetensors files in this folder", source=self.name)
        else:
            weight_map, files = None, [root]
        self.files = files
        self.metadata: dict = {}
        self._offset: dict[str, int] = {}
        self._infos: dict[str, LeafInfo] = {}
        self._file_of: dict[str, Path] = {}
        for file in files:
            if not file.is_file():
                raise MergeError("shard listed in the index is missing", source=str(file))
            meta, tensors, data_start = read_header(file)
            self.metadata = self.metadata or meta
            for name, (info, (begin, _)) in tensors.items():
                if name in self._infos:
                    raise MergeError(f"tensor appears in two shards ({self._file_of[name].name}, {file.name})", leaf=name, source=self.name)
                self._infos[name], self._file_of[name] = info, file
                self._offset[name] = data_start + begin
        if weight_map is not None:
            for name, file in weight_map.items():
                if self._file_of.get(name, root / file) != root / file or name not in self._infos:
                    raise MergeError(f"the index puts this tensor in {file}, which does not hold it", leaf=name, source=self.name)

    def _weight_map(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MergeError(f"unreadable safetensors index: {e!r}", source=str(index)) from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise MergeError("the index has an empty weight_map", source=str(index))
        return weight_map

    def leaves(self) -> dict[str, LeafInfo]:
        return dict(self._infos)

    def shard_of(self, path: str) -> str:
        """The file (name) holding a tensor."""
        return self._file_of[path].name

    @property
    def sharded(self) -> bool:
        return Path(self.name).is_dir() and (len(self.files) > 1 or (Path(self.name) / INDEX_NAME).exists())

    def extra_files(self) -> list[Path]:
        """Files of a model folder other than weights (config.json, tokenizer files, ...)."""
        root = Path(self.name)
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES))

    def read(self, path: str, index: Index | None = None, out: np.ndarray | None = None) -> np.ndarray:
        info, file = self._infos[path], self._file_of[path]
        try:
            array = read_array(file, self._offset[path], info.shape, info.dtype, index, out)
        except (OSError, ValueError) as e:  # the file changed since its header was read
            raise MergeError(f"unreadable: {e}", leaf=path, source=str(file)) from None
        return checked(self, info, array, index)

    def close(self) -> None:
        pass


class SafetensorsSink:
    """Writes a ``.safetensors`` file (when the target's name ends so), or a model folder: one
    ``model.safetensors``, or shards with an index. Each file's header is written up front."""

    in_order = False

    def __init__(
        self,
        staging: Path,
        infos: Sequence[LeafInfo],
        *,
        shard_of: Mapping[str, str] | None = None,
        shard_size: int | None = None,
        metadata: Mapping[str, str] | None = None,
        extra_files: Sequence[Path] = (),
    ):
        self.order = [i.path for i in infos]
        self.single_file = staging.name.endswith(".safetensors")
        if self.single_file and (shard_of or shard_size):
            raise MergeError("a single .safetensors output cannot be sharded; give a folder name", source=staging.name)
        self.metadata = {"format": "pt", **(metadata or {})}
        assignment = self._assign(infos, shard_of, shard_size)
        self.root = staging
        if not self.single_file:
            staging.mkdir()
        self.index = bool(shard_of) or len(set(assignment.values())) > 1
        self.extra_files = list(extra_files)
        self._infos = {i.path: i for i in infos}
        self._assignment = assignment
        self._files: dict[str, tuple[int, dict[str, int]]] = {}  # file -> (fd, name -> data start)
        self._pending = set(self.order)
        self._behind = WriteBehind()
        for file in dict.fromkeys(assignment.values()):
            self._open(file, [i for i in infos if assignment[i.path] == file])

    def _assign(self, infos, shard_of, shard_size) -> dict[str, str]:
        if shard_of:
            missing = [i.path for i in infos if i.path not in shard_of]
            if missing:
                raise MergeError("no shard for this tensor in the layout to mirror", leaf=missing[0])
            return {i.path: shard_of[i.path] for i in infos}
        if self.single_file or not shard_size:
            return {i.path: SINGLE_NAME for i in infos}
        groups, size = [[]], 0
        for i in infos:
            if groups[-1] and size + i.nbytes > shard_size:
                groups.append([])
                size = 0
            groups[-1].append(i.path)
            size += i.nbytes
        if len(groups) == 1:
            return {p: SINGLE_NAME for p in groups[0]}
        n = len(groups)
        return {p: f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k, g in enumerate(groups) for p in g}

    def _path(self, file: str) -> Path:
        return self.root if self.single_file else self.root / file

    def _open(self, file: str, infos: list[LeafInfo]) -> None:
        # widest dtypes first keeps every tensor aligned to its item size
        infos = sorted(infos, key=lambda i: -np.dtype(i.dtype).itemsize)
        header, starts, offset = {"__metadata__": dict(self.metadata)}, {}, 0
        for i in infos:
            header[i.path] = {"dtype": CODES[i.dtype], "shape": list(i.shape), "data_offsets": [offset, offset + i.nbytes]}
            starts[i.path] = offset
            offset += i.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        fd = os.open(self._path(file), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, struct.pack("<Q", len(text)) + text)
        os.ftruncate(fd, 8 + len(text) + offset)
        self._files[file] = (fd, {p: 8 + len(text) + s for p, s in starts.items()})

    def write(self, path: str, array: np.ndarray) -> None:
        info = self._infos[path]
        array = np.asarray(array, order="C")
        if tuple(array.shape) != info.shape or str(array.dtype) != info.dtype:
            raise ValueError(f"{path}: got {array.dtype}{list(array.shape)}, declared {info.dtype}{list(info.shape)}")
        fd, starts = self._files[self._assignment[path]]
        data, pos = memoryview(array.reshape(-1).view(np.uint8)), starts[path]
        while data:
            n = os.pwrite(fd, data, pos)
            data, pos = data[n:], pos + n
        self._pending.discard(path)
        self._behind.wrote(fd, array.nbytes)

    def commit(self) -> None:
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} tensors never written, e.g. {sorted(self._pending)[0]}")
        self._behind.wait()
        for fd, _ in self._files.values():
            os.fsync(fd)
            os.close(fd)
        self._files.clear()
        if self.single_file:
            return
        if self.index:
            total = sum(i.nbytes for i in self._infos.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self._assignment.items()))}
            (self.root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        for f in self.extra_files:
            shutil.copy2(f, self.root / f.name)

    def __del__(self):
        if hasattr(self, "_behind"):  # a sync may still run on a file about to close
            with contextlib.suppress(OSError):
                self._behind.wait()
        for fd, _ in getattr(self, "_files", {}).values():
            os.close(fd)
