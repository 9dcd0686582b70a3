"""Merge in-memory PyTrees with every method and print the per-leaf report.

    python examples/quickstart.py
"""

import warnings

import jax
import numpy as np

import breadcrumbs_jax as bj

rng = np.random.default_rng(0)
pretrained = {
    "embed": {"embedding": rng.normal(size=(100, 16)).astype(np.float32)},
    "mlp": {"kernel": rng.normal(size=(16, 32)).astype(np.float32), "bias": np.zeros(32, np.float32)},
    "norm": {"scale": np.ones(16, np.float32)},
}
finetuned = [
    jax.tree.map(lambda x: x + 0.01 * rng.standard_t(3, size=x.shape).astype(np.float32), pretrained)
    for _ in range(4)
]

# Keep embeddings at the pre-trained values, merge norms by plain task arithmetic.
rules = [bj.LeafRule("embed/*", action="base"), bj.LeafRule("norm/*", method=bj.task_arithmetic(0.3))]
method = bj.breadcrumbs(alpha=0.3, beta=0.85, gamma=0.993, granularity="tensor")
print(bj.dry_run(pretrained, method, rules), end="\n\n")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the tiny demo leaves keep few entries; the report shows it
    result = bj.merge(pretrained, finetuned, method, rules=rules)
print(result.report.table(), end="\n\n")

for name in bj.METHODS:
    merged = bj.merge(pretrained, finetuned, bj.get_method(name), rules=rules).params
    change = float(np.abs(np.asarray(merged["mlp"]["kernel"]) - pretrained["mlp"]["kernel"]).mean())
    print(f"{name:17s} mean |theta - P| on mlp/kernel: {change:.5f}")
