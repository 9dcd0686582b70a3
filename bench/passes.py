"""Value passes the exact selection takes on bfloat16 task vectors of Llama-shaped leaves.

    python bench/passes.py [--views 768x768,2048x768,4096x1024,32000x768] [--tasks 4] [--seeds 3]

For each view and seed, a bfloat16 base and T fine-tunings (as bench/kernel.py makes them) go
through Breadcrumbs' merge kernel (density 0.1, gamma_top 0.01); every value pass of the search
is counted as it runs (a `jax.debug.callback` in `selection._value_pass`), as a counting pass or
one that also extracts. Pass counts, unlike times, do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import collections

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from kernel import METHODS, inputs

from breadcrumbs_jax import selection
from breadcrumbs_jax.merge import _merge_kernel


def counted_passes() -> collections.Counter:
    """Make every value pass count itself into the returned counter when it runs."""
    counts, value_pass = collections.Counter(), selection._value_pass

    def counting(groups, p_lo, p_hi, extract):
        jax.debug.callback(lambda: counts.update(["extract" if extract else "count"]))
        return value_pass(groups, p_lo, p_hi, extract)

    selection._value_pass = counting
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", default="768x768,2048x768,4096x1024,32000x768")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    counts, total = counted_passes(), collections.Counter()
    bf16 = np.dtype(ml_dtypes.bfloat16)
    def kernel(b, s):
        return _merge_kernel(b, s, jnp.uint32(0), None, method=METHODS["breadcrumbs"], out_axis=None, out_dtype=bf16)

    print(f"jax {jax.__version__}; breadcrumbs; T={args.tasks}; bfloat16; value passes (count + extract)")
    for view in args.views.split(","):
        shape = tuple(int(d) for d in view.split("x"))
        row = []
        for seed in range(args.seeds):
            base, stack = inputs(args.tasks, shape, seed)
            counts.clear()
            jax.block_until_ready(kernel(base, stack))
            jax.effects_barrier()
            row.append(f"{counts['count'] + counts['extract']} ({counts['count']} + {counts['extract']})")
            total.update(counts)
        print(f"  [{args.tasks}, {', '.join(map(str, shape))}]: {', '.join(row)}")
    print(f"  all: {total['count'] + total['extract']} ({total['count']} + {total['extract']})")


if __name__ == "__main__":
    main()
