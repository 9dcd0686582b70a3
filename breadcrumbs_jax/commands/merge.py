"""``breadcrumbs-jax merge CONFIG.yaml OUT``: merge checkpoints on disk as a YAML config says."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..config import load_config
from ..io import format_for
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
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None, help="show a progress bar")
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    kw = dict(
        rules=cfg.leaf_rules(), layout=cfg.layout, names=[m.name or m.path for m in cfg.models],
        vocab=cfg.vocab, include=cfg.include,
    )
    base, models, method = cfg.base_model, [m.path for m in cfg.models], cfg.method_obj()
    if args.dry_run:
        print(dry_run_checkpoints(base, models, method, out_dtype=cfg.dtype, **kw))
        fmt = cfg.output.format or format_for(args.out)
        print(f"output: {args.out} ({fmt}){' - exists: needs --overwrite' if Path(args.out).exists() and not args.overwrite else ''}")
        return 0
    report_path = args.report or f"{Path(args.out).absolute()}.report.json"
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    start = time.perf_counter()
    report = merge_checkpoints(
        base, models, args.out, method, out_dtype=cfg.dtype, format=cfg.output.format,
        shard_size=cfg.output.shard_size, overwrite=args.overwrite, progress=progress,
        report_path=report_path, **kw,
    )
    tot = report.totals()
    kept = f"; kept {tot['kept']} of {tot['entries']} task-vector entries" if tot["entries"] else ""
    print(f"merged {len(report.leaves)} leaves of {len(models)} models into {args.out} in "
          f"{time.perf_counter() - start:.1f} s{kept}; report: {report_path}", file=sys.stderr)
    return 0
