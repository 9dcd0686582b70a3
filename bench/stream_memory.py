"""Peak memory of the streaming merge against the whole-model in-memory merge.

Generates a pre-trained model and T fine-tuned ones (random weights, fine-tuned = pre-trained
plus small Gaussian perturbations; about `--gib` GiB each, written leaf by leaf), then runs

  stream:    breadcrumbs_jax.stream.merge_checkpoints (reads, merges, writes one leaf at a time)
  in-memory: io.load every model whole, breadcrumbs_jax.merge, io.save the result

each in a fresh subprocess, and prints each one's peak RSS (VmHWM; ru_maxrss too, which on
Linux includes the parent's RSS), the peak after imports, the largest leaf and the wall time. Generated files live in a temporary
folder (default under /tmp) that is deleted at the end.

    python bench/stream_memory.py                # T = 4, 1 GiB models, safetensors
    python bench/stream_memory.py --format orbax --tasks 4 --gib 1 --method task_arithmetic
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SUFFIX = {"safetensors": ".safetensors", "orbax": "", "msgpack": ".msgpack"}


def layout(gib: float) -> dict[str, tuple[int, ...]]:
    """An embedding of 128 MiB (the largest leaf) and 64 MiB kernels up to about `gib` GiB."""
    leaves = {"embed/embedding": (32768, 1024)}
    n_layers = max(1, round((gib * 1024 - 128) / 64))
    for i in range(n_layers):
        leaves[f"layers_{i:02d}/kernel"] = (4096, 4096)
    return leaves


class Synthetic:
    """A generated model as a leaf source: leaf = N(0, 1) (seeded by leaf) + scale * N(0, 1) (seeded by model)."""

    format, layout = "synthetic", "flax"

    def __init__(self, shapes, model: int, scale: float = 0.01):
        self.name, self.shapes, self.model, self.scale = f"synthetic {model}", shapes, model, scale

    def leaves(self):
        from breadcrumbs_jax.io import LeafInfo

        return {p: LeafInfo(p, s, "float32") for p, s in self.shapes.items()}

    def read(self, path, index=None):
        k = list(self.shapes).index(path)
        x = np.random.default_rng([k]).standard_normal(self.shapes[path], dtype=np.float32)
        if self.model:
            x += self.scale * np.random.default_rng([k, self.model]).standard_normal(x.shape, dtype=np.float32)
        return x if index is None else x[index]

    def close(self):
        pass


def peak_rss_mib() -> tuple[float, float]:
    """(VmHWM, ru_maxrss) in MiB. VmHWM is this process's own peak RSS; Linux's ru_maxrss also
    counts the parent's RSS at fork/exec (it survives exec), so it is only an upper bound."""
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return hwm / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


METHODS = {"breadcrumbs": dict(alpha=0.5, density=0.1, gamma_top=0.01), "task_arithmetic": dict(alpha=0.5)}


def child(mode: str, method_name: str, base: str, models: list[str], out: str) -> None:
    import breadcrumbs_jax as bj
    from breadcrumbs_jax import io
    from breadcrumbs_jax.stream import merge_checkpoints

    after_import = peak_rss_mib()[0]
    method = bj.get_method(method_name, **METHODS[method_name])
    start = time.perf_counter()
    if mode == "stream":
        merge_checkpoints(base, models, out, method)
    else:
        trees = [io.load(p) for p in (base, *models)]
        result = bj.merge(trees[0], trees[1:], method)
        io.save(result.params, out)
    hwm, maxrss = peak_rss_mib()
    print(json.dumps({"peak_mib": hwm, "ru_maxrss_mib": maxrss, "after_import_mib": after_import,
                      "seconds": time.perf_counter() - start}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--gib", type=float, default=1.0, help="size of each model")
    ap.add_argument("--format", choices=list(SUFFIX), default="safetensors")
    ap.add_argument("--method", choices=list(METHODS), default="breadcrumbs")
    ap.add_argument("--dir", default=None, help="where to generate (default: a new folder under /tmp)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, method, out, base, *models = args.child
        return child(mode, method, base, models, out)

    from breadcrumbs_jax import io

    shapes = layout(args.gib)
    largest = max(int(np.prod(s)) * 4 for s in shapes.values())
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    work = Path(tempfile.mkdtemp(prefix="bc_stream_mem_", dir=args.dir or "/tmp"))
    try:
        t0 = time.perf_counter()
        paths = []
        for m in range(args.tasks + 1):
            path = work / f"model{m}{SUFFIX[args.format]}"
            io.write(Synthetic(shapes, m), path, format=args.format)
            paths.append(str(path))
        print(f"generated {args.tasks + 1} models of {total / 2**30:.2f} GiB ({len(shapes)} leaves, largest "
              f"{largest / 2**20:.0f} MiB) as {args.format} in {time.perf_counter() - t0:.0f} s")
        results = {}
        for mode in ("stream", "in-memory"):
            out = work / f"out_{mode}{SUFFIX[args.format]}"
            cmd = [sys.executable, __file__, "--child", mode, args.method, str(out), *paths]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[mode]
            print(f"{mode:>9}: peak RSS {r['peak_mib']:6.0f} MiB (VmHWM; after imports {r['after_import_mib']:.0f} MiB; "
                  f"ru_maxrss {r['ru_maxrss_mib']:.0f} MiB)  {r['seconds']:.0f} s")
        same = io.load(work / f"out_stream{SUFFIX[args.format]}")
        ref = io.load(work / f"out_in-memory{SUFFIX[args.format]}")
        equal = all(np.array_equal(same[k][kk], ref[k][kk]) for k in ref for kk in ref[k])
        s, m = results["stream"], results["in-memory"]
        print(f"{args.method}, T = {args.tasks}, largest leaf L = {largest / 2**20:.0f} MiB, model {total / 2**20:.0f} MiB: "
              f"stream peak - imports = {(s['peak_mib'] - s['after_import_mib']) / (largest / 2**20):.1f} L; "
              f"in-memory peak / stream peak = {m['peak_mib'] / s['peak_mib']:.2f}; outputs identical: {equal}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
