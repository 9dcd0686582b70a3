"""Where one leaf's merge kernel spends its time: the kernel and its parts, as multiples of one pass.

    python bench/kernel.py [--side 4096] [--tasks 4] [--reps 3] [--method breadcrumbs|ties] [--dtype bfloat16]

On a [T, side, side] stack of fine-tuned leaves (small perturbations of a base, in --dtype:
bfloat16 as bench/llama_models.py makes them, float16 or float32), in one process and interleaved
(only ratios in one run mean anything), the median over --reps of:
  pass       jnp.abs(tau).sum() over the stored float32 task vectors (one read; the unit)
  tau        the task vectors recomputed from the inputs, summed
  finite     the NaN/Inf check of the T + 1 inputs
  mask       the method's band mask, task vectors recomputed, applied (jnp.where)
  stats      the report's per-task statistics of the band (given its thresholds; ~0 when an entry
             tied with the upper threshold ranks below it in every group, as bf16 differences do)
  stats_pass the same with that pass forced (the cost where the largest kept |tau| must be read)
  kernel     the whole jitted leaf merge (merge._merge_kernel), output in --dtype
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from selection import bench

import breadcrumbs_jax as bj
from breadcrumbs_jax import kernel_store
from breadcrumbs_jax.merge import _finite, _merge_kernel, _stack_tau
from breadcrumbs_jax.selection import Part
from breadcrumbs_jax.steps import LeafContext

METHODS = {"breadcrumbs": bj.breadcrumbs(1.0, density=0.1, gamma_top=0.01), "ties": bj.ties(1.0, density=0.2)}


DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}


def inputs(tasks: int, shape: tuple[int, ...], seed: int = 0, dtype: str = "bfloat16") -> tuple[np.ndarray, np.ndarray]:
    """A base leaf ~ N(0, 0.02) and T fine-tunings (base + N(0, 0.002)), both rounded to `dtype`."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(DTYPES[dtype])
    noise = rng.standard_normal((tasks, *shape), dtype=np.float32) * 0.002
    return base, (base.astype(np.float32)[None] + noise).astype(DTYPES[dtype])


def parts(method, base, stack) -> dict:
    sel, ctx = method.selector, LeafContext()
    lo, hi = kernel_store.jit(lambda b, s: sel._select(lambda: _stack_tau(b, s), ctx)[1:])(base, stack)
    axes = tuple(range(1, stack.ndim))
    unknown_under = dataclasses.replace(hi, under=None)

    def mask(b, s, _):
        keep, _, _ = sel.mask(lambda: _stack_tau(b, s), ctx)
        return jnp.where(keep, _stack_tau(b, s), 0.0)

    return {
        "pass": kernel_store.jit(lambda b, s, tau: jnp.abs(tau).sum()),
        "tau": kernel_store.jit(lambda b, s, _: _stack_tau(b, s).sum()),
        "finite": kernel_store.jit(lambda b, s, _: _finite(b, s)),
        "mask": kernel_store.jit(mask),
        "stats": kernel_store.jit(lambda b, s, _: sel._rank_stats(Part(lambda: _stack_tau(b, s), axes), lo, hi)),
        "stats_pass": kernel_store.jit(lambda b, s, _: sel._rank_stats(Part(lambda: _stack_tau(b, s), axes), lo, unknown_under)),
        "kernel": lambda b, s, _: _merge_kernel(
            b, s, jnp.uint32(0), None, method=method, out_axis=None, out_dtype=base.dtype),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--method", default="breadcrumbs", choices=sorted(METHODS))
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    args = ap.parse_args()
    base, stack = (jax.device_put(x) for x in inputs(args.tasks, (args.side, args.side), dtype=args.dtype))
    tau = jax.block_until_ready(_stack_tau(base, stack))
    t = bench(parts(METHODS[args.method], base, stack), (base, stack, tau), args.reps)
    print(f"jax {jax.__version__}; {args.method}; T={args.tasks} x {args.side}x{args.side} {args.dtype}; "
          f"median of {args.reps}; multiples of one pass ({t['pass'] * 1e3:.1f} ms)")
    for name, seconds in t.items():
        print(f"  {name:10s} {seconds / t['pass']:6.1f}x")


if __name__ == "__main__":
    main()
