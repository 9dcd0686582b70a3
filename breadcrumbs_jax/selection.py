"""Exact rank selection of |x| within groups in a few counting passes: no sort of the data, no gather.

An entry's rank in its group is its position when the group is sorted by magnitude, ties broken
by flat index (SPEC.md). The entry of rank k is described by a composite threshold (value, index):
an entry ranks below k exactly when ``key < value``, or ``key == value and index < index_threshold``.

Value. Each target rank k keeps a bracket [lo, hi] of keys that holds its value, with exact counts
of the entries below lo and up to hi. One pass over the data counts, for two pivots per target, the
entries below each; all targets share one int32 word per entry (8-bit lanes). The bracket shrinks to
the side the target's rank falls on. The first pivots come from a small strided sample of each group
(the sample is sorted, never the data); later ones interpolate the target's rank inside the bracket,
about two standard deviations either side. Once the inner bracket holds few entries, the same pass
also keeps the smallest and largest candidate of each block of about 1024 entries: unless a block
holds three distinct candidates, these are all of them, and they give the value with no further pass.

Index. Only when the target lies strictly inside a run of equal keys is the index threshold needed.
It is found by position: a pass counts the tied entries along the first group axis, a running sum of
these few counts picks the line that holds the target, the next pass does the same inside that line.

Every data-dependent step is a reduction over the group's axes (blocks of 32 along one axis, then the
rest), so with a sharded input it compiles to local work plus a small all-reduce: no ravel, no sort
and no cumulative sum of the data. A group may span several arrays ("parts", e.g. all leaves of a
task vector for `global` granularity); ties are then ordered by part, then by flat index in the part.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

KEY_MAX = 0x7FFFFFFF  # the largest key (a NaN with every bit set); +inf is 0x7F800000
_BLOCK = 32  # entries per block and level of the blocked reductions
_SAMPLE_BUDGET = 1 << 16  # sampled keys per call (all groups together) ...
_SAMPLE_SHARE = 256  # ... and at most one in this many entries
_MARGIN = 1.25  # half-width of an interpolated bracket, in sqrt(entries in the bracket)
_MIN_BLOCKS = 64  # extraction blocks per group at least (finer blocks for smaller groups)
_FEW = 0.1  # extract when a bracket holds at most this many entries per block
_BIAS = 0.003  # extra half-width of an interpolated bracket, as a share of its entries (curvature)
_BIG = 2.0**30


def magnitude_keys(x: jax.Array) -> jax.Array:
    """int32 keys that sort like |x| (float32 bits with the sign cleared; -0 == +0)."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return bits & jnp.int32(KEY_MAX)


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


def below(part: Part, thr: Threshold, p: int = 0) -> jax.Array:
    """Entries of `part` whose rank is below the threshold's rank."""
    nd = part.keys.ndim
    value, index = _expand(thr.value, nd), _expand(thr.index[p], nd)
    return (part.keys < value) | ((part.keys == value) & (part.index < index))


# ---------------------------------------------------------------- blocked reductions over group axes


def _block_plan(shape: Sequence[int], axes: Sequence[int], levels: int = 2) -> tuple[tuple[int, int], ...]:
    """Up to `levels` block reductions (axis, factor) over group axes: the largest power-of-two factor
    (<= 32) that divides an axis, preferring an axis that is not the minor one."""
    plan, shape = [], list(shape)
    for _ in range(levels):
        options = [(math.gcd(shape[a], _BLOCK), a != len(shape) - 1, shape[a], a) for a in axes]
        options = [o for o in options if o[0] >= 4]
        if not options:
            break
        r, _, _, a = max(options)
        plan.append((a, r))
        shape[a] //= r
    return tuple(plan)


_INIT = {"sum": 0, "min": KEY_MAX, "max": -1}
_OP = {"sum": lax.add, "min": lax.min, "max": lax.max}


def _reduce_blocks(arrays: Sequence[jax.Array], kinds: Sequence[str], block: tuple[int, int]) -> list[jax.Array]:
    """One variadic reduction of blocks of `r` entries along `axis`: the arrays are read in one pass.

    The optimization barrier keeps XLA from merging consecutive reductions into one over several
    axes, which XLA:CPU compiles to a slow loop."""
    axis, r = block
    split = [x.reshape(x.shape[:axis] + (x.shape[axis] // r, r) + x.shape[axis + 1 :]) for x in arrays]

    def combine(a, b):
        return tuple(_OP[k](x, y) for k, x, y in zip(kinds, a, b))

    init = tuple(jnp.int32(_INIT[k]) for k in kinds)
    return list(lax.optimization_barrier(tuple(lax.reduce(tuple(split), init, combine, (axis + 1,)))))


def _pack(lanes: Sequence[jax.Array], bits: int) -> list[jax.Array]:
    per = 32 // bits
    return [
        sum(lane << (bits * i) for i, lane in enumerate(lanes[j : j + per]))
        for j in range(0, len(lanes), per)
    ]


def _unpack(words: Sequence[jax.Array], bits: int, n: int) -> list[jax.Array]:
    per, mask = 32 // bits, (1 << bits) - 1
    return [(w >> (bits * i)) & mask for w in words for i in range(per)][:n]


def _blocked(lanes: Sequence[jax.Array], extras: Sequence[tuple[jax.Array, str]], plan, at: int):
    """Block sums of 0/1 `lanes` (packed 4 to an int32 word, 8 bits a lane, then 16) and block
    min/max of `extras`. Returns the lanes at the coarsest level of `plan`, and lanes and extras
    after the first `at` levels (`extras` are reduced no further)."""
    n, bits = len(lanes), 8
    words = _pack([lane.astype(jnp.int32) for lane in lanes], bits)
    rest = [x for x, _ in extras]
    fine = (_unpack(words, bits, n), rest)
    for level, block in enumerate(plan):
        if level == 1:  # lanes hold up to 32 now: widen them before they can pass 255
            words, bits = _pack(_unpack(words, bits, n), 16), 16
        kinds = ["sum"] * len(words) + ([k for _, k in extras] if level < at else [])
        out = _reduce_blocks(words + (rest if level < at else []), kinds, block)
        words, rest = out[: len(words)], out[len(words) :] if level < at else rest
        if level + 1 == at:
            fine = (_unpack(words, bits, n), rest)
    return _unpack(words, bits, n), fine


class _Groups:
    """The groups of a call: their shape and how group-shaped arrays meet each part."""

    def __init__(self, parts: Sequence[Part]):
        self.parts = tuple(parts)
        self.multi = len(parts) > 1
        if self.multi:
            for p in parts:
                if tuple(p.axes) != tuple(range(1, p.keys.ndim)):
                    raise ValueError("with several parts, each part is ranked over all axes but the first")
            self.shape = (parts[0].keys.shape[0],)
        else:
            p = parts[0]
            self.shape = tuple(1 if a in p.axes else d for a, d in enumerate(p.keys.shape))
        self.size = sum(p.size for p in parts)
        if self.size >= KEY_MAX:
            raise ValueError(f"a group of {self.size} entries does not fit int32 counts")
        self.plans = tuple(_block_plan(p.keys.shape, p.axes) for p in parts)
        # extraction keeps one min/max per block at the coarsest level with enough blocks per group
        self.at, self.blocks = [], 0
        for p, plan in zip(parts, self.plans):
            at, r = 0, 1
            for _, f in plan:
                if p.size // (r * f) < _MIN_BLOCKS:
                    break
                at, r = at + 1, r * f
            self.at.append(at)
            self.blocks += p.size // r

    def expand(self, g: jax.Array, p: int) -> jax.Array:
        return _expand(g, self.parts[p].keys.ndim)

    def total(self, x: jax.Array, p: int) -> jax.Array:
        """Sum a (blocked) array of part `p` over its group axes: group-shaped."""
        return jnp.sum(x, axis=self.parts[p].axes, keepdims=True).reshape(self.shape)


# ---------------------------------------------------------------- the value of each target rank


@dataclasses.dataclass(frozen=True)
class _Bracket:
    """Keys [lo, hi] hold the target's value; c_lo entries lie below lo, c_hi up to hi. `hint`:
    (has one, lo, hi, expected entries between) pivots for the next pass, from a miss or an extraction."""

    lo: jax.Array
    hi: jax.Array
    c_lo: jax.Array
    c_hi: jax.Array
    hint: tuple[jax.Array, jax.Array, jax.Array, jax.Array]

    def replace(self, **kw) -> _Bracket:
        return dataclasses.replace(self, **kw)


jax.tree_util.register_dataclass(_Bracket, data_fields=["lo", "hi", "c_lo", "c_hi", "hint"], meta_fields=[])


def _sample(groups: _Groups, budget: int) -> jax.Array:
    """A sorted strided sample of every group, [*groups.shape, S]: the whole group when all groups
    together hold at most `budget` entries."""
    n_groups = math.prod(groups.shape)
    if groups.size * n_groups <= budget:
        per_group = groups.size
    else:
        per_group = max(64, min(budget, groups.size * n_groups // _SAMPLE_SHARE) // n_groups)
    pieces = []
    for part in groups.parts:
        shape, axes = part.keys.shape, sorted(part.axes)
        factor = groups.size / per_group  # one entry in `factor` of every part
        slices = [slice(None)] * len(shape)
        for i, a in enumerate(sorted(axes, key=lambda a: shape[a])):
            step = max(1, min(shape[a], round(factor ** (1 / (len(axes) - i)))))
            step |= 1 if step > 1 else 0  # odd strides do not alias with power-of-two structure
            factor /= step
            slices[a] = slice(step // 2, None, step)
        s = part.keys[tuple(slices)]
        s = jnp.moveaxis(s, axes, list(range(s.ndim - len(axes), s.ndim)))
        s = s.reshape(s.shape[: s.ndim - len(axes)] + (-1,))
        pieces.append(s if groups.multi else s.reshape(groups.shape + (-1,)))
    return jnp.sort(jnp.concatenate(pieces, axis=-1), axis=-1)


def _sample_pivots(sample: jax.Array, k: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Sample keys that bracket rank k, three standard deviations of the sample's rank either side."""
    s = sample.shape[-1]
    pick = lambda i: jnp.take_along_axis(sample, jnp.clip(i, 0, s - 1)[..., None], axis=-1)[..., 0]  # noqa: E731
    if s == n:  # the sample is the group: its k-th key is the value
        return pick(k), pick(k)
    q = (k.astype(jnp.float32) + 0.5) / n
    pos = q * s - 0.5
    m = 3.0 * jnp.sqrt(s * q * (1 - q)) + 1.0
    i_lo = jnp.floor(pos - m).astype(jnp.int32)
    i_hi = jnp.ceil(pos + m).astype(jnp.int32)
    return jnp.where(i_lo < 0, 0, pick(i_lo)), jnp.where(i_hi >= s, KEY_MAX, pick(i_hi))


def _interp_pivots(b: _Bracket, k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The hint if there is one; else pivots around the key where rank k is expected if the keys in
    [lo, hi] were evenly spread (a single pivot when that would not shrink the bracket). Also the
    expected number of entries between them."""
    r = jnp.maximum(b.c_hi - b.c_lo, 1).astype(jnp.float32)
    width = (b.hi - b.lo).astype(jnp.float32) + 1.0
    off = jnp.floor(((k - b.c_lo).astype(jnp.float32) + 0.5) / r * width)
    center = b.lo + jnp.clip(off, 0.0, jnp.minimum(width - 1, _BIG)).astype(jnp.int32)
    m = _MARGIN * jnp.sqrt(r) + _BIAS * r + 1.0
    mk = jnp.minimum(jnp.ceil(m / r * width), _BIG).astype(jnp.int32)
    p_lo = jnp.where(center - b.lo <= mk, b.lo, center - mk)
    p_hi = jnp.where(b.hi - center <= mk, b.hi, center + mk)
    pin = (p_lo == b.lo) & (p_hi == b.hi)
    has, h_lo, h_hi, h_n = b.hint
    p_lo = jnp.where(has, h_lo, jnp.where(pin, center, p_lo))
    p_hi = jnp.where(has, h_hi, jnp.where(pin, center, p_hi))
    expected = jnp.where(has, h_n, jnp.where(pin, 1.0, jnp.minimum(r, 2 * m + 1)))
    return p_lo, p_hi, expected


def _update(b: _Bracket, k, p_lo, p_hi, c_below, c_upto) -> _Bracket:
    """The part of [lo, hi] that holds rank k, given the counts below p_lo and up to p_hi. After a
    miss, hint pivots extrapolated from the density of entries between the pivots."""
    fixed = b.lo == b.hi  # resolved (or k == 0 or k == n): keep
    low, high = ~fixed & (k < c_below), ~fixed & (k >= c_upto)
    lo = jnp.where(low, b.lo, jnp.where(high, p_hi + 1, jnp.where(fixed, b.lo, p_lo)))
    hi = jnp.where(low, p_lo - 1, jnp.where(high, b.hi, jnp.where(fixed, b.hi, p_hi)))
    c_lo = jnp.where(low, b.c_lo, jnp.where(high, c_upto, jnp.where(fixed, b.c_lo, c_below)))
    c_hi = jnp.where(low, c_below, jnp.where(high, b.c_hi, jnp.where(fixed, b.c_hi, c_upto)))
    # entries per key between the pivots; the target lies d entries beyond the pivot it missed
    density = (c_upto - c_below).astype(jnp.float32) / ((p_hi - p_lo).astype(jnp.float32) + 1.0)
    d = jnp.where(low, c_below - k, k - c_upto + 1).astype(jnp.float32)
    step = jnp.minimum(jnp.ceil(d / jnp.maximum(density, 1e-30)), _BIG).astype(jnp.int32)
    m = _MARGIN * jnp.sqrt(d) + 0.25 * d + 2.0
    mk = jnp.minimum(jnp.ceil(m / jnp.maximum(density, 1e-30)), _BIG).astype(jnp.int32)
    center = jnp.where(low, jnp.maximum(p_lo - step, lo), jnp.minimum(p_hi + step, hi))
    h_lo = jnp.where(center - lo <= mk, lo, center - mk)
    h_hi = jnp.where(hi - center <= mk, hi, center + mk)
    guess = c_upto - c_below >= 2  # else no density to go by: halve the bracket
    mid = lo + (hi - lo) // 2
    hint = (low | high, jnp.where(guess, h_lo, mid), jnp.where(guess, h_hi, mid), jnp.where(guess, 2 * m + 1, 1.0))
    return _Bracket(lo, hi, c_lo, c_hi, hint)


def _value_pass(groups: _Groups, pivots, extract: bool):
    """Count the entries below each pivot ([key < lo'], [key <= hi'] per target); with `extract`, also
    the min and max key of each block among the candidates of all targets (lo' <= key <= hi'), and
    per target the block's number of candidates."""
    counts = [[jnp.zeros(groups.shape, jnp.int32)] * 2 for _ in pivots]
    stats = []
    for p, (part, plan) in enumerate(zip(groups.parts, groups.plans)):
        keys = part.keys
        bounds = [(groups.expand(lo, p), groups.expand(hi, p)) for lo, hi in pivots]
        lanes = [x for lo, hi in bounds for x in (keys < lo, keys <= hi)]
        extras = []
        if extract:
            cand = functools.reduce(jnp.logical_or, [(keys >= lo) & (keys <= hi) for lo, hi in bounds])
            extras = [(jnp.where(cand, keys, KEY_MAX), "min"), (jnp.where(cand, keys, -1), "max")]
        lanes, (fine, extras) = _blocked(lanes, extras, plan, groups.at[p] if extract else 0)
        for t in range(len(pivots)):
            counts[t][0] = counts[t][0] + groups.total(lanes[2 * t], p)
            counts[t][1] = counts[t][1] + groups.total(lanes[2 * t + 1], p)
        if extract:
            stats.append((*extras, [fine[2 * t + 1] - fine[2 * t] for t in range(len(pivots))]))
    return counts, stats


def _select_extracted(groups: _Groups, stats, t: int, j: jax.Array, lo: jax.Array, hi: jax.Array):
    """From per-block (min, max) of all candidates and target t's per-block count of candidates in
    [lo, hi]: keys a <= b between which t's j-th smallest candidate (0-based) lies, with the candidates
    below and up to a. `complete` (then a == b and the counts are exact) unless some block held
    more of t's candidates than its min and max."""
    weights, incomplete = [], jnp.zeros(groups.shape, jnp.int32)
    for p, (mn, mx, cs) in enumerate(stats):
        c = cs[t]
        lo_p, hi_p = groups.expand(lo, p), groups.expand(hi, p)
        same = mn == mx
        w_mn = jnp.where((mn >= lo_p) & (mn <= hi_p), jnp.where(same, c, 1), 0)
        w_mx = ((mx >= lo_p) & (mx <= hi_p) & ~same).astype(jnp.int32)
        middle = c - w_mn - w_mx  # t's candidates strictly between min and max, unseen
        weights.append((mn, mx, w_mn, w_mx, middle, jnp.maximum(mn, lo_p), jnp.minimum(mx, hi_p)))
        incomplete = incomplete + groups.total((middle > 0).astype(jnp.int32), p)

    def upto(u, bound):  # bound of the number of t's candidates <= u: 'upper' or 'lower'
        total = jnp.zeros(groups.shape, jnp.int32)
        for p, (mn, mx, w_mn, w_mx, middle, first, last) in enumerate(weights):
            ue = groups.expand(u, p)
            at = first if bound == "upper" else last
            x = jnp.where(mn <= ue, w_mn, 0) + jnp.where(mx <= ue, w_mx, 0) + jnp.where(at <= ue, middle, 0)
            total = total + groups.total(x, p)
        return total

    def first_above(bound):  # smallest u in [lo, hi] with upto(u) > j
        def step(ab):
            a, b = ab
            mid = a + (b - a) // 2
            ok = upto(mid, bound) > j
            return jnp.where(ok, a, mid + 1), jnp.where(ok, mid, b)

        return lax.while_loop(lambda ab: jnp.any(ab[0] < ab[1]), step, (lo, hi))[0]

    a = first_above("upper")
    b = lax.cond(jnp.any(incomplete > 0), lambda: first_above("lower"), lambda: a)
    return a, b, upto(a - 1, "upper"), upto(a, "upper"), incomplete == 0


def _value_search(groups: _Groups, ks: Sequence[jax.Array], budget: int) -> list[_Bracket]:
    """Brackets [v, v] of the value of each target rank, with exact counts below and up to v."""
    n = groups.size
    no = jnp.zeros(groups.shape, bool)
    zero = jnp.zeros(groups.shape, jnp.int32)
    start = []
    for k in ks:
        # k == 0: nothing below (value 0, index 0); k == n: everything below (index = size)
        open_, edge = (k > 0) & (k < n), jnp.where(k == 0, 0, KEY_MAX)
        start.append(_Bracket(
            jnp.where(open_, 0, edge), jnp.where(open_, KEY_MAX, edge),
            jnp.where(open_, 0, k), jnp.where(open_, n, k), (no, zero, zero, zero.astype(jnp.float32)),
        ))

    # first pass: pivots from the sample
    sample = _sample(groups, budget)
    pivots = [_sample_pivots(sample, k, n) for k in ks]
    counts, _ = _value_pass(groups, pivots, extract=False)
    brackets = [_update(b, k, lo, hi, *c) for b, k, (lo, hi), c in zip(start, ks, pivots, counts)]

    # then interpolate, and extract once every open bracket holds (or is expected to) few entries
    few = n if not any(groups.at) else max(2.0, _FEW * groups.blocks)  # blocks of one entry are always complete

    def body(bs):
        chosen = [_interp_pivots(b, k) for b, k in zip(bs, ks)]
        small = [(b.c_hi - b.c_lo <= few) & ~b.hint[0] for b in bs]
        ready = [(b.lo == b.hi) | s | (e <= few) for b, s, (_, _, e) in zip(bs, small, chosen)]
        extract = jnp.all(jnp.stack([jnp.all(r) for r in ready]))

        def count_only(_):
            pivots = [(lo, hi) for lo, hi, _ in chosen]
            counts, _ = _value_pass(groups, pivots, extract=False)
            return [_update(b, k, lo, hi, *c) for b, k, (lo, hi), c in zip(bs, ks, pivots, counts)]

        def with_extraction(_):
            pivots = [(jnp.where(s, b.lo, lo), jnp.where(s, b.hi, hi)) for b, s, (lo, hi, _) in zip(bs, small, chosen)]
            counts, stats = _value_pass(groups, pivots, extract=True)
            out = []
            for t, (b, k, (lo, hi), c) in enumerate(zip(bs, ks, pivots, counts)):
                nb = _update(b, k, lo, hi, *c)
                a, z, c_lt, c_le, complete = _select_extracted(groups, stats, t, k - c[0], lo, hi)
                inside = ~nb.hint[0] & (nb.lo < nb.hi)
                done = inside & complete
                hint = tuple(jnp.where(inside, x, y) for x, y in zip((~complete, a, z, jnp.zeros_like(nb.hint[3])), nb.hint))
                out.append(nb.replace(
                    lo=jnp.where(done, a, nb.lo), hi=jnp.where(done, a, nb.hi),
                    c_lo=jnp.where(done, c[0] + c_lt, nb.c_lo), c_hi=jnp.where(done, c[0] + c_le, nb.c_hi),
                    hint=hint,
                ))
            return out

        return lax.cond(extract, with_extraction, count_only, None)

    def cont(bs):
        return jnp.any(jnp.stack([jnp.any(b.lo < b.hi) for b in bs]))

    return lax.while_loop(cont, body, brackets)


# ---------------------------------------------------------------- the index threshold inside a run of ties


def _lines(part: Part) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The part's shape for positional search, and its group axes there: a single group axis is split
    in two near its square root, so that no running sum spans a whole group."""
    shape, axes = tuple(part.keys.shape), tuple(sorted(part.axes))
    if len(axes) != 1 or shape[axes[0]] < 64:
        return shape, axes
    a, d = axes[0], shape[axes[0]]
    inner = max(b for b in range(1, math.isqrt(d) + 1) if d % b == 0)
    if inner == 1:
        return shape, axes
    return shape[:a] + (d // inner, inner) + shape[a + 1 :], (a, a + 1)


def _in_view(g: jax.Array, shape: Sequence[int], axes: Sequence[int]) -> jax.Array:
    """A group-shaped array broadcastable against a part viewed as `shape` with group `axes`."""
    return g.reshape(tuple(1 if a in axes else d for a, d in enumerate(shape)))


def _count_along(groups: _Groups, masks: Sequence[jax.Array], axes: Sequence[int], axis: int | None) -> list[jax.Array]:
    """Per-group counts of each mask at each position along `axis`, summed over the other group
    `axes`: [*groups.shape, d] (d = 1 when the part has no group axis)."""
    others = [a for a in axes if a != axis]
    xs = [m.astype(jnp.int32) for m in masks]
    for block in _block_plan(xs[0].shape, others, levels=1):
        xs = _reduce_blocks(xs, ["sum"] * len(xs), block)
    out = []
    for x in xs:
        c = jnp.sum(x, axis=tuple(others), keepdims=True)
        c = c[..., None] if axis is None else jnp.moveaxis(c, axis, -1)
        out.append(c.reshape(groups.shape + (c.shape[-1],)))
    return out


def _locate(counts: jax.Array, j: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Position along the last axis of the j-th counted entry (0-based), and the count before it."""
    run = jnp.cumsum(counts, axis=-1)
    before = run <= j[..., None]
    return jnp.sum(before, axis=-1, dtype=jnp.int32), jnp.sum(jnp.where(before, counts, 0), axis=-1)


def _index_search(groups: _Groups, values: Sequence[jax.Array], js: Sequence[jax.Array]) -> list[list[jax.Array]]:
    """Index threshold per part of each target: the position (ties ordered by part, then by flat
    index) before which exactly j entries equal the value. One pass per group axis."""
    views = [_lines(p) for p in groups.parts]
    ties = []
    for p, (part, (shape, _)) in enumerate(zip(groups.parts, views)):
        keys = part.keys.reshape(shape)
        ties.append([keys == _in_view(v, shape, views[p][1]) for v in values])

    # the first pass picks the part and the position along its first group axis, in one running sum
    firsts = [_count_along(groups, t, axes, axes[0] if axes else None) for t, (_, axes) in zip(ties, views)]
    starts = [0]
    for f in firsts:
        starts.append(starts[-1] + f[0].shape[-1])
    chosen, pos, rest = [], [], []
    for t, j in enumerate(js):
        x, base = _locate(jnp.concatenate([f[t] for f in firsts], axis=-1), j)
        part = sum(jnp.where(x >= s, 1, 0) for s in starts[1:-1]) + jnp.zeros_like(x)
        chosen.append(part)
        pos.append([x - sum(jnp.where(part == p, s, 0) for p, s in enumerate(starts[:-1]))])
        rest.append(j - base)

    # each further pass: the same along the next axis, within the chosen line
    for level in range(1, max(len(axes) for _, axes in views)):
        found = [[] for _ in js]
        for p, (shape, axes) in enumerate(views):
            if len(axes) <= level:
                continue
            masks = []
            for t in range(len(js)):
                m = ties[p][t] & (_in_view(chosen[t], shape, axes) == p)
                for lv in range(level):
                    m = m & (lax.broadcasted_iota(jnp.int32, shape, axes[lv]) == _in_view(pos[t][lv], shape, axes))
                masks.append(m)
            for t, c in enumerate(_count_along(groups, masks, axes, axes[level])):
                found[t].append((p, *_locate(c, rest[t])))
        for t in range(len(js)):
            pos[t].append(sum(jnp.where(chosen[t] == p, x, 0) for p, x, _ in found[t]))
            rest[t] = rest[t] - sum(jnp.where(chosen[t] == p, base, 0) for p, _, base in found[t])

    out = []
    for t in range(len(js)):
        per_part = []
        for p, (part, (shape, axes)) in enumerate(zip(groups.parts, views)):
            flat, stride = jnp.zeros(groups.shape, jnp.int32), 1
            for lv in reversed(range(len(axes))):
                flat = flat + pos[t][lv] * stride
                stride *= shape[axes[lv]]
            per_part.append(jnp.where(chosen[t] > p, part.size, jnp.where(chosen[t] == p, flat, 0)))
        out.append(per_part)
    return out


def rank_thresholds(
    parts: Sequence[Part], ranks: Sequence[int | jax.Array], *, sample: int | None = None
) -> list[Threshold]:
    """The composite threshold of each rank k in `ranks` (0 <= k <= group size).

    k == group size gives a threshold above every entry. Groups are the entries sharing all
    non-ranked axes; with several parts the ranked axes must be all but the leading one.
    `sample` bounds the keys sampled (and sorted) over all groups together to place the first
    pivots; when all groups hold no more, they are sorted whole. It changes the speed, never the
    result.
    """
    groups = _Groups(parts)
    ks = [jnp.broadcast_to(jnp.asarray(k, jnp.int32), groups.shape) for k in ranks]
    brackets = _value_search(groups, ks, _SAMPLE_BUDGET if sample is None else sample)
    values = [b.lo for b in brackets]
    js = [jnp.where(k == groups.size, 0, k - b.c_lo) for k, b in zip(ks, brackets)]
    need = jnp.any(jnp.stack([jnp.any(j > 0) for j in js]))
    zeros = [[jnp.zeros(groups.shape, jnp.int32) for _ in parts] for _ in ks]
    index = lax.cond(need, lambda: _index_search(groups, values, js), lambda: zeros)
    out = []
    for k, v, idx in zip(ks, values, index):
        full = k == groups.size
        out.append(Threshold(v, tuple(jnp.where(full, p.size, i) for p, i in zip(parts, idx))))
    return out
