"""Merging: one jitted kernel per leaf, driven over a tree (in memory) or any leaf source.

Every merge path (in-memory trees, streaming checkpoints, sharded arrays) goes through
`merge_leaves`, so all of them produce the same bits for the same inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import kernel_store
from .errors import MergeError
from .methods import Method, Structure
from .paths import flatten
from .plan import LeafPlan, LeafRule, Layout, format_plan, plan_tree
from .report import LeafReport, MergeReport, leaf_report
from .selection import Part, Threshold, reduce_groups
from .steps import LeafContext, MagnitudeBand, path_hash
from .task_vectors import difference

Loader = Callable[[LeafPlan], tuple[Any, Sequence[Any]]]


@dataclasses.dataclass(frozen=True)
class MergeResult:
    params: Any
    report: MergeReport


def default_names(n: int) -> tuple[str, ...]:
    return tuple(f"model {t}" for t in range(n))


def is_stack(finetuned) -> bool:
    """Whether fine-tuned leaves come as one [T, ...] array rather than a sequence of T arrays."""
    return isinstance(finetuned, (np.ndarray, jax.Array))


def stack_models(finetuned) -> np.ndarray | jax.Array:
    """The fine-tuned leaves as one [T, ...] array (host arrays stay on the host)."""
    if is_stack(finetuned):
        return finetuned
    finetuned = list(finetuned)
    if all(isinstance(x, np.ndarray) for x in finetuned):
        return np.stack(finetuned)
    return jnp.stack(finetuned)


def check_leaf(plan: LeafPlan, base, finetuned, names: Sequence[str], base_name: str = "pretrained") -> None:
    """Shapes and dtypes of one leaf agree with the plan in every model; errors name leaf and model.

    `finetuned` is a sequence of T leaves or their [T, ...] stack. Dtypes compare as JAX holds
    them (float64 is float32 unless jax_enable_x64 is set)."""
    want = jax.dtypes.canonicalize_dtype(plan.dtype)
    if is_stack(finetuned):
        if len(finetuned) != len(names):
            raise MergeError(f"{len(finetuned)} fine-tuned leaves stacked for {len(names)} models", leaf=plan.path)
        models = [(n, tuple(finetuned.shape[1:]), finetuned.dtype) for n in names]
    else:
        models = [(n, tuple(np.shape(x)), x.dtype) for n, x in zip(names, finetuned)]
    for name, shape, dtype in [(base_name, tuple(np.shape(base)), base.dtype), *models]:
        if shape != plan.shape:
            raise MergeError(f"shape {shape} differs from the pre-trained {plan.shape}", leaf=plan.path, source=name)
        if jax.dtypes.canonicalize_dtype(dtype) != want:
            raise MergeError(f"dtype {np.dtype(dtype)} differs from the pre-trained {plan.dtype}", leaf=plan.path, source=name)


def _stack_tau(base, stacked) -> jax.Array:
    """[T, ...] float32 task vectors of a [T, ...] stack of fine-tuned leaves: an elementwise
    expression that XLA fuses into each pass over it, so it is never stored."""
    return difference(base[None], stacked)


def _finite(base, stacked) -> jax.Array:
    """[T + 1] whether the pre-trained leaf, then each fine-tuned one, is free of NaN and Inf.

    x - x is 0 for finite x and NaN for NaN or Inf, so its float sum is 0 exactly when every entry
    is finite: one vectorised read with no scratch on XLA:CPU, where a count of `~isfinite` stores
    a copy of the stack. The barrier keeps XLA from sharing the inputs' float32 conversion with
    the merge's pass (a shared one is stored). XLA:CPU's vectorised reductions convert float16
    through a stored copy, so float16 is counted in blocks (`reduce_groups`, slower)."""
    base, stacked = lax.optimization_barrier((base, stacked))
    axes = tuple(range(1, jnp.ndim(stacked)))

    def bad(x):
        if x.dtype == jnp.float16:
            return reduce_groups([(~jnp.isfinite(x)).astype(jnp.int32)], ["sum"], axes)[0].astype(jnp.float32)
        x = x.astype(jnp.float32)
        return jnp.sum(x - x, axis=axes)

    return jnp.concatenate([bad(base[None]), bad(stacked)]) == 0


@functools.partial(kernel_store.jit, static_argnames=("method", "out_axis", "out_dtype", "sharded"))
def _merge_kernel(
    base, stacked, leaf_hash, thresholds, numbers=None, *, method: Method | Structure, out_axis, out_dtype, sharded=None
):
    """One leaf's merge. `method`: a Method, its numbers compiled in; or a method's `Structure`,
    its numbers for this leaf given as `numbers` (`_leaf_numbers`), so that one kernel serves every
    setting of the method's hyperparameters."""
    if isinstance(method, Structure):
        if numbers is None:
            raise TypeError("a merge kernel of a method's structure takes the method's numbers")
        method = method.method
    floats = [jnp.finfo(x.dtype).nmant for x in (base, stacked) if jnp.issubdtype(x.dtype, jnp.floating)]
    mantissa = max(floats) if len(floats) == 2 else None  # a difference resolves as finely as its finer input
    ctx = LeafContext(out_axis=out_axis, path_hash=leaf_hash, thresholds=thresholds, sharded=sharded, mantissa=mantissa)
    state = method(lambda: _stack_tau(base, stacked), ctx, numbers)
    merged = (base.astype(jnp.float32) + state.delta).astype(out_dtype)
    return merged, state.stats, _finite(base, stacked)


@functools.partial(kernel_store.jit, static_argnames=("sharded",))
def _global_kernel(bases, finetuned, counts, *, sharded: bool):
    """The thresholds of each task's `counts` ([T, 3], `MagnitudeBand.counts`) over all the leaves."""
    taus = [_stack_tau(b, f) for b, f in zip(bases, finetuned)]  # stacks [T, ...] per leaf
    parts = [Part(t, tuple(range(1, t.ndim))) for t in taus]
    return MagnitudeBand.thresholds(parts, counts, sharded)


def spans_devices(*arrays) -> bool:
    """Whether any of the arrays is split over (or copied to) several devices: a merge then ranks
    with reductions that shard (`rank_thresholds(sharded=True)`), else with the faster local steps."""
    return any(isinstance(x, jax.Array) and len(x.sharding.device_set) > 1 for x in arrays)


def _raise_not_finite(plan: LeafPlan, finite, names) -> None:
    bad = [n for n, ok in zip(("pretrained", *names), np.asarray(finite)) if not ok]
    if bad:
        raise MergeError("contains NaN or Inf", leaf=plan.path, source=bad[0])


def global_thresholds(plans: Sequence[LeafPlan], load: Loader) -> dict[str, tuple[Threshold, Threshold]]:
    """Thresholds of `global` granularity: one ranked group per task over all leaves of each selector.

    Needs every such leaf of every model at once (in memory)."""
    groups: dict[MagnitudeBand, list[LeafPlan]] = {}
    for p in plans:
        if p.action == "merge" and p.method.selector and p.method.selector.granularity == "global":
            groups.setdefault(p.method.selector, []).append(p)
    out = {}
    for selector, members in groups.items():
        loaded = [load(p) for p in members]
        bases, stacks = [b for b, _ in loaded], [stack_models(f) for _, f in loaded]
        counts = selector.counts(len(stacks[0]), sum(p.size for p in members))
        lo, hi = _global_kernel(bases, stacks, counts, sharded=spans_devices(*bases, *stacks))
        for i, p in enumerate(members):
            out[p.path] = (Threshold(lo.value, (lo.index[i],)), Threshold(hi.value, (hi.index[i],)))
    return out


def merge_leaf(
    plan: LeafPlan,
    base,
    finetuned: Sequence | np.ndarray | jax.Array,
    *,
    names: Sequence[str] | None = None,
    out_dtype=None,
    thresholds: tuple[Threshold, Threshold] | None = None,
    kernel: Callable | None = None,
) -> tuple[jax.Array, LeafReport]:
    """Merge one leaf as its plan says; returns the merged leaf and its report.

    `finetuned`: the T fine-tuned leaves, as a sequence or as one [T, ...] stack (what the
    kernel takes: a stack keeps the task vectors an expression XLA never stores). `kernel`: the
    leaf's `_merge_kernel` compiled ahead for these inputs (see `merge_leaves`), if it was."""
    names = tuple(names) if names is not None else default_names(len(finetuned))
    return _finish(_start(plan, base, finetuned, names, out_dtype, thresholds, kernel))


@dataclasses.dataclass(frozen=True)
class _Started:
    """A leaf whose merge is dispatched (its kernel may still run): the merged leaf, and for merged
    leaves the kernel's statistics and finite flags, not yet on the host."""

    plan: LeafPlan
    names: tuple[str, ...]
    merged: Any
    stats: Any = None
    finite: Any = None


def _start(plan: LeafPlan, base, finetuned, names, out_dtype, thresholds, kernel) -> _Started:
    check_leaf(plan, base, finetuned, names)
    if plan.action != "merge":  # kept as given (no device copy, no x64 truncation); 'base' takes out_dtype
        return _Started(plan, names, base if plan.action == "copy" or out_dtype is None else base.astype(out_dtype))
    stack = stack_models(finetuned)
    if isinstance(base, np.ndarray) and isinstance(stack, np.ndarray):  # host leaves go in as their kernel view
        view = _kernel_view(plan)
        base, stack = base.reshape(view), stack.reshape((len(stack), *view))
    if kernel is None or not _fits(kernel, base, stack):
        kernel = functools.partial(_merge_kernel, **_kernel_options(plan, out_dtype, sharded=spans_devices(base, stack)))
    numbers = _leaf_numbers(plan, np.shape(stack))
    merged, stats, finite = kernel(base, stack, np.uint32(path_hash(plan.path)), thresholds, numbers)
    return _Started(plan, names, merged, stats, finite)  # in the kernel's view until _finish


def _finish(leaf: _Started) -> tuple[Any, LeafReport]:
    """Waits for a started leaf; raises if an input held NaN or Inf."""
    if leaf.finite is None:
        return leaf.merged, leaf_report(leaf.plan, None, len(leaf.names))
    _raise_not_finite(leaf.plan, leaf.finite, leaf.names)
    return _in_shape(leaf.merged, leaf.plan.shape), leaf_report(leaf.plan, jax.device_get(leaf.stats), len(leaf.names))


def _in_shape(merged: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A computed leaf in `shape`. On one CPU device, a view of its memory: `jnp.reshape` would copy
    it into a new buffer (a [4096, 11008] bfloat16 leaf: 45 ms against 0.6 ms)."""
    if merged.shape == shape:
        return merged
    (device, *others) = merged.devices()
    if not others and device.platform == "cpu":
        return jax.device_put(np.asarray(merged).reshape(shape), device if merged.committed else None)
    return merged.reshape(shape)


def _fits(kernel, base, stack) -> bool:
    """Whether a kernel compiled ahead takes these inputs (as the loads were said to be)."""
    want = kernel.in_avals[0][:2]
    return all(
        a.shape == np.shape(x) and a.dtype == jax.dtypes.canonicalize_dtype(x.dtype) for a, x in zip(want, (base, stack))
    )


def _kernel_view(plan: LeafPlan) -> tuple[int, ...]:
    """The shape in which a leaf's host arrays go into its kernel."""
    return kernel_shape(plan.shape) if plan.method.flat else plan.shape


def _out_axis(plan: LeafPlan) -> int | None:
    """The row axis a leaf's kernel sees (a flat method does not use it)."""
    return None if plan.method.flat else plan.out_axis


def _kernel_options(plan: LeafPlan, out_dtype, sharded: bool) -> dict:
    """The static arguments of a leaf's `_merge_kernel`: its method's structure, not its numbers."""
    dtype = jax.dtypes.canonicalize_dtype(out_dtype if out_dtype is not None else plan.dtype)
    return dict(method=plan.method.structure(), out_axis=_out_axis(plan), out_dtype=dtype, sharded=sharded)


def _leaf_numbers(plan: LeafPlan, stack_shape: tuple[int, ...]) -> tuple:
    """The numbers a leaf's kernel takes: its method's hyperparameters for a stack of that shape."""
    return plan.method.numbers(tuple(stack_shape), LeafContext(out_axis=_out_axis(plan)))


def kernel_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The view of a leaf that a `Method.flat` merge takes: (n / m, m), m the smaller of the last two
    dims. Leaves of one size then share one compiled kernel, and the long axis leads (the block
    reductions run along it: [1024, 2816] merged 1.3x to 1.9x faster as [2816, 1024] in two runs)."""
    if len(shape) < 2 or min(shape[-2:]) == 0:
        return shape
    m = min(shape[-2:])
    return (math.prod(shape) // m, m)


def merge_leaves(
    plans: Sequence[LeafPlan],
    load: Loader,
    *,
    names: Sequence[str],
    out_dtype=None,
    progress: bool = False,
    compile_ahead: Literal["host", "device"] | None = None,
    ready_first: bool = False,
) -> Iterator[tuple[LeafPlan, jax.Array, LeafReport]]:
    """Merge leaf after leaf: `load(plan)` gives (pre-trained leaf, fine-tuned leaves as a
    sequence or a [T, ...] stack); yields (plan, merged leaf, report).

    Kernels run asynchronously: the next leaf is loaded while this leaf's kernel runs, and this
    leaf is yielded (the consumer writes it) while the next one's runs. This holds at most two
    leaves of each model and two merged leaves (and all leaves with `global` granularity, whose
    thresholds need them together).

    `compile_ahead`: what the loads are, 'host' (numpy) or 'device' (uncommitted arrays on the
    default device, as `jax.device_put` leaves them); another background thread then compiles
    their kernels, each distinct one once and in order of first use, while earlier leaves load
    and merge. With `ready_first`, the next leaf is the first in `plans` whose kernel is ready,
    and the loop waits only when none is: leaves are then yielded out of order (not for merges
    whose processes must agree on the order of their collectives)."""
    thresholds = global_thresholds(plans, load)
    warm = [p for p in plans if p.action == "merge" and p.path not in thresholds] if compile_ahead else []
    with _compiled_ahead(warm, len(names), out_dtype, host=compile_ahead == "host") as compiled:
        it = _ready_first(plans, compiled) if ready_first else plans
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="merging", unit="leaf", total=len(plans))
        started = None
        for plan in it:
            base, finetuned = load(plan)
            kernel = compiled.get(plan.path)
            if kernel is not None:  # a failed compile fails again, with context, in _start
                kernel = kernel.result() if kernel.exception() is None else None
            following = _start(plan, base, finetuned, names, out_dtype, thresholds.get(plan.path), kernel)
            del base, finetuned  # the kernel holds the inputs while it runs, and no longer
            if started is not None:
                yield started.plan, *_finish(started)
            started = following
        if started is not None:
            yield started.plan, *_finish(started)


def _ready_first(plans: Sequence[LeafPlan], compiled: dict[str, futures.Future]) -> Iterator[LeafPlan]:
    """`plans`, each next one the first left whose kernel is ready (or needs none); waits for a
    kernel only when none is."""
    left = list(plans)
    while left:
        ready = next((p for p in left if p.path not in compiled or compiled[p.path].done()), None)
        if ready is None:
            futures.wait({compiled[p.path] for p in left}, return_when=futures.FIRST_COMPLETED)
            continue
        left.remove(ready)
        yield ready


@contextlib.contextmanager
def _compiled_ahead(
    plans: Sequence[LeafPlan], tasks: int, out_dtype, *, host: bool
) -> Iterator[dict[str, futures.Future]]:
    """Compiles, in background threads, the kernel of each leaf of `plans` (merged ones) for host
    leaves (`host`: their kernel view) or for single-device arrays (the leaf's shape), loading it
    from the kernel store and JAX's persistent cache where they hold it; gives a future of the
    compiled kernel per leaf path, the same one for leaves that share a kernel. One thread traces
    and lowers kernels, in order of first use, while another compiles them: XLA keeps 1.6 of 2
    cores busy, and tracing the next kernel takes 0.3 to 0.6 s of one."""
    lowering = ThreadPoolExecutor(1, thread_name_prefix="breadcrumbs-lower")
    compiling = ThreadPoolExecutor(1, thread_name_prefix="breadcrumbs-compile")
    by_kernel: dict[Any, futures.Future] = {}
    compiled = {}
    try:
        for plan in plans:
            shape = _kernel_view(plan) if host else plan.shape
            dtype = jax.dtypes.canonicalize_dtype(plan.dtype)
            numbers = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), _leaf_numbers(plan, (tasks, *shape)))
            args = (jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct((tasks, *shape), dtype),
                    jax.ShapeDtypeStruct((), jnp.uint32), None, numbers)
            options = _kernel_options(plan, out_dtype, sharded=False)
            key = (shape, dtype, tuple(options.items()))
            if key not in by_kernel:
                staged = lowering.submit(kernel_store.lower_kernel, _merge_kernel, args, options)
                by_kernel[key] = compiling.submit(_finish_kernel, staged)
            compiled[plan.path] = by_kernel[key]
        yield compiled
    finally:
        for pool in (lowering, compiling):
            pool.shutdown(wait=False, cancel_futures=True)


def _finish_kernel(staged: futures.Future):
    return kernel_store.finish_kernel(staged.result())


def _check_structure(base_paths: list[str], other: Any, name: str) -> None:
    paths = flatten(other)[0]
    if paths == base_paths:
        return
    missing = [p for p in base_paths if p not in set(paths)]
    extra = [p for p in paths if p not in set(base_paths)]
    if missing:
        raise MergeError(f"missing from this model ({len(missing)} leaves missing)", leaf=missing[0], source=name)
    if extra:
        raise MergeError(f"not in the pre-trained model ({len(extra)} extra leaves)", leaf=extra[0], source=name)
    raise MergeError("leaves are in a different order than in the pre-trained model", source=name)


def warn_empty(report: MergeReport) -> None:
    empty = report.empty()
    if empty:
        warnings.warn(
            f"{len(empty)} (leaf, task) pairs keep no entries (the band is empty for groups this small), "
            f"e.g. leaf '{empty[0][0]}' of {empty[0][1]}; see the merge report",
            stacklevel=3,
        )


def plan_for(pretrained: Any, method: Method, rules: Sequence[LeafRule] = (), layout: Layout = "flax") -> list[LeafPlan]:
    """Per-leaf plans for an in-memory tree."""
    paths, leaves, _ = flatten(pretrained)
    return plan_tree(paths, [np.shape(x) for x in leaves], [x.dtype for x in leaves], method, rules, layout)


def dry_run(pretrained: Any, method: Method, rules: Sequence[LeafRule] = (), layout: Layout = "flax") -> str:
    """The table of what `merge` would do to each leaf, without computing anything."""
    return format_plan(plan_for(pretrained, method, rules, layout))


def merge(
    pretrained: Any,
    finetuned: Sequence[Any],
    method: Method,
    *,
    rules: Sequence[LeafRule] = (),
    layout: Layout = "flax",
    names: Sequence[str] | None = None,
    out_dtype=None,
    progress: bool = False,
) -> MergeResult:
    """Merge fine-tuned PyTrees into the pre-trained one with `method`; returns params and report.

    `rules` choose per-leaf methods by path pattern; `layout` ('flax' [in, out] or 'torch'
    [out, in]) sets the default row axis; `names` label the models in errors and the report."""
    finetuned = list(finetuned)
    if not finetuned:
        raise MergeError("no fine-tuned models given (T = 0): nothing to merge")
    names = tuple(names) if names is not None else default_names(len(finetuned))
    if len(names) != len(finetuned):
        raise MergeError(f"{len(names)} names given for {len(finetuned)} fine-tuned models")
    base_paths, base_leaves, treedef = flatten(pretrained)
    for f, name in zip(finetuned, names):
        _check_structure(base_paths, f, name)
    ft_leaves = [flatten(f)[1] for f in finetuned]
    plans = plan_for(pretrained, method, rules, layout)
    index = {p: i for i, p in enumerate(base_paths)}

    def load(plan: LeafPlan):
        i = index[plan.path]
        return base_leaves[i], [leaves[i] for leaves in ft_leaves]

    kind = _loads_kind([load(p) for p in plans if p.action == "merge"])
    out, reports = {}, {}
    for plan, leaf, report in merge_leaves(plans, load, names=names, out_dtype=out_dtype, progress=progress,
                                           compile_ahead=kind, ready_first=kind is not None):
        out[plan.path], reports[plan.path] = leaf, report
    report = MergeReport(names, tuple(reports[p.path] for p in plans))
    warn_empty(report)
    return MergeResult(jax.tree_util.tree_unflatten(treedef, [out[p] for p in base_paths]), report)


def _loads_kind(loads: Sequence[tuple[Any, Sequence[Any]]]) -> Literal["host", "device"] | None:
    """What `merge_leaves` may compile ahead for, given the loads of the leaves to merge: 'host' when
    all are numpy arrays, 'device' when all are uncommitted jax.Arrays (on the default device), else None."""
    leaves = [x for base, finetuned in loads for x in (base, *finetuned)]
    if all(isinstance(x, np.ndarray) for x in leaves):
        return "host"
    if all(isinstance(x, jax.Array) and not x.committed for x in leaves):
        return "device"
    return None
