"""Exact rank selection (breadcrumbs_jax.selection) against a sort-based numpy reference.

The entry of rank k in a group is the k-th in the order (|x|, flat index); `below(part, thr)` must
mark exactly the k entries before it, whatever the ties. Each case runs in three modes: the default
sample (small groups are then sorted whole, so the first pass finds the value); a tiny sample, which
forces the counting passes, the interpolation, the block extraction and, on ties, the positional
index search; and the sharded mode (no sample, blocks whole on any of the 8 test devices, the index
found by counting), which test_sharding.py compiles over meshes.
"""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import breadcrumbs_jax as bj
from breadcrumbs_jax import selection
from breadcrumbs_jax.merge import _merge_kernel
from breadcrumbs_jax.selection import Part, below, magnitude_keys, rank_thresholds

# (sample, sharded, capacity): the default; counting and block extraction only; gathering small
# brackets; gathering the first bracket that a pass counted; sharded
MODES = [(None, False, None), (64, False, 0), (64, False, 24), (64, False, 1 << 20), (None, True, None)]


def thresholds(parts, ranks, mode):
    return rank_thresholds(parts, ranks, sample=mode[0], sharded=mode[1], capacity=mode[2])


def np_keys(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, np.float32).view(np.int32) & 0x7FFFFFFF


def reference_below(x: np.ndarray, axes: tuple[int, ...], k) -> np.ndarray:
    """Entries of rank < k per group, by np.lexsort of (key, flat index); k scalar or group-shaped."""
    other = [a for a in range(x.ndim) if a not in axes]
    keys = np.moveaxis(np_keys(x), other, list(range(len(other))))
    lead = keys.shape[: len(other)]
    flat = keys.reshape(int(np.prod(lead)), -1)
    ks = np.moveaxis(np.broadcast_to(np.asarray(k), x.shape), other, list(range(len(other))))
    ks = ks.reshape(flat.shape)[:, 0]
    out = np.zeros(flat.shape, bool)
    for g in range(flat.shape[0]):
        order = np.lexsort((np.arange(flat.shape[1]), flat[g]))
        out[g, order[: ks[g]]] = True
    return np.moveaxis(out.reshape(keys.shape), list(range(len(other))), other)


@functools.lru_cache(maxsize=None)
def kernel(axes: tuple[int, ...], n_ranks: int, mode: tuple[int | None, bool]):
    @jax.jit
    def f(x, ranks):
        part = Part(x, axes)
        return jnp.stack([below(part, t) for t in thresholds([part], [ranks[i] for i in range(n_ranks)], mode)])

    return f


def check(x, axes, ranks, mode):
    x = np.asarray(x, np.float32)
    got = np.asarray(kernel(tuple(axes), len(ranks), mode)(x, jnp.asarray(ranks, jnp.int32)))
    for k, g in zip(ranks, got):
        np.testing.assert_array_equal(g, reference_below(x, tuple(axes), k), err_msg=f"rank {k}")


def group_size(shape, axes):
    return int(np.prod([shape[a] for a in axes]))


# shapes and ranked axes: tensor groups (all but the task axis), rows along either axis, 1-D, scalars,
# three group axes (the index search descends three levels), group axes around a free one
CASES = [((2, 100), (1,)), ((3, 64, 96), (1, 2)), ((2, 96, 64), (2,)), ((2, 96, 64), (1,)), ((4, 37, 11), (1, 2)), ((3,), ()),
         ((2, 4, 6, 10), (1, 2, 3)), ((2, 6, 5, 8), (1, 3))]

values = st.sampled_from(["normal", "integers", "zeros", "bf16", "constant", "signed_zeros"])


def make(kind: str, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "integers":  # a few values, long runs of ties
        return rng.integers(-3, 4, shape).astype(np.float32)
    if kind == "zeros":  # mostly exact zeros, as sparse task vectors have
        x = rng.standard_normal(shape).astype(np.float32)
        return np.where(rng.random(shape) < 0.7, 0.0, x).astype(np.float32)
    if kind == "bf16":  # the difference of two bf16 models: clustered magnitudes
        import ml_dtypes

        base = (rng.standard_normal(shape) * 0.02).astype(ml_dtypes.bfloat16)
        ft = (base.astype(np.float32) + rng.standard_normal(shape) * 0.002).astype(ml_dtypes.bfloat16)
        return ft.astype(np.float32) - base.astype(np.float32)
    if kind == "constant":
        return np.full(shape, -0.5, np.float32)
    return np.where(rng.random(shape) < 0.5, -0.0, 0.0).astype(np.float32)  # -0 ties with +0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,axes", CASES)
@settings(max_examples=10, deadline=None)
@given(kind=values, seed=st.integers(0, 2**16), data=st.data())
def test_exact_against_lexsort(shape, axes, mode, kind, seed, data):
    n = group_size(shape, axes)
    ranks = data.draw(st.lists(st.integers(0, n), min_size=3, max_size=3))
    check(make(kind, shape, seed), axes, ranks, mode)


@pytest.mark.parametrize("mode", MODES)
def test_band_edges_and_extremes(mode):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 64, 96)).astype(np.float32)
    n = 64 * 96
    check(x, (1, 2), [0, 1, n // 2, int(n * 0.85), int(n * 0.993), n - 1, n], mode)


@pytest.mark.parametrize("mode", MODES)
def test_ties_straddle_both_thresholds(mode):
    # 90% zeros: the low threshold falls inside the run of zeros, the index tie-break decides
    x = np.zeros((2, 50, 40), np.float32)
    x[:, ::10] = np.arange(1, 401, dtype=np.float32).reshape(2, 5, 40)[:, :5]
    check(x, (1, 2), [1000, 1799, 1800, 1950], mode)


def test_no_tie_below_the_rank_in_one_group_while_another_searches():
    # group 0's value is found with no tie below rank 216 (index 0) while group 1 needs the index
    # search, whose per-line counts for group 0 are from an earlier pass (found by hypothesis)
    check(make("zeros", (2, 4, 6, 10), 1), (1, 2, 3), [0, 1, 216], MODES[1])


@pytest.mark.parametrize("mode", MODES[1:])
@settings(max_examples=15, deadline=None)
@given(x=hnp.arrays(np.float32, (2, 24, 20), elements=st.floats(-4, 4, width=32)), data=st.data())
def test_hypothesis_arrays(mode, x, data):
    ranks = data.draw(st.lists(st.integers(0, 480), min_size=2, max_size=2))
    check(x, (1, 2), ranks, mode)


@pytest.mark.parametrize("mode", MODES[1:])
def test_ranks_per_group(mode):
    # one rank per task (a [T, 1, 1] array), as per-task bands give
    rng = np.random.default_rng(3)
    x = rng.integers(-5, 6, (3, 30, 20)).astype(np.float32)
    ranks = np.array([0, 250, 600], np.int32).reshape(3, 1, 1)
    f = jax.jit(lambda x, r: below(Part(x, (1, 2)), thresholds([Part(x, (1, 2))], [r], mode)[0]))
    np.testing.assert_array_equal(np.asarray(f(x, ranks)), reference_below(x, (1, 2), ranks))


@pytest.mark.parametrize("mode", MODES)
def test_several_parts_rank_as_one_group(mode):
    # global granularity: all leaves of a task vector are one group, ties ordered by part then index
    rng = np.random.default_rng(4)
    leaves = [
        rng.integers(-2, 3, (2, 30, 20)).astype(np.float32),
        rng.integers(-2, 3, (2, 17)).astype(np.float32),
        rng.integers(-2, 3, (2,)).astype(np.float32),
        rng.standard_normal((2, 64, 32)).astype(np.float32),
    ]
    n = sum(int(np.prod(x.shape[1:])) for x in leaves)
    ranks = [0, 5, n // 3, n // 2 + 7, n - 1, n]

    @jax.jit
    def f(*xs):
        parts = [Part(x, tuple(range(1, x.ndim))) for x in xs]
        ths = thresholds(parts, ranks, mode)
        return [[below(p, t, i) for i, p in enumerate(parts)] for t in ths]

    got = f(*leaves)
    flat = np.concatenate([x.reshape(2, -1) for x in leaves], axis=1)
    for k, masks in zip(ranks, got):
        want = reference_below(flat, (1,), k)
        np.testing.assert_array_equal(np.concatenate([np.asarray(m).reshape(2, -1) for m in masks], axis=1), want)


def test_keys_or_values_give_the_same_thresholds():
    x = np.random.default_rng(5).standard_normal((2, 40, 30)).astype(np.float32)
    a = rank_thresholds([Part(jnp.asarray(x), (1, 2))], [100, 1000])
    b = rank_thresholds([Part(magnitude_keys(jnp.asarray(x)), (1, 2))], [100, 1000])
    for ta, tb in zip(a, b):
        np.testing.assert_array_equal(np.asarray(ta.value), np.asarray(tb.value))
        np.testing.assert_array_equal(np.asarray(ta.index[0]), np.asarray(tb.index[0]))


@pytest.mark.parametrize("capacity", [128, 0])
@pytest.mark.parametrize("kind", ["normal", "bf16", "zeros"])
def test_large_group(kind, capacity):
    # 1M entries per group: two levels of 32-blocks, sampled pivots, then gathering of a small
    # bracket (capacity 128: one in 8192, the share by default in groups of 2**23 and more), or
    # extraction of block min/max only (capacity 0)
    x = make(kind, (2, 1024, 1024), 7)
    n = 1024 * 1024
    ranks = [n - 149946 - 7340, n - 7340]  # the Breadcrumbs band of beta 0.85, gamma 0.993
    check(x, (1, 2), ranks, (None, False, capacity))


@pytest.mark.parametrize("n", [1, 64, 100, 5000])
def test_running_sums_are_exact_beyond_float_precision(n):
    """The blocked integer matmuls give np.cumsum's sums exactly, also where they pass 2**24 (a
    float32 matmul would round) and over more blocks than one level of block totals holds."""
    x = np.random.default_rng(n).integers(0, 1 << 18, (2, 3, n), dtype=np.int32)  # sums to 1.3e9 at n = 5000
    np.testing.assert_array_equal(np.asarray(jax.jit(selection._running_sums)(x)), np.cumsum(x, axis=-1))


def test_take_gathers_per_row_as_take_along_axis():
    """`_take` of x [*rows, n, *rest] at i [*lead, *rows, m]: entries i along the axis after the rows."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 1000, (4, 5, 7, 3), dtype=np.int32)
    i = rng.integers(0, 7, (2, 4, 5, 6), dtype=np.int32)
    got = np.asarray(selection._take(jnp.asarray(x), jnp.asarray(i), 2))
    want = np.take_along_axis(np.broadcast_to(x, (2, *x.shape)), i[..., None], axis=3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("width", [32, 20])
def test_set_bits_give_the_positions_of_the_set_bits(width):
    """`_set_bits` of a mask: the positions of its first `size` set bits (as
    np.nonzero of the flattened mask gives them), then the mask's size; rows empty, sparse, half
    and wholly set (bit 31, the sign bit of an int32 word)."""
    rng = np.random.default_rng(width)
    mask = rng.random((4, 50, width)) < np.array([0.0, 0.02, 0.5, 1.0])[:, None, None]
    for size in (1, 40, 700):
        got = np.asarray(jax.jit(selection._set_bits, static_argnums=1)(jnp.asarray(mask), size))
        for row, m in enumerate(mask):
            at = np.flatnonzero(m)[:size]
            want = np.concatenate([at, np.full(size - at.size, m.size)])
            np.testing.assert_array_equal(got[row], want, err_msg=f"row {row}, size {size}")


@pytest.mark.parametrize(
    "base, stack, cap",
    [("float32", "float32", 1024), ("float32", "bfloat16", 1024), ("float16", "float16", 4096), ("bfloat16", "bfloat16", 0)],
)
def test_merge_kernels_gather_by_the_precision_of_the_task_vectors(monkeypatch, base, stack, cap):
    """A merge kernel of a group of 2**23 entries gathers one in 8192 entries, one in 2048 where the
    task vectors are differences of float16 leaves (their runs of ties hold more than one in
    8192), and never where they are differences of bfloat16 leaves (those resolve on runs of ties
    by counting, in the same passes either way: gathering would only add to the compile)."""
    traced, gathered = [], selection._gathered

    def recording(groups, *args):
        traced.append(groups.cap)
        return gathered(groups, *args)

    monkeypatch.setattr(selection, "_gathered", recording)
    shape = (4096, 2048)
    method = bj.breadcrumbs(1.0, density=0.1, gamma_top=0.01)
    base, stack = jnp.dtype(base), jnp.dtype(stack)
    kernel = functools.partial(_merge_kernel.__wrapped__, method=method, out_axis=None, out_dtype=stack, sharded=False)
    jax.eval_shape(kernel, jax.ShapeDtypeStruct(shape, base), jax.ShapeDtypeStruct((2, *shape), stack), jnp.uint32(0), None)
    assert traced == ([cap] if cap else [])


def test_gather_capacity():
    assert selection.gather_capacity((1 << 23) - 1) == 0  # smaller groups never gather
    assert [selection.gather_capacity(1 << 23, m) for m in (None, 23, 10, 7)] == [1024, 1024, 4096, 0]
    assert selection.gather_capacity(3 << 23) == 4096  # a power of two, at least one in 8192


@pytest.mark.parametrize("shape", [(3, 48, 40), (3, 64, 7)])
@pytest.mark.parametrize("kind", ["bf16", "integers", "zeros"])
def test_gathering_finds_the_thresholds_of_the_sort(kind, shape):
    """A search that ends by gathering (a capacity that takes the first bracket counted) gives the
    thresholds of the sort of small groups: value, index threshold (0 where no entry equal to the
    value ranks below k) and the count below the value. Blocks of [64, 7] run down the rows, so
    the candidates are gathered out of flat index order."""
    x = jnp.asarray(make(kind, shape, 11))
    n = shape[1] * shape[2]
    ranks = [0, 7, n // 3, int(n * 0.85), n - 1, n]
    want = rank_thresholds([Part(x, (1, 2))], ranks, sharded=False)
    got = rank_thresholds([Part(x, (1, 2))], ranks, sample=64, sharded=False, capacity=1 << 20)
    for k, w, g in zip(ranks, want, got):
        for field in ("value", "under"):
            np.testing.assert_array_equal(np.asarray(getattr(g, field)), np.asarray(getattr(w, field)), err_msg=f"{field}, rank {k}")
        np.testing.assert_array_equal(np.asarray(g.index[0]), np.asarray(w.index[0]), err_msg=f"index, rank {k}")


@pytest.mark.parametrize("mode", MODES)
def test_search_always_narrows_its_bracket(mode):
    """A miss just past a pivot once extrapolated pivots outside the bracket, and the search
    went back and forth for ever (found by the property test above)."""
    check(make("zeros", (2, 96, 64), 65535), (2,), [62, 5, 49], mode)
