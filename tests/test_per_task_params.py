"""Per-task (per-model) band and drop parameters: each task vector gets its own band / p."""

import numpy as np
import pytest

import breadcrumbs_jax as bj
from breadcrumbs_jax import Band, MergeError


def _tree(seed=0, shape=(24, 10)):
    rng = np.random.default_rng(seed)
    base = {"w": rng.standard_normal(shape).astype(np.float32)}
    fts = [{"w": base["w"] + rng.standard_normal(shape).astype(np.float32)} for _ in range(3)]
    return base, fts


def _reference_mask(tau: np.ndarray, band: Band, axis=None) -> np.ndarray:
    """SPEC.md's mask by sorting: ranks by |tau| (ties by flat index) in [n_bot, n_bot + n_keep)."""
    if axis is not None:  # one group per slice along `axis`
        return np.stack([_reference_mask(s, band) for s in np.moveaxis(tau, axis, 0)], axis)
    flat = np.abs(tau).ravel()
    order = np.lexsort((np.arange(flat.size), flat))
    n_bot, n_keep, _ = band.counts(flat.size)
    mask = np.zeros(flat.size, bool)
    mask[order[n_bot : n_bot + n_keep]] = True
    return mask.reshape(tau.shape)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_each_task_keeps_its_own_band(granularity):
    base, fts = _tree()
    bands = [Band.from_density(d, g) for d, g in ((0.1, 0.0), (0.3, 0.05), (0.5, 0.2))]
    method = bj.breadcrumbs(1.0, density=(0.1, 0.3, 0.5), gamma_top=(0.0, 0.05, 0.2), granularity=granularity)
    result = bj.merge(base, fts, method)
    axis = 1 if granularity == "row" else None  # flax layout: rows are slices of the last axis
    taus = [f["w"] - base["w"] for f in fts]
    masks = [_reference_mask(t, b, axis) for t, b in zip(taus, bands)]
    assert result.report.leaves[0].kept == tuple(int(m.sum()) for m in masks)
    expected = base["w"] + sum(np.where(m, t, 0) for m, t in zip(masks, taus))
    np.testing.assert_allclose(np.asarray(result.params["w"]), expected, rtol=1e-6, atol=1e-6)


def test_global_granularity_counts_per_task_over_all_leaves():
    base, fts = _tree()
    base["b"] = np.zeros(6, np.float32)
    for t, f in enumerate(fts):
        f["b"] = np.arange(6, dtype=np.float32) * (t + 1)
    method = bj.breadcrumbs(1.0, density=(0.2, 0.4, 0.6), gamma_top=0.0, granularity="global")
    report = bj.merge(base, fts, method).report
    n = 24 * 10 + 6
    kept = [sum(lr.kept[t] for lr in report.leaves) for t in range(3)]
    assert kept == [Band.from_density(d, 0).counts(n)[1] for d in (0.2, 0.4, 0.6)]


def test_equal_per_task_values_give_the_same_bits_as_one_value():
    base, fts = _tree()
    one = bj.merge(base, fts, bj.breadcrumbs(0.5, beta=0.7, gamma=0.99)).params["w"]
    per = bj.merge(base, fts, bj.breadcrumbs(0.5, beta=(0.7,) * 3, gamma=0.99)).params["w"]
    assert np.asarray(one).tobytes() == np.asarray(per).tobytes()
    ties_one = bj.merge(base, fts, bj.ties(density=0.3)).params["w"]
    ties_per = bj.merge(base, fts, bj.ties(density=[0.3, 0.3, 0.3])).params["w"]
    assert np.asarray(ties_one).tobytes() == np.asarray(ties_per).tobytes()


def test_dare_per_task_drop_probability():
    base, fts = _tree(shape=(200, 50))
    one = bj.merge(base, fts, bj.dare(1.0, p=0.5, seed=1))
    per = bj.merge(base, fts, bj.dare(1.0, p=(0.5, 0.5, 0.5), seed=1))
    assert np.asarray(one.params["w"]).tobytes() == np.asarray(per.params["w"]).tobytes()
    kept = bj.merge(base, fts, bj.dare(1.0, p=(0.1, 0.5, 0.9), seed=1)).report.leaves[0].kept
    np.testing.assert_allclose(np.array(kept) / 10_000, [0.9, 0.5, 0.1], atol=0.02)


def test_wrong_number_of_per_task_values_is_an_error():
    base, fts = _tree()
    with pytest.raises(MergeError, match="2 per-task bands given for 3 task vectors"):
        bj.merge(base, fts, bj.breadcrumbs(density=(0.1, 0.2)))
    with pytest.raises(MergeError, match="different lengths"):
        bj.breadcrumbs(density=(0.1, 0.2), gamma_top=(0.0, 0.0, 0.0))
