"""The Breadcrumbs mask: exact counts, deterministic tie-breaking, granularities (SPEC.md)."""

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
from breadcrumbs_jax.steps import LeafContext
from tests import reference as ref


@functools.partial(jax.jit, static_argnames=("selector", "out_axis"))
def _mask(tau, selector, out_axis):
    return selector.mask(tau, LeafContext(out_axis=out_axis))


def mask(tau_stack, beta, gamma, granularity="tensor", out_axis=None):
    sel = bj.MagnitudeBand(bj.Band.from_quantiles(beta, gamma), granularity)
    keep, low, high = (np.asarray(m) for m in _mask(jnp.asarray(tau_stack), sel, out_axis))
    assert not (keep & low).any() and not (keep & high).any() and not (low & high).any()
    assert (keep | low | high).all()
    return keep


def check(tau_stack, beta, gamma, granularity="tensor", out_axis=None):
    got = mask(tau_stack, beta, gamma, granularity, out_axis)
    for t in range(tau_stack.shape[0]):
        want = ref.band_mask(tau_stack[t], beta, gamma, granularity, out_axis)
        np.testing.assert_array_equal(got[t], want)
    return got


def test_all_ties_keeps_exactly_n_keep_by_flat_index():
    tau = np.zeros((2, 100), np.float32)
    got = check(tau, 0.85, 0.993)
    # n_top = 0, n_keep = 14, n_bot = 86: ranks 86..99 are the last 14 flat indices
    np.testing.assert_array_equal(got[0], np.arange(100) >= 86)


def test_negative_zero_ties_with_zero():
    tau = np.array([[0.0, -0.0, 0.0, -0.0, 1.0, -1.0]], np.float32)
    got = check(tau, 0.5, 1.0)
    np.testing.assert_array_equal(got[0], [False, False, False, True, True, True])


def test_n_top_zero_keeps_the_largest():
    # the peer bug: idx[n_bot:-n_top] with n_top == 0 drops everything
    tau = np.arange(1, 11, dtype=np.float32)[None]
    got = check(tau, 0.5, 1.0)
    np.testing.assert_array_equal(got[0], np.arange(10) >= 5)


@pytest.mark.parametrize("n", [1, 2, 5, 50, 142])
def test_tiny_leaves_follow_the_floor_counts(n):
    # n < 1 / (1 - gamma): n_top = 0; n_keep = floor(0.143 n) may be 0 -> nothing kept
    rng = np.random.default_rng(n)
    tau = rng.normal(size=(3, n)).astype(np.float32)
    got = check(tau, 0.85, 0.993)
    assert (got.sum(axis=1) == ref.counts(n, 0.85, 0.993)[1]).all()


def test_scalar_leaf_is_one_group():
    tau = np.array([0.5, -2.0, 0.0], np.float32)  # three tasks of a scalar leaf
    assert not check(tau, 0.85, 0.993).any()
    assert check(tau, 0.0, 1.0).all()


def test_heavy_ties_at_both_thresholds():
    # values in {0, 1, 2, 3} with many repeats: both band edges fall inside runs of ties
    rng = np.random.default_rng(1)
    tau = rng.integers(-3, 4, size=(4, 37, 11)).astype(np.float32)
    got = check(tau, 0.3, 0.8)
    assert (got.reshape(4, -1).sum(1) == ref.counts(37 * 11, 0.3, 0.8)[1]).all()


@pytest.mark.parametrize("out_axis", [0, 1, 2, 3])
def test_row_granularity_conv_kernel(out_axis):
    rng = np.random.default_rng(out_axis)
    tau = np.round(rng.normal(size=(2, 3, 3, 4, 8)) * 4).astype(np.float32)
    got = check(tau, 0.2, 0.9, "row", out_axis)
    other = tuple(a + 1 for a in range(4) if a != out_axis)
    per_row = got.sum(axis=other)
    group = 3 * 3 * 4 * 8 // tau.shape[out_axis + 1]
    assert (per_row == ref.counts(group, 0.2, 0.9)[1]).all()


def test_row_granularity_differs_from_tensor_on_skewed_rows():
    # one output unit has much larger updates: tensor granularity keeps mostly that row,
    # row granularity keeps the same count in every row.
    rng = np.random.default_rng(0)
    tau = rng.normal(size=(1, 16, 4)).astype(np.float32)
    tau[0, :, 0] = 100 + np.abs(tau[0, :, 0])
    t = mask(tau, 0.5, 1.0, "tensor")
    r = mask(tau, 0.5, 1.0, "row", 1)
    assert t[0, :, 0].sum() == 16 and (r[0].sum(axis=0) == 8).all()


def test_bfloat16_magnitudes_rank_exactly():
    import ml_dtypes

    rng = np.random.default_rng(2)
    tau = rng.normal(size=(2, 300)).astype(ml_dtypes.bfloat16)  # many exact ties in bf16
    got = mask(tau.astype(np.float32), 0.4, 0.9)
    for t in range(2):
        np.testing.assert_array_equal(got[t], ref.band_mask(tau[t].astype(np.float32), 0.4, 0.9))


finite_f32 = st.floats(-2.0**100, 2.0**100, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)
small_pool = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-30, 3.5])


@settings(max_examples=25, deadline=None)
@given(
    tau=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9), elements=st.one_of(finite_f32, small_pool)),
    beta=st.sampled_from([0.0, 0.1, 0.5, 0.85, 0.9, 1.0]),
    width=st.sampled_from([0.0, 0.05, 0.143, 0.5, 1.0]),
)
def test_property_tensor_mask_matches_sorted_reference(tau, beta, width):
    gamma = min(1.0, round(beta + width, 6))
    check(tau[None], beta, gamma)


@settings(max_examples=16, deadline=None)
@given(
    tau=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, max_side=7), elements=small_pool),
    data=st.data(),
)
def test_property_row_mask_matches_reference(tau, data):
    out_axis = data.draw(st.integers(0, tau.ndim - 1))
    check(np.stack([tau, -tau[::-1]]), 0.25, 0.75, "row", out_axis)


@settings(max_examples=12, deadline=None)
@given(
    tau=hnp.arrays(np.float32, st.integers(1, 60), elements=finite_f32),
    k=st.integers(-6, 6),
)
def test_property_mask_invariant_to_power_of_two_scaling(tau, k):
    base = mask(tau[None], 0.3, 0.9)
    scaled = (tau * np.float32(2.0**k)).astype(np.float32)
    if np.all(np.isfinite(scaled)) and not np.any((scaled == 0) & (tau != 0)) and np.all(
        np.abs(scaled[scaled != 0]) >= np.finfo(np.float32).tiny
    ) and np.all(np.abs(tau[tau != 0]) >= np.finfo(np.float32).tiny):
        np.testing.assert_array_equal(mask(scaled[None], 0.3, 0.9), base)
