"""How merge kernels compile (`compiler_options`, `jit`), and how they are kept across processes
as serialized executables.

JAX's persistent cache keeps a compiled executable, but finds it by the lowered module: a warm
run first traces and lowers every kernel and hashes the module (0.35 to 0.45 s per kernel of a
106M-parameter Llama, more than loading the executable takes). The store keeps the executable
itself, under a key of everything that decides it: this package's source, the jax and jaxlib
versions, the backend, its version and device kind (on CPU, the host's instruction-set flags,
which XLA compiles for), the compiler options, x64, the kernel's static arguments (a dataclass by
the fields its equality compares) and its argument tree, shapes and dtypes. A hit is loaded
without tracing, lowering or compiling anything (0.05 to 0.4 s). A miss is compiled under a name
made of the key, so JAX's persistent cache gives it only where it was stored before (and the entry
since lost); such an executable is not stored again: serialized again, it would lack its code.

Static arguments must be built of this package's dataclasses (every built-in merge step), exact
scalars, strings and dtypes; a kernel with anything else (a user-defined step), or one whose
executable cannot be serialized, is compiled without the store.
Entries are written to a temporary file, then renamed: concurrent runs share a store safely. An
unreadable entry is compiled again and replaced. Like JAX's persistent cache, the store runs what
it loads: keep it where only you can write.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import pickle
import platform
import tempfile
import threading
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np
from jax.experimental import serialize_executable

log = logging.getLogger(__name__)

_FORMAT = 2  # bumped when what an entry holds changes
_store: Path | None = None
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
# XLA:CPU's classic fusion emitters at LLVM -O1 compile a merge kernel in 0.55x to 0.65x the time
# of its defaults (MLIR fusion emitters, -O3), with the same bits; whole merges run as fast (README:
# Performance). Either option alone saves little.
_CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1}


class _Hits(threading.local):
    n = 0  # JAX persistent-cache hits of this thread's compiles


_hits = _Hits()


def _count_hit(event: str, **_) -> None:
    if event == _CACHE_HIT:
        _hits.n += 1


jax.monitoring.register_event_listener(_count_hit)


def use(path: str | os.PathLike | None) -> None:
    """Keep kernels in the folder `path` from now on (None: keep none). Forgets the executables
    this process kept (`clear`), so that each kernel is loaded from, or written to, the new store."""
    global _store
    _store = None if path is None else Path(path)
    clear()


_here: dict[Any, Any] = {}  # executables this process compiled or loaded, by `_here_key`


def clear() -> None:
    """Forget the executables this process compiled or loaded (as `jax.clear_caches` does jit's)."""
    _here.clear()


def compile_kernel(kernel, args: tuple, options: dict):
    """`kernel` (a jitted function) compiled for `args` (ShapeDtypeStructs or arrays) with the static
    `options`; called as compiled(*args). Loaded from the store when it holds it, else compiled
    with `compiler_options()`, and stored when the store is on and the options have a key."""
    return finish_kernel(lower_kernel(kernel, args, options))


@dataclasses.dataclass(frozen=True)
class Staged:
    """The first half of `compile_kernel`: an executable the store held (`compiled`), or the
    module to compile (`lowered`) and where to store its executable (`path`, None: nowhere)."""

    compiled: Any = None
    lowered: Any = None
    path: Path | None = None
    here: Any = None  # the key `finish_kernel` keeps the executable under in this process


def lower_kernel(kernel, args: tuple, options: dict) -> Staged:
    """The kernel as this process compiled it before, or loaded from the store, or traced and
    lowered (Python work, under the GIL); a thread may lower the next kernel while `finish_kernel`
    compiles this one (XLA, without it)."""
    here = _here_key(kernel, args, options)
    if here is not None and here in _here:
        return Staged(compiled=_here[here])
    key = _key(args, options) if _store is not None else None
    if key is None:
        return Staged(lowered=kernel.trace(*args, **options).lower(), here=here)
    path = _store / f"{key}.executable"
    compiled = _read(path)
    if compiled is not None:
        return Staged(compiled=compiled, here=here)
    return Staged(lowered=jax.jit(_named(kernel, options, key)).trace(*args).lower(), path=path, here=here)


def finish_kernel(staged: Staged):
    """The executable of a `lower_kernel` result: compiled with `compiler_options()` and stored
    where it has a path; kept for this process where it has a `here` key."""
    compiled = staged.compiled
    if compiled is None:
        hits = _hits.n
        compiled = staged.lowered.compile(compiler_options=compiler_options())
        # an executable JAX's persistent cache gave serializes without its code (jax 0.10.2, CPU):
        # it is not stored, and the next run takes it from that cache again
        if staged.path is not None and _hits.n == hits:
            _store_compiled(compiled, staged.path)
    if staged.here is not None:
        _here[staged.here] = compiled
    return compiled


def _signature(args: tuple) -> tuple[Any, tuple]:
    """The argument tree's structure and its leaves' (shape, dtype)."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((tuple(a.shape), np.dtype(a.dtype)) for a in leaves)


def _here_key(kernel, args: tuple, options: dict):
    """What decides a kernel's executable within this process (None where an option is unhashable)."""
    key = (kernel, *_signature(args), tuple(sorted(options.items())), jax.config.jax_enable_x64)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def compiler_options() -> dict:
    """The XLA options merge kernels compile with: `_CPU_COMPILER_OPTIONS` on CPU, none elsewhere."""
    return dict(_CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else {}


class jit:  # lower case: used as jax.jit is
    """`jax.jit(fun, **kwargs)` compiling with `compiler_options()`, made at its first use: the
    options depend on the backend, which JAX must not pick at import (`jax.distributed.initialize`
    and `XLA_FLAGS` come first). Like any jit with compiler options, it is called at top level
    only; inside another jit, call `fun` (its `__wrapped__`)."""

    def __init__(self, fun: Callable, **kwargs):
        functools.update_wrapper(self, fun)
        self._fun, self._kwargs = fun, kwargs

    @functools.cached_property
    def _jitted(self):
        return jax.jit(self._fun, compiler_options=compiler_options(), **self._kwargs)

    def __call__(self, *args, **kwargs):
        return self._jitted(*args, **kwargs)

    def __getattr__(self, name: str):  # trace, lower, eval_shape, ...
        return getattr(self._jitted, name)


def _named(kernel, options: dict, key: str):
    """`kernel` with its static `options`, as a function named after the store key: JAX's
    persistent cache keys a module by its name too, so it holds this kernel only from a run that
    also stored it (not from one with another key, e.g. before an upgrade)."""

    def call(*args):
        return kernel.__wrapped__(*args, **options)

    call.__name__ = call.__qualname__ = f"stored_kernel_{key[:16]}"
    return call


def _read(path: Path):
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        payload, in_tree, out_tree, device_ids = pickle.loads(data)
        devices = {d.id: d for d in jax.devices()}
        return serialize_executable.deserialize_and_load(
            payload, in_tree, out_tree, execution_devices=[devices[i] for i in device_ids])
    except Exception as e:  # a damaged entry: compiled again, and replaced
        log.warning("kernel store entry %s unreadable (%s); compiling the kernel again", path, e)
        return None


def _store_compiled(compiled, path: Path) -> None:
    """Writes `compiled`, with the ids of the devices it runs on, to `path`."""
    try:
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    except Exception as e:
        log.warning("kernel not stored: its executable cannot be serialized (%s)", e)
        return
    device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
    _write(path, pickle.dumps((payload, in_tree, out_tree, device_ids)))


def _write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:  # a read-only or full store costs the next run a compile, nothing else
        log.warning("kernel store entry %s not written (%s)", path, e)


def _key(args: tuple, options: dict) -> str | None:
    """Hex digest of everything that decides the executable, or None if an option has no
    exact canonical form."""
    treedef, avals = _signature(args)
    try:
        options = _canonical(sorted(options.items()))
    except TypeError:
        return None
    described = repr((
        _FORMAT, _source_digest(), jax.__version__, jaxlib.__version__, _target(),
        sorted(compiler_options().items()), jax.config.jax_enable_x64, options,
        str(treedef), [(shape, str(dtype)) for shape, dtype in avals],
    ))
    return hashlib.sha256(described.encode()).hexdigest()


def _canonical(x: Any) -> Any:
    """An exact, process-independent form of a static argument (TypeError where there is none)."""
    if dataclasses.is_dataclass(x) and type(x).__module__.startswith(f"{__package__}."):
        fields = (f for f in dataclasses.fields(x) if f.compare)  # what its equality ignores decides nothing
        return (type(x).__qualname__, *((f.name, _canonical(getattr(x, f.name))) for f in fields))
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


@functools.cache
def _target() -> tuple[str, ...]:
    """What an executable is compiled for: the default backend, its version and device kind, and on
    CPU the host's instruction-set flags (XLA:CPU compiles for the host's features)."""
    device = jax.devices()[0]
    target = (jax.default_backend(), device.client.platform_version, device.device_kind)
    if device.platform != "cpu":
        return target
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return (*target, platform.machine(), platform.processor(), flags.strip())
