"""The search API: the alpha sweep over one combined delta equals separate merges, and the
search's scores and best setting equal a brute-force loop over `merge`."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import breadcrumbs_jax as bj
S = importlib.import_module("breadcrumbs_jax.search")  # the module, even if the package re-exports `search`


def _models(T=3, dtype=jnp.float32):
    """One float leaf (each merge compiles a kernel per leaf: tests stay fast) and an integer one."""
    keys = jax.random.split(jax.random.key(0), 1 + T)
    pre = {"dense": {"kernel": jax.random.normal(keys[0], (12, 5)).astype(dtype)}, "step": jnp.int32(7)}

    def tune(t):
        noise = 0.1 * jax.random.normal(keys[1 + t], (12, 5))
        return {"dense": {"kernel": (pre["dense"]["kernel"] + noise).astype(dtype)}, "step": jnp.int32(7 + t)}

    return pre, [tune(t) for t in range(T)]


SETTINGS = [
    ("task_arithmetic", {}),
    ("breadcrumbs", {"density": 0.4, "gamma_top": 0.1}),
    ("ties", {"density": 0.3}),
    ("dare", {"p": 0.5, "seed": 3}),
    ("breadcrumbs_ties", {"beta": 0.5, "gamma": 0.9}),
]


@pytest.mark.parametrize(
    "name,params,dtype", [(n, p, jnp.float32) for n, p in SETTINGS] + [("task_arithmetic", {}, jnp.bfloat16)]
)
def test_alpha_sweep_equals_separate_merges(name, params, dtype):
    pre, fts = _models(dtype=dtype)
    delta = S.combined_delta(pre, fts, bj.get_method(name, **params))
    assert delta.params["step"] == 0  # integer leaves carry no update
    alphas = [0.3, 1.7]
    many = S.scale_many(pre, delta.params, jnp.asarray(alphas, jnp.float32))
    for i, alpha in enumerate(alphas):
        ref = bj.merge(pre, fts, bj.get_method(name, alpha=alpha, **params)).params
        one = S.scale(pre, delta.params, alpha)
        for got in (one, jax.tree.map(lambda a: a[i], many)):
            assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: a.dtype, ref)
            # The same arithmetic; XLA may fuse the merge kernel's divide-then-scale
            # differently (TIES' disjoint mean), so allow one float32 rounding.
            for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
                np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=2e-7, atol=2e-7)
        assert int(one["step"]) == 7


def test_combined_delta_is_merge_at_alpha_one_minus_base():
    pre, fts = _models()
    delta = S.combined_delta(pre, fts, bj.breadcrumbs(alpha=0.25, density=0.5, gamma_top=0.1)).params
    merged = bj.merge(pre, fts, bj.breadcrumbs(alpha=1.0, density=0.5, gamma_top=0.1)).params
    np.testing.assert_allclose(delta["dense"]["kernel"], merged["dense"]["kernel"] - pre["dense"]["kernel"], atol=1e-6)
    kept = delta["dense"]["kernel"] != 0
    assert 0 < int(kept.sum()) < kept.size  # the band really masks


def _target_validate(target):
    def validate(params):
        return -sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(params["dense"]), jax.tree.leaves(target)))
    return validate


def test_search_equals_brute_force():
    pre, fts = _models()
    validate = _target_validate({"kernel": 0.5 * (fts[0]["dense"]["kernel"] + fts[1]["dense"]["kernel"])})
    grid = {"density": [0.3, 0.6], "gamma_top": [0.1]}
    alphas = [0.4, 0.8]
    brute = {
        (d, a): float(validate(bj.merge(pre, fts, bj.breadcrumbs(a, density=d, gamma_top=0.1)).params))
        for d in grid["density"] for a in alphas
    }
    best = max(brute, key=brute.get)
    for vectorized in (True, False):
        res = S.search(pre, fts, "breadcrumbs", grid, validate, alphas=alphas, vectorized=vectorized)
        assert [t.params for t in res.trials] == [{**g, "alpha": a} for g in S.grid_points(grid) for a in alphas]
        np.testing.assert_allclose(
            [t.score for t in res.trials], [brute[t.params["density"], t.params["alpha"]] for t in res.trials],
            rtol=1e-5,
        )
        assert (res.best.params["density"], res.best.params["alpha"]) == best
        assert res.best.score == max(t.score for t in res.trials)
    # The best setting merged again gives the best score.
    again = S.merge_setting(pre, fts, "breadcrumbs", res.best.params)
    np.testing.assert_allclose(float(validate(again)), res.best.score, rtol=1e-6)


def test_search_without_scale_and_with_a_factory():
    pre, fts = _models()
    validate = _target_validate(fts[2]["dense"])
    res = S.search(pre, fts, "linear", [{}], validate)
    assert [t.params for t in res.trials] == [{}]
    assert res.trials[0].score == pytest.approx(float(validate(bj.merge(pre, fts, bj.linear()).params)))

    def halves(alpha=1.0, k=0.5):
        return bj.ties(alpha, density=k)

    res = S.search(pre, fts, halves, [{"k": 0.2}, {"k": 0.8}], validate, alphas=[0.1, 0.9])
    assert res.method == "halves" and len(res.trials) == 4
    assert "halves parameters" in res.table()
    assert res.to_dict()["best"]["params"] == res.best.params


def test_points_helpers():
    assert S.grid_points({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    pts = S.random_points({"density": {"low": 0.05, "high": 0.2}, "gamma_top": [0.0, 0.01]}, 20, seed=1)
    assert pts == S.random_points({"density": {"low": 0.05, "high": 0.2}, "gamma_top": [0.0, 0.01]}, 20, seed=1)
    assert all(0.05 <= p["density"] <= 0.2 and p["gamma_top"] in (0.0, 0.01) for p in pts)
    assert len({p["density"] for p in pts}) == 20


def test_bad_searches_raise_merge_errors():
    pre, fts = _models()
    validate = _target_validate(pre["dense"])
    with pytest.raises(bj.MergeError, match="alpha is swept"):
        S.search(pre, fts, "breadcrumbs", {"alpha": [0.1]}, validate)
    with pytest.raises(bj.MergeError, match="unknown method"):
        S.search(pre, fts, "nope", [{}], validate)
    with pytest.raises(bj.MergeError, match="bad parameters"):
        S.search(pre, fts, "ties", {"beta": [0.1]}, validate)
    with pytest.raises(bj.MergeError, match="own method"):
        S.combined_delta(pre, fts, bj.task_arithmetic(), rules=[bj.LeafRule("*kernel", bj.ties())])
    with pytest.raises(bj.MergeError, match="no global scale"):
        S.merge_setting(pre, fts, "linear", {"alpha": 0.5})
    bad = jax.tree.map(lambda a: a, fts[1])
    bad["dense"]["kernel"] = bad["dense"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(bj.MergeError, match="model 1.*dense/kernel"):
        S.combined_delta(pre, [fts[0], bad], bj.task_arithmetic())
    with pytest.raises(bj.MergeError, match="missing"):
        S.combined_delta(pre, [fts[0], {"dense": {}, "step": fts[1]["step"]}], bj.task_arithmetic())
