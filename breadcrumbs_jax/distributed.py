"""Merging checkpoints across hosts: jax.distributed, per-process shard reads, Orbax multi-host writes.

Every process runs the same command (SPMD), e.g. on each worker of a TPU slice::

    breadcrumbs-jax merge config.yaml gs://bucket/merged --distributed [--mesh 4,4 --mesh-axes x,y]

Leaves are planned from metadata (`stream.plan_stream`), each gets a `NamedSharding` over the
mesh of all processes' devices (`sharding.plan_sharding`), and is built as a global array from
reads of only the shards this process's devices hold: `jax.make_array_from_callback` over
slice reads (safetensors, msgpack), or an Orbax restore with a sharded target. The
merge goes through `merge.merge_leaves`, so the bits are the single-device merge's. Each merged
leaf is added to an Orbax checkpoint (every process writes its own shards, process 0 the
metadata) and freed. The output is staged beside the target and moved there when complete.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from .errors import MergeError
from .io import LeafInfo, LeafSource, format_for
from .merge import merge_leaves, warn_empty
from .methods import Method
from .plan import LeafPlan, LeafRule
from .report import MergeReport
from .sharding import ShardRule, auto_mesh, format_shardings, make_mesh, plan_sharding
from .stream import _sources, plan_stream

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] = os.environ,
) -> None:
    """Start `jax.distributed`: from the arguments, else from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID, else from the cluster (Cloud TPU, SLURM, Open MPI,
    Kubernetes detect all three). Call it before anything else touches JAX."""
    coordinator = coordinator or env.get(ENV[0])
    if num_processes is None and env.get(ENV[1]):
        num_processes = _int(env[ENV[1]], ENV[1])
    if process_id is None and env.get(ENV[2]):
        process_id = _int(env[ENV[2]], ENV[2])
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise MergeError(
            "give all of coordinator address, number of processes and process id (or none, on a TPU slice "
            f"or another cluster JAX detects); got coordinator={coordinator}, num_processes={num_processes}, "
            f"process_id={process_id}"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise MergeError(f"process id {process_id} is not in [0, {num_processes})")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise MergeError(f"{name} must be an integer, got {text!r}") from None


def global_leaf(source: LeafSource, info: LeafInfo | LeafPlan, sharding: jax.sharding.Sharding) -> jax.Array:
    """Leaf `info.path` of `source` as a global array with `sharding`, of which this process reads
    only the shards its own devices hold (each distinct shard once)."""
    from .io.orbax import OrbaxSource  # imported on use, as by io.open_source: Orbax takes 0.15 s to import

    if isinstance(source, OrbaxSource):
        return source.read_sharded(info.path, sharding)
    return jax.make_array_from_callback(info.shape, sharding, lambda index: source.read(info.path, index))


def local_bytes(x: jax.Array) -> int:
    """Bytes of the distinct shards of `x` on this process's devices."""
    seen = {}
    for s in x.addressable_shards:
        seen.setdefault(tuple((i.start, i.stop, i.step) for i in s.index), s.data.nbytes)
    return sum(seen.values())


def _sync(name: str) -> None:
    multihost_utils.sync_global_devices(f"breadcrumbs_jax:{name}")


def _clear(staging: epath.Path, sync: bool = True) -> None:
    """Process 0 deletes `staging` and Orbax's temporary folders beside it (a failed run's)."""
    if jax.process_index() == 0:
        for p in staging.parent.glob(f"{staging.name}*"):
            p.rmtree(missing_ok=True)
    if sync:
        _sync("cleared")


@dataclasses.dataclass(frozen=True)
class DistributedResult:
    """The merge report, and the bytes this process read against the bytes of the leaves it loaded
    (the rest was read by the other processes; `global` granularity loads its leaves twice)."""

    report: MergeReport
    bytes_read: int
    bytes_loaded: int


def dry_run_distributed(
    base, models, method: Method, *, mesh: jax.sharding.Mesh, shard_rules: Sequence[ShardRule] = (), **kw
) -> str:
    """What `merge_distributed` would do: the per-leaf plan and sharding tables, from metadata only."""
    with _sources(base, models) as (src, sources):
        sp = plan_stream(src, sources, method, **kw)
    shardings = [plan_sharding(p, mesh, shard_rules) for p in sp.plans]
    return f"{sp.describe()}\n\n{format_shardings(sp.plans, shardings)}"


def merge_distributed(
    base: str | os.PathLike | LeafSource,
    models: Sequence[str | os.PathLike | LeafSource],
    target: str | os.PathLike,
    method: Method,
    *,
    mesh: jax.sharding.Mesh | None = None,
    shard_rules: Sequence[ShardRule] = (),
    rules: Sequence[LeafRule] = (),
    layout: str | None = None,
    names: Sequence[str] | None = None,
    out_dtype=None,
    include: Sequence[str] = (),
    overwrite: bool = False,
    progress: bool = False,
    report_path: str | os.PathLike | None = None,
) -> DistributedResult:
    """Merge checkpoints on disk with every leaf sharded over `mesh` (default: all devices of all
    processes on one axis) into an Orbax checkpoint at `target` (a local, shared or gs:// path).

    Call it on every process; process 0 writes the report to `report_path`."""
    if format_for(target) != "orbax":
        raise MergeError("a sharded merge writes Orbax checkpoints (a folder or gs:// path), not "
                         f"{format_for(target)}", source=str(target))
    target = epath.Path(target)
    if target.exists() and not overwrite:
        raise MergeError("output exists; pass --overwrite (overwrite=True) to replace it", source=str(target))
    mesh = make_mesh() if mesh is None else auto_mesh(mesh)
    with _sources(base, models) as (src, sources):
        opened = [src, *sources]
        sp = plan_stream(src, sources, method, rules=rules, layout=layout, names=names, out_dtype=out_dtype,
                         include=include)
        shardings = {p.path: plan_sharding(p, mesh, shard_rules) for p in sp.plans}
        read = [0, 0]

        def load(plan: LeafPlan):
            if plan.action != "merge" and jax.dtypes.canonicalize_dtype(plan.dtype) != np.dtype(plan.dtype):
                leaves = [s.read(plan.path) for s in opened]  # int64, float64 copied: exact on the host
                read[0] += sum(x.nbytes for x in leaves)
            else:
                leaves = [global_leaf(s, plan, shardings[plan.path]) for s in opened]
                read[0] += sum(local_bytes(x) for x in leaves)
            read[1] += sum(plan.size * np.dtype(plan.dtype).itemsize for _ in opened)
            return leaves[0], leaves[1:]

        # one name for all processes; no leading '.': Orbax 0.12.8's partial.finalize then leaves
        # the checkpoint inside a '.partial_save.pending_*' folder
        staging = target.parent / f"{target.name}.breadcrumbs-staging"
        _clear(staging)
        try:
            from .io.orbax import OrbaxSink

            sink = OrbaxSink(staging, sp.outputs)
            reports = []
            leaves = merge_leaves(sp.plans, load, names=sp.names, out_dtype=out_dtype,
                                  progress=progress and jax.process_index() == 0)
            for plan, merged, report in leaves:
                sink.write(plan.path, merged)
                reports.append(report)
                del merged
            sink.commit()
            _sync("written")
            if jax.process_index() == 0:
                if target.exists():
                    target.rmtree()
                staging.rename(target)
            _sync("committed")
        except BaseException:
            _clear(staging, sync=False)
            raise
    report = MergeReport(sp.names, tuple(reports))
    warn_empty(report)
    if report_path is not None and jax.process_index() == 0:
        tmp = epath.Path(f"{report_path}.tmp")
        tmp.write_text(report.to_json())
        tmp.replace(report_path)
    return DistributedResult(report, *read)
