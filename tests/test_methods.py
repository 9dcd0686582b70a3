"""Every merge method against the plain-numpy reference of SPEC.md, on mixed trees."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

import breadcrumbs_jax as bj
from tests import reference as ref
from tests.ckpt_factory import same_bits
from tests import trees

pytestmark = pytest.mark.filterwarnings("ignore:.*keep no entries")

T = 3
WEIGHTS = (1.0, 0.5, 2.0)


@pytest.fixture(scope="module")
def models():
    pre = trees.pretrained(0)
    fts = [trees.finetuned(pre, 10 + t) for t in range(T)]
    return pre, fts


def is_float(x):
    return np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16


def close(got, want, dtype):
    """Merged leaf equals the float32 reference cast to the leaf dtype (one ulp of slack for FMA)."""
    got = np.asarray(got)
    assert got.dtype == dtype
    want_cast = want.astype(dtype).astype(np.float32)
    tol = np.abs(want_cast) * (2.0 ** -7 if dtype in (ml_dtypes.bfloat16, np.float16) else 2e-6) + 1e-6
    np.testing.assert_array_less(np.abs(got.astype(np.float32) - want_cast), tol + 1e-12)


def run(models, method, expected_leaf):
    pre, fts = models
    result = bj.merge(trees.as_jax(pre), [trees.as_jax(f) for f in fts], method)
    got = dict(trees.leaves(result.params))
    for path, p in trees.leaves(pre):
        f = [dict(trees.leaves(ft))[path] for ft in fts]
        if not is_float(p):
            np.testing.assert_array_equal(np.asarray(got[path]), p)
            assert np.asarray(got[path]).dtype == p.dtype
            continue
        close(got[path], expected_leaf(path, p, f), p.dtype)
    return result


def out_axis(p):
    return p.ndim - 1 if p.ndim >= 2 else None


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_breadcrumbs(models, granularity):
    beta, gamma, alpha = 0.6, 0.95, 0.7

    def want(path, p, fts):
        masks = [ref.band_mask(ref.tau(p, f), beta, gamma, granularity, out_axis(p)) for f in fts]
        return ref.masked_sum(p, fts, masks, alpha, WEIGHTS)

    result = run(models, bj.breadcrumbs(alpha, beta=beta, gamma=gamma, granularity=granularity, weights=WEIGHTS), want)
    lr = next(r for r in result.report.leaves if r.path == "dense/kernel")
    if granularity == "tensor":
        assert lr.kept == (ref.counts(91, beta, gamma)[1],) * T


def test_breadcrumbs_global(models):
    pre, fts = models
    beta, gamma, alpha = 0.5, 0.9, 0.4
    float_paths = [p for p, x in trees.leaves(pre) if is_float(x)]
    masks = {}
    for t, f in enumerate(fts):
        fl = dict(trees.leaves(f))
        taus = [ref.tau(dict(trees.leaves(pre))[p], fl[p]) for p in float_paths]
        for p, m in zip(float_paths, ref.global_masks(taus, beta, gamma)):
            masks.setdefault(p, []).append(m)

    def want(path, p, f):
        return ref.masked_sum(p, f, masks[path], alpha, (1.0,) * T)

    result = run(models, bj.breadcrumbs(alpha, beta=beta, gamma=gamma, granularity="global"), want)
    n = sum(int(np.prod(np.shape(dict(trees.leaves(pre))[p]))) for p in float_paths)
    kept = np.sum([lr.kept for lr in result.report.leaves if lr.kept], axis=0)
    assert tuple(kept) == (ref.counts(n, beta, gamma)[1],) * T


def test_task_arithmetic(models):
    def want(path, p, f):
        return ref.masked_sum(p, f, [np.ones(p.shape, bool)] * T, 0.3, WEIGHTS)

    run(models, bj.task_arithmetic(0.3, weights=WEIGHTS), want)


def test_linear_soup(models):
    run(models, bj.linear(weights=WEIGHTS), lambda path, p, f: ref.linear(p, f, WEIGHTS))


def test_linear_soup_is_average_of_models():
    pre = {"w": np.zeros((4, 4), np.float32)}
    fts = [{"w": np.full((4, 4), v, np.float32)} for v in (1.0, 2.0, 6.0)]
    out = bj.merge(pre, fts, bj.linear()).params["w"]
    np.testing.assert_allclose(np.asarray(out), 3.0)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_ties(models, granularity):
    density, alpha = 0.3, 0.9

    def want(path, p, fts):
        masks = [ref.band_mask(ref.tau(p, f), 1 - density, 1.0, granularity, out_axis(p)) for f in fts]
        return ref.ties_combine(p, fts, masks, alpha, WEIGHTS)

    run(models, bj.ties(alpha, density=density, granularity=granularity, weights=WEIGHTS), want)


def test_breadcrumbs_ties(models):
    density, gamma_top, alpha = 0.25, 0.05, 1.0
    beta, gamma = 1 - gamma_top - density, 1 - gamma_top

    def want(path, p, fts):
        masks = [ref.band_mask(ref.tau(p, f), round(beta, 10), gamma, "tensor") for f in fts]
        return ref.ties_combine(p, fts, masks, alpha, WEIGHTS)

    run(models, bj.breadcrumbs_ties(alpha, density=density, gamma_top=gamma_top, weights=WEIGHTS), want)


def test_ties_hand_computed():
    # two tasks, top-100% kept: entry 0 signs agree (+), entry 1 disagree -> elected by the sum.
    pre = {"w": np.zeros(3, np.float32)}
    fts = [{"w": np.array([1.0, 3.0, -1.0], np.float32)}, {"w": np.array([3.0, -1.0, 0.0], np.float32)}]
    out = np.asarray(bj.merge(pre, fts, bj.ties(1.0, density=1.0)).params["w"])
    # entry 0: mean(1, 3) = 2; entry 1: elected +, only 3 agrees -> 3; entry 2: -1 alone -> -1
    np.testing.assert_array_equal(out, [2.0, 3.0, -1.0])


def test_breadcrumbs_hand_computed():
    # |tau| = 0..9 at positions, beta=0.2, gamma=0.9: n_top=1, n_keep=7, n_bot=2 -> keep ranks 2..8.
    tau = np.array([5, -1, 9, 0, 2, -7, 3, 8, -4, 6], np.float32)
    pre = {"w": np.zeros(10, np.float32)}
    out = np.asarray(bj.merge(pre, [{"w": tau}], bj.breadcrumbs(1.0, beta=0.2, gamma=0.9)).params["w"])
    np.testing.assert_array_equal(out, np.where(np.isin(np.abs(tau), [0, 1, 9]), 0, tau))


def test_dare_properties():
    rng = np.random.default_rng(0)
    pre = {"a": rng.normal(size=(64, 32)).astype(np.float32), "b": rng.normal(size=(500,)).astype(np.float32)}
    ft = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in pre.items()}
    p = 0.75
    out = bj.merge(pre, [ft], bj.dare(1.0, p=p, seed=3))
    again = bj.merge(pre, [ft], bj.dare(1.0, p=p, seed=3))
    other = bj.merge(pre, [ft], bj.dare(1.0, p=p, seed=4))
    for k in pre:
        d = np.asarray(out.params[k]) - pre[k]
        t = ft[k] - pre[k]
        kept = d != 0
        # survivors are rescaled by 1/(1-p), the rest dropped
        np.testing.assert_allclose(d[kept], t[kept] / (1 - p), rtol=1e-5)
        frac = kept.mean()
        assert abs(frac - (1 - p)) < 4 * np.sqrt(p * (1 - p) / kept.size)
        np.testing.assert_array_equal(np.asarray(again.params[k]), np.asarray(out.params[k]))
        assert not np.array_equal(np.asarray(other.params[k]), np.asarray(out.params[k]))
    # different leaves and tasks get different masks
    lr = {r.path: r for r in out.report.leaves}
    assert lr["a"].kept[0] + lr["a"].dropped_low[0] == 64 * 32


def test_dare_p0_is_task_arithmetic(models):
    pre, fts = models
    a = bj.merge(pre, fts, bj.dare(0.5, p=0.0))
    b = bj.merge(pre, fts, bj.task_arithmetic(0.5))
    for (_, x), (_, y) in zip(trees.leaves(a.params), trees.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_custom_chain_is_a_few_lines(models):
    pre, fts = models
    method = bj.chain("trimmed_mean", bj.MagnitudeBand(bj.Band.top_k(0.5)), bj.Combine("disjoint_mean"))

    def want(path, p, f):
        masks = [ref.band_mask(ref.tau(p, x), 0.5, 1.0) for x in f]
        ts = [ref.tau(p, x) * m for x, m in zip(f, masks)]
        num, den = ref.tsum(ts), ref.tsum([(t != 0).astype(np.float32) for t in ts])
        return p.astype(np.float32) + np.where(den != 0, num / np.where(den != 0, den, 1), 0)

    run(models, method, want)


def test_breadcrumbs_ties_unnormalized_sums_agreeing_entries(models):
    density, gamma_top, alpha = 0.25, 0.05, 0.5

    def want(path, p, fts):
        masks = [ref.band_mask(ref.tau(p, f), 0.7, 0.95, "tensor") for f in fts]
        ts = [ref.tau(p, f) * m * np.float32(w) for f, m, w in zip(fts, masks, WEIGHTS)]
        elected = np.sign(ref.tsum(ts))
        agree = [np.where(np.sign(t) == elected, t, 0.0).astype(np.float32) for t in ts]
        return p.astype(np.float32) + np.float32(alpha) * ref.tsum(agree)

    method = bj.breadcrumbs_ties(alpha, density=density, gamma_top=gamma_top, weights=WEIGHTS, normalize=False)
    run(models, method, want)


@pytest.mark.parametrize("method", [bj.breadcrumbs(0.7, density=0.2, gamma_top=0.05), bj.dare(1.0, p=0.5, seed=3),
                                    bj.ties(1.0, density=0.3), bj.breadcrumbs(1.0, density=0.2, gamma_top=0.05, granularity="global")])
def test_host_leaves_merge_as_their_kernel_view(method, monkeypatch):
    """Host (numpy) leaves of a `flat` method are merged viewed as (n / m, m): the same bits as the
    leaves given as device arrays (merged in their own shape), and one kernel for the shapes of one
    view (compiled ahead, or for `global` leaves by jit)."""
    import jax

    from breadcrumbs_jax import kernel_store
    from breadcrumbs_jax.merge import _merge_kernel, kernel_shape

    assert kernel_shape((24, 40)) == (40, 24) and kernel_shape((6, 40, 24)) == (240, 24) and kernel_shape((7,)) == (7,)
    rng = np.random.default_rng(5)
    pre = {"a": rng.standard_normal((24, 40), dtype=np.float32), "b": rng.standard_normal((40, 24), dtype=np.float32),
           "c": rng.standard_normal((2, 24, 20), dtype=np.float32)}
    fts = [{k: v + rng.integers(-3, 4, v.shape).astype(np.float32) * 0.25 for k, v in pre.items()} for _ in range(3)]
    jax.clear_caches()
    kernel_store.clear()
    lowered, lower_kernel = [], kernel_store.lower_kernel
    monkeypatch.setattr(kernel_store, "lower_kernel", lambda kernel, args, options: (
        lowered.append(args[1].shape), lower_kernel(kernel, args, options))[1])
    host = bj.merge(pre, fts, method)
    compiled = len(lowered) + _merge_kernel._cache_size()
    device = bj.merge(jax.device_put(pre), [jax.device_put(f) for f in fts], method)
    for k in pre:
        got, want = np.asarray(host.params[k]), np.asarray(device.params[k])
        assert got.shape == pre[k].shape
        np.testing.assert_array_equal(got, want, err_msg=k)
    assert host.report == device.report
    assert compiled == 2  # [24, 40] and [40, 24] merge as [40, 24], [2, 24, 20] as [48, 20]


SETTINGS = [  # pairs of settings of one structure: hyperparameters differ, nothing else
    (bj.breadcrumbs(1.0, beta=(0.8, 0.5, 0.9), gamma=0.995, weights=WEIGHTS),
     bj.breadcrumbs(0.4, beta=0.1, gamma=(0.3, 1, 0.6), weights=(1, 1, 1))),
    (bj.ties(1.0, density=0.3, weights=(1, 1, 1)), bj.ties(0.6, density=(0.1, 0.5, 0.9), weights=WEIGHTS)),
    (bj.dare(1.0, p=0.5, seed=3), bj.dare(0.5, p=(0.1, 0.0, 0.9), seed=3)),
    (bj.breadcrumbs_ties(1.0, granularity="row"), bj.breadcrumbs_ties(2.0, density=0.5, gamma_top=0, granularity="row")),
    (bj.linear(weights=(3, 2, 1)), bj.linear(weights=WEIGHTS)),
    (bj.task_arithmetic(0.3), bj.task_arithmetic(1.7)),
]


def test_a_second_merge_takes_the_kernels_the_first_compiled(monkeypatch):
    """`bj.merge` of host or device leaves compiles its kernels ahead, in background threads, and the
    process keeps them: a second merge of the same shapes, with another setting of the method,
    lowers and compiles nothing, and gets the bits of kernels compiled for it alone."""
    import jax

    from breadcrumbs_jax import kernel_store

    rng = np.random.default_rng(6)
    pre = {"a": rng.standard_normal((24, 40), dtype=np.float32), "b": rng.standard_normal((7,), dtype=np.float32)}
    fts = [{k: v + rng.standard_normal(v.shape, dtype=np.float32) for k, v in pre.items()} for _ in range(3)]
    first, second = SETTINGS[1]  # ties, two settings of one structure
    compiles, finish_kernel = [], kernel_store.finish_kernel
    monkeypatch.setattr(kernel_store, "finish_kernel", lambda staged: (
        compiles.append(staged.lowered is not None), finish_kernel(staged))[1])
    for leaves in (pre, jax.device_put(pre)):  # host leaves, then uncommitted device arrays
        kernel_store.clear()
        compiles.clear()
        fine = fts if isinstance(leaves["a"], np.ndarray) else [jax.device_put(f) for f in fts]
        bj.merge(leaves, fine, first)
        assert compiles == [True, True]  # one kernel per view, compiled ahead
        got = bj.merge(leaves, fine, second)
        assert compiles == [True, True, False, False]  # the kept executables, nothing lowered
        kernel_store.clear()
        jax.clear_caches()
        want = bj.merge(leaves, fine, second)
        assert same_bits(got.params, want.params) and got.report == want.report


def _leaf(seed=12):
    """A bfloat16 leaf and its [T, ...] stack, with the kernel's other arguments."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    base = rng.standard_normal((40, 24), dtype=np.float32).astype(ml_dtypes.bfloat16)
    stack = (base.astype(np.float32) + rng.standard_normal((T, 40, 24), dtype=np.float32) * 0.1).astype(ml_dtypes.bfloat16)
    return base, stack, jnp.uint32(9), None


def _run(method, structure, leaf):
    """The leaf merged by the kernel of `structure`, with `method`'s numbers as arguments."""
    from breadcrumbs_jax.merge import _merge_kernel
    from breadcrumbs_jax.steps import LeafContext

    numbers = method.numbers(leaf[1].shape, LeafContext(out_axis=0))
    return _merge_kernel(*leaf, numbers, method=structure, out_axis=0, out_dtype=np.dtype(np.float32))


@pytest.mark.parametrize("first, second", SETTINGS, ids=[a.name for a, _ in SETTINGS])
def test_settings_of_a_method_share_a_kernel(first, second):
    """A leaf's kernel takes the method's numbers as arguments: two settings of one structure run one
    compiled kernel, and the second gets the bits of a kernel compiled for it alone (nothing of the
    first setting's numbers is compiled in). Every merge runs these kernels: the reference tests
    above check their results."""
    import jax

    from breadcrumbs_jax.merge import _merge_kernel

    leaf = _leaf()
    assert first.structure() == second.structure()
    jax.clear_caches()
    shared = [_run(m, first.structure(), leaf) for m in (first, second)]
    assert _merge_kernel._cache_size() == 1
    jax.clear_caches()
    own = _run(second, second.structure(), leaf)
    for g, w in zip(jax.tree.leaves(shared[1]), jax.tree.leaves(own), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=second.describe())
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(shared[0]), jax.tree.leaves(shared[1])))


def test_numbers_as_arguments_change_only_the_rounding_of_alpha():
    """Against a kernel with the numbers compiled in: the same report statistics and finite flags,
    and the merged leaf up to the rounding of one multiply-add (XLA:CPU fuses `base + delta * alpha`
    into an FMA when alpha is an argument, not when it is a constant)."""
    import jax

    from breadcrumbs_jax.merge import _merge_kernel

    leaf = _leaf()
    method = bj.ties(0.6, density=(0.1, 0.5, 0.9), weights=WEIGHTS)
    merged, stats, finite = _run(method, method.structure(), leaf)
    want_merged, want_stats, want_finite = _merge_kernel(*leaf, method=method, out_axis=0, out_dtype=np.dtype(np.float32))
    for g, w in zip(jax.tree.leaves((stats, finite)), jax.tree.leaves((want_stats, want_finite)), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    b, want_merged = leaf[0].astype(np.float32), np.asarray(want_merged)
    rounding = np.spacing(np.abs(b) + np.abs(want_merged - b))  # of the larger term of the sum
    np.testing.assert_array_less(np.abs(np.asarray(merged) - want_merged), rounding * 1.001)
    with pytest.raises(TypeError, match="numbers"):
        _merge_kernel(*leaf, method=method.structure(), out_axis=0, out_dtype=np.dtype(np.float32))


def test_structure_holds_what_decides_the_kernel():
    """Structures compare equal when only numbers differ, and differ in anything else: the method's
    name, its steps, granularity, a combine's kind, DARE's seed, or a step's type (a numbered step
    defined elsewhere shares kernels across its numbers too)."""
    from breadcrumbs_jax.methods import Structure
    from breadcrumbs_jax.steps import Scale

    base = bj.breadcrumbs(0.7, density=0.2, gamma_top=0.05)
    assert base.structure() == bj.breadcrumbs(0.1, beta=(0.2, 0.3), gamma=1).structure()
    assert hash(base.structure()) == hash(bj.breadcrumbs(0.1, beta=0.2, gamma=1).structure())
    others = [
        bj.breadcrumbs(0.7, density=0.2, gamma_top=0.05, granularity="row"),
        bj.breadcrumbs(0.7, density=0.2, gamma_top=0.05, weights=(1, 1)),  # a Weight step more
        bj.breadcrumbs_ties(0.7, density=0.2, gamma_top=0.05),
        bj.breadcrumbs_ties(0.7, density=0.2, gamma_top=0.05, normalize=False),
        bj.chain("breadcrumbs", *base.steps[:-1], Scale(0.7)),  # same steps: equal
        bj.dare(p=0.1, seed=1),
        bj.dare(p=0.1, seed=2),
        bj.linear(), bj.linear(weights=(1, 1)),  # a Weight step more
    ]
    structures = [m.structure() for m in others]
    assert structures[4] == base.structure()
    distinct = {base.structure(), *structures}
    assert len(distinct) == len(others)  # all but the equal one differ

    @dataclasses.dataclass(frozen=True)
    class Halve(Scale):  # a numbered step from elsewhere shares kernels too
        pass

    def sum_then(step):
        return bj.chain("x", bj.Combine("sum"), step).structure()

    a, b = sum_then(Halve(0.5)), sum_then(Halve(0.6))
    assert a == b and isinstance(a, Structure) and a.method.steps[1] == Halve(0.5)
    assert a != sum_then(Scale(0.5))
