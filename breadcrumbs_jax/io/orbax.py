"""Orbax checkpoints (Flax, T5X, MaxText): read and written one leaf at a time.

Reading: shapes and dtypes come from the checkpoint's metadata; one leaf is restored by a
`PyTreeCheckpointer` restore whose every other leaf is `ocp.PLACEHOLDER`. Accepted paths: a
PyTree checkpoint folder (holding ``_METADATA``), a checkpoint whose items are subfolders
(``state``, ``default``, ``items``, ...), or a `CheckpointManager` folder (latest step).

Writing: ``orbax.checkpoint.experimental.v1.partial.save`` adds leaves to one checkpoint
(buffered up to `flush_bytes`), ``partial.finalize`` completes it. The result is an Orbax v1
checkpoint: ``ocp.v1.load(path)`` loads it, as does
``ocp.PyTreeCheckpointer().restore(path / 'state')``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.experimental.v1 import partial

from ..errors import MergeError
from ..paths import SEP, flatten
from .base import Index, LeafInfo, checked

ITEM_NAMES = ("state", "default", "items", "params")


def pytree_dir(path: Path) -> Path:
    """The folder of `path` that holds the PyTree (its ``_METADATA``)."""
    if (path / "_METADATA").is_file():
        return path
    subdirs = [d for d in sorted(path.iterdir()) if d.is_dir()]
    items = [d for d in subdirs if (d / "_METADATA").is_file()]
    preferred = [d for name in ITEM_NAMES for d in items if d.name == name]
    if len(items) == 1 or preferred:
        return (preferred or items)[0]
    if items:
        raise MergeError(f"several checkpoint items ({', '.join(d.name for d in items)}); give one of their folders", source=str(path))
    steps = [d for d in subdirs if d.name.isdigit()]
    if steps:
        return pytree_dir(max(steps, key=lambda d: int(d.name)))
    raise MergeError("not an Orbax checkpoint (no _METADATA in it, its items or its latest step)", source=str(path))


class OrbaxSource:
    """An Orbax PyTree checkpoint; paths join the tree's keys with '/'."""

    format = "orbax"
    layout = "flax"

    def __init__(self, path: str | os.PathLike):
        self.name = str(path)
        self.directory = pytree_dir(Path(path))
        try:
            meta = ocp.StandardCheckpointer().metadata(self.directory).item_metadata
            tree = meta.tree if meta is not None else None
        except Exception as e:  # orbax raises many types on a damaged checkpoint
            raise MergeError(f"unreadable Orbax metadata: {_short(e)}", source=self.name) from None
        if tree is None:
            raise MergeError("missing or damaged Orbax PyTree metadata", source=self.name)
        paths, metas, self._treedef = flatten(tree)
        self._metas = metas
        self._index = {p: i for i, p in enumerate(paths)}
        self._infos = {}
        for p, m in zip(paths, metas):
            if getattr(m, "shape", None) is None or getattr(m, "dtype", None) is None:
                raise MergeError(f"leaf is not an array ({type(m).__name__})", leaf=p, source=self.name)
            self._infos[p] = LeafInfo(p, tuple(int(s) for s in m.shape), str(np.dtype(m.dtype)))
        self._checkpointer = ocp.PyTreeCheckpointer()

    def leaves(self) -> dict[str, LeafInfo]:
        return dict(self._infos)

    def _only(self, i: int, value):
        return jax.tree_util.tree_unflatten(
            self._treedef, [value if j == i else ocp.PLACEHOLDER for j in range(len(self._metas))]
        )

    def read(self, path: str, index: Index | None = None) -> np.ndarray:
        """One leaf (restored whole; `index` slices it afterwards)."""
        i = self._index[path]
        args = ocp.args.PyTreeRestore(
            item=self._only(i, self._metas[i]), restore_args=self._only(i, ocp.RestoreArgs(restore_type=np.ndarray))
        )
        try:
            restored = self._checkpointer.restore(self.directory, args=args)
        except Exception as e:  # tensorstore and orbax raise many types on damaged data
            raise MergeError(f"unreadable: {_short(e)}", leaf=path, source=self.name) from None
        array = np.asarray(jax.tree_util.tree_leaves(restored)[i])
        return checked(self, self._infos[path], array if index is None else array[index], index)

    def read_sharded(self, path: str, sharding: jax.sharding.Sharding) -> jax.Array:
        """One leaf as a global array with `sharding`: this process reads only its devices' shards."""
        i, info = self._index[path], self._infos[path]
        dtype = jax.dtypes.canonicalize_dtype(info.dtype)  # as device arrays hold it (float64 -> float32 without x64)
        target = jax.ShapeDtypeStruct(info.shape, dtype, sharding=sharding)
        args = ocp.args.PyTreeRestore(
            item=self._only(i, target), restore_args=self._only(i, ocp.ArrayRestoreArgs(sharding=sharding))
        )
        try:
            restored = self._checkpointer.restore(self.directory, args=args)
        except Exception as e:  # tensorstore and orbax raise many types on damaged data
            raise MergeError(f"unreadable: {_short(e)}", leaf=path, source=self.name) from None
        array = jax.tree_util.tree_leaves(restored)[i]
        if array.shape != info.shape or array.dtype != dtype:
            raise MergeError(f"corrupt checkpoint: read {array.dtype}{list(array.shape)}, metadata says "
                             f"{dtype}{list(info.shape)}", leaf=path, source=self.name)
        return array

    def close(self) -> None:
        self._checkpointer.close()


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


class OrbaxSink:
    """Writes an Orbax checkpoint leaf by leaf; leaves are saved in batches of `flush_bytes`."""

    in_order = False

    def __init__(self, staging: Path, infos: Sequence[LeafInfo], *, flush_bytes: int = 64 << 20):
        self.order = [i.path for i in infos]
        self.flush_bytes = flush_bytes
        self._staging = staging
        self._buffer: dict = {}
        self._nbytes = 0

    def write(self, path: str, array: np.ndarray) -> None:
        node = self._buffer
        *parents, last = path.split(SEP)
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = array if isinstance(array, jax.Array) else np.asarray(array)  # global arrays stay sharded
        self._nbytes += node[last].nbytes
        if self._nbytes >= self.flush_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            partial.save(self._staging, self._buffer)
            self._buffer, self._nbytes = {}, 0

    def commit(self) -> None:
        self._flush()
        partial.finalize(self._staging)
