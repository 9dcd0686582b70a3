"""The built-in experiment as a script (what `breadcrumbs-jax demo` runs), with its knobs.

    python examples/run_experiment.py --out /tmp/breadcrumbs_demo            # the default run
    python examples/run_experiment.py --search-tasks 4 --seeds 5              # tune on 4 tasks, 5 orders
    python examples/run_experiment.py --tasks rot90,rot270,invert,checker,shift,swap,permute,permute2

Pre-trains a Flax nnx MLP on scikit-learn's digits, fine-tunes it on every task (each a
fixed image transformation with its own frozen few-shot head), saves all checkpoints with
Orbax, searches every method's hyperparameters on the validation split of the first tasks,
merges 2, 4, ..., T tasks and scores them on the test splits.
"""

import argparse
import sys
import time

from breadcrumbs_jax.experiment.run import Config, format_table, run
from breadcrumbs_jax.experiment.tasks import DEFAULT_TASKS

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="breadcrumbs_demo")
parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
parser.add_argument("--seeds", type=int, default=3)
parser.add_argument("--search-tasks", type=int, default=2)
parser.add_argument("--hidden", type=int, default=256)
args = parser.parse_args()

cfg = Config(
    tasks=tuple(args.tasks.split(",")),
    seeds=tuple(range(args.seeds)),
    search_tasks=args.search_tasks,
    hidden=args.hidden,
    # Any other field of Config can be set here too, e.g. a finer Breadcrumbs grid:
    # grids={**breadcrumbs_jax.experiment.run.DEFAULT_GRIDS, "breadcrumbs": {"density": (0.1, 0.2, 0.4), "gamma_top": (0.0, 0.01, 0.05)}},
)
start = time.perf_counter()
results = run(cfg, args.out, log=lambda s: print(s, file=sys.stderr))
print(format_table(cfg, results["summary"]))
print(f"\n{time.perf_counter() - start:.0f} s; wrote {args.out}/results.json, results.md, normalized_accuracy.png",
      file=sys.stderr)
