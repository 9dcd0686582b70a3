"""Leaf rules, the dry run, the report, and PyTree kinds (dicts, lists, Flax nnx and linen)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import breadcrumbs_jax as bj

from . import reference as ref


def models(T=2, seed=0):
    rng = np.random.default_rng(seed)
    pre = {
        "embed": {"embedding": rng.normal(size=(20, 8)).astype(np.float32)},
        "layers": [{"kernel": rng.normal(size=(8, 8)).astype(np.float32), "norm": np.ones(8, np.float32)} for _ in range(2)],
        "count": np.int32(7),
    }
    fts = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(x.dtype) if x.dtype == np.float32 else x, pre) for _ in range(T)]
    return pre, fts


def test_rules_choose_method_per_leaf_first_match_wins():
    pre, fts = models()
    rules = [
        bj.LeafRule("embed/*", action="base"),
        bj.LeafRule("re:norm$", method=bj.task_arithmetic(1.0)),
        bj.LeafRule("layers/*", out_axis=0),
    ]
    method = bj.breadcrumbs(0.5, beta=0.5, gamma=0.9, granularity="row")
    plans = {p.path: p for p in bj.plan_for(pre, method, rules)}
    assert plans["embed/embedding"].action == "base"
    assert plans["layers/0/norm"].method.name == "task_arithmetic"
    assert plans["layers/1/kernel"].method is method and plans["layers/1/kernel"].out_axis == 0
    assert plans["count"].action == "copy"
    result = bj.merge(pre, fts, method, rules=rules)
    np.testing.assert_array_equal(np.asarray(result.params["embed"]["embedding"]), pre["embed"]["embedding"])
    norm = pre["layers"][0]["norm"] + sum(f["layers"][0]["norm"] - pre["layers"][0]["norm"] for f in fts)
    np.testing.assert_allclose(np.asarray(result.params["layers"][0]["norm"]), norm, rtol=1e-6)
    # out_axis 0: 8 groups of 8 entries, floor(8 * 0.4) = 3 kept each (tensor granularity would keep 25)
    lr = {r.path: r for r in result.report.leaves}
    assert lr["layers/0/kernel"].kept == (24, 24)


def test_dry_run_lists_every_leaf():
    pre, _ = models()
    rules = [bj.LeafRule("embed/*", action="base")]
    table = bj.dry_run(pre, bj.breadcrumbs(granularity="row"), rules)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["leaf", "shape", "dtype", "action"]
    body = {ln.split()[0]: ln.split() for ln in lines[2:]}
    assert set(body) == {"count", "embed/embedding", "layers/0/kernel", "layers/0/norm", "layers/1/kernel", "layers/1/norm"}
    assert body["embed/embedding"][3] == "base" and body["count"][3] == "copy"
    assert body["layers/0/kernel"][5:7] == ["row", "1"]


def test_report_counts_and_table():
    pre, fts = models()
    result = bj.merge(pre, fts, bj.breadcrumbs(1.0, beta=0.5, gamma=0.9))
    lr = {r.path: r for r in result.report.leaves}["embed/embedding"]
    assert lr.kept == (64, 64) and lr.dropped_low == (80, 80) and lr.dropped_high == (16, 16)
    assert all(lo <= hi for lo, hi in zip(lr.min_kept, lr.max_kept))
    table = result.report.table()
    assert "embed/embedding  model 0" in table and "total: kept" in table
    data = result.report.to_dict()
    assert data["task_names"] == ["model 0", "model 1"] and len(data["leaves"]) == 6


def test_empty_band_is_reported_and_warned():
    pre = {"tiny": np.zeros(3, np.float32), "big": np.zeros(100, np.float32)}
    fts = [{"tiny": np.ones(3, np.float32), "big": np.ones(100, np.float32)}]
    with pytest.warns(UserWarning, match="1 \\(leaf, task\\) pairs keep no entries.*'tiny'"):
        result = bj.merge(pre, fts, bj.breadcrumbs())
    assert result.report.empty() == [("tiny", "model 0")]
    assert "<- keeps nothing" in result.report.table()


def test_lists_tuples_and_nnx_state():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(6, 5, rngs=rngs)
            self.b = nnx.Linear(5, 3, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.relu(self.a(x)))

    states = [nnx.split(Net(nnx.Rngs(s)), nnx.Param)[1] for s in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bj.merge(states[0], states[1:], bj.breadcrumbs(0.5, beta=0.2, gamma=0.9))
    assert type(result.params) is type(states[0])
    paths = [r.path for r in result.report.leaves]
    assert paths == ["a/bias", "a/kernel", "b/bias", "b/kernel"]
    model = nnx.merge(nnx.split(Net(nnx.Rngs(0)), nnx.Param)[0], result.params)
    assert model(jnp.ones((1, 6))).shape == (1, 3)

    pre = [np.zeros(4, np.float32), (np.ones(2, np.float32),)]
    out = bj.merge(pre, [[np.ones(4, np.float32), (np.full(2, 3.0, np.float32),)]], bj.task_arithmetic())
    assert isinstance(out.params, list) and isinstance(out.params[1], tuple)
    assert [r.path for r in out.report.leaves] == ["0", "1/0"]


def test_task_vector_round_trip():
    pre, fts = models()
    tau = bj.task_vector(pre, fts[0])
    assert tau["count"] == 0 and tau["layers"][0]["kernel"].dtype == jnp.float32
    back = bj.apply_task_vector(pre, tau)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(fts[0])):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6)
    assert back["count"] == pre["count"]


def _reference_masks(granularity, fts, pre, beta, gamma):
    """[task][leaf] (keep, high) masks: high is the top band, ranks (gamma, 1]."""
    out = []
    for f, b, g in zip(fts, beta, gamma):
        if granularity == "global":
            both = zip(ref.global_masks([f[k] for k in pre], b, g), ref.global_masks([f[k] for k in pre], g, 1))
        else:
            axis = {"a": 0, "b": 1}
            both = [(ref.band_mask(f[k], b, g, granularity, axis[k]), ref.band_mask(f[k], g, 1, granularity, axis[k])) for k in pre]
        out.append(dict(zip(pre, both)))
    return out


@pytest.mark.parametrize("granularity", ["tensor", "row", "global"])
def test_report_statistics_equal_the_reference_masks(granularity):
    """Kept and dropped counts and the smallest and largest kept |tau| of each task against np.lexsort
    masks, on data with long runs of ties (the band edges split them; leaf b of the second task has
    none, so that only leaf a's largest kept |tau| follows from its thresholds alone), with a band per
    task, one of which keeps nothing."""
    rng = np.random.default_rng(3)
    pre = {"a": np.zeros((24, 40), np.float32), "b": np.zeros((16, 8), np.float32)}
    fts = [{k: rng.integers(-6, 7, size=v.shape).astype(np.float32) * 0.5 for k, v in pre.items()} for _ in range(3)]
    fts[1]["b"] = rng.standard_normal(pre["b"].shape).astype(np.float32)
    beta, gamma = (0.5, 0.3, 0.999), (0.9, 0.95, 0.999)  # the last keeps floor(n * 0) = 0 entries
    method = bj.breadcrumbs(1.0, beta=list(beta), gamma=list(gamma), granularity=granularity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the empty band warns
        result = bj.merge(pre, fts, method, rules=[bj.LeafRule("a", out_axis=0)])
    masks = _reference_masks(granularity, fts, pre, beta, gamma)
    for lr in result.report.leaves:
        for t, f in enumerate(fts):
            keep, high = masks[t][lr.path]
            mag = np.abs(f[lr.path])[keep]
            want = (int(keep.sum()), int((~keep & ~high).sum()), int(high.sum()),
                    float(mag.min()) if mag.size else None, float(mag.max()) if mag.size else None)
            got = (lr.kept[t], lr.dropped_low[t], lr.dropped_high[t], lr.min_kept[t], lr.max_kept[t])
            assert got == want, (lr.path, t)
