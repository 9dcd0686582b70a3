"""Merge kernels kept across processes as serialized `jax.export` modules.

JAX's persistent cache keeps a compiled executable, but finds it by the lowered module: a warm
run still traces and lowers every kernel (0.15 s of Python each for a 106M-parameter Llama's
kernels, where loading the executable takes 0.1 s). The store keeps the lowered module itself,
under a key of everything that decides it: this package's source, the jax and jaxlib versions,
the backend, x64, the kernel's static arguments and its argument shapes and dtypes. A hit is
deserialized and compiled (from the persistent cache, when it holds the executable) without
tracing anything.

Static arguments must be built of this package's dataclasses (every built-in merge step), exact
scalars, strings and dtypes; a kernel with anything else (a user-defined step), or one that
jax.export refuses, is compiled without the store.
Entries are written to a temporary file, then renamed: concurrent runs share a store safely. An
unreadable entry is traced again and replaced.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np
from jax import export

log = logging.getLogger(__name__)

_FORMAT = 1  # bumped when what an entry holds changes
_store: Path | None = None


def use(path: str | os.PathLike | None) -> None:
    """Keep kernels in the folder `path` from now on (None: keep none)."""
    global _store
    _store = None if path is None else Path(path)


def compile_kernel(kernel, args: tuple, options: dict):
    """`kernel` (a jitted function) compiled for `args` (ShapeDtypeStructs or arrays) with the static
    `options`; called as compiled(*args). Taken from the store when it holds it, else traced, and
    stored when the store is on and the options have a key."""
    key = _key(args, options) if _store is not None else None
    exported = None if key is None else _stored(kernel, args, options, _store / f"{key}.exported")
    if exported is None:
        return kernel.trace(*args, **options).lower().compile()
    return jax.jit(exported.call).trace(*args).lower().compile()


def _stored(kernel, args: tuple, options: dict, path: Path) -> export.Exported | None:
    """The entry at `path`, exported and written there first if missing; None if jax.export refuses
    the kernel (a custom call it does not keep)."""
    exported = _read(path)
    if exported is None:
        try:
            exported = export.export(jax.jit(functools.partial(kernel, **options)))(*args)
        except Exception as e:
            log.warning("kernel not stored: jax.export failed (%s)", e)
            return None
        _write(path, exported.serialize())
    return exported


def _read(path: Path) -> export.Exported | None:
    try:
        return export.deserialize(bytearray(path.read_bytes()))
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged entry: traced again, and replaced
        log.warning("kernel store entry %s unreadable (%s); tracing the kernel again", path, e)
        return None


def _write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:  # a read-only or full store costs the next run a trace, nothing else
        log.warning("kernel store entry %s not written (%s)", path, e)


def _key(args: tuple, options: dict) -> str | None:
    """Hex digest of everything that decides the exported module, or None if an option has no
    exact canonical form."""
    try:
        options = _canonical(sorted(options.items()))
    except TypeError:
        return None
    described = repr((
        _FORMAT, _source_digest(), jax.__version__, jaxlib.__version__, jax.default_backend(),
        jax.config.jax_enable_x64, options,
        [None if a is None else (tuple(a.shape), str(a.dtype)) for a in args],
    ))
    return hashlib.sha256(described.encode()).hexdigest()


def _canonical(x: Any) -> Any:
    """An exact, process-independent form of a static argument (TypeError where there is none)."""
    if dataclasses.is_dataclass(x) and type(x).__module__.startswith(f"{__package__}."):
        return (type(x).__qualname__, *((f.name, _canonical(getattr(x, f.name))) for f in dataclasses.fields(x)))
    if isinstance(x, (tuple, list)):
        return tuple(_canonical(v) for v in x)
    if isinstance(x, float):
        return float.hex(x)
    if isinstance(x, Fraction):
        return f"{x.numerator}/{x.denominator}"
    if isinstance(x, np.dtype):
        return x.name
    if x is None or isinstance(x, (bool, int, str)):
        return x
    raise TypeError(f"no canonical form for {type(x).__qualname__}")


@functools.cache
def _source_digest() -> str:
    """Digest of this package's Python source (a changed kernel never loads a stale entry)."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()
