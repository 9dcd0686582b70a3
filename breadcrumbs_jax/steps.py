"""Merge steps: small pure functions over the stacked task vectors of one leaf.

A merge method is a chain of steps (as optax chains gradient transformations). Each step
maps a `LeafState` to a new one: sparsifiers mask the per-task vectors, `Weight` scales
them, `ElectSign` drops entries that disagree with the elected sign, a combiner reduces
the task axis to one delta, and `Scale` multiplies it by alpha. Steps are frozen
dataclasses, so a chain is hashable and is a static argument of the jitted leaf merge.

Steps with hyperparameters are `NumberedStep`s: `numbers` turns the hyperparameters into arrays
for a leaf of a given shape (exactly, on the host: a band's rank counts), and `apply` runs the step
with them. A leaf's merge kernel takes those arrays as arguments, so one compiled kernel serves
every setting of a sweep (`Method.structure`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .band import Band, exact_fraction
from .selection import Part, Threshold, below, evaluate, gather_capacity, rank_thresholds, reduce_groups

Granularity = Literal["tensor", "row", "global"]
GRANULARITIES = ("tensor", "row", "global")


@dataclasses.dataclass(frozen=True)
class LeafContext:
    """Per-leaf facts a step may use: row axis (of the leaf, without the task axis),
    a stable hash of the leaf path (seeds DARE), precomputed global thresholds, whether the
    leaf spans several devices (None: whether JAX sees several; see `rank_thresholds`), and
    the mantissa bits of the task vectors' inputs (the finer of the pre-trained and fine-tuned
    float dtypes; None: not known), which set how a selection gathers (`gather_capacity`)."""

    out_axis: int | None = None
    path_hash: jax.Array | None = None
    thresholds: tuple[Threshold, Threshold] | None = None
    sharded: bool | None = None
    mantissa: int | None = None


@dataclasses.dataclass(frozen=True)
class LeafState:
    """tau: [T, ...] float32 task vectors; weights: [T]; delta: the combined [...] update;
    recompute: a function that gives `tau` again from the leaf's inputs (None once a step has
    changed tau), so that passes inside loops read the inputs instead of a stored copy of tau."""

    tau: jax.Array
    weights: jax.Array
    delta: jax.Array | None = None
    stats: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    recompute: Callable[[], jax.Array] | None = None

    def replace(self, **kw) -> LeafState:
        if "tau" in kw:
            kw.setdefault("recompute", None)
        return dataclasses.replace(self, **kw)


def path_hash(path: str) -> int:
    """Stable 31-bit hash of a leaf path (the same in every process and run)."""
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


def group_axes(ndim: int, granularity: str, out_axis: int | None) -> tuple[int, ...]:
    """Axes of a [T, ...] stack ranked together: all but the task axis, and for `row`
    also all but the output axis (leaves of rank < 2 are always one group)."""
    axes = tuple(range(1, ndim))
    if granularity == "row" and out_axis is not None and ndim >= 3:
        axes = tuple(a for a in axes if a != out_axis % (ndim - 1) + 1)
    return axes


class NumberedStep:
    """A step with hyperparameters (the dataclass fields named in `NUMBERS`) that reach its code only
    through `numbers`: arrays computed on the host for a leaf, which `apply` takes as arguments."""

    NUMBERS: ClassVar[tuple[str, ...]] = ()

    def numbers(self, shape: tuple[int, ...], ctx: LeafContext) -> Any:
        """The hyperparameters as numpy arrays for a [T, ...] task-vector stack of `shape`."""
        raise NotImplementedError

    def apply(self, state: LeafState, ctx: LeafContext, numbers: Any) -> LeafState:
        """The step, with `numbers` as `self.numbers` gives them (or as traced arrays of them)."""
        raise NotImplementedError

    def __call__(self, state: LeafState, ctx: LeafContext) -> LeafState:
        return self.apply(state, ctx, self.numbers(state.tau.shape, ctx))


def _per_task(values: Any, tasks: int, what: str) -> tuple:
    """One value per task: a tuple as given (of length `tasks`, else an error naming `what`), or a
    single value repeated."""
    values = values if isinstance(values, tuple) else (values,) * tasks
    if len(values) != tasks:
        from .errors import MergeError

        raise MergeError(f"{len(values)} {what} given for {tasks} task vectors")
    return values


def _mask_stats(tau: jax.Array, keep: jax.Array, low: jax.Array, high: jax.Array) -> dict:
    mag = jnp.abs(tau)
    kept, dropped_low, dropped_high, min_kept, max_kept = reduce_groups(
        [keep.astype(jnp.int32), low.astype(jnp.int32), high.astype(jnp.int32),
         jnp.where(keep, mag, jnp.inf), jnp.where(keep, mag, -jnp.inf)],
        ["sum", "sum", "sum", "min", "max"], tuple(range(1, tau.ndim)),
    )
    return {"kept": kept, "dropped_low": dropped_low, "dropped_high": dropped_high,
            "min_kept": min_kept, "max_kept": max_kept}


def _band_masks(part: Part, lo: Threshold, hi: Threshold) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(keep, dropped_low, dropped_high): ranks in [lo, hi), below lo, from hi on."""
    low, not_high = below(part, lo), below(part, hi)
    return not_high & ~low, low, ~not_high


@dataclasses.dataclass(frozen=True)
class MagnitudeBand(NumberedStep):
    """Keep the entries of each group whose magnitude rank lies in the band (Breadcrumbs, TIES trim).
    Its numbers are each task's rank counts (`counts`); `global` granularity takes its thresholds
    from the context and has none."""

    band: Band | tuple[Band, ...]  # one band for all tasks, or one per task
    granularity: Granularity = "tensor"
    NUMBERS: ClassVar[tuple[str, ...]] = ("band",)

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            from .errors import MergeError

            raise MergeError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")

    def counts(self, tasks: int, n: int) -> np.ndarray:
        """[T, 3] int32: (n_bot, n_keep, n_top) of each task's band in groups of n entries."""
        return np.asarray([b.counts(n) for b in _per_task(self.band, tasks, "per-task bands")], np.int32)

    def numbers(self, shape: tuple[int, ...], ctx: LeafContext) -> np.ndarray | None:
        if self.granularity == "global":
            return None
        axes = group_axes(len(shape), self.granularity, ctx.out_axis)
        return self.counts(shape[0], math.prod(shape[a] for a in axes))

    @staticmethod
    def thresholds(
        parts: list[Part], counts, sharded: bool | None = None, capacity: int | None = None
    ) -> tuple[Threshold, Threshold]:
        """The thresholds of ranks n_bot and n_bot + n_keep of each task (`counts`, [T, 3])."""
        # per-task ranks broadcast against the group shape: [T] for several parts, [T, 1, ...] for one
        shape = (-1,) + (1,) * (0 if len(parts) > 1 else parts[0].keys.ndim - 1)
        lo = jnp.asarray(counts[:, 0], jnp.int32)
        hi = lo + jnp.asarray(counts[:, 1], jnp.int32)
        return tuple(rank_thresholds(parts, [lo.reshape(shape), hi.reshape(shape)], sharded=sharded, capacity=capacity))

    def _select(
        self, tau: jax.Array | Callable[[], jax.Array], ctx: LeafContext, counts
    ) -> tuple[Part, Threshold, Threshold]:
        ndim = jnp.ndim(evaluate(tau))
        part = Part(tau, group_axes(ndim, self.granularity, ctx.out_axis))
        if self.granularity == "global":
            if ctx.thresholds is None:
                raise ValueError("global granularity needs thresholds computed over all leaves")
            return part, *ctx.thresholds
        return part, *self.thresholds([part], counts, ctx.sharded, gather_capacity(part.size, ctx.mantissa))

    def mask(
        self, tau: jax.Array | Callable[[], jax.Array], ctx: LeafContext = LeafContext()
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(keep, dropped_low, dropped_high) boolean masks of a [T, ...] task-vector stack, given as
        an array or as a function that computes it."""
        counts = self.numbers(jnp.shape(evaluate(tau)), ctx)
        return _band_masks(*self._select(tau, ctx, counts))

    @staticmethod
    def _rank_stats(part: Part, lo: Threshold, hi: Threshold, counts) -> dict:
        """The report's statistics of a band of ranks (tensor or row groups): the counts follow from
        the ranks; the smallest kept |tau| is the lower threshold's value; the largest is the upper
        one's when an entry equal to it ranks below it, else the largest |tau| under it (one pass of
        two outputs, skipped when every group has such a tie, as runs of equal bf16 differences do)."""
        counts = jnp.asarray(counts, jnp.int32)  # [T, 3]: bottom, kept, top
        shape = tuple(d for a, d in enumerate(hi.value.shape) if a not in part.axes)  # [T, *groups] without group axes
        k_hi = (counts[:, 0] + counts[:, 1]).reshape((-1,) + (1,) * (len(shape) - 1))
        value = hi.value.reshape(shape)  # thresholds of tensor and row groups are group-shaped

        def largest_under():
            keys = part.keys
            under = keys < hi.value
            n_under, max_under = reduce_groups([under.astype(jnp.int32), jnp.where(under, keys, -1)], ["sum", "max"], part.axes)
            return jnp.where(n_under < k_hi, value, max_under)

        some = counts[:, 1] > 0
        tied = False if hi.under is None else jnp.all((hi.under.reshape(shape) < k_hi) | ~some.reshape(k_hi.shape))
        top = lax.cond(tied, lambda: value, largest_under)
        groups = math.prod(shape[1:])
        magnitude = functools.partial(lax.bitcast_convert_type, new_dtype=jnp.float32)
        rows = tuple(range(1, len(shape)))
        return {"kept": counts[:, 1] * groups, "dropped_low": counts[:, 0] * groups, "dropped_high": counts[:, 2] * groups,
                "min_kept": jnp.where(some, jnp.min(magnitude(lo.value.reshape(shape)), axis=rows), jnp.inf),
                "max_kept": jnp.where(some, jnp.max(magnitude(top), axis=rows), -jnp.inf)}

    def apply(self, state: LeafState, ctx: LeafContext, counts) -> LeafState:
        part, lo, hi = self._select(state.recompute or state.tau, ctx, counts)
        keep, low, high = _band_masks(part, lo, hi)
        if self.granularity == "global":  # the thresholds rank all leaves: count this one's share
            stats = _mask_stats(state.tau, keep, low, high)
        else:
            stats = self._rank_stats(part, lo, hi, counts)
        return state.replace(tau=jnp.where(keep, state.tau, 0.0), stats={**state.stats, **stats})


@dataclasses.dataclass(frozen=True)
class RandomDrop(NumberedStep):
    """DARE: drop each entry with probability p, rescale survivors by 1/(1-p); seeded per leaf and task.
    `p` is one probability for all tasks or a tuple of one per task. Its numbers are each task's
    keep probability and rescale factor (float32)."""

    p: float | tuple[float, ...]
    seed: int = 0
    rescale: bool = True
    NUMBERS: ClassVar[tuple[str, ...]] = ("p",)

    def __post_init__(self):
        for p in self.p if isinstance(self.p, tuple) else (self.p,):
            if not 0 <= float(exact_fraction(p, "drop probability p")) < 1:
                from .errors import MergeError

                raise MergeError(f"DARE drop probability p must lie in [0, 1), got {p}")

    def numbers(self, shape: tuple[int, ...], ctx: LeafContext) -> tuple[np.ndarray, np.ndarray]:
        ps = _per_task(self.p, shape[0], "per-task drop probabilities")
        keep_prob = np.asarray([1.0 - p for p in ps], np.float32)
        return keep_prob, np.asarray([1.0 / (1.0 - p) if self.rescale else 1.0 for p in ps], np.float32)

    def apply(self, state: LeafState, ctx: LeafContext, numbers) -> LeafState:
        tau = state.tau
        keep_prob, scale = numbers
        key = jax.random.fold_in(jax.random.key(self.seed), ctx.path_hash)
        keys = jax.vmap(lambda t: jax.random.fold_in(key, t))(jnp.arange(tau.shape[0]))
        keep = jax.vmap(lambda k, q: jax.random.bernoulli(k, q, tau.shape[1:]))(keys, keep_prob)
        none = jnp.zeros_like(keep)
        stats = _mask_stats(tau, keep, ~keep, none)
        return state.replace(
            tau=jnp.where(keep, tau * _expand_task(scale, tau.ndim), 0.0), stats={**state.stats, **stats}
        )


@dataclasses.dataclass(frozen=True)
class Weight(NumberedStep):
    """Multiply task t's vector by w_t."""

    weights: tuple[float, ...]
    NUMBERS: ClassVar[tuple[str, ...]] = ("weights",)

    def numbers(self, shape: tuple[int, ...], ctx: LeafContext) -> np.ndarray:
        return np.asarray(_per_task(self.weights, shape[0], "weights"), np.float32)

    def apply(self, state: LeafState, ctx: LeafContext, w) -> LeafState:
        return state.replace(tau=state.tau * _expand_task(w, state.tau.ndim), weights=jnp.asarray(w, jnp.float32))


@dataclasses.dataclass(frozen=True)
class ElectSign:
    """TIES sign election: keep only entries whose sign equals sign(sum_t tau_t)."""

    def __call__(self, state: LeafState, ctx: LeafContext) -> LeafState:
        elected = jnp.sign(_task_sum(state.tau))
        agree = jnp.sign(state.tau) == elected[None]
        return state.replace(tau=jnp.where(agree, state.tau, 0.0))


@dataclasses.dataclass(frozen=True)
class Combine:
    """Reduce the task axis: `sum`; `mean` (divide by sum of weights); `disjoint_mean`
    (divide each entry by the summed weights of the tasks that still contribute to it)."""

    kind: Literal["sum", "mean", "disjoint_mean"] = "sum"

    def __call__(self, state: LeafState, ctx: LeafContext) -> LeafState:
        total = _task_sum(state.tau)
        w = _expand_task(state.weights, state.tau.ndim)
        if self.kind == "sum":
            delta = total
        elif self.kind == "mean":
            delta = total / jnp.sum(state.weights)
        elif self.kind == "disjoint_mean":
            denom = _task_sum(jnp.where(state.tau != 0, w, 0.0))
            delta = jnp.where(denom != 0, total / jnp.where(denom != 0, denom, 1.0), 0.0)
        else:
            raise ValueError(f"unknown combine kind {self.kind!r}")
        return state.replace(delta=delta)


@dataclasses.dataclass(frozen=True)
class Scale(NumberedStep):
    """Multiply the combined delta by alpha."""

    alpha: float
    NUMBERS: ClassVar[tuple[str, ...]] = ("alpha",)

    def numbers(self, shape: tuple[int, ...], ctx: LeafContext) -> np.ndarray:
        return np.float32(self.alpha)

    def apply(self, state: LeafState, ctx: LeafContext, alpha) -> LeafState:
        return state.replace(delta=state.delta * alpha)


def _expand_task(w: jax.Array, ndim: int) -> jax.Array:
    return w.reshape((-1,) + (1,) * (ndim - 1))


def _task_sum(x: jax.Array) -> jax.Array:
    """Sum over the task axis in a fixed order (t = 0, 1, ...), so every sharding gives the same bits."""
    acc = x[0]
    for t in range(1, x.shape[0]):
        acc = acc + x[t]
    return acc


Step = Any  # any callable (LeafState, LeafContext) -> LeafState that is hashable
