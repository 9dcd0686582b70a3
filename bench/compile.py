"""Compile and run time of the merge kernel with XLA's default options and with ours.

    python bench/compile.py [--views 768x768,2048x768,32000x768] [--tasks 4] [--reps 11]

For each leaf view (a [T, *view] stack of bfloat16 fine-tuned leaves, as bench/kernel.py makes),
the kernel is lowered once and compiled twice in one process: with XLA's defaults given
explicitly (MLIR fusion emitters, LLVM -O3) and with `kernel_store.compiler_options()` (what merge
kernels compile with here). It prints both compile times, the median run time of each over --reps
interleaved runs, and whether their outputs have the same bits. Only ratios in one run mean
anything on a shared machine.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from kernel import METHODS, inputs

from breadcrumbs_jax import kernel_store
from breadcrumbs_jax.merge import _merge_kernel

XLA_DEFAULTS = {"xla_cpu_use_fusion_emitters": True, "xla_backend_optimization_level": 3}


def digest(out) -> str:
    return hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(out))).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", default="768x768,2048x768,32000x768")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--method", default="breadcrumbs", choices=sorted(METHODS))
    args = ap.parse_args()
    variants = {"defaults": XLA_DEFAULTS, "ours": kernel_store.compiler_options()}
    static = dict(method=METHODS[args.method], out_axis=None, out_dtype=np.dtype(ml_dtypes.bfloat16))
    print(f"jax {jax.__version__}; {args.method}; T={args.tasks}; bfloat16; ours = {variants['ours']}")
    print(f"  {'view':>14s}  {'compile: defaults':>17s} {'ours':>7s}  {'run: defaults':>13s} {'ours':>9s}  same bits")
    jax.jit(lambda x: x + 1).lower(1.0).compile()  # the backend's one-time start-up, outside the timings
    for view in args.views.split(","):
        shape = tuple(int(d) for d in view.split("x"))
        call = (*inputs(args.tasks, shape), jnp.uint32(0), None)
        lowered = _merge_kernel.trace(*call, **static).lower()
        compiled, seconds, runs = {}, {}, {}
        for name, options in variants.items():
            t = time.perf_counter()
            compiled[name] = lowered.compile(compiler_options=options)
            seconds[name], runs[name] = time.perf_counter() - t, []
        same = len({digest(k(*call)) for k in compiled.values()}) == 1
        for _ in range(args.reps):
            for name, kernel in compiled.items():
                t = time.perf_counter()
                jax.block_until_ready(kernel(*call))
                runs[name].append(time.perf_counter() - t)
        ms = {n: float(np.median(r)) * 1e3 for n, r in runs.items()}
        print(f"  {view:>14s}  {seconds['defaults']:16.2f}s {seconds['ours']:6.2f}s  "
              f"{ms['defaults']:11.1f}ms {ms['ours']:7.1f}ms  {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
