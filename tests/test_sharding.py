"""Sharded merging: the default sharding rule, and bit-identical masks and merges on 1, 2, 4, 8
devices and meshes (8,), (2, 4), with no gather of a leaf in the compiled program."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import breadcrumbs_jax as bj
from breadcrumbs_jax.merge import _global_kernel, _merge_kernel, global_thresholds, plan_for, spans_devices, stack_models
from breadcrumbs_jax.sharding import (
    ShardRule,
    default_spec,
    leaf_spec,
    make_mesh,
    merge_sharded,
    plan_sharding,
)
from breadcrumbs_jax.steps import LeafContext, LeafState, MagnitudeBand, RandomDrop, path_hash

CPU = jax.devices("cpu")
pytestmark = pytest.mark.skipif(len(CPU) < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")

MESHES = {"1": (1,), "2": (2,), "4": (4,), "8": (8,), "2x4": (2, 4)}
T = 3
# leaves whose sizes the meshes do not divide evenly: 1000 splits 125 per device on 8, (24, 10)
# only along one dimension; the rest are replicated on every mesh (no dimension divides).
SWEEP = {"w": (24, 10), "v": (1000,)}
AWKWARD = {"m": (13, 7), "c": (5, 3, 11), "s": (), "b": (1, 6), "step": ()}


def mesh_of(key: str):
    shape = MESHES[key]
    return make_mesh(shape, ("x", "y")[: len(shape)], devices=CPU[: math.prod(shape)])


def models(shapes: dict, seed: int = 0, dtypes: dict | None = None):
    """Pre-trained and T fine-tuned trees with exact task vectors full of ties: base = k/64,
    tau = +-j/64 (j = 1..16), so F - P is exact in float32 and bfloat16 and never zero."""
    rng = np.random.default_rng(seed)
    dtypes = dtypes or {}

    def leaf(shape):
        return rng.integers(-64, 65, size=shape) / 64

    def tau(shape):
        return rng.choice([-1, 1], size=shape) * rng.integers(1, 17, size=shape) / 64

    base = {k: leaf(s) for k, s in shapes.items()}
    fts = [{k: base[k] + tau(s) for k, s in shapes.items()} for _ in range(T)]
    cast = lambda tree: {k: np.asarray(v, dtypes.get(k, np.float32)) for k, v in tree.items()}  # noqa: E731
    return cast(base), [cast(f) for f in fts]


def bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.dtype(f"uint{8 * x.dtype.itemsize}"))


METHODS = {
    "linear": bj.linear(),
    "task_arithmetic": bj.task_arithmetic(0.7),
    "dare": bj.dare(0.9, p=0.4, seed=3),
    **{f"breadcrumbs/{g}": bj.breadcrumbs(0.5, beta=0.3, gamma=0.9, granularity=g) for g in ("tensor", "row", "global")},
    **{f"ties/{g}": bj.ties(0.8, density=0.45, granularity=g) for g in ("tensor", "row", "global")},
    **{f"breadcrumbs_ties/{g}": bj.breadcrumbs_ties(density=0.5, gamma_top=0.1, granularity=g) for g in ("tensor", "row", "global")},
}
# the default run: every method on (8,) and (2, 4), a granularity each, the others rotated in;
# `-m slow` runs every method and granularity on every mesh.
DEFAULT = {
    "1": ["breadcrumbs/tensor"],
    "2": ["breadcrumbs/row"],
    "4": ["ties/global"],
    "8": ["linear", "task_arithmetic", "dare", "ties/tensor"],
    "2x4": ["linear", "task_arithmetic", "dare", "breadcrumbs/tensor", "ties/row", "breadcrumbs_ties/global"],
}
AWKWARD_DEFAULT = ["breadcrumbs_ties/global"]
CASES = [
    pytest.param(m, k, marks=() if name in DEFAULT[k] else pytest.mark.slow, id=f"{k}-{name}")
    for k in MESHES
    for name, m in METHODS.items()
]


@functools.cache
def reference(method):
    base, fts = models(SWEEP)
    return bj.merge(base, fts, method)


# ---------------------------------------------------------------- the sharding rule


@pytest.mark.parametrize(
    "shape, mesh, prefer, spec",
    [
        ((1000,), "8", None, P("x")),
        ((1000,), "2x4", None, P(("x", "y"))),
        ((13, 7), "8", None, P(None, None)),
        ((5, 3, 11), "2x4", None, P(None, None, None)),
        ((), "8", None, P()),
        ((24, 10), "8", None, P("x", None)),
        ((24, 10), "2x4", None, P("y", "x")),
        ((64, 16), "8", None, P("x", None)),
        ((64, 16), "8", 1, P(None, "x")),
        ((64, 16), "2x4", 1, P(None, ("x", "y"))),
        ((6, 4), "2x4", None, P("x", "y")),
        ((1, 6), "2x4", None, P(None, "x")),
    ],
)
def test_default_spec(shape, mesh, prefer, spec):
    assert default_spec(shape, mesh_of(mesh), prefer) == spec


def test_shard_rules():
    mesh = mesh_of("2x4")
    rules = (ShardRule.parse("*kernel=-,x+y"), ShardRule.parse("re:bias$=y"))
    assert rules[0].spec == (None, ("x", "y"))
    assert leaf_spec("a/kernel", (3, 16), mesh, rules) == P(None, ("x", "y"))
    assert leaf_spec("a/bias", (12,), mesh, rules) == P("y")
    assert leaf_spec("a/other", (12,), mesh, rules) == P("y")  # the default rule
    with pytest.raises(bj.MergeError, match=r"leaf 'a/kernel'.*not divisible by the 8 devices"):
        leaf_spec("a/kernel", (3, 12), mesh, rules)
    with pytest.raises(bj.MergeError, match="unknown mesh axis 'z'"):
        leaf_spec("k", (8,), mesh, (ShardRule("k", ("z",)),))
    with pytest.raises(bj.MergeError, match="used twice"):
        leaf_spec("k", (8, 8), mesh, (ShardRule("k", ("x", "x")),))
    with pytest.raises(bj.MergeError, match="more entries"):
        leaf_spec("k", (8,), mesh, (ShardRule("k", ("x", None)),))
    for bad in ("kernel", "*=x,y!", "=x"):
        with pytest.raises(bj.MergeError, match="shard rule"):
            ShardRule.parse(bad)


def test_row_granularity_keeps_rows_whole():
    mesh = mesh_of("8")
    (plan,) = plan_for({"k": np.zeros((64, 16), np.float32)}, bj.breadcrumbs(granularity="row"))
    assert plan_sharding(plan, mesh).spec == P(None, "x")  # Flax [in, out]: rows along axis 1
    (plan,) = plan_for({"k": np.zeros((64, 16), np.float32)}, bj.breadcrumbs())
    assert plan_sharding(plan, mesh).spec == P("x", None)


# ---------------------------------------------------------------- the compiled program


COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce)(?:-start)?\(")


def collectives(hlo: str) -> list[tuple[str, int]]:
    """(op, largest operand element count) of every cross-device collective in compiled HLO."""
    out = []
    for types, op in COLLECTIVE.findall(hlo):
        sizes = [math.prod(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\[([\d,]*)\]", types)]
        out.append((op, max(sizes, default=1)))
    return out


@pytest.mark.parametrize(
    "name, spec",
    [
        ("breadcrumbs/tensor", None),
        ("breadcrumbs/row", None),
        ("breadcrumbs/row", ("x", "y")),  # the ranked axis sharded: counts cross devices
        ("ties/global", None),
        ("dare", None),
    ],
)
def test_sharded_program_never_gathers_a_leaf(name, spec):
    method, shape = METHODS[name], (64, 40)
    mesh = mesh_of("2x4")
    rules = () if spec is None else (ShardRule("w", spec),)
    base, fts = models({"w": shape})
    (plan,) = plan_for(base, method)
    sharding = plan_sharding(plan, mesh, rules)
    assert len(sharding.device_set) == 8 and not sharding.is_fully_replicated
    put = lambda x: jax.device_put(x["w"], sharding)  # noqa: E731
    b, f = put(base), stack_models([put(x) for x in fts])
    assert spans_devices(b, f)  # so merge_leaf compiles the sharded program, as here
    if method.granularity == "global":
        counts = method.selector.counts(T, math.prod(shape))
        compiled = _global_kernel.lower([b], [f], counts, sharded=True).compile()
    else:
        numbers = method.numbers(f.shape, LeafContext(out_axis=plan.out_axis))
        compiled = _merge_kernel.lower(
            b, f, jnp.uint32(path_hash("w")), None, numbers, method=method.structure(), out_axis=plan.out_axis,
            out_dtype=np.dtype("float32"), sharded=True,
        ).compile()
    ops = collectives(compiled.as_text())
    assert [op for op, _ in ops if op != "all-reduce"] == []
    groups = shape[1] if method.granularity == "row" else 1
    # counts per task and group (for a few thresholds and bounds at once), never leaf-sized
    assert all(n <= 8 * T * groups for _, n in ops), ops
    if method.selector is not None and (spec is not None or method.granularity != "row"):
        assert ops, "the ranked axes are sharded, so the counts must be all-reduced"


# ---------------------------------------------------------------- identical bits


@functools.partial(jax.jit, static_argnames=("step", "out_axis"))
def _keep(base, fts, leaf_hash, thresholds, *, step, out_axis):
    ctx = LeafContext(out_axis=out_axis, path_hash=leaf_hash, thresholds=thresholds)
    tau = jnp.stack([f - base for f in fts])
    return step(LeafState(tau, jnp.ones(len(fts), jnp.float32)), ctx).tau != 0


def masks(method, base, fts, mesh=None):
    """The sparsifier's keep mask of each leaf ([T, ...]; tau is never zero), sharded over `mesh`."""
    step = next(s for s in method.steps if isinstance(s, MagnitudeBand | RandomDrop))
    plans = plan_for(base, method)
    where = {p.path: plan_sharding(p, mesh) if mesh else CPU[0] for p in plans}

    def load(p):
        return jax.device_put(base[p.path], where[p.path]), [jax.device_put(f[p.path], where[p.path]) for f in fts]

    thr = global_thresholds(plans, load)
    return {
        p.path: _keep(*load(p), jnp.uint32(path_hash(p.path)), thr.get(p.path), step=step, out_axis=p.out_axis)
        for p in plans
    }


SPARSIFIERS = ["breadcrumbs/tensor", "breadcrumbs/row", "ties/global", "dare"]


@functools.cache
def reference_masks(name):
    return masks(METHODS[name], *models(SWEEP, seed=1))


@pytest.mark.parametrize("mesh", [pytest.param(k, marks=() if k == "2x4" else pytest.mark.slow) for k in MESHES])
def test_masks_identical_on_every_mesh(mesh):
    base, fts = models(SWEEP, seed=1)
    for name in SPARSIFIERS:
        want = reference_masks(name)
        got = masks(METHODS[name], base, fts, mesh_of(mesh))
        for path in SWEEP:
            assert np.array_equal(np.asarray(got[path]), np.asarray(want[path])), (name, path)
            assert 0 < np.asarray(want[path]).sum() < want[path].size  # a real selection, not all or nothing


@pytest.mark.parametrize("method, mesh", CASES)
def test_merge_identical_on_every_mesh(method, mesh):
    base, fts = models(SWEEP)
    want = reference(method)
    m = mesh_of(mesh)
    got = merge_sharded(base, fts, method, mesh=m)
    for p in plan_for(base, method):
        out = got.params[p.path]
        assert out.sharding == plan_sharding(p, m), p.path
        assert np.array_equal(bits(out), bits(want.params[p.path])), p.path
    assert got.report == want.report


@pytest.mark.filterwarnings("ignore:.*keep no entries")
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in AWKWARD_DEFAULT else pytest.mark.slow) for n in METHODS]
)
def test_awkward_leaves_identical(name):
    """Leaves no mesh axis divides (replicated), bfloat16, scalars, an integer leaf (copied), one
    split over part of the mesh."""
    method = METHODS[name]
    base, fts = models(AWKWARD, seed=2, dtypes={"c": jnp.bfloat16, "step": np.int64})
    want = bj.merge(base, fts, method)
    got = merge_sharded(base, fts, method, mesh=mesh_of("2x4"))
    for k in AWKWARD:
        assert got.params[k].dtype == want.params[k].dtype
        assert np.array_equal(bits(got.params[k]), bits(want.params[k])), k
    assert got.report == want.report


def test_merge_sharded_errors_name_leaf_and_model():
    base, fts = models({"w": (8, 4)})
    fts[1]["w"] = np.zeros((8, 5), np.float32)
    with pytest.raises(bj.MergeError, match=r"model 1, leaf 'w': shape \(8, 5\)"):
        merge_sharded(base, fts, bj.breadcrumbs(), mesh=mesh_of("8"))
    with pytest.raises(bj.MergeError, match="leaf 'w'.*not divisible"):
        merge_sharded(base, fts[:1], bj.breadcrumbs(), mesh=mesh_of("8"), shard_rules=[ShardRule("w", (None, "x"))])


def test_explicit_mesh_is_used_with_auto_axes():
    base, fts = models(SWEEP, seed=5)
    method = METHODS["breadcrumbs/row"]  # its mask is rejected under Explicit axes (sharding in types)
    explicit = jax.make_mesh((2, 4), ("x", "y"), devices=CPU, axis_types=(AxisType.Explicit,) * 2)
    got = merge_sharded(base, fts, method, mesh=explicit)
    want = bj.merge(base, fts, method)
    for k in SWEEP:
        assert np.array_equal(bits(got.params[k]), bits(want.params[k]))
        assert got.params[k].sharding.mesh.axis_types == (AxisType.Auto,) * 2


def test_input_shardings_do_not_matter():
    """Inputs already on devices with another sharding are resharded and give the same bits."""
    base, fts = models(SWEEP, seed=4)
    method = METHODS["breadcrumbs/row"]
    want = bj.merge(base, fts, method)
    other = NamedSharding(mesh_of("2"), P())
    moved = [jax.device_put(f, other) for f in fts]
    got = merge_sharded(jax.device_put(base, other), moved, method, mesh=mesh_of("8"))
    for k in SWEEP:
        assert np.array_equal(bits(got.params[k]), bits(want.params[k]))


def test_only_leaves_that_span_devices_take_the_sharded_program():
    """With 8 devices visible, a leaf on one device ranks with the local steps (sample, sort of
    small groups), a leaf split or copied over devices with the sharded ones."""
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert not spans_devices(x, jax.device_put(x, CPU[3]), 1.0)
    assert spans_devices(x, jax.device_put(x, NamedSharding(mesh_of("2"), P("x"))))
    assert spans_devices(jax.device_put(x, NamedSharding(mesh_of("2"), P())))  # copied to both
    base, fts = models({"w": (64, 40)})
    (plan,) = plan_for(base, METHODS["breadcrumbs/tensor"])
    args = (base["w"], stack_models([f["w"] for f in fts]), jnp.uint32(0), None)
    kw = dict(method=plan.method, out_axis=plan.out_axis, out_dtype=np.dtype("float32"))
    local, sharded = (_merge_kernel.lower(*args, **kw, sharded=s).compile().as_text() for s in (False, True))
    assert " sort(" in local and " sort(" not in sharded  # the local program sorts its sample
