"""``breadcrumbs-jax merge CONFIG.yaml OUT``: merge checkpoints on disk as a YAML config says."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax

from .. import kernel_store
from ..config import load_config
from ..distributed import dry_run_distributed, initialize, merge_distributed
from ..errors import MergeError
from ..io import format_for
from ..sharding import ShardRule, make_mesh
from ..stream import dry_run_checkpoints, merge_checkpoints


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge", help="merge checkpoints (Orbax, safetensors, msgpack) as a YAML config says",
        description="Merge the fine-tuned checkpoints of CONFIG into its base model, leaf by leaf, writing OUT. "
        "See breadcrumbs_jax.config for the YAML keys.",
    )
    p.add_argument("config", help="YAML merge configuration")
    p.add_argument("out", help="output checkpoint (folder; or a .safetensors / .msgpack file)")
    p.add_argument("--dry-run", action="store_true", help="print what would be done to each leaf, write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--report", metavar="PATH", help="merge report JSON (default: OUT.report.json beside OUT)")
    dist = p.add_argument_group(
        "sharded and multi-host merging",
        "shard every leaf over a device mesh; with --distributed, run the same command on every host "
        "(each reads only its shards; OUT is an Orbax checkpoint on shared storage, e.g. gs://)",
    )
    dist.add_argument("--sharded", action="store_true",
                      help="shard over all devices (implied by any option of this group)")
    dist.add_argument("--distributed", action="store_true",
                      help="start jax.distributed (on a TPU slice or SLURM with no more options; else "
                      "--coordinator, --num-processes, --process-id or JAX_COORDINATOR_ADDRESS, "
                      "JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator")
    dist.add_argument("--num-processes", type=int, metavar="N")
    dist.add_argument("--process-id", type=int, metavar="I")
    dist.add_argument("--mesh", metavar="SHAPE", type=_ints,
                      help="mesh shape over all devices, e.g. 8 or 2,4 (default: one axis of all devices)")
    dist.add_argument("--mesh-axes", metavar="NAMES", type=lambda s: tuple(s.split(",")),
                      help="mesh axis names, e.g. x,y (default: x, y, z, ...)")
    dist.add_argument("--shard", metavar="PATTERN=SPEC", action="append", default=[], type=ShardRule.parse,
                      help="PartitionSpec of matching leaves, one entry per dimension: an axis name, a+b, "
                      "or - (replicated); e.g. '*kernel=-,x'. Default: each mesh axis splits the largest "
                      "dimension it divides")
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None, help="show a progress bar")
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def compilation_cache() -> None:
    """Keep compiled merge kernels (one per leaf view, dtype and method structure) across runs, in
    the kernel store (its `kernels` subfolder), and every jitted function in JAX's persistent cache:
    in the folder $BREADCRUMBS_JAX_CACHE names, by default (on one device: jax 0.10.2 crashed writing
    to it from a process with 8 simulated CPU devices) $XDG_CACHE_HOME/breadcrumbs_jax or
    ~/.cache/breadcrumbs_jax; none if it is `off`. A cache the user configured for JAX is kept
    (and no kernel store is used)."""
    where = os.environ.get("BREADCRUMBS_JAX_CACHE")
    if where is None and jax.device_count() == 1:
        where = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "breadcrumbs_jax")
    if not where or where == "off" or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    kernel_store.use(Path(where) / "kernels")


def _ints(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a mesh shape like 8 or 2,4: {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"not a mesh shape like 8 or 2,4: {text!r}")
    return shape


def sharded(args: argparse.Namespace) -> bool:
    return bool(args.sharded or args.distributed or args.mesh or args.mesh_axes or args.shard)


def run(args: argparse.Namespace) -> int:
    if args.distributed:
        initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.coordinator or args.num_processes is not None or args.process_id is not None:
        raise MergeError("--coordinator, --num-processes and --process-id need --distributed")
    cfg = load_config(args.config)
    compilation_cache()
    kw = dict(
        rules=cfg.leaf_rules(), layout=cfg.layout, names=[m.name or m.path for m in cfg.models],
        vocab=cfg.vocab, include=cfg.include,
    )
    base, models, method = cfg.base_model, [m.path for m in cfg.models], cfg.method_obj()
    if sharded(args):
        return run_sharded(args, cfg, base, models, method, kw)
    if args.dry_run:
        print(dry_run_checkpoints(base, models, method, out_dtype=cfg.dtype, **kw))
        fmt = cfg.output.format or format_for(args.out)
        print(f"output: {args.out} ({fmt}){' - exists: needs --overwrite' if Path(args.out).exists() and not args.overwrite else ''}")
        return 0
    report_path, progress, start = _run_options(args, Path(args.out).absolute())
    report = merge_checkpoints(
        base, models, args.out, method, out_dtype=cfg.dtype, format=cfg.output.format,
        shard_size=cfg.output.shard_size, overwrite=args.overwrite, progress=progress,
        report_path=report_path, **kw,
    )
    print(_summary(report, len(models), args.out, "", start, report_path), file=sys.stderr)
    return 0


def _run_options(args: argparse.Namespace, out) -> tuple[str, bool, float]:
    """(report path, whether to show progress, start time) of a merge run."""
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    return args.report or f"{out}.report.json", progress, time.perf_counter()


def _summary(report, n_models: int, out, where: str, start: float, report_path) -> str:
    tot = report.totals()
    kept = f"; kept {tot['kept']} of {tot['entries']} task-vector entries" if tot["entries"] else ""
    return (f"merged {len(report.leaves)} leaves of {n_models} models into {out}{where} in "
            f"{time.perf_counter() - start:.1f} s{kept}; report: {report_path}")


def run_sharded(args: argparse.Namespace, cfg, base, models, method, kw: dict) -> int:
    """The merge with every leaf sharded over a mesh of all processes' devices (distributed.py)."""
    if kw.pop("vocab") != "error":
        raise MergeError("vocab: shared is not supported by sharded merges")
    if cfg.output.format not in (None, "orbax") or cfg.output.shard_size is not None:
        raise MergeError("sharded merges write Orbax checkpoints: remove output.format / output.shard_size")
    mesh = make_mesh(args.mesh, args.mesh_axes)
    if args.dry_run:
        print(dry_run_distributed(base, models, method, mesh=mesh, shard_rules=args.shard, out_dtype=cfg.dtype, **kw))
        print(f"output: {args.out} (orbax, every process writing its own shards)")
        return 0
    report_path, progress, start = _run_options(args, args.out)
    result = merge_distributed(
        base, models, args.out, method, mesh=mesh, shard_rules=args.shard, out_dtype=cfg.dtype,
        overwrite=args.overwrite, progress=progress, report_path=report_path, **kw,
    )
    report = result.report
    print(f"process {jax.process_index()}/{jax.process_count()}: read {result.bytes_read} of the "
          f"{result.bytes_loaded} bytes of the leaves it loaded ({jax.local_device_count()} of "
          f"{jax.device_count()} devices)", file=sys.stderr)
    if jax.process_index() == 0:
        where = f" on mesh {dict(mesh.shape)}"
        print(_summary(report, len(models), args.out, where, start, report_path), file=sys.stderr)
    return 0
