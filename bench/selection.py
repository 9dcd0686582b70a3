"""Exact band selection vs one elementwise pass, on float32 leaves of 1M, 16M and 64M entries.

    python bench/selection.py [--sizes 1,16,64] [--tasks 1] [--reps 5] [--dist normal|bf16|zeros]

For each size, in one process and interleaved (the machine may be shared, so only ratios
measured in the same run mean anything), the median over --reps of:
  pass       jnp.abs(x).sum()                          (one read of the leaf)
  write      x * 2                                     (one read and one fresh write)
  select     the two exact thresholds of the Breadcrumbs band (beta 0.85, gamma 0.993)
  select0    the same without gathering (rank_thresholds(capacity=0): counting and extraction only)
  mask       select + jnp.where(keep, x, 0)            (what MagnitudeBand does)
  sort       jnp.sort(|x|) over the group              (what a sort-based reference costs; <= 16M)
and checks the kept set against numpy's lexsort (<= 16M) or its count (64M).
Distributions: normal (continuous, no ties); bf16 (a difference of two bf16 models: huge runs of
equal magnitudes, so the index tie-break runs); zeros (60% exact zeros, rest normal).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from breadcrumbs_jax import kernel_store
from breadcrumbs_jax import selection as sel
from breadcrumbs_jax.band import Band

BAND = Band.from_quantiles("0.85", "0.993")


def make(dist: str, shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "normal":
        return rng.standard_normal(shape, dtype=np.float32)
    if dist == "bf16":
        import ml_dtypes

        base = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        ft = (base.astype(np.float32) + rng.standard_normal(shape, dtype=np.float32) * 0.002).astype(ml_dtypes.bfloat16)
        return ft.astype(np.float32) - base.astype(np.float32)
    if dist == "zeros":
        x = rng.standard_normal(shape, dtype=np.float32)
        x[rng.random(shape) < 0.6] = 0.0
        return x
    raise ValueError(dist)


def thresholds(x, capacity=None):
    part = sel.Part(x, tuple(range(1, x.ndim)))
    n_bot, n_keep, _ = BAND.counts(part.size)
    return part, sel.rank_thresholds([part], [n_bot, n_bot + n_keep], capacity=capacity)


@functools.partial(kernel_store.jit, static_argnames="capacity")
def select(x, capacity=None):
    _, (lo, hi) = thresholds(x, capacity)
    return lo, hi


@kernel_store.jit
def mask(x):
    part, (lo, hi) = thresholds(x)
    keep = sel.below(part, hi) & ~sel.below(part, lo)
    return jnp.where(keep, x, 0.0)


FUNCS = {
    "pass": kernel_store.jit(lambda x: jnp.abs(x).sum()),
    "write": kernel_store.jit(lambda x: x * 2),
    "select": select,
    "select0": functools.partial(select, capacity=0),
    "mask": mask,
    "sort": kernel_store.jit(lambda x: jnp.sort(jnp.abs(x).reshape(x.shape[0], -1), axis=-1)),
}


def bench(funcs, args, reps):
    """Median seconds of each function of `funcs` on `args`, compiled first, then run interleaved."""
    times = {n: [] for n in funcs}
    for f in funcs.values():  # compile and warm up
        jax.block_until_ready(f(*args))
    for _ in range(reps):
        for n, f in funcs.items():
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[n].append(time.perf_counter() - t)
    return {n: float(np.median(v)) for n, v in times.items()}


def check(x_np, masked):
    got = np.asarray(masked) != 0
    n = x_np[0].size
    n_bot, n_keep, _ = BAND.counts(n)
    for t in range(x_np.shape[0]):
        if n <= 16 << 20:
            keys = x_np[t].ravel().view(np.int32) & 0x7FFFFFFF
            order = np.lexsort((np.arange(n), keys))
            want = np.zeros(n, bool)
            want[order[n_bot : n_bot + n_keep]] = True
            assert (got[t].ravel() == (want & (x_np[t].ravel() != 0))).all(), "kept set differs from lexsort"
        else:
            assert got[t].sum() <= n_keep
    return "exact" if n <= 16 << 20 else "count ok"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,16,64", help="leaf sizes in Mi entries")
    ap.add_argument("--tasks", type=int, default=1, help="T: task vectors stacked on axis 0")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dist", default="normal", choices=["normal", "bf16", "zeros"])
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; T={args.tasks}; dist={args.dist}; "
          f"median of {args.reps}; times in ms, ratios to 'pass'")
    for mi in (int(s) for s in args.sizes.split(",")):
        side = int(np.sqrt(mi << 20))
        shape = (args.tasks, side, (mi << 20) // side)
        x_np = make(args.dist, shape)
        x = jnp.asarray(x_np)
        names = ["pass", "write", "select", "select0", "mask"] + (["sort"] if mi <= 16 else [])
        t = bench({n: FUNCS[n] for n in names}, (x,), args.reps)
        status = check(x_np, mask(x))
        row = "  ".join(f"{n} {t[n] * 1e3:7.1f} ({t[n] / t['pass']:5.2f}x)" for n in names)
        print(f"{mi:3d}Mi x{args.tasks}: {row}  [{status}]", flush=True)
        del x


if __name__ == "__main__":
    main()
