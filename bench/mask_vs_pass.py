"""Time of the exact Breadcrumbs mask against one elementwise pass, in one run (ratios only).

    python bench/mask_vs_pass.py 16        # a float32 leaf of 16 Mi entries

Prints the median of 3 of: jnp.abs(x).sum() (one read), the masked leaf for continuous data,
and for data with 50 % exact zeros (the index tie-break runs).
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from breadcrumbs_jax import Band, MagnitudeBand

SELECTOR = MagnitudeBand(Band.from_quantiles(0.85, 0.993))


def median_time(f, a) -> float:
    f(a).block_until_ready()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(mi: int) -> None:
    n = mi * 2**20
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, n), dtype=np.float32)
    zeros = x.copy()
    zeros[:, ::2] = 0
    one_pass = jax.jit(lambda v: jnp.abs(v).sum())
    masked = jax.jit(lambda v: jnp.where(SELECTOR.mask(v)[0], v, 0))
    x = jnp.asarray(x)  # one transfer for both timings that use it
    tp = median_time(one_pass, x)
    tm, tz = median_time(masked, x), median_time(masked, jnp.asarray(zeros))
    print(f"n={n}: pass {tp * 1e3:.1f} ms; mask {tm * 1e3:.0f} ms = {tm / tp:.0f}x a pass; "
          f"with 50% zeros {tz * 1e3:.0f} ms = {tz / tp:.0f}x a pass")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
