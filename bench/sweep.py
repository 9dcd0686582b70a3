"""A hyperparameter sweep: what each setting costs once the first compiled.

    python bench/sweep.py [--size 100m] [--tasks 4] [--settings 0.1/0.01,0.2/0.02,0.05/0.005]
        [--work /tmp/bcbench] [--rounds 1] [--python]

Makes (or reuses) the Llama-style models of bench/mergekit_compare.py, then per round runs
`breadcrumbs-jax merge` once per Breadcrumbs setting (density/gamma_top), each in a fresh process,
one after the other with one cache that starts empty. With --python, it loads the models into
memory once (`io.load`) and times `bj.merge` of each setting in this process instead (the jit
cache only). Kernels take a method's hyperparameters as arguments and are keyed by its structure,
so only the first setting compiles. Prints each run's wall time (and for CLI runs, peak RSS) and
its ratio to the first run of its round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import llama_models  # noqa: E402
from mergekit_compare import run, write_configs  # noqa: E402
from mergekit_compare import weights as mergekit_weights  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="100m", choices=list(llama_models.SIZES))
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--settings", default="0.1/0.01,0.2/0.02,0.05/0.005", help="density/gamma_top, comma separated")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bcbench"))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--python", action="store_true", help="merge in this process (bj.merge) instead of the CLI")
    args = ap.parse_args()
    settings = [tuple(float(x) for x in s.split("/")) for s in args.settings.split(",")]
    base, fts = llama_models.make_models(args.work, args.size, args.tasks)
    if args.python:
        return in_process(base, fts, settings, args.rounds)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        config = yaml.safe_load(write_configs(tmp, base, fts, "bfloat16")[0].read_text())
        print(f"{args.size}, T={args.tasks}: Breadcrumbs settings one after the other, one cache that starts empty")
        for r in range(args.rounds):
            cache = tmp / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            first = None
            for density, gamma_top in settings:
                config["params"].update(density=density, gamma_top=gamma_top)
                path = tmp / "sweep.yaml"
                path.write_text(yaml.safe_dump(config, sort_keys=False))
                cmd = [sys.executable, "-m", "breadcrumbs_jax.cli", "merge", str(path), str(tmp / "out.safetensors"),
                       "--overwrite", "--no-progress"]
                wall, rss, _ = run(cmd, env={**_env(), "BREADCRUMBS_JAX_CACHE": str(cache)})
                first = first or wall
                print(f"  round {r + 1}  density {density:<6g} gamma_top {gamma_top:<6g} {wall:6.2f} s "
                      f"({wall / first:.2f}x the first)  peak RSS {rss:.2f} GiB", flush=True)


def in_process(base: Path, fts: list[Path], settings, rounds: int) -> None:
    import jax

    import breadcrumbs_jax as bj
    from breadcrumbs_jax.io.tree import load

    pre, models = load(base), [load(f) for f in fts]
    weights = mergekit_weights(len(fts))
    print(f"{len(fts)} models in memory: bj.merge of Breadcrumbs settings one after the other")
    for r in range(rounds):
        jax.clear_caches()
        first = None
        for density, gamma_top in settings:
            start = time.perf_counter()
            merged = bj.merge(pre, models, bj.breadcrumbs(density=density, gamma_top=gamma_top, weights=weights))
            jax.block_until_ready(merged.params)
            wall = time.perf_counter() - start
            first = first or wall
            print(f"  round {r + 1}  density {density:<6g} gamma_top {gamma_top:<6g} {wall:6.2f} s "
                  f"({wall / first:.2f}x the first)", flush=True)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    return env


if __name__ == "__main__":
    main()
