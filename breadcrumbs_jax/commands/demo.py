"""``breadcrumbs-jax demo``: the built-in multi-task merging experiment on scikit-learn's digits."""

from __future__ import annotations

import argparse
import sys
import time

from ..experiment.tasks import DEFAULT_TASKS, TRANSFORMS
from ..methods import METHODS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="pre-train, fine-tune on T digit tasks, merge with every method, report (a few minutes on CPU)",
        description="Pre-train a Flax MLP on scikit-learn's digits, fine-tune it on T transformed-digit tasks, "
        "save every checkpoint with Orbax, search each method's hyperparameters on the validation split of the "
        "first tasks, merge 2, 4, ..., T tasks and score them on the test splits. Writes checkpoints, "
        "results.json, results.md and normalized_accuracy.png to --out.",
    )
    p.add_argument("--out", default="breadcrumbs_demo", help="output folder (default: %(default)s)")
    p.add_argument("--tasks", help=f"comma-separated tasks, at least 2 (default: {','.join(DEFAULT_TASKS)}; "
                   f"known: {', '.join(TRANSFORMS)})")
    p.add_argument("--methods", help=f"comma-separated methods (default: {','.join(METHODS)})")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds, each with its own task order (default 3)")
    p.add_argument("--search-tasks", type=int, default=None,
                   help="tune hyperparameters on the validation split of this many first tasks (default 2)")
    p.add_argument("--no-retune", action="store_true", help="skip the re-tuning of every method with all T tasks")
    p.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds (for tests)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..experiment.run import Config, format_table, run  # Flax, Optax: only the demo needs them

    kw = {}
    if args.tasks:
        kw["tasks"] = _names(args.tasks)
    if args.methods:
        kw["methods"] = _names(args.methods)
    if args.seeds is not None:
        kw["seeds"] = tuple(range(args.seeds))
    if args.search_tasks is not None:
        kw["search_tasks"] = args.search_tasks
    if args.no_retune:
        kw["retune"] = False
    cfg = Config.quick(**kw) if args.quick else Config(**kw)
    start = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - start:6.1f} s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"{len(cfg.tasks)} tasks ({', '.join(cfg.tasks)}), seeds {list(cfg.seeds)}, writing to {args.out}")
    results = run(cfg, args.out, plot=not args.no_plot, log=log)
    print(format_table(cfg, results["summary"]))
    log(f"wrote {args.out}/results.json, results.md{'' if args.no_plot else ', normalized_accuracy.png'}, checkpoints/")
    return 0


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())
