"""Breadcrumbs merge of Llama-style safetensors models: breadcrumbs-jax's CLI against mergekit.

    python bench/mergekit_compare.py [--sizes 100m,400m,1b] [--tasks 2,4] [--reps 3] [--dtype bfloat16]
        [--work /tmp/bcbench] [--mergekit /work/venvs/mergekit/bin/mergekit-yaml] [--keep]

For each size and T it makes a base and T fine-tunings (bench/llama_models.py; bf16 by default,
float32 with --dtype float32), then runs,
each in a fresh process and interleaved --reps times (median reported):
  io        read every tensor of the T + 1 inputs and write a bf16 output of the same tensors,
            through breadcrumbs_jax.io (the floor: no compute)
  ours      `breadcrumbs-jax merge ours.yaml OUT`, every kernel compiled (empty compilation cache)
  ours warm the same, kernels from the persistent compilation cache an earlier run filled;
            both with the time spent reading inputs, writing the output (both while kernels run
            asynchronously) and waiting for kernels measured inside the process
  mergekit  `mergekit-yaml mergekit.yaml OUT` (if installed: it is a comparison, never a
            dependency), the same merge: merge_method breadcrumbs, per-model density, gamma
            (its fraction of largest entries dropped), weight; computed in float32, written bf16
and prints wall time and peak RSS (os.wait4 of the child), ratios to mergekit and to `io`, the
read/compute/write split, and how the two outputs differ: the largest difference, and whether
every differing entry is explained by ties at a band edge (same magnitude as the k-th entry; the
order of equal magnitudes is ours by flat index, mergekit's by torch.sort). Outputs are deleted
unless --keep; the models stay under --work for the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import llama_models  # noqa: E402

DENSITY, GAMMA_TOP = 0.1, 0.01


def weights(tasks: int) -> list[float]:
    return [round(1.0 - 0.15 * t, 2) for t in range(tasks)]


def write_configs(work: Path, base: Path, fts: list[Path], dtype: str) -> tuple[Path, Path]:
    ws = weights(len(fts))
    ours = {
        "base_model": str(base),
        "models": [{"path": str(f), "weight": w} for f, w in zip(fts, ws)],
        "method": "breadcrumbs",
        "params": {"alpha": 1.0, "density": DENSITY, "gamma_top": GAMMA_TOP, "granularity": "tensor"},
        "dtype": dtype,
        "output": {"format": "safetensors"},
    }
    mk = {
        "merge_method": "breadcrumbs",
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"density": DENSITY, "gamma": GAMMA_TOP, "weight": w}}
                   for f, w in zip(fts, ws)],
        "parameters": {"normalize": False, "lambda": 1.0},
        "dtype": "float32",
        "out_dtype": dtype,
    }
    import yaml

    p_ours, p_mk = work / "ours.yaml", work / "mergekit.yaml"
    p_ours.write_text(yaml.safe_dump(ours, sort_keys=False))
    p_mk.write_text(yaml.safe_dump(mk, sort_keys=False))
    return p_ours, p_mk


def run(cmd: list[str], env=None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB, stderr tail) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 2**20, err[-2000:]


# ---------------------------------------------------------------- child processes


def child_ours(config: str, out: str, times: str) -> None:
    """The CLI merge, with the time inside SafetensorsSource.read / SafetensorsSink.write counted,
    and the time the merge waited for its kernels (they run asynchronously, while the next leaf
    is read and the last one written)."""
    import importlib

    from breadcrumbs_jax import cli
    from breadcrumbs_jax.io import safetensors as st

    merge_mod = importlib.import_module("breadcrumbs_jax.merge")  # the package exports a function `merge`

    spent = {"read": 0.0, "write": 0.0, "wait": 0.0}

    def timed(fn, key):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t

        return wrapper

    merge_mod._finish = timed(merge_mod._finish, "wait")
    st.SafetensorsSource.read = timed(st.SafetensorsSource.read, "read")
    st.SafetensorsSink.write = timed(st.SafetensorsSink.write, "write")
    start = time.perf_counter()
    code = cli.program(["merge", config, out, "--overwrite", "--no-progress"])
    spent["total"] = time.perf_counter() - start
    Path(times).write_text(json.dumps(spent))
    sys.exit(code)


def child_io(base: str, models: list[str], out: str, times: str) -> None:
    """Read every leaf of base and models, write the base's leaves: the I/O floor."""
    from breadcrumbs_jax.io import open_sink, open_source, staged_output
    from breadcrumbs_jax.io.base import LeafInfo

    spent = {"read": 0.0, "write": 0.0}
    start = time.perf_counter()
    srcs = [open_source(p) for p in [base, *models]]
    leaves = srcs[0].leaves()
    outs = [LeafInfo(p, i.shape, i.dtype) for p, i in leaves.items()]
    target = Path(out)
    if target.exists():
        shutil.rmtree(target)
    with staged_output(target, overwrite=True) as staging:
        sink = open_sink("safetensors", staging, outs, like=srcs[0])
        for path in sink.order:
            t = time.perf_counter()
            arrays = [s.read(path) for s in srcs]
            spent["read"] += time.perf_counter() - t
            t = time.perf_counter()
            sink.write(path, arrays[0])
            spent["write"] += time.perf_counter() - t
            del arrays
        t = time.perf_counter()
        sink.commit()
        spent["write"] += time.perf_counter() - t
    spent["total"] = time.perf_counter() - start
    Path(times).write_text(json.dumps(spent))


# ---------------------------------------------------------------- comparing outputs


def compare(ours: Path, theirs: Path, base: Path, fts: list[Path], weights: list[float]) -> dict:
    """Largest |ours - theirs|; entries that differ by no more than the rounding of the sum
    base + sum_t w_t tau_t (float32 terms added in another order, then rounded to the output
    dtype: 4 output ulps of the largest term), and entries that differ by more, which only a kept
    set can explain: how many of those are not at a band-edge tie of any task (|tau_t| equal to
    the magnitude at a band edge, where the two tools order equal magnitudes differently)."""
    import ml_dtypes

    from breadcrumbs_jax.io import open_source

    a, b = open_source(ours), open_source(theirs)
    src_base, src_fts = open_source(base), [open_source(f) for f in fts]
    worst, differ, unexplained, entries, rounding = 0.0, 0, 0, 0, 0
    for path in a.leaves():
        xo = a.read(path)
        x, y = xo.astype(np.float32).ravel(), b.read(path).astype(np.float32).ravel()
        entries += x.size
        d = np.abs(x - y)
        worst = max(worst, float(d.max()))
        idx = np.flatnonzero(d > 0)
        if not idx.size:
            continue
        p = src_base.read(path).astype(np.float32).ravel()
        taus = [f.read(path).astype(np.float32).ravel() - p for f in src_fts]
        scale = np.abs(p[idx]) + sum(w * np.abs(t[idx]) for w, t in zip(weights, taus))
        eps = float(ml_dtypes.finfo(xo.dtype).eps)
        summed = d[idx] <= 4 * eps * scale
        rounding += int(summed.sum())
        bad = idx[~summed]
        differ += bad.size
        if not bad.size:
            continue
        n = p.size
        n_top, n_keep = int(np.floor(n * GAMMA_TOP)), int(np.floor(n * DENSITY))
        n_bot = n - n_keep - n_top
        tied = np.zeros(bad.size, bool)
        for t in taus:
            mag = np.abs(t)
            edges = [r for r in (n_bot - 1, n_bot, n_bot + n_keep - 1, n_bot + n_keep) if 0 <= r < n]
            tied |= np.isin(mag[bad], np.partition(mag, edges)[edges])
        unexplained += int((~tied).sum())
    return {"max_abs_diff": worst, "differ": differ, "not_at_ties": unexplained, "entries": entries, "rounding": rounding}


# ---------------------------------------------------------------- the benchmark


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100m,400m,1b")
    ap.add_argument("--tasks", default="4", help="comma-separated values of T")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="of the models and the output")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bcbench"))
    ap.add_argument("--mergekit", default="/work/venvs/mergekit/bin/mergekit-yaml")
    ap.add_argument("--no-mergekit", action="store_true", help="skip mergekit")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "ours":
            child_ours(*rest)
        elif kind == "compare":  # in a child, so that the parent's RSS stays small: Linux counts a
            # forked child's peak RSS from its parent's (ru_maxrss outlives exec)
            ours, theirs, base, *fts, tasks, out = rest
            result = compare(Path(ours), Path(theirs), Path(base), [Path(f) for f in fts], weights(int(tasks)))
            Path(out).write_text(json.dumps(result))
        else:
            child_io(rest[0], rest[1:-2], rest[-2], rest[-1])
        return

    have_mk = not args.no_mergekit and Path(args.mergekit).exists()
    repo = HERE.parent
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print(f"{os.cpu_count()} CPUs; models and output {args.dtype}, merges computed in float32; density {DENSITY}, "
          f"gamma_top {GAMMA_TOP}; median of {args.reps} runs; mergekit: {args.mergekit if have_mk else 'not run'}")
    for size in args.sizes.split(","):
        for tasks in (int(t) for t in args.tasks.split(",")):
            t0 = time.perf_counter()
            base, fts = llama_models.make_models(args.work, size, tasks, args.dtype)
            work = args.work / f"{size}-{args.dtype}-T{tasks}"
            work.mkdir(parents=True, exist_ok=True)
            cfg_ours, cfg_mk = write_configs(work, base, fts, args.dtype)
            out_ours, out_mk, out_io = work / "out_ours", work / "out_mergekit", work / "out_io"
            times_ours, times_io = work / "times_ours.json", work / "times_io.json"
            me = [sys.executable, str(Path(__file__).resolve()), "--child"]
            runs = {
                "io": me + ["io", str(base), *map(str, fts), str(out_io), str(times_io)],
                "ours": me + ["ours", str(cfg_ours), str(out_ours), str(times_ours)],
                "ours warm": me + ["ours", str(cfg_ours), str(out_ours), str(times_ours)],
            }
            if have_mk:
                runs["mergekit"] = [args.mergekit, str(cfg_mk), str(out_mk), "--no-copy-tokenizer",
                                    "--no-write-model-card", "--quiet"]
            cold, warm = work / "jax_cache_cold", work / "jax_cache_warm"
            shutil.rmtree(warm, ignore_errors=True)
            run(runs["ours"], {**env, "BREADCRUMBS_JAX_CACHE": str(warm)})  # fills the warm cache
            res = {k: [] for k in runs}
            split = {"io": [], "ours": [], "ours warm": []}
            for _ in range(args.reps):
                for name, cmd in runs.items():
                    for o in (out_ours, out_mk, out_io):  # every run writes a new output
                        shutil.rmtree(o, ignore_errors=True)
                    shutil.rmtree(cold, ignore_errors=True)  # 'ours' compiles every kernel
                    cache = str(warm if name == "ours warm" else cold)
                    wall, rss, _ = run(cmd, {**env, "BREADCRUMBS_JAX_CACHE": cache})
                    res[name].append((wall, rss))
                    if name in split:
                        split[name].append(json.loads((times_ours if "ours" in name else times_io).read_text()))
            # one more pair of runs to leave both outputs for the comparison
            run(runs["ours warm"], {**env, "BREADCRUMBS_JAX_CACHE": str(warm)})
            if have_mk:
                shutil.rmtree(out_mk, ignore_errors=True)
                run(runs["mergekit"], env)
            med = {k: (float(np.median([w for w, _ in v])), float(np.median([r for _, r in v]))) for k, v in res.items()}
            sp = {k: {f: float(np.median([s.get(f, s["read"]) for s in v])) for f in ("read", "wait", "write", "total")}
                  for k, v in split.items()}
            n = llama_models.n_params(size)
            width = 2 if args.dtype == "bfloat16" else 4
            print(f"\n{size} ({n / 1e6:.0f}M params), T={tasks}: reads {n * width * (tasks + 1) / 1e9:.1f} GB, "
                  f"writes {n * width / 1e9:.1f} GB")
            for name, (wall, rss) in med.items():
                row = f"  {name:10s} wall {wall:7.1f} s  peak RSS {rss:5.2f} GiB"
                if have_mk and name != "mergekit":
                    row += f"  | vs mergekit: {med['mergekit'][0] / wall:5.1f}x faster, RSS {rss / med['mergekit'][1]:4.2f}x"
                if name != "io":
                    row += f"  | {wall / med['io'][0]:4.2f}x the I/O floor"
                print(row)
            for name in ("ours", "ours warm"):
                o = sp[name]
                print(f"  {name} split: read {o['read']:.1f} s and write {o['write']:.1f} s (while kernels run), "
                      f"waiting for kernels {o['wait']:.1f} s "
                      f"({'compiling every kernel' if name == 'ours' else 'kernels from the compilation cache'}), "
                      f"the rest (waiting for compiles, Python) {o['total'] - o['read'] - o['write'] - o['wait']:.1f} s; "
                      f"process start-up and imports {med[name][0] - o['total']:.1f} s")
            i = sp["io"]
            print(f"  io floor split: read {i['read']:.1f} s, write {i['write']:.1f} s")
            if have_mk:
                found = work / "compare.json"
                run(me + ["compare", str(out_ours), str(out_mk), str(base), *map(str, fts), str(tasks), str(found)], env)
                c = json.loads(found.read_text())
                print(f"  outputs: max |ours - mergekit| = {c['max_abs_diff']:.3g}; of {c['entries']} entries "
                      f"{c['rounding']} differ within the rounding of the sum, {c['differ']} by more "
                      f"({c['differ'] / c['entries']:.2e}: kept by one tool only), {c['not_at_ties']} of these "
                      f"not at a band-edge tie")
            if not args.keep:
                for o_ in (out_ours, out_mk, out_io, cold, warm):
                    shutil.rmtree(o_, ignore_errors=True)
            print(f"  ({time.perf_counter() - t0:.0f} s for this size)", flush=True)


if __name__ == "__main__":
    main()
