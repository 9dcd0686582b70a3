"""Merging leaves sharded over a device mesh, with the same bits as the single-device merge.

The per-leaf kernel is a `jax.jit` (no shard_map) over `NamedSharding` inputs. Rank selection is
pure counting (reductions over the group axes, ties by an iota flat index), so XLA's SPMD
partitioner compiles each count to a local reduction plus an all-reduce of the counts: no
device ever gathers a leaf (tests/test_sharding.py checks the compiled HLO). The merged
leaf keeps its input sharding; everything else in the kernel is elementwise, the task sum
has a fixed order and DARE's random bits are partitionable (threefry), so 1 device and any
mesh give identical bits.

Meshes use `AxisType.Auto` (jax 0.10.2's `jax.make_mesh` defaults to Explicit): with Auto
axes the partitioner places the counts itself, while Explicit axes (sharding in types) reject
steps that mix differently sharded operands, e.g. the `row` mask's `where`. A mesh given with
Explicit axes is used with its axes made Auto (`auto_mesh`).

Sharding rule: a `ShardRule` (glob or ``re:`` pattern, as `LeafRule`) fixes a leaf's
PartitionSpec; otherwise `default_spec` gives each mesh axis (largest first) to the leaf
dimension that it divides evenly and that is then largest per device (for `row` granularity
the output axis first, so that rows stay whole on one device). `jax.Array` shards must be
even, so a dimension no mesh axis divides is not split: a leaf no axis divides (13 x 7 on 8
devices, scalars) is replicated.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from .errors import MergeError
from .merge import MergeResult, merge, plan_for
from .methods import Method
from .plan import LeafPlan, LeafRule, Layout
from .paths import flatten

SpecEntry = str | tuple[str, ...] | None


def make_mesh(
    shape: Sequence[int] | None = None,
    axis_names: Sequence[str] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh with Auto axes over `devices` (default: all devices, of every process).

    Default shape: one axis over all devices; default names: 'x', 'y', 'z', ... ."""
    devices = list(jax.devices() if devices is None else devices)
    shape = (len(devices),) if shape is None else tuple(int(s) for s in shape)
    if axis_names is None:
        axis_names = tuple("xyzuvw"[: len(shape)])
    axis_names = tuple(axis_names)
    if len(axis_names) != len(shape):
        raise MergeError(f"mesh shape {shape} has {len(shape)} axes but {len(axis_names)} names {axis_names}")
    if math.prod(shape) != len(devices):
        raise MergeError(f"mesh shape {shape} needs {math.prod(shape)} devices, {len(devices)} available")
    return jax.make_mesh(shape, axis_names, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with every axis of type Auto."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _entries(spec: PartitionSpec | Sequence[SpecEntry], ndim: int) -> list[tuple[str, ...]]:
    spec = tuple(spec)
    return [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec] + [()] * (ndim - len(spec))


def _spec(entries: Sequence[tuple[str, ...]]) -> PartitionSpec:
    return PartitionSpec(*(None if not e else e[0] if len(e) == 1 else tuple(e) for e in entries))


def default_spec(shape: Sequence[int], mesh: Mesh, prefer: int | None = None) -> PartitionSpec:
    """Each mesh axis (largest first) shards a dimension it divides evenly: dimension `prefer`
    if it can, else the one largest per device (the first of equals). An axis that divides no
    dimension replicates the leaf over it."""
    shape = tuple(shape)
    entries: list[list[str]] = [[] for _ in shape]
    order = sorted(mesh.axis_names, key=lambda a: -mesh.shape[a])
    for name in order:
        n = mesh.shape[name]
        if n == 1:
            continue
        split = [math.prod(mesh.shape[a] for a in e) for e in entries]
        fits = [d for d in range(len(shape)) if shape[d] % (split[d] * n) == 0]
        if fits:
            best = max(fits, key=lambda d: (d == prefer, shape[d] // split[d], -d))
            entries[best].append(name)
    rank = {a: i for i, a in enumerate(mesh.axis_names)}
    return _spec([tuple(sorted(e, key=rank.get)) for e in entries])


@dataclasses.dataclass(frozen=True)
class ShardRule:
    """Leaves matching `pattern` (glob, or ``re:`` regex) get PartitionSpec `spec` (mesh axis
    names per dimension; None replicates a dimension)."""

    pattern: str
    spec: tuple[SpecEntry, ...]

    def __post_init__(self):
        object.__setattr__(self, "spec", tuple(self.spec))
        LeafRule(self.pattern)  # validates the pattern

    def matches(self, path: str) -> bool:
        return LeafRule(self.pattern).matches(path)

    @classmethod
    def parse(cls, text: str) -> ShardRule:
        """``PATTERN=SPEC``, SPEC one entry per dimension separated by ',': an axis name,
        names joined by '+' (several axes on one dimension), or '-' (replicated).
        Example: ``*kernel=-,x+y``."""
        pattern, sep, spec = text.rpartition("=")
        if not sep or not pattern:
            raise MergeError(f"shard rule {text!r}: expected PATTERN=SPEC, e.g. '*kernel=-,x'")
        entries = []
        for e in spec.split(",") if spec else []:
            e = e.strip()
            if not re.fullmatch(r"-|\w+(\+\w+)*", e):
                raise MergeError(f"shard rule {text!r}: bad entry {e!r} (an axis name, a+b, or -)")
            entries.append(None if e == "-" else tuple(e.split("+")) if "+" in e else e)
        return cls(pattern, tuple(entries))


def leaf_spec(
    path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[ShardRule] = (), prefer: int | None = None
) -> PartitionSpec:
    """The PartitionSpec of one leaf: the first matching rule's, checked, else `default_spec`."""
    shape = tuple(shape)
    rule = next((r for r in rules if r.matches(path)), None)
    if rule is None:
        return default_spec(shape, mesh, prefer)
    where = f"shard rule {rule.pattern!r}"
    if len(rule.spec) > len(shape):
        raise MergeError(f"{where}: spec {rule.spec} has more entries than the leaf's {len(shape)} dimensions", leaf=path)
    entries = _entries(rule.spec, len(shape))
    used = [a for e in entries for a in e]
    for a in used:
        if a not in mesh.axis_names:
            raise MergeError(f"{where}: unknown mesh axis {a!r} (mesh axes {mesh.axis_names})", leaf=path)
    if len(set(used)) != len(used):
        raise MergeError(f"{where}: a mesh axis is used twice in {rule.spec}", leaf=path)
    for d, e in enumerate(entries):
        n = math.prod(mesh.shape[a] for a in e)
        if shape[d] % n:
            raise MergeError(
                f"{where}: dimension {d} of shape {shape} ({shape[d]}) is not divisible by the {n} devices of "
                f"mesh axes {e}; jax.Array shards must be even (use '-' to replicate this dimension)",
                leaf=path,
            )
    return _spec(entries)


def plan_sharding(plan: LeafPlan, mesh: Mesh, rules: Sequence[ShardRule] = ()) -> NamedSharding:
    """Sharding of a planned leaf; `row` granularity prefers its output axis (rows stay whole)."""
    prefer = plan.out_axis if plan.method is not None and plan.method.granularity == "row" else None
    return NamedSharding(mesh, leaf_spec(plan.path, plan.shape, mesh, rules, prefer))


def format_shardings(plans: Sequence[LeafPlan], shardings: Sequence[NamedSharding]) -> str:
    """The dry-run table of shardings: per leaf its PartitionSpec and the shape each device holds."""
    rows = [("leaf", "shape", "partition spec", "per device")]
    for p, s in zip(plans, shardings):
        rows.append((p.path, "x".join(map(str, p.shape)) or "scalar", str(tuple(s.spec)),
                     "x".join(map(str, s.shard_shape(p.shape))) or "scalar"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if shardings:
        mesh = shardings[0].mesh
        lines.insert(0, f"mesh {dict(mesh.shape)} over {mesh.size} devices of {jax.process_count()} process(es)")
    return "\n".join(lines)


def merge_sharded(
    pretrained: Any,
    finetuned: Sequence[Any],
    method: Method,
    *,
    mesh: Mesh | None = None,
    shard_rules: Sequence[ShardRule] = (),
    rules: Sequence[LeafRule] = (),
    layout: Layout = "flax",
    names: Sequence[str] | None = None,
    out_dtype=None,
    progress: bool = False,
) -> MergeResult:
    """`merge.merge` with every merged leaf sharded over `mesh` (default: all devices on one axis).

    Inputs may be host arrays or jax.Arrays of any sharding; each leaf to merge is placed with
    its `plan_sharding` and comes back merged with the same sharding (leaves kept or copied
    from the pre-trained model are returned as `merge` returns them). The result is
    bit-identical to the single-device `merge`."""
    mesh = make_mesh() if mesh is None else auto_mesh(mesh)
    plans = plan_for(pretrained, method, rules, layout)
    shardings = [plan_sharding(p, mesh, shard_rules) for p in plans]
    treedef = flatten(pretrained)[2]

    def place(tree):  # leaves that do not match the plan stay as they are: merge names them
        _, leaves, td = flatten(tree)
        if td != treedef:
            return tree
        return td.unflatten([
            jax.device_put(x, s) if p.action == "merge" and tuple(np.shape(x)) == p.shape else x
            for x, p, s in zip(leaves, plans, shardings)
        ])

    result = merge(
        place(pretrained), [place(f) for f in finetuned], method, rules=rules, layout=layout, names=names,
        out_dtype=out_dtype, progress=progress,
    )
    return dataclasses.replace(result, params=place(result.params))
