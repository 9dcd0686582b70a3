"""Exact rank selection of |x| within groups, by counting passes: no sort, no gather.

An entry's rank in its group is its position when the group is sorted by magnitude, ties
broken by flat index (SPEC.md). The entry of rank k is found as a composite threshold
(value, index): an entry ranks below k exactly when ``key < value`` or
``key == value and index < index_threshold``. Both parts are found by bisection, each step
one counting pass; the index bisection runs only when a group's target falls strictly inside
a run of equal keys (with continuous data it seldom does). Counts are plain reductions over the group's axes, so under jit with a
sharded input they compile to local counts plus a tiny all-reduce, never a gather.

A group may span several arrays ("parts", e.g. all leaves of a task vector for `global`
granularity); ties are then ordered by part, then by flat index inside the part.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

KEY_LIMIT = 1 << 31  # greater than the key of every finite magnitude
_VALUE_STEPS = 32  # bisection over [0, KEY_LIMIT]


def magnitude_keys(x: jax.Array) -> jax.Array:
    """uint32 keys that sort like |x| (float32 bits with the sign cleared; -0 == +0)."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return bits & jnp.uint32(0x7FFFFFFF)


def flat_index(shape: Sequence[int], axes: Sequence[int]) -> jax.Array:
    """int32 row-major position of each entry within its group (the entries sharing the other axes)."""
    idx = jnp.zeros(shape, jnp.int32)
    stride = 1
    for ax in sorted(axes, reverse=True):
        idx = idx + lax.broadcasted_iota(jnp.int32, shape, ax) * stride
        stride *= shape[ax]
    return idx


@dataclasses.dataclass(frozen=True)
class Part:
    """One array of a group: its magnitude keys and the axes its group is ranked over."""

    keys: jax.Array
    axes: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.keys.shape[a] for a in self.axes)

    @property
    def index(self) -> jax.Array:
        return flat_index(self.keys.shape, self.axes)


@dataclasses.dataclass(frozen=True)
class Threshold:
    """Composite key of one rank per group: `value` (group-shaped), one index threshold per part."""

    value: jax.Array
    index: tuple[jax.Array, ...]


jax.tree_util.register_dataclass(Threshold, data_fields=["value", "index"], meta_fields=[])


def _expand(g: jax.Array, ndim: int) -> jax.Array:
    return g.reshape(g.shape + (1,) * (ndim - g.ndim))


def _count(part: Part, pred: jax.Array, multi: bool) -> jax.Array:
    c = jnp.sum(pred, axis=part.axes, keepdims=True, dtype=jnp.int32)
    return c.reshape(c.shape[:1]) if multi else c


def below(part: Part, thr: Threshold, p: int = 0) -> jax.Array:
    """Entries of `part` whose rank is below the threshold's rank."""
    nd = part.keys.ndim
    value, index = _expand(thr.value, nd), _expand(thr.index[p], nd)
    return (part.keys < value) | ((part.keys == value) & (part.index < index))


def rank_thresholds(parts: Sequence[Part], ranks: Sequence[int | jax.Array]) -> list[Threshold]:
    """The composite threshold of each rank k in `ranks` (0 <= k <= group size).

    k == group size gives a threshold above every entry. Groups are the entries sharing all
    non-ranked axes; with several parts the ranked axes must be all but the leading one.
    """
    multi = len(parts) > 1
    count = lambda p, pred: _count(parts[p], pred, multi)  # noqa: E731
    total = lambda pred_fn: sum(count(p, pred_fn(p)) for p in range(len(parts)))  # noqa: E731
    gshape = total(lambda p: jnp.zeros(parts[p].keys.shape, bool)).shape
    ks = [jnp.broadcast_to(jnp.asarray(k, jnp.int32), gshape) for k in ranks]

    def value_step(_, carry):
        out = []
        for (lo, hi), k in zip(carry, ks):
            mid = lo + (hi - lo) // 2
            c = total(lambda p: parts[p].keys <= _expand(mid, parts[p].keys.ndim))
            ok = c > k
            out.append((jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)))
        return tuple(out)

    start = (jnp.zeros(gshape, jnp.uint32), jnp.full(gshape, KEY_LIMIT, jnp.uint32))
    values = [hi for _, hi in lax.fori_loop(0, _VALUE_STEPS, value_step, (start,) * len(ks))]

    thresholds = []
    for v, k in zip(values, ks):
        rest = k - total(lambda p: parts[p].keys < _expand(v, parts[p].keys.ndim))
        index = []
        for p, part in enumerate(parts):
            ties = part.keys == _expand(v, part.keys.ndim)
            idx = part.index
            n_ties = count(p, ties)
            need = rest + 1  # the (rest)-th tie of this part, 0-based, ends the band below

            def index_step(_, carry, ties=ties, idx=idx, need=need, nd=part.keys.ndim, p=p):
                lo, hi = carry
                mid = lo + (hi - lo) // 2
                ok = count(p, ties & (idx <= _expand(mid, nd))) >= need
                return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

            def bisect(_, size=part.size, step=index_step, shape=need.shape):
                steps = max(1, math.ceil(math.log2(size + 1)))
                start = (jnp.zeros(shape, jnp.int32), jnp.full(shape, size, jnp.int32))
                return lax.fori_loop(0, steps, step, start)[1]

            def whole(_, size=part.size, rest=rest, n_ties=n_ties):
                # no group splits a run of ties: all of them are below (size) or none is (0)
                return jnp.where(rest >= n_ties, size, 0).astype(jnp.int32)

            split = jnp.any((rest > 0) & (rest < n_ties))  # only then is the index bisection needed
            i = lax.cond(split, bisect, whole, None)
            index.append(i)
            rest = rest - n_ties
        thresholds.append(Threshold(v, tuple(index)))
    return thresholds
