"""Small random model trees for tests: mixed shapes and dtypes, with ties and outliers."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np

SHAPES = {
    "conv/kernel": ((3, 3, 4, 8), np.float32),  # Flax conv kernel [kh, kw, in, out]
    "conv/bias": ((8,), np.float32),
    "conv3d/kernel": ((2, 3, 5), ml_dtypes.bfloat16),
    "dense/kernel": ((13, 7), np.float32),
    "dense/bias": ((7,), np.float16),
    "head/kernel": ((7, 3), ml_dtypes.bfloat16),
    "scale": ((), np.float32),
    "tiny": ((2,), np.float32),
    "step": ((), np.int32),
    "mask": ((4,), np.bool_),
}


def pretrained(seed: int = 0, shapes=SHAPES) -> dict:
    rng = np.random.default_rng(seed)
    out: dict = {}
    for path, (shape, dtype) in shapes.items():
        if dtype == np.bool_:
            x = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            x = rng.integers(0, 100, shape)
        else:
            x = rng.normal(size=shape)
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.asarray(x).astype(dtype)
    return out


def finetuned(pre: dict, seed: int, zero_frac: float = 0.3, outlier_frac: float = 0.02) -> dict:
    """pre + perturbation: a fraction of entries exactly unchanged (ties at 0), a few outliers,
    and quantised steps so equal magnitudes occur."""
    rng = np.random.default_rng(seed)

    def leaf(x):
        if not np.issubdtype(x.dtype, np.floating) and x.dtype != ml_dtypes.bfloat16:
            return x
        d = np.asarray(np.round(rng.normal(scale=0.05, size=x.shape) * 64) / 64)
        d[rng.random(x.shape) < zero_frac] = 0.0
        d[rng.random(x.shape) < outlier_frac] *= 40
        return (x.astype(np.float32) + d).astype(x.dtype)

    return _map(leaf, pre)


def _map(fn, tree):
    return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def as_jax(tree):
    return _map(jnp.asarray, tree)


def leaves(tree, prefix=""):
    """(path, leaf) pairs in JAX's flatten order (sorted dict keys)."""
    out = []
    for k in sorted(tree):
        v = tree[k]
        p = f"{prefix}/{k}" if prefix else k
        out.extend(leaves(v, p) if isinstance(v, dict) else [(p, v)])
    return out
