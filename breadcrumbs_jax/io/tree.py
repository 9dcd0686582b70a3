"""In-memory PyTrees as leaf sources, and whole-checkpoint save / load through the same sinks."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..paths import SEP, flatten
from .base import Index, LeafInfo, LeafSource, staged_output
from .detect import format_for, open_sink, open_source


class TreeSource:
    """A PyTree in memory, read leaf by leaf like a checkpoint."""

    format = "tree"

    def __init__(self, tree: Any, name: str = "tree", layout: str = "flax"):
        self.name, self.layout = name, layout
        paths, leaves, _ = flatten(tree)
        self._leaves = dict(zip(paths, leaves))

    def leaves(self) -> dict[str, LeafInfo]:
        return {p: LeafInfo(p, tuple(np.shape(x)), str(np.dtype(x.dtype))) for p, x in self._leaves.items()}

    def read(self, path: str, index: Index | None = None) -> np.ndarray:
        x = self._leaves[path]
        return np.asarray(x if index is None else x[index])

    def close(self) -> None:
        pass


def write(source: LeafSource, target: str | os.PathLike, *, format: str | None = None,
          overwrite: bool = False, shard_size: int | None = None) -> None:
    """Copy every leaf of `source` to a new checkpoint at `target` (format from its name unless given)."""
    infos = list(source.leaves().values())
    with staged_output(target, overwrite=overwrite) as staging:
        sink = open_sink(format or format_for(target), staging, infos, like=source, shard_size=shard_size)
        for path in sink.order:
            sink.write(path, source.read(path))
        sink.commit()


def save(tree: Any, target: str | os.PathLike, *, format: str | None = None, overwrite: bool = False,
         shard_size: int | None = None) -> None:
    """Write a PyTree of arrays as a checkpoint (Orbax, or by the target's suffix safetensors / msgpack)."""
    write(TreeSource(tree), target, format=format, overwrite=overwrite, shard_size=shard_size)


def load(path: str | os.PathLike) -> dict:
    """A whole checkpoint as nested dicts of numpy arrays (keys split at '/')."""
    source = open_source(path)
    try:
        out: dict = {}
        for p in source.leaves():
            node = out
            *parents, last = p.split(SEP)
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = source.read(p)
        return out
    finally:
        source.close()
