"""Band parameterisations and exact counts."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from breadcrumbs_jax import Band, MergeError
from tests import reference as ref


def test_paper_setting_counts():
    band = Band.from_quantiles(0.85, 0.993)
    assert band.density == Fraction(143, 1000) and band.gamma_top == Fraction(7, 1000)
    assert band.counts(1000) == (850, 143, 7)
    assert band.counts(1) == (1, 0, 0)


def test_conversion_is_exact_where_floats_are_not():
    # 0.7 - 0.4 == 0.29999999999999993 in binary floats: floor(10 * that) would be 2, not 3
    band = Band.from_quantiles(0.4, 0.7)
    assert band.density == Fraction(3, 10) and band.counts(10) == (4, 3, 3)
    assert Band.from_density(0.3, 0.3) == band


decimals = st.integers(0, 1000).map(lambda k: k / 1000)


@given(beta=decimals, gamma=decimals, n=st.integers(0, 10**7))
def test_counts_match_reference(beta, gamma, n):
    beta, gamma = min(beta, gamma), max(beta, gamma)
    band = Band.from_quantiles(beta, gamma)
    assert band.counts(n) == ref.counts(n, beta, gamma)
    assert sum(band.counts(n)) == n and min(band.counts(n)) >= 0
    back = Band.from_density(float(band.density), float(band.gamma_top))
    assert back.counts(n) == band.counts(n)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta=0.9, gamma=0.5), "must not exceed gamma"),
        (dict(beta=-0.1, gamma=0.5), r"beta must lie in \[0, 1\]"),
        (dict(beta=0.1, gamma=1.5), r"gamma must lie in \[0, 1\]"),
        (dict(beta=float("nan"), gamma=0.5), "beta must be finite"),
        (dict(beta="x", gamma=0.5), "beta must be a number"),
    ],
)
def test_bad_quantiles(kwargs, match):
    with pytest.raises(MergeError, match=match):
        Band.from_quantiles(**kwargs)


@pytest.mark.parametrize(
    "density, gamma_top, match",
    [(0.9, 0.2, "must not exceed 1"), (1.2, 0.0, "density must lie"), (0.1, -0.01, "gamma_top must lie")],
)
def test_bad_density(density, gamma_top, match):
    with pytest.raises(MergeError, match=match):
        Band.from_density(density, gamma_top)
