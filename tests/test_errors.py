"""Bad input raises a MergeError that names the leaf and the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import breadcrumbs_jax as bj


def tree(**over):
    base = {"enc": {"kernel": np.ones((4, 3), np.float32), "bias": np.zeros(3, np.float32)}, "step": np.int32(1)}
    for path, value in over.items():
        a, b = path.split("__") if "__" in path else (path, None)
        if b is None:
            base[a] = value
        elif value is None:
            del base[a][b]
        else:
            base[a][b] = value
    return base


def merge(pre, fts, method=None, **kw):
    return bj.merge(pre, fts, method or bj.breadcrumbs(0.5, beta=0.1, gamma=0.9), **kw)


def test_missing_leaf_names_leaf_and_model():
    with pytest.raises(bj.MergeError, match=r"b\.ckpt, leaf 'enc/bias': missing from this model"):
        merge(tree(), [tree(), tree(enc__bias=None)], names=["a.ckpt", "b.ckpt"])


def test_extra_leaf():
    bad = tree()
    bad["enc"]["extra"] = np.zeros(2, np.float32)
    with pytest.raises(bj.MergeError, match=r"model 0, leaf 'enc/extra': not in the pre-trained"):
        merge(tree(), [bad])


def test_shape_mismatch():
    with pytest.raises(bj.MergeError, match=r"ft2, leaf 'enc/kernel': shape \(4, 4\) differs from the pre-trained \(4, 3\)"):
        merge(tree(), [tree(), tree(enc__kernel=np.ones((4, 4), np.float32))], names=["ft1", "ft2"])


def test_dtype_mismatch():
    with pytest.raises(bj.MergeError, match=r"leaf 'enc/bias': dtype float16 differs from the pre-trained float32"):
        merge(tree(), [tree(enc__bias=np.zeros(3, np.float16))])


@pytest.mark.parametrize(("bad", "dtype"), [(np.nan, np.float32), (np.inf, np.float16), (-np.inf, jnp.bfloat16)])
def test_non_finite_input(bad, dtype):
    def model(**leaves):
        return jax.tree.map(lambda x: np.asarray(x, dtype) if np.issubdtype(x.dtype, np.floating) else x, tree(**leaves))

    k = np.ones((4, 3), dtype)
    k[2, 1] = bad
    with pytest.raises(bj.MergeError, match=r"m1, leaf 'enc/kernel': contains NaN or Inf"):
        merge(model(), [model(), model(enc__kernel=k)], names=["m0", "m1"])
    with pytest.raises(bj.MergeError, match=r"pretrained, leaf 'enc/kernel': contains NaN or Inf"):
        merge(model(enc__kernel=k), [model()])
    # a band that drops the entry (it ranks as the largest) still reports it
    with pytest.raises(bj.MergeError, match=r"m1, leaf 'enc/kernel': contains NaN or Inf"):
        merge(model(), [model(), model(enc__kernel=k)], names=["m0", "m1"],
              method=bj.breadcrumbs(1.0, density=0.5, gamma_top=0.2))


def test_no_models():
    with pytest.raises(bj.MergeError, match="T = 0"):
        merge(tree(), [])


def test_names_count():
    with pytest.raises(bj.MergeError, match="2 names given for 1"):
        merge(tree(), [tree()], names=["a", "b"])


def test_weights_count():
    with pytest.raises(bj.MergeError, match="3 weights given for 2 task vectors"):
        merge(tree(), [tree(), tree()], bj.task_arithmetic(weights=[1, 1, 1]))


@pytest.mark.parametrize(
    "factory, kwargs, match",
    [
        (bj.breadcrumbs, dict(beta=0.9, gamma=0.2), "must not exceed gamma"),
        (bj.breadcrumbs, dict(beta=0.1, density=0.2), "not both"),
        (bj.breadcrumbs, dict(granularity="layer"), "granularity must be one of"),
        (bj.ties, dict(density=1.5), "density must lie"),
        (bj.dare, dict(p=1.0), r"p must lie in \[0, 1\)"),
    ],
)
def test_bad_method_parameters(factory, kwargs, match):
    with pytest.raises(bj.MergeError, match=match):
        factory(**kwargs)


def test_unknown_method():
    with pytest.raises(bj.MergeError, match="unknown method 'soup'; known: linear"):
        bj.get_method("soup")
    with pytest.raises(bj.MergeError, match="bad parameters for method 'ties'"):
        bj.get_method("ties", beta=0.3)


def test_bad_rules():
    with pytest.raises(bj.MergeError, match="bad regular expression"):
        bj.LeafRule("re:(")
    with pytest.raises(bj.MergeError, match="action must be"):
        bj.LeafRule("*", action="drop")
    with pytest.raises(bj.MergeError, match=r"leaf 'enc/kernel'.*out_axis 5 out of range"):
        merge(tree(), [tree()], rules=[bj.LeafRule("*kernel", out_axis=5)])


def test_jax_inputs_are_accepted():
    pre = {"w": jnp.ones(5)}
    out = bj.merge(pre, [{"w": jnp.full(5, 2.0)}], bj.task_arithmetic(0.5))
    np.testing.assert_array_equal(np.asarray(out.params["w"]), 1.5)


def test_float64_leaves_merge_as_jax_holds_them():
    pre = {"w": np.zeros(4, np.float64)}
    out = bj.merge(pre, [{"w": jnp.ones(4)}], bj.task_arithmetic(0.5))  # jnp.ones is float32 without x64
    np.testing.assert_array_equal(np.asarray(out.params["w"]), 0.5)
    with pytest.raises(bj.MergeError, match="dtype float16 differs from the pre-trained float64"):
        bj.merge(pre, [{"w": np.ones(4, np.float16)}], bj.task_arithmetic())
