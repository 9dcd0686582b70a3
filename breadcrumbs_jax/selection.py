"""Exact rank selection of |x| within groups in a few counting passes: the data is never sorted.

An entry's rank in its group is its position when the group is sorted by magnitude, ties broken
by flat index (SPEC.md). The entry of rank k is described by a composite threshold (value, index):
an entry ranks below k exactly when ``key < value``, or ``key == value and index < index_threshold``.
Keys are the float32 bits of |x| as int32 (they sort like |x|), recomputed in every pass.

Value. Each target rank k keeps a bracket [lo, hi] of keys that holds its value, with exact counts
of the entries below lo and up to hi. A pass counts, for two pivots per target, the entries below
each; all targets share one int32 word per entry (8-bit lanes); the bracket shrinks to the side the
target falls on. Pivots: first from a sorted strided sample of each group (the sample is sorted,
never the data); then by interpolating the target's rank inside the bracket (the sample decides
where keys cluster, as runs of ties do; a miss is followed by pivots bracketing the chord and
tangent estimates, or by the sample's after a miss on repeating sample keys). In a group of at least
2**23 entries, once a pass has counted a bracket whole and it holds at most one in 8192 of them
(2048 in differences of float16 floats), the search ends by gathering them: that pass's counts per
block of 32 entries say which blocks hold candidates; only those are read; their keys sorted give
the value, and the flat indices of its ties sorted the index threshold. There, interpolated brackets
are made almost as wide as can be gathered, so that one pass that lands on the target ends the
search. A pass on a bracket of few distinct keys, one that cannot be narrowed, or (without
gathering: smaller groups, several parts, sharded) one expected to hold few entries also keeps, per
target and block of about 1024 entries, the number, min and max of its candidates: unless a block
holds three distinct candidates these are all of them and give the value at once; otherwise they
bound it, and the next pivots split those bounds.

Index. Only when the target lies strictly inside a run of equal keys is the index threshold needed.
It is found by position: a pass counts the tied entries along the first group axis, a running sum of
these few counts picks the line that holds the target, and the same is done inside that line, which
is all that is read of it (a gather that XLA fuses with the part's computation).

Every pass is a reduction over the group's axes (variadic, in blocks of 32 along one axis, the
minor one where it can, then the rest: XLA:CPU compiles a reduction fused with elementwise work
over many axes to a loop several times slower than a pass). In `sharded` mode (the default when JAX
sees several devices; a merge uses it when a leaf spans several) every data-dependent step is a
local reduction plus a small all-reduce: the block counts divide by the device count, there is no
sample, and the index threshold is found by the same counting search on the positions of the tied
entries. A group may span several arrays ("parts", e.g. all leaves of a task vector for `global`
granularity); ties are then ordered by part, then by flat index in the part.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

KEY_MAX = 0x7FFFFFFF  # the largest key (a NaN with every bit set); +inf is 0x7F800000
_BLOCK = 32  # entries per block and level of the blocked reductions
_SORT_MAX = 1 << 14  # groups of at most this many entries in all are sorted whole
_SAMPLE_BUDGET = 1 << 18  # sampled keys per call (all groups together) ...
_SAMPLE_SHARE = 128  # ... and at most one in this many entries
_SAMPLE_MAX = 1 << 16  # ... and per group
_MARGIN = 1.25  # half-width of an interpolated bracket, in sqrt(entries in the bracket)
_MIN_BLOCKS = 64  # extraction blocks per group at least (finer blocks for smaller groups)
_FEW = 0.1  # extract when a bracket holds at most this many entries per block
_BIAS = 0.003  # extra half-width of an interpolated bracket, as a share of its entries (curvature)
_BIG = 2.0**30
_SPREAD = 2.5  # half-width of a sampled bracket, in standard deviations of the sample's rank
_NEAR = 0.35  # ... and of the pivots where sample keys repeat (fewest passes on bf16 differences)
_GATHER_FROM = 1 << 23  # groups of at least this many entries end their search by gathering ...
_GATHER_SHARE = 8192  # ... a bracket that holds at most one in this many of their entries
_GATHER_SHARE_F16 = 2048  # ... or this many, in differences of float16 floats (see gather_capacity)
_FILL = 0.45  # ... and an interpolated bracket there holds this share of that either side of its center, at least
_PREFIX = 64  # entries per block of `_running_sums`


def magnitude_keys(x: jax.Array) -> jax.Array:
    """int32 keys that sort like |x| (float32 bits with the sign cleared; -0 == +0)."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return bits & jnp.int32(KEY_MAX)


def _row_major(coords: Sequence[jax.Array], dims: Sequence[int]) -> jax.Array:
    """The row-major position of coordinates `coords` along axes of sizes `dims`."""
    position, stride = jnp.zeros((), jnp.int32), 1
    for c, d in zip(reversed(coords), reversed(dims)):
        position, stride = position + c * stride, stride * d
    return position


def flat_index(shape: Sequence[int], axes: Sequence[int]) -> jax.Array:
    """int32 row-major position of each entry within its group (the entries sharing the other axes)."""
    axes = sorted(axes)
    coords = [lax.broadcasted_iota(jnp.int32, shape, ax) for ax in axes]
    return jnp.broadcast_to(_row_major(coords, [shape[ax] for ax in axes]), shape)


def evaluate(source: jax.Array | Callable[[], jax.Array]) -> jax.Array:
    """An array given as itself or as a function that computes it (then traced anew at each use)."""
    return source() if callable(source) else source


@dataclasses.dataclass(frozen=True)
class Part:
    """One array of a group, ranked by magnitude over `axes`: float values, or their int32
    `magnitude_keys`. Float values are best: their keys are then recomputed in each pass over the
    data instead of being written out once. `source` is the array, or a function that computes it
    (from the merge's inputs): each pass then recomputes it, and it is never held in memory."""

    source: jax.Array | Callable[[], jax.Array]
    axes: tuple[int, ...]

    @property
    def values(self) -> jax.Array:
        return evaluate(self.source)

    @property
    def keys(self) -> jax.Array:
        values = self.values
        if jnp.issubdtype(values.dtype, jnp.floating):
            return magnitude_keys(values)
        return values

    @property
    def size(self) -> int:
        return math.prod(self.values.shape[a] for a in self.axes)

    @property
    def index(self) -> jax.Array:
        return flat_index(self.values.shape, self.axes)


@dataclasses.dataclass(frozen=True)
class Threshold:
    """Composite key of one rank per group: `value` (group-shaped), one index threshold per part, and
    `under`, the number of entries of the group whose key is below the value (None if not known)."""

    value: jax.Array
    index: tuple[jax.Array, ...]
    under: jax.Array | None = None


jax.tree_util.register_dataclass(Threshold, data_fields=["value", "index", "under"], meta_fields=[])


def _expand(g: jax.Array, ndim: int) -> jax.Array:
    return g.reshape(g.shape + (1,) * (ndim - g.ndim))


def below(part: Part, thr: Threshold, p: int = 0) -> jax.Array:
    """Entries of `part` whose rank is below the threshold's rank."""
    keys = part.keys
    value, index = _expand(thr.value, keys.ndim), _expand(thr.index[p], keys.ndim)
    return (keys < value) | ((keys == value) & (part.index < index))


# ---------------------------------------------------------------- blocked reductions over group axes


def _block_plan(shape: Sequence[int], axes: Sequence[int], levels: int = 2, devices: int = 1) -> tuple[tuple[int, int], ...]:
    """Up to `levels` block reductions (axis, factor) over group axes: the largest factor <= 32 that
    divides an axis into a number of blocks that `devices` divides (so that, sharded over any of
    them, an axis splits into whole blocks on each device), preferring the minor axis. XLA:CPU
    vectorises blocks of adjacent entries; blocks across rows read with a stride of a row, which
    on rows of a power-of-two size (LLM widths) thrashes the cache: such passes were 3x slower."""
    plan, shape = [], list(shape)
    for _ in range(levels):
        options = []
        for a in axes:
            r = next((r for r in range(_BLOCK, 3, -1) if shape[a] % r == 0 and shape[a] // r % devices == 0), None)
            if r is not None:
                options.append((r, a == len(shape) - 1, shape[a], a))
        if not options:
            break
        r, _, _, a = max(options)
        plan.append((a, r))
        shape[a] //= r
    return tuple(plan)


_OP = {"sum": lax.add, "min": lax.min, "max": lax.max}


def _init(kind: str, dtype) -> jax.Array:
    if kind == "sum":
        return jnp.zeros((), dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.asarray(jnp.inf if kind == "min" else -jnp.inf, dtype)
    info = jnp.iinfo(dtype)
    return jnp.asarray(info.max if kind == "min" else info.min, dtype)


def _reduce_blocks(arrays: Sequence[jax.Array], kinds: Sequence[str], block: tuple[int, int]) -> list[jax.Array]:
    """One variadic reduction of blocks of `r` entries along `axis`: the arrays are read in one pass.

    The optimization barrier keeps XLA from merging consecutive reductions into one over several
    axes, which XLA:CPU compiles to a slow loop."""
    axis, r = block
    split = [x.reshape(x.shape[:axis] + (x.shape[axis] // r, r) + x.shape[axis + 1 :]) for x in arrays]

    def combine(a, b):
        return tuple(_OP[k](x, y) for k, x, y in zip(kinds, a, b))

    init = tuple(_init(k, x.dtype) for k, x in zip(kinds, arrays))
    return list(lax.optimization_barrier(tuple(lax.reduce(tuple(split), init, combine, (axis + 1,)))))


def reduce_groups(arrays: Sequence[jax.Array], kinds: Sequence[str], axes: Sequence[int]) -> list[jax.Array]:
    """Sum, min or max (`kinds`) of each array over `axes`, all in one pass over the data.

    The same as jnp.sum/min/max(x, axis=axes), but in blocks of 32 along one axis first: XLA:CPU
    compiles a reduction fused with elementwise work over a large array to a loop several times
    slower than one pass over it. Sharded inputs reduce locally, then all-reduce."""
    arrays = list(arrays)
    for block in _block_plan(arrays[0].shape, axes, devices=jax.device_count()):
        arrays = _reduce_blocks(arrays, kinds, block)
    fn = {"sum": jnp.sum, "min": jnp.min, "max": jnp.max}
    return [fn[k](x, axis=tuple(axes)) for k, x in zip(kinds, arrays)]


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
    min/max of `extras` over the first `at` levels of `plan`. Returns the lanes before and after
    each level of `plan` (the last: the coarsest), and the extras after `at` levels."""
    n, bits = len(lanes), 8
    words = _pack([lane.astype(jnp.int32) for lane in lanes], bits)
    rest = [x for x, _ in extras]
    levels = [_unpack(words, bits, n)]
    for level, block in enumerate(plan):
        if level == 1:  # lanes hold up to 32 now: widen them before they can pass 255
            words, bits = _pack(_unpack(words, bits, n), 16), 16
        kinds = ["sum"] * len(words) + ([k for _, k in extras] if level < at else [])
        out = _reduce_blocks(words + (rest if level < at else []), kinds, block)
        words, rest = out[: len(words)], out[len(words) :] if level < at else rest
        levels.append(_unpack(words, bits, n))
    return levels, rest


def gather_capacity(size: int, mantissa: int | None = None) -> int:
    """The most entries a bracket may hold to end a search by gathering (0: never), in a group of
    `size` entries of task vectors that are differences of floats with `mantissa` bits (None: any).
    Smaller groups than 2**23 never gather: the passes it would save cost less than compiling it.
    bfloat16 differences (7 bits) never do: they end on runs of ties by counting, in as many
    passes. float16 differences (10 bits) gather one in 2048 of the entries: their runs of ties at
    the band's edges hold more than one in 8192, and a run that fits is gathered whole, without
    the passes that place the index threshold. Others gather one in 8192. A power of two."""
    if size < _GATHER_FROM or (mantissa is not None and mantissa <= 7):
        return 0
    share = _GATHER_SHARE_F16 if mantissa is not None and mantissa <= 10 else _GATHER_SHARE
    return 1 << (-(-size // share) - 1).bit_length()


class _Groups:
    """The groups of a call and how arrays of one value per group and target meet each part.

    Per-group values of all targets are stacked: [targets, *shape]."""

    def __init__(self, parts: Sequence[Part], sharded: bool, capacity: int | None = None):
        self.parts = tuple(parts)
        self.sharded = sharded
        self.multi = len(parts) > 1
        if self.multi:
            for p in parts:
                if tuple(p.axes) != tuple(range(1, p.values.ndim)):
                    raise ValueError("with several parts, each part is ranked over all axes but the first")
            self.shape = (parts[0].values.shape[0],)
        else:
            p = parts[0]
            self.shape = tuple(1 if a in p.axes else d for a, d in enumerate(p.values.shape))
        self.size = sum(p.size for p in parts)
        if self.size >= KEY_MAX:
            raise ValueError(f"a group of {self.size} entries does not fit int32 counts")
        self.plans = tuple(_block_plan(p.values.shape, p.axes, devices=jax.device_count() if sharded else 1) for p in parts)
        # lines of the positional index search: blocks of the first group axis when the first level
        # of the block plan sums them, else its single entries (the value passes count the ties per
        # line from that level)
        self.line, self.n_lines = None, 0
        if self.plans[0] and not (sharded or self.multi):
            (axis, r), a = self.plans[0][0], min(parts[0].axes)
            self.line = r if axis == a else 1
            self.n_lines = parts[0].values.shape[a] // self.line
        # extraction keeps one min/max per block at the coarsest level with enough blocks per group,
        # and at least the first (blocks of one entry would make its statistics leaf-sized)
        self.at, self.blocks = [], 0
        for p, plan in zip(parts, self.plans):
            at, r = 0, 1
            for _, f in plan:
                if at and p.size // (r * f) < _MIN_BLOCKS:
                    break
                at, r = at + 1, r * f
            self.at.append(at)
            self.blocks += p.size // r
        # the most candidates a bracket may hold to be gathered (0: never): one part, not sharded
        plan = self.plans[0]
        if sharded or self.multi or not plan:
            self.cap = 0
        elif capacity is not None:
            self.cap = min(capacity, self.size)
        else:
            self.cap = gather_capacity(self.size)

    def expand(self, g: jax.Array, p: int, lead: int = 1) -> jax.Array:
        """[*lead, *shape] values against part p's arrays with `lead` extra leading axes."""
        return g.reshape(g.shape + (1,) * (self.parts[p].values.ndim + lead - g.ndim))

    def total(self, x: jax.Array, p: int, lead: int = 1) -> jax.Array:
        """Sum an array of part p (blocked or not; `lead` extra leading axes) over its group axes."""
        axes = tuple(a + lead for a in self.parts[p].axes)
        return jnp.sum(x, axis=axes, keepdims=True).reshape(x.shape[:lead] + self.shape)


# ---------------------------------------------------------------- the value of each target rank


@dataclasses.dataclass(frozen=True)
class _Bracket:
    """Keys [lo, hi] hold each target's value; c_lo entries lie below lo, c_hi up to hi. `hint`:
    (has one, lo, hi, expected entries between) pivots for the next pass, from a miss or an
    extraction (lo > hi: the pass missed, but the next pivots are the sample's). Every field is [targets, *groups], but `lines`: the candidates per line that the
    last pass counted ([targets, *groups, lines], with `groups.line`); `tallied`: whether that
    pass's pivots were the resolved value's (the lines then count the entries equal to it).
    With gathering (`groups.cap`): `blocks`, the candidates of each target per first-level block
    that the last pass counted (packed, [words, *first-level shape]); `counted`, whether that
    pass's pivots were the bracket's ends (then `blocks` holds the bracket's entries); `index`, the
    index threshold of a value found by gathering, -1 elsewhere."""

    lo: jax.Array
    hi: jax.Array
    c_lo: jax.Array
    c_hi: jax.Array
    hint: tuple[jax.Array, jax.Array, jax.Array, jax.Array]
    lines: jax.Array | None = None
    tallied: jax.Array | None = None
    blocks: jax.Array | None = None
    counted: jax.Array | None = None
    index: jax.Array | None = None

    def replace(self, **kw) -> _Bracket:
        return dataclasses.replace(self, **kw)


jax.tree_util.register_dataclass(
    _Bracket, data_fields=["lo", "hi", "c_lo", "c_hi", "hint", "lines", "tallied", "blocks", "counted", "index"], meta_fields=[]
)


def _sample(groups: _Groups, budget: int) -> jax.Array:
    """A sorted strided sample of every group, [*groups.shape, S]: the whole group when all groups
    together hold at most `budget` entries. Empty in sharded mode: sorting a sample of a sharded
    array would gather it."""
    n_groups = math.prod(groups.shape)
    if groups.sharded:
        return jnp.zeros(groups.shape + (0,), jnp.int32)
    if groups.size * n_groups <= budget:
        per_group = groups.size
    else:
        per_group = max(64, min(_SAMPLE_MAX, min(budget, groups.size * n_groups // _SAMPLE_SHARE) // n_groups))
    pieces = []
    for part in groups.parts:
        shape, axes = part.values.shape, sorted(part.axes)
        factor = groups.size / per_group  # one entry in `factor` of every part
        slices = [slice(None)] * len(shape)
        for i, a in enumerate(sorted(axes, key=lambda a: shape[a])):
            step = max(1, min(shape[a], round(factor ** (1 / (len(axes) - i)))))
            step |= 1 if step > 1 else 0  # odd strides do not alias with power-of-two structure
            factor /= step
            slices[a] = slice(step // 2, None, step)
        s = Part(part.values[tuple(slices)], ()).keys
        s = jnp.moveaxis(s, axes, list(range(s.ndim - len(axes), s.ndim)))
        s = s.reshape(s.shape[: s.ndim - len(axes)] + (-1,))
        pieces.append(s if groups.multi else s.reshape(groups.shape + (-1,)))
    return jnp.sort(jnp.concatenate(pieces, axis=-1), axis=-1)


@dataclasses.dataclass(frozen=True)
class _Sample:
    """A sorted sample of every group (`keys`, [*groups, S]) and the number of distinct keys up to
    each of its positions (`distinct`), side by side in `table` ([*groups, 2 S]) and fixed for a
    whole search. Each query is one reduction (`count`) or one gather (`pick`) however many values
    it asks for: every reduction or gather is a kernel of its own to compile."""

    table: jax.Array

    @classmethod
    def of(cls, keys: jax.Array) -> _Sample:
        new = jnp.concatenate([jnp.ones_like(keys[..., :1], bool), keys[..., 1:] != keys[..., :-1]], axis=-1)
        return cls(jnp.concatenate([keys, _running_sums(new)], axis=-1))

    @property
    def size(self) -> int:
        return self.table.shape[-1] // 2

    @property
    def keys(self) -> jax.Array:
        return self.table[..., : self.size]

    def count(self, below: Sequence[jax.Array] = (), upto: Sequence[jax.Array] = ()) -> list[jax.Array]:
        """The number of keys below each key of `below`, then up to each of `upto` ([targets, *groups])."""
        keys = self.keys
        hits = [(keys < v[..., None]).astype(jnp.int32) for v in below] + [(keys <= v[..., None]).astype(jnp.int32) for v in upto]
        zero = [jnp.int32(0)] * len(hits)
        return list(lax.reduce(hits, zero, lambda a, b: [x + y for x, y in zip(a, b)], (hits[0].ndim - 1,)))

    def pick(self, keys: Sequence[jax.Array] = (), distinct: Sequence[jax.Array] = ()) -> list[jax.Array]:
        """The keys at positions `keys`, then the distinct counts at positions `distinct`
        ([targets, *groups] each; clipped to the sample)."""
        size = self.size
        at = [jnp.clip(i, 0, size - 1) for i in keys] + [size + jnp.clip(i, 0, size - 1) for i in distinct]
        return list(jnp.moveaxis(_take(self.table, jnp.stack(at, axis=-1), self.table.ndim - 1), -1, 0))


def _position(sample: _Sample, b: _Bracket, k: jax.Array, between: tuple[jax.Array, jax.Array] | None = None):
    """Where each target stands in the sample: the position of its first key in [lo, hi] and how
    many keys it holds there, the target's expected position among all the keys and its standard
    deviation (None for an empty sample); also, in the same reduction, the number of keys
    `between` two other keys (float; 0 without them or a sample)."""
    seen = jnp.zeros(b.lo.shape, jnp.float32)
    if not sample.size:
        return None, seen
    if between is None:
        first, upto = sample.count(below=[b.lo], upto=[b.hi])
    else:
        first, lo, upto, hi = sample.count(below=[b.lo, between[0]], upto=[b.hi, between[1]])
        seen = jnp.maximum(hi - lo, 0).astype(jnp.float32)
    m = upto - first
    f = ((k - b.c_lo).astype(jnp.float32) + 0.5) / jnp.maximum(b.c_hi - b.c_lo, 1).astype(jnp.float32)
    return (first, m, first + f * m - 0.5, jnp.sqrt(m * f * (1 - f))), seen


def _take(x: jax.Array, i: jax.Array, axis: int) -> jax.Array:
    """The entries at positions i (in bounds) along `axis` of each row of x (its axes before
    `axis`): x [*rows, n, *rest], i [*lead, *rows, m] -> [*lead, *rows, m, *rest]. One gather from
    x flattened (jnp.take_along_axis builds an index for every axis: more code to compile)."""
    rows, n = x.shape[:axis], x.shape[axis]
    row = jnp.arange(math.prod(rows), dtype=jnp.int32).reshape(rows + (1,))
    return x.reshape((-1,) + x.shape[axis + 1 :])[row * n + i]


def _sample_pivots(sample: _Sample, at, b: _Bracket) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Pivots from the sample, given where the target stands in it (`at`: its `_position`; None for
    an empty sample), from one gather:

    - sample keys that bracket the target inside [lo, hi], where its rank among the sample points
      in [lo, hi] is expected +- 2.5 standard deviations (the bracket's own end where the sample
      runs out), and the share of the bracket's entries expected between them;
    - the sample keys `_NEAR` standard deviations either side of its expected position (the
      bracket's ends where the sample runs out), and whether the sample's keys there repeat, on
      average at least twice. They do where the keys lie on a coarse lattice with runs of ties at
      its points, as differences of bf16 weights do: pivots interpolated between keys then miss
      the runs, while these land on them."""
    if at is None:
        return (b.lo, b.hi, jnp.ones(b.lo.shape, jnp.float32)), (b.lo, b.hi, jnp.zeros(b.lo.shape, bool))
    first, m, pos, sd = at
    i_lo, i_hi = jnp.floor(pos - _SPREAD * sd - 1).astype(jnp.int32), jnp.ceil(pos + _SPREAD * sd + 1).astype(jnp.int32)
    j_lo, j_hi = jnp.floor(pos - sd).astype(jnp.int32), jnp.ceil(pos + sd).astype(jnp.int32)
    n_lo, n_hi = jnp.floor(pos - _NEAR * sd).astype(jnp.int32), jnp.ceil(pos + _NEAR * sd).astype(jnp.int32)
    k_i_lo, k_i_hi, k_j_lo, k_j_hi, k_n_lo, k_n_hi, d_last, d_first = sample.pick(
        keys=[i_lo, i_hi, j_lo, j_hi, n_lo, n_hi], distinct=[first + m - 1, first]
    )
    share = (jnp.minimum(i_hi, first + m) - jnp.maximum(i_lo, first) + 1) / jnp.maximum(m, 1)
    s_lo = jnp.where(i_lo < first, b.lo, k_i_lo)
    s_hi = jnp.where(i_hi >= first + m, b.hi, k_i_hi)
    # a run of equal keys as wide as one standard deviation either side: it likely holds the target
    run = (j_lo >= first) & (j_hi < first + m) & (m >= 8) & (k_j_lo == k_j_hi)
    share = jnp.where(run, (j_hi - j_lo + 1) / jnp.maximum(m, 1), share)
    near = jnp.where(n_lo < first, b.lo, k_n_lo), jnp.where(n_hi >= first + m, b.hi, k_n_hi)
    lumpy = (m > 0) & ((d_last - d_first + 1) * 2 <= m)
    return (jnp.where(run, k_j_lo, s_lo), jnp.where(run, k_j_lo, s_hi), share), (*near, lumpy)


def _interp_pivots(sample: _Sample, b: _Bracket, k: jax.Array, least: float = 0.0) -> tuple[jax.Array, ...]:
    """Pivots for the next pass: the hint if there is one; else, where the sample's keys repeat,
    sample keys close to the target (`_sample_pivots`); else around the key where rank k is expected
    if the keys in [lo, hi] were evenly spread, when that agrees with the sample (it does not where
    keys cluster), and the sample's bracket when not; that one holds `least` entries either side of
    its center at least. Also the expected number of entries between them, whether the bracket
    could not be narrowed, and whether the pivots are sample keys that repeat (runs of ties)."""
    r = jnp.maximum(b.c_hi - b.c_lo, 1).astype(jnp.float32)
    width = (b.hi - b.lo).astype(jnp.float32) + 1.0
    off = jnp.floor(((k - b.c_lo).astype(jnp.float32) + 0.5) / r * width)
    center = b.lo + jnp.clip(off, 0.0, jnp.minimum(width - 1, _BIG)).astype(jnp.int32)
    m = jnp.maximum(_MARGIN * jnp.sqrt(r) + _BIAS * r + 1.0, least)
    mk = jnp.minimum(jnp.ceil(m / r * width), _BIG).astype(jnp.int32)
    p_lo = jnp.where(center - b.lo <= mk, b.lo, center - mk)
    p_hi = jnp.where(b.hi - center <= mk, b.hi, center + mk)
    expected = jnp.minimum(r, 2 * m + 1)
    at, seen = _position(sample, b, k, (p_lo, p_hi))  # seen: sample keys in [p_lo, p_hi]
    (s_lo, s_hi, share), (n_lo, n_hi, lumpy) = _sample_pivots(sample, at, b)
    m_s = jnp.zeros(b.lo.shape, jnp.float32) if at is None else at[1].astype(jnp.float32)  # sample keys in [lo, hi]
    due = m_s * expected / r
    agree = (s_lo <= p_lo) & (p_hi <= s_hi) & ((due < 8) | (seen * 4 > due)) & (s_lo < s_hi)
    linear = agree | ((s_lo == b.lo) & (s_hi == b.hi))  # or the sample is no help
    p_lo, p_hi, expected = (jnp.where(linear, x, y) for x, y in ((p_lo, s_lo), (p_hi, s_hi), (expected, share * r)))
    if at is not None:
        n_below, n_upto = sample.count(below=[n_lo], upto=[n_hi])
        expected = jnp.where(lumpy, jnp.maximum(n_upto - n_below, 0) / jnp.maximum(m_s, 1) * r, expected)
    p_lo, p_hi = jnp.where(lumpy, n_lo, p_lo), jnp.where(lumpy, n_hi, p_hi)
    has, h_lo, h_hi, h_n = b.hint
    has = has & (h_lo <= h_hi)
    p_lo, p_hi, expected = jnp.where(has, h_lo, p_lo), jnp.where(has, h_hi, p_hi), jnp.where(has, h_n, expected)
    runs = lumpy & ~has
    # pivots inside the bracket, in order: then every pass narrows it (or resolves it)
    p_lo = jnp.clip(p_lo, b.lo, b.hi)
    p_hi = jnp.clip(p_hi, p_lo, b.hi)
    pin = (p_lo == b.lo) & (p_hi == b.hi)  # counting there would not narrow the bracket
    p_lo, p_hi = jnp.where(pin, center, p_lo), jnp.where(pin, center, p_hi)
    return p_lo, p_hi, jnp.where(pin, 1.0, expected), pin, runs & ~pin


def _update(b: _Bracket, k, p_lo, p_hi, c_below, c_upto, runs) -> _Bracket:
    """The part of [lo, hi] that holds rank k, given the counts below p_lo and up to p_hi. After a
    miss, hint pivots extrapolated from the density of entries between the pivots, unless they
    were one key or `runs` (sample keys that repeat)."""
    fixed = b.lo == b.hi  # resolved (or k == 0 or k == n): keep
    low, high = ~fixed & (k < c_below), ~fixed & (k >= c_upto)
    inner = ~fixed & ~low & ~high
    lo = jnp.where(low | fixed, b.lo, jnp.where(high, p_hi + 1, p_lo))
    hi = jnp.where(high | fixed, b.hi, jnp.where(low, p_lo - 1, p_hi))
    c_lo = jnp.where(high, c_upto, jnp.where(inner, c_below, b.c_lo))
    c_hi = jnp.where(low, c_below, jnp.where(inner, c_upto, b.c_hi))
    # After a miss the target lies d entries beyond the pivot it missed. Two estimates of its key:
    # the tangent (the density between the pivots) and the chord (the density across the new
    # bracket); where the density is monotone they lie on either side of it.
    d = jnp.where(low, c_below - k, k - c_upto + 1).astype(jnp.float32)
    near = (c_upto - c_below).astype(jnp.float32) / ((p_hi - p_lo).astype(jnp.float32) + 1.0)
    across = (c_hi - c_lo).astype(jnp.float32) / ((hi - lo).astype(jnp.float32) + 1.0)
    m = _MARGIN * jnp.sqrt(d) + 2.0  # sampling noise, in entries
    reach = [jnp.minimum(jnp.ceil(x / jnp.maximum(rho, 1e-30)), _BIG).astype(jnp.int32)
             for x, rho in ((d - m, jnp.maximum(near, across)), (d + m, jnp.minimum(near, across)))]
    h_lo = jnp.where(low, jnp.maximum(p_lo - reach[1], lo), jnp.minimum(p_hi + reach[0], hi))
    h_hi = jnp.where(low, jnp.maximum(p_lo - reach[0], lo), jnp.minimum(p_hi + reach[1], hi))
    # with no entries between the pivots the keys are sparse (few distinct values): extract it all
    guess = c_upto - c_below >= 2
    # after a miss on one key or on runs of ties that the sample pointed at, no hint pivots (an
    # empty pair): the sample's pivots in the new bracket serve better than extrapolation from runs
    one = (p_lo == p_hi) | runs
    h_lo, h_hi = jnp.where(one, 1, jnp.where(guess, h_lo, lo)), jnp.where(one, 0, jnp.where(guess, h_hi, hi))
    hint = (low | high, h_lo, h_hi, jnp.zeros_like(d))
    return _Bracket(lo, hi, c_lo, c_hi, hint)


def _value_pass(groups: _Groups, p_lo: jax.Array, p_hi: jax.Array, extract: bool):
    """Count the entries below each target's pivots ([key < lo'], [key <= hi']); the candidates
    (lo' <= key <= hi') per line of `groups.line` ([targets, *groups, lines]; None without lines);
    with `extract`, also per target and block the number, min and max of the candidates; with
    gathering, the candidates per target and first-level block (packed 4 to a word; else None)."""
    n_t = p_lo.shape[0]
    below, upto, stats, lines, blocks = 0, 0, [], None, None
    for p, (part, plan) in enumerate(zip(groups.parts, groups.plans)):
        keys = part.keys
        lo, hi = groups.expand(p_lo, p), groups.expand(p_hi, p)
        lanes = [x for t in range(n_t) for x in (keys < lo[t], keys <= hi[t])]
        extras = []
        if extract:
            for t in range(n_t):
                cand = (keys >= lo[t]) & (keys <= hi[t])
                extras += [(jnp.where(cand, keys, KEY_MAX), "min"), (jnp.where(cand, keys, -1), "max")]
        levels, extras = _blocked(lanes, extras, plan, groups.at[p] if extract else 0)
        below = below + groups.total(jnp.stack(levels[-1][0::2]), p)
        upto = upto + groups.total(jnp.stack(levels[-1][1::2]), p)
        if extract:
            fine = levels[groups.at[p]]
            stats.append((jnp.stack(extras[0::2]), jnp.stack(extras[1::2]), jnp.stack(fine[1::2]) - jnp.stack(fine[0::2])))
        if groups.line or groups.cap:  # candidates per target and first-level block
            cand = jnp.stack(levels[1][1::2]) - jnp.stack(levels[1][0::2])
        if groups.line:  # levels[1] holds the lines of the first group axis: sum the other group axes
            a = min(part.axes)
            c = jnp.moveaxis(jnp.sum(cand, axis=tuple(x + 1 for x in part.axes if x != a), keepdims=True), a + 1, -1)
            lines = c.reshape(c.shape[:1] + groups.shape + c.shape[-1:])
        if groups.cap:
            blocks = jnp.stack(_pack(list(cand), 8))
    return below, upto, stats, lines, blocks


def _select_extracted(groups: _Groups, stats, j: jax.Array, lo: jax.Array, hi: jax.Array):
    """From each target's per-block number, min and max of its candidates in [lo, hi]: keys
    a <= m <= b, the target's j-th smallest candidate (0-based) lies in [a, b] and about as often on
    either side of m; the candidates below and up to a. `complete` (then a == b and the counts are
    exact) unless some block held more of the target's candidates than its min and max."""
    weights, incomplete = [], 0
    for p, (mn, mx, c) in enumerate(stats):
        same = mn == mx
        w_mn = jnp.where(same, c, jnp.minimum(c, 1))
        w_mx = jnp.where(same, 0, jnp.minimum(c, 2) - jnp.minimum(c, 1))
        middle = c - w_mn - w_mx  # candidates strictly between min and max, unseen
        weights.append((mn, mx, w_mn, w_mx, middle, mn, mx))
        incomplete = incomplete + groups.total((middle > 0).astype(jnp.int32), p)

    def upto(u):  # [3, targets, *groups]: candidates <= u counting the unseen as low as they may
        # lie (an upper bound), as high (a lower bound), and both (their sum, twice the midpoint)
        up, down = 0, 0
        for p, (mn, mx, w_mn, w_mx, middle, first, last) in enumerate(weights):
            ue = groups.expand(u, p, 2)
            seen = jnp.where(mn <= ue, w_mn, 0) + jnp.where(mx <= ue, w_mx, 0)
            up = up + groups.total(seen + jnp.where(first <= ue, middle, 0), p, 2)
            down = down + groups.total(seen + jnp.where(last <= ue, middle, 0), p, 2)
        return jnp.stack([up[0], down[1], up[2] + down[2]])

    target = jnp.stack([j, j, 2 * j + 1])

    def step(s):
        a, b, c_a, c_b = s  # c_a: candidates < a, c_b: candidates <= b
        mid = a + (b - a) // 2
        c = upto(mid)
        ok = (c > target) | (a == b)
        return jnp.where(ok, a, mid + 1), jnp.where(ok, mid, b), jnp.where(ok, c_a, c), jnp.where(ok & (a < b), c, c_b)

    total = sum(groups.total(c, p) for p, (_, _, c) in enumerate(stats))
    start = (jnp.stack([lo] * 3), jnp.stack([hi] * 3), jnp.zeros((3, *j.shape), jnp.int32), jnp.stack([total] * 3))
    a, _, c_a, c_b = lax.while_loop(lambda s: jnp.any(s[0] < s[1]), step, start)
    return a[0], a[2], a[1], c_a[0], c_b[0], incomplete == 0  # the counts are exact when complete


def _value_search(groups: _Groups, k: jax.Array, budget: int) -> _Bracket:
    """Brackets [v, v] of the value of each target rank k ([targets, *groups]), with exact counts
    below and up to v."""
    n = groups.size
    no = jnp.zeros(k.shape, bool)
    zero = jnp.zeros(k.shape, jnp.int32)
    # k == 0: nothing below (value 0, index 0); k == n: everything below (index = size)
    open_, edge = (k > 0) & (k < n), jnp.where(k == 0, 0, KEY_MAX)
    start = _Bracket(
        jnp.where(open_, 0, edge), jnp.where(open_, KEY_MAX, edge),
        jnp.where(open_, 0, k), jnp.where(open_, n, k), (no, zero, zero, zero.astype(jnp.float32)),
        jnp.zeros(k.shape + (groups.n_lines,), jnp.int32) if groups.line else None, no,
    )
    if groups.cap:
        (axis, r), first = groups.plans[0][0], list(groups.parts[0].values.shape)
        first[axis] //= r
        start = start.replace(blocks=jnp.zeros((-(-k.shape[0] // 4), *first), jnp.int32), counted=no, index=zero - 1)

    # the first pass takes its pivots from the sample, later ones interpolate; extract once every
    # open bracket holds (or is expected to hold) few entries
    sample = _Sample.of(_sample(groups, budget))
    if sample.size == n:  # the sample is the group: its k-th key is the value
        s_lo = s_hi = sample.pick(keys=[jnp.minimum(k, n - 1)])[0]
    else:
        (s_lo, s_hi, _), _ = _sample_pivots(sample, _position(sample, start, k)[0], start)
    start = start.replace(hint=(open_, s_lo, s_hi, jnp.full(k.shape, jnp.inf)))
    few = n if not any(groups.at) else max(2.0, _FEW * groups.blocks)  # blocks of one entry are always complete

    def body(b: _Bracket) -> _Bracket:
        p_lo, p_hi, expected, pin, runs = _interp_pivots(sample, b, k, _FILL * groups.cap)
        # a bracket that may be gathered is counted whole (once more if the last pass did not)
        small = (b.c_hi - b.c_lo <= groups.cap) if groups.cap else no
        # else extract the whole bracket when it holds few entries or few keys (runs of ties are
        # always complete) or cannot be narrowed; extracting costs more than counting, but not
        # much: without gathering, do it as soon as one bracket is ready
        whole = ((((b.c_hi - b.c_lo <= few) | (b.hi - b.lo < 2)) & ~b.hint[0]) | pin) & ~small
        ready = whole | ((expected <= few) & ~small if not groups.cap else no)
        extract = jnp.any((b.lo < b.hi) & ready)
        p_lo, p_hi = jnp.where(whole & extract, b.lo, p_lo), jnp.where(whole & extract, b.hi, p_hi)
        p_lo, p_hi = jnp.where(small, b.lo, p_lo), jnp.where(small, b.hi, p_hi)

        def count_only(_):
            below, upto, _, lines, blocks = _value_pass(groups, p_lo, p_hi, extract=False)
            return below, upto, lines, blocks, (p_lo, p_lo, p_lo, below, below, no)

        def with_extraction(_):
            below, upto, stats, lines, blocks = _value_pass(groups, p_lo, p_hi, extract=True)
            return below, upto, lines, blocks, _select_extracted(groups, stats, k - below, p_lo, p_hi)

        below, upto, lines, blocks, (a, m, z, c_lt, c_le, complete) = lax.cond(extract, with_extraction, count_only, None)
        nb = _update(b, k, p_lo, p_hi, below, upto, runs)
        inside = ~nb.hint[0] & (nb.lo < nb.hi)
        done = inside & complete
        # next pivots from the extraction's bounds: [a, m] (the target lies in it or above m, about
        # as likely); if that is the whole bracket, its midpoint
        refine = inside & extract & ready & ~complete
        m = jnp.minimum(m, z)
        whole_again = (a == nb.lo) & (m >= nb.hi)
        mid = nb.lo + (nb.hi - nb.lo) // 2
        h_lo, h_hi = jnp.where(whole_again, mid, a), jnp.where(whole_again, mid, m)
        lo, hi = jnp.where(done, a, nb.lo), jnp.where(done, a, nb.hi)
        return nb.replace(
            lo=lo, hi=hi, c_lo=jnp.where(done, below + c_lt, nb.c_lo), c_hi=jnp.where(done, below + c_le, nb.c_hi),
            hint=tuple(jnp.where(refine, x, y) for x, y in zip((refine, h_lo, h_hi, jnp.zeros(k.shape)), nb.hint)),
            lines=lines, tallied=(p_lo == lo) & (p_hi == hi) & (lo == hi),
            blocks=blocks, counted=(p_lo == lo) & (p_hi == hi) if groups.cap else None, index=b.index,
        )

    def gatherable(b: _Bracket) -> jax.Array:
        return (b.lo < b.hi) & b.counted & (b.c_hi - b.c_lo <= groups.cap) if groups.cap else no

    def searching(b: _Bracket) -> jax.Array:
        # with lines, also until the last pass counted the ties of every value that some rank splits
        # (one more pass only where a value was found by a miss or by extraction)
        untallied = (b.c_lo < k) & ~b.tallied if groups.line else False
        return jnp.any(((b.lo < b.hi) | untallied) & ~gatherable(b))

    b = lax.while_loop(searching, body, start)
    if not groups.cap:
        return b
    g = gatherable(b)
    value, under, index = lax.cond(jnp.any(g), lambda: _gathered(groups, b, k), lambda: (b.lo, b.c_lo, b.index))
    pick = functools.partial(jnp.where, g)  # c_hi is left as it was: nothing reads it after the search
    return b.replace(lo=pick(value, b.lo), hi=pick(value, b.hi), c_lo=pick(under, b.c_lo), index=pick(index, b.index))


def _running_sums(x: jax.Array) -> jax.Array:
    """Inclusive running sums of int32 counts along the last axis: integer matmuls with a
    triangular matrix per block of `_PREFIX`, then the same over the block totals. (XLA:CPU
    rewrites jnp.cumsum into a tree of reduce-windows, each compiled as a kernel of its own.)"""
    n = x.shape[-1]
    blocks = -(-n // _PREFIX)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, blocks * _PREFIX - n)]).reshape(x.shape[:-1] + (blocks, _PREFIX))
    upper = (jnp.arange(_PREFIX)[:, None] <= jnp.arange(_PREFIX)).astype(jnp.int32)
    sums = jnp.matmul(x.astype(jnp.int32), upper, preferred_element_type=jnp.int32)
    if blocks > 1:
        totals = sums[..., -1]
        sums = sums + (_running_sums(totals) - totals)[..., None]
    return sums.reshape(x.shape[:-2] + (blocks * _PREFIX,))[..., :n]


def _set_bits(mask: jax.Array, size: int) -> jax.Array:
    """Positions of the first `size` True entries of each row of a [rows, n, width <= 32] mask
    (flattened per row: word * width + bit), in order; n * width in the slots after the last (as
    jnp.nonzero(size=)). Each run of `width` entries is packed into one uint32 word.
    Slot j lies in the word whose running count of set bits first passes j: the words whose count
    ends at or before j are counted by a scatter into the slots, and the bit by halving the word.
    Everything but the scatter and the count is `size` wide, however many words there are."""
    rows, n, width = mask.shape
    words = jnp.sum(mask.astype(jnp.uint32) << jnp.arange(width, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
    counts = lax.population_count(words).astype(jnp.int32)
    ends = _running_sums(counts)
    row = jnp.arange(rows)[:, None]
    word = _running_sums(jnp.zeros((rows, size), jnp.int32).at[row, ends].add(1, mode="drop"))
    at = jnp.minimum(word, n - 1)
    x, rank = jnp.moveaxis(_take(jnp.stack([lax.bitcast_convert_type(words, jnp.int32), ends - counts], -1), at, 1), -1, 0)
    x, rank, bit = lax.bitcast_convert_type(x, jnp.uint32), jnp.arange(size, dtype=jnp.int32) - rank, jnp.zeros_like(at)
    for half in (16, 8, 4, 2, 1):  # the rank-th set bit of x: skip the lower half where it lies above
        low = lax.population_count((x >> bit.astype(jnp.uint32)) & jnp.uint32((1 << half) - 1)).astype(jnp.int32)
        up = rank >= low
        rank, bit = rank - jnp.where(up, low, 0), bit + jnp.where(up, half, 0)
    return jnp.where(word < n, word * width + bit, n * width)


def _gathered(groups: _Groups, b: _Bracket, k: jax.Array) -> tuple[jax.Array, ...]:
    """The value of each target rank k, the entries below it, and its index threshold, for
    brackets that the last pass counted whole (`b.blocks`): the first-level blocks that hold
    candidates are found from one bit per block, read (a gather, which XLA fuses with the part's
    computation), and their candidates found from one bit per entry; their keys sorted give the
    value, the flat indices of its ties sorted the index threshold. At most `groups.cap`
    candidates per target and group."""
    part, cap, n_t = groups.parts[0], groups.cap, k.shape[0]
    (axis, r), shape = groups.plans[0][0], part.values.shape
    axes, free = sorted(part.axes), [a for a in range(len(shape)) if a not in part.axes]
    first = [d // r if a == axis else d for a, d in enumerate(shape)]
    n_groups, n_blocks = math.prod(shape[a] for a in free), math.prod(first[a] for a in axes)
    rows, n_words = n_t * n_groups, -(-n_blocks // 32)
    c_blocks = min(cap, n_blocks)  # the most blocks that hold candidates

    cand = jnp.stack(_unpack(list(b.blocks), 8, n_t))  # [targets, *first]: candidates per block
    cand = jnp.transpose(cand, [0] + [a + 1 for a in free + axes]).reshape(rows, n_blocks)
    cand = jnp.pad(cand > 0, ((0, 0), (0, n_words * 32 - n_blocks))).reshape(rows, n_words, 32)
    block = _set_bits(cand, c_blocks)  # [rows, c_blocks]: the blocks with candidates
    valid = (block < n_blocks)[..., None]  # [rows, c_blocks, 1]

    # the entries of those blocks: [rows, c_blocks, r]
    index = [None] * len(shape)
    g = jnp.arange(rows) % n_groups
    for a, c in zip(free, jnp.unravel_index(g, [shape[a] for a in free]) if free else ()):
        index[a] = c[:, None, None]
    for a, c in zip(axes, jnp.unravel_index(jnp.minimum(block, n_blocks - 1), [first[a] for a in axes])):
        index[a] = c[..., None] * r + jnp.arange(r) if a == axis else c[..., None]
    keys = Part(part.values[tuple(index)], ()).keys
    flat = _row_major([index[a] for a in axes], [shape[a] for a in axes])
    lo, hi = (x.reshape(rows, 1, 1) for x in (b.lo, b.hi))
    keep = _set_bits(valid & (keys >= lo) & (keys <= hi), cap)  # [rows, cap]: the candidates
    ok = keep < keys[0].size
    table = jnp.stack([keys, jnp.broadcast_to(flat, keys.shape)], -1).reshape(rows, -1, 2)
    ck, cf = jnp.moveaxis(_take(table, jnp.minimum(keep, keys[0].size - 1), 1), -1, 0)
    ck = jnp.where(ok, ck, KEY_MAX)

    # the value: the j-th smallest candidate key; its index: the flat index of the tie that has
    # rank k (single-array sorts: XLA:CPU sorts (key, index) pairs 6x slower)
    c_lo, k = b.c_lo.reshape(rows, 1), k.reshape(rows, 1)
    value = _take(jnp.sort(ck, axis=1), jnp.clip(k - c_lo, 0, cap - 1), 1)
    under = c_lo + jnp.sum(ck < value, axis=1, keepdims=True, dtype=jnp.int32)
    ties = jnp.sort(jnp.where(ck == value, cf, KEY_MAX), axis=1)
    idx = jnp.where(under == k, 0, _take(ties, jnp.clip(k - under, 0, cap - 1), 1))  # no tie below rank k: index 0, as elsewhere
    return tuple(x.reshape(b.lo.shape) for x in (value, under, idx))


# ---------------------------------------------------------------- the index threshold inside a run of ties


def _lines(part: Part, line: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The part's shape for positional search, and its group axes there: with `line`, the first group
    axis is split into blocks of that many (the lines the value passes count); else a single group
    axis is split in two near its square root, so that no running sum spans a whole group."""
    shape, axes = tuple(part.values.shape), tuple(sorted(part.axes))
    if line == 1:
        return shape, axes
    if line:
        a = axes[0]
        return shape[:a] + (shape[a] // line, line) + shape[a + 1 :], (a, a + 1) + tuple(x + 1 for x in axes[1:])
    if len(axes) != 1 or shape[axes[0]] < 64:
        return shape, axes
    a, d = axes[0], shape[axes[0]]
    inner = max(b for b in range(1, math.isqrt(d) + 1) if d % b == 0)
    if inner == 1:
        return shape, axes
    return shape[:a] + (d // inner, inner) + shape[a + 1 :], (a, a + 1)


def _in_view(g: jax.Array, shape: Sequence[int], axes: Sequence[int]) -> jax.Array:
    """[targets, *groups] values against a part viewed as `shape` with group `axes` (plus targets)."""
    return g.reshape(g.shape[:1] + tuple(1 if a in axes else d for a, d in enumerate(shape)))


def _count_along(groups: _Groups, mask: jax.Array, axes: Sequence[int], axis: int | None) -> jax.Array:
    """Counts of a [targets, *view] mask at each position along view `axis`, summed over the other
    group `axes`: [targets, *groups, d] (d = 1 when the part has no group axis)."""
    others = [a + 1 for a in axes if a != axis]
    x = mask.astype(jnp.int32)
    for block in _block_plan(x.shape, others, levels=1, devices=jax.device_count() if groups.sharded else 1):
        x = _reduce_blocks([x], ["sum"], block)[0]
    c = jnp.sum(x, axis=tuple(others), keepdims=True)
    c = c[..., None] if axis is None else jnp.moveaxis(c, axis + 1, -1)
    return c.reshape(c.shape[:1] + groups.shape + (c.shape[-1],))


def _locate(counts: jax.Array, j: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Position along the last axis of the j-th counted entry (0-based), and the count before it."""
    run = _running_sums(counts)
    before = run <= j[..., None]
    return jnp.sum(before, axis=-1, dtype=jnp.int32), jnp.sum(jnp.where(before, counts, 0), axis=-1)


def _count_in_slices(groups: _Groups, part: Part, shape, axes, value: jax.Array, pos: Sequence[jax.Array]) -> jax.Array:
    """Counts of the entries equal to each target's value at each position along view axis
    axes[len(pos)], within the slice at positions `pos` along the group axes before it:
    [targets, *groups, d]. Only the slices are read (a gather, which XLA fuses with the part's
    computation), not the part."""
    n_free = len(shape) - len(axes)
    keys = jnp.moveaxis(part.keys.reshape(shape), axes, range(n_free, len(shape)))  # [*free, *group axes]
    free, dims = keys.shape[:n_free], keys.shape[n_free:]
    counts = []
    for t in range(value.shape[0]):
        at = [jnp.clip(g[t].reshape(free), 0, d - 1) for g, d in zip(pos, dims)]
        sub = keys[tuple(jnp.indices(free, sparse=True)) + tuple(at)]  # [*free, *group axes from len(pos)]
        ties = sub == value[t].reshape(free + (1,) * (len(dims) - len(pos)))
        c = jnp.sum(ties, axis=tuple(range(n_free + 1, sub.ndim)), dtype=jnp.int32)
        counts.append(c.reshape(groups.shape + c.shape[-1:]))
    return jnp.stack(counts)


def _index_search(groups: _Groups, value: jax.Array, j: jax.Array, lines: jax.Array | None = None) -> list[jax.Array]:
    """Index threshold per part of each target ([targets, *groups] each): the position (ties ordered
    by part, then by flat index) before which exactly j entries equal the value. The ties per line
    along the first group axis (which also pick the part) are `lines`, as the value search counted
    them, or one pass; then a read of the chosen slice per further axis."""
    views = [_lines(p, groups.line) for p in groups.parts]
    if lines is None:
        ties = [p.keys.reshape(shape)[None] == _in_view(value, shape, axes) for p, (shape, axes) in zip(groups.parts, views)]
        firsts = [_count_along(groups, t, axes, axes[0] if axes else None) for t, (_, axes) in zip(ties, views)]
    else:
        firsts = [lines]
    starts = [0]
    for f in firsts:
        starts.append(starts[-1] + f.shape[-1])
    x, base = _locate(jnp.concatenate(firsts, axis=-1), j)
    chosen = sum(jnp.where(x >= s, 1, 0) for s in starts[1:-1]) + jnp.zeros_like(x)
    pos = [x - sum(jnp.where(chosen == p, s, 0) for p, s in enumerate(starts[:-1]))]
    rest = j - base

    for level in range(1, max(len(axes) for _, axes in views)):
        x, base = 0, 0
        for p, (part, (shape, axes)) in enumerate(zip(groups.parts, views)):
            if len(axes) <= level:
                continue
            xp, bp = _locate(_count_in_slices(groups, part, shape, axes, value, pos), rest)
            x, base = x + jnp.where(chosen == p, xp, 0), base + jnp.where(chosen == p, bp, 0)
        pos.append(x)
        rest = rest - base

    out = []
    for p, (part, (shape, axes)) in enumerate(zip(groups.parts, views)):
        flat = _row_major(pos[: len(axes)], [shape[a] for a in axes])
        out.append(jnp.where(chosen > p, part.size, jnp.where(chosen == p, flat, 0)))
    return out


def _index_by_count(groups: _Groups, value: jax.Array, j: jax.Array) -> list[jax.Array]:
    """The index thresholds found by the value search itself, on keys that are the position (part
    offset + flat index) of each entry equal to the value and KEY_MAX elsewhere: reductions only,
    for sharded arrays (the running sums of `_index_search` would gather their counts)."""
    offsets = [0]
    for part in groups.parts[:-1]:
        offsets.append(offsets[-1] + part.size)

    def tie_positions(p: Part, i: int, off: int, t: int) -> jax.Array:
        return jnp.where(p.keys == groups.expand(value, i)[t], p.index + off, KEY_MAX)

    out = []
    for t in range(value.shape[0]):  # one search per target: each has its own keys
        # recomputed in each pass (never stored): positions of the ties, KEY_MAX elsewhere
        keyed = [Part(functools.partial(tie_positions, p, i, off, t), p.axes)
                 for i, (p, off) in enumerate(zip(groups.parts, offsets))]
        found = _value_search(_Groups(keyed, sharded=True), j[t][None], 0).lo[0]
        out.append([jnp.clip(found - off, 0, p.size) for p, off in zip(groups.parts, offsets)])
    return [jnp.stack([o[i] for o in out]) for i in range(len(groups.parts))]


def _sorted_thresholds(part: Part, groups: _Groups, k: jax.Array) -> list[Threshold]:
    """The thresholds of small groups, from a sort of each whole group by key (stable: ties stay in
    flat index order), which compiles to far less than the search."""
    axes = sorted(part.axes)
    ends = list(range(part.values.ndim - len(axes), part.values.ndim))
    keys, index = (jnp.moveaxis(x, axes, ends).reshape(-1, groups.size) for x in (part.keys, part.index))
    keys, index = lax.sort((keys, index), dimension=1, num_keys=1, is_stable=True)
    k = k.reshape(k.shape[0], -1, 1)
    at = jnp.minimum(k, groups.size - 1)
    value = _take(keys, at, 1)
    value = jnp.where(k == 0, 0, jnp.where(k == groups.size, KEY_MAX, value))  # as the search gives them
    under = jnp.sum(keys < value, axis=2, keepdims=True, dtype=jnp.int32)
    index = _take(index, at, 1)
    index = jnp.where(k == groups.size, part.size, jnp.where(under < k, index, 0))
    shape = (k.shape[0],) + groups.shape
    value, index, under = (x.reshape(shape) for x in (value, index, under))
    return [Threshold(value[t], (index[t],), under[t]) for t in range(k.shape[0])]


def rank_thresholds(
    parts: Sequence[Part],
    ranks: Sequence[int | jax.Array],
    *,
    sample: int | None = None,
    sharded: bool | None = None,
    capacity: int | None = None,
) -> list[Threshold]:
    """The composite threshold of each rank k in `ranks` (0 <= k <= group size).

    k == group size gives a threshold above every entry. Groups are the entries sharing all
    non-ranked axes; with several parts the ranked axes must be all but the leading one.
    `sample` bounds the keys sampled (and sorted) over all groups together to place the first
    pivots; groups that hold no more in all (and at most 2**14 entries: the sort costs more than
    the search beyond, but compiles to far less) are sorted whole. `sharded` (default: whether JAX
    sees several devices) avoids every step whose sharded form is not a local reduction plus an
    all-reduce: the sample, running sums, blocks that a device's shard may split. `capacity`
    (default: one in 8192 of a group's entries in groups of at least 2**23; 0: never; never
    sharded or with several parts) is the most entries a bracket may hold to be finished by
    gathering and sorting them. None of these changes the result, only the speed.
    """
    groups = _Groups(parts, jax.device_count() > 1 if sharded is None else sharded, capacity)
    k = jnp.stack([jnp.broadcast_to(jnp.asarray(r, jnp.int32), groups.shape) for r in ranks])
    budget = _SAMPLE_BUDGET if sample is None else sample
    if not groups.sharded and not groups.multi and groups.size * math.prod(groups.shape) <= min(budget, _SORT_MAX):
        return _sorted_thresholds(parts[0], groups, k)
    b = _value_search(groups, k, budget)
    found = jnp.full(k.shape, -1) if b.index is None else b.index  # index thresholds found by gathering
    j = jnp.where((k == groups.size) | (found >= 0), 0, k - b.c_lo)  # entries equal to the value that rank below k
    zeros = [jnp.zeros(k.shape, jnp.int32) for _ in parts]
    search = _index_by_count if groups.sharded else functools.partial(_index_search, lines=b.lines)
    index = lax.cond(jnp.any(j > 0), lambda: search(groups, b.lo, j), lambda: zeros)
    # j == 0: no entry equal to the value ranks below k, so index 0 (the search's lines may be stale there)
    index = [jnp.where(k == groups.size, p.size, jnp.where(found >= 0, found, jnp.where(j > 0, i, 0)))
             for p, i in zip(parts, index)]
    return [Threshold(b.lo[t], tuple(i[t] for i in index), b.c_lo[t]) for t in range(len(ranks))]
