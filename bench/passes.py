"""Value passes the exact selection takes on task vectors of Llama-shaped leaves.

    python bench/passes.py [--views 768x768,2048x768,4096x1024,32000x768] [--tasks 4] [--seeds 3] [--dtype bfloat16]

For each view and seed, a base and T fine-tunings in --dtype (as bench/kernel.py makes them) go
through Breadcrumbs' merge kernel (density 0.1, gamma_top 0.01); every value pass of the search
is counted as it runs (a `jax.debug.callback` in `selection._value_pass`), as a counting pass or
one that also extracts, and whether the search ended by gathering (float16 and float32 groups of
2**23 entries and more). Pass counts, unlike times, do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import collections

import jax
import jax.numpy as jnp
from kernel import DTYPES, METHODS, inputs

from breadcrumbs_jax import selection
from breadcrumbs_jax.merge import _merge_kernel


def counted_passes() -> collections.Counter:
    """Make every value pass, and every gathering, count itself into the returned counter when it runs."""
    counts, value_pass, gathered = collections.Counter(), selection._value_pass, selection._gathered

    def counting(groups, p_lo, p_hi, extract):
        jax.debug.callback(lambda: counts.update(["extract" if extract else "count"]))
        return value_pass(groups, p_lo, p_hi, extract)

    def gathering(groups, b, k):
        jax.debug.callback(lambda: counts.update(["gather"]))
        return gathered(groups, b, k)

    selection._value_pass, selection._gathered = counting, gathering
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", default="768x768,2048x768,4096x1024,32000x768")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    args = ap.parse_args()
    counts, total = counted_passes(), collections.Counter()

    def kernel(b, s):
        return _merge_kernel(b, s, jnp.uint32(0), None, method=METHODS["breadcrumbs"], out_axis=None, out_dtype=b.dtype)

    print(f"jax {jax.__version__}; breadcrumbs; T={args.tasks}; {args.dtype}; value passes (count + extract; g: gathered)")
    for view in args.views.split(","):
        shape = tuple(int(d) for d in view.split("x"))
        row = []
        for seed in range(args.seeds):
            base, stack = inputs(args.tasks, shape, seed, args.dtype)
            counts.clear()
            jax.block_until_ready(kernel(base, stack))
            jax.effects_barrier()
            row.append(f"{counts['count'] + counts['extract']} ({counts['count']} + {counts['extract']}){' g' if counts['gather'] else ''}")
            total.update(counts)
        print(f"  [{args.tasks}, {', '.join(map(str, shape))}]: {', '.join(row)}")
    print(f"  all: {total['count'] + total['extract']} ({total['count']} + {total['extract']})")


if __name__ == "__main__":
    main()
