"""Flushing written data to disk while later data is still being written.

A sink fsyncs its files before the output is renamed into place, so that a crash never leaves
a complete-looking but unwritten output. Left to the end, that fsync waits for the whole output
to reach the disk (0.34 s for a 212 MB file here). `WriteBehind` starts that work early: after
every `every` bytes written to a file it runs one `fdatasync` of it in a background thread (one
at a time), so the final fsync waits only for the rest (0.02 to 0.03 s for the same file).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

_EVERY = 32 << 20
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class WriteBehind:
    """Background `fdatasync`s of open file descriptors as bytes are written to them."""

    def __init__(self, every: int | None = None):
        self.every = _EVERY if every is None else every
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._unsynced: dict[int, int] = {}  # fd -> bytes written since its last sync began

    def wrote(self, fd: int, nbytes: int) -> None:
        """Note `nbytes` written to `fd`; start syncing it if enough are unsynced and no sync runs.
        Raises the error of an earlier background sync."""
        self._unsynced[fd] = self._unsynced.get(fd, 0) + nbytes
        if self._unsynced[fd] < self.every:
            return
        if self._pending is not None:
            if not self._pending.done():
                return
            self._pending.result()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="breadcrumbs-sync")
        self._unsynced[fd] = 0
        self._pending = self._pool.submit(_datasync, fd)

    def wait(self) -> None:
        """Wait for the running sync, if any; raises its error. Call before closing a file."""
        pending, self._pending = self._pending, None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if pending is not None:
            pending.result()
