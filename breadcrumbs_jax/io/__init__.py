"""Checkpoints read and written leaf by leaf: Orbax, Hugging Face safetensors, Flax msgpack."""

from .base import LeafInfo, LeafSink, LeafSource, staged_output
from .detect import FORMATS, detect_format, format_for, open_sink, open_source
from .tree import TreeSource, load, save, write

__all__ = [
    "FORMATS", "LeafInfo", "LeafSink", "LeafSource", "TreeSource", "detect_format", "format_for", "load",
    "open_sink", "open_source", "save", "staged_output", "write",
]
