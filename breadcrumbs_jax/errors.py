"""Errors raised on bad merge input."""

from __future__ import annotations


class MergeError(ValueError):
    """Bad merge input. The message names the leaf and the source file when they are known."""

    def __init__(self, message: str, *, leaf: str | None = None, source: str | None = None):
        self.leaf = leaf
        self.source = source
        self.reason = message
        where = []
        if source:
            where.append(str(source))
        if leaf:
            where.append(f"leaf '{leaf}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
