"""Which format a checkpoint is in, and opening sources and sinks by format."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import MergeError
from .base import LeafInfo, LeafSink, LeafSource

FORMATS = ("orbax", "safetensors", "msgpack")


def detect_format(path: str | os.PathLike) -> str:
    """'safetensors', 'msgpack' or 'orbax', from the file name, the folder's contents or the first bytes."""
    p = Path(path)
    if not p.exists():
        raise MergeError("no such file or directory", source=str(path))
    if p.is_dir():
        if any(p.glob("*.safetensors")) or any(p.glob("*.safetensors.index.json")):
            return "safetensors"
        return "orbax"
    if p.suffix == ".safetensors":
        return "safetensors"
    if p.suffix == ".msgpack":
        return "msgpack"
    with open(p, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "msgpack"
    raise MergeError("unknown checkpoint format (expected an Orbax folder, safetensors or Flax msgpack)", source=str(path))


def open_source(path: str | os.PathLike, format: str | None = None) -> LeafSource:
    """Open a checkpoint for leaf-by-leaf reading, detecting its format unless given."""
    format = format or detect_format(path)
    if not Path(path).exists():
        raise MergeError("no such file or directory", source=str(path))
    if format == "safetensors":
        from .safetensors import SafetensorsSource

        return SafetensorsSource(path)
    if format == "msgpack":
        from .msgpack import MsgpackSource

        return MsgpackSource(path)
    if format == "orbax":
        from .orbax import OrbaxSource

        return OrbaxSource(path)
    raise MergeError(f"unknown format {format!r}; known: {', '.join(FORMATS)}")


def format_for(target: str | os.PathLike) -> str:
    """The output format a target name implies: by suffix, else Orbax."""
    suffix = Path(target).suffix
    return {".safetensors": "safetensors", ".msgpack": "msgpack"}.get(suffix, "orbax")


def open_sink(
    format: str,
    staging: Path,
    infos: Sequence[LeafInfo],
    *,
    like: LeafSource | None = None,
    shard_size: int | None = None,
) -> LeafSink:
    """A sink writing `infos` to `staging` in `format`. Safetensors output into a folder mirrors
    `like`'s shard layout, metadata and non-weight files when `like` is a safetensors model
    folder (unless `shard_size` is given)."""
    if shard_size is not None and format != "safetensors":
        raise MergeError(f"shard_size applies to safetensors output only, not {format}")
    if format == "safetensors":
        from .safetensors import SafetensorsSink, SafetensorsSource

        kw = {}
        if isinstance(like, SafetensorsSource) and not staging.name.endswith(".safetensors"):
            kw = dict(metadata=like.metadata, extra_files=like.extra_files())
            if like.sharded and shard_size is None:
                kw["shard_of"] = {i.path: like.shard_of(i.path) for i in infos}
        return SafetensorsSink(staging, infos, shard_size=shard_size, **kw)
    if format == "msgpack":
        from .msgpack import MsgpackSink

        return MsgpackSink(staging, infos)
    if format == "orbax":
        from .orbax import OrbaxSink

        return OrbaxSink(staging, infos)
    raise MergeError(f"unknown output format {format!r}; known: {', '.join(FORMATS)}")
