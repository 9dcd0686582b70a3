"""Small generated models for the checkpoint, streaming and CLI tests: a pre-trained tree and
fine-tuned copies (pre-trained plus random perturbations)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

FLAX_SHAPES = {
    "params/embed/embedding": ((40, 8), np.float32),
    "params/Dense_0/kernel": ((8, 12), np.float32),
    "params/Dense_0/bias": ((12,), ml_dtypes.bfloat16),
    "step": ((), np.int64),
}

HF_SHAPES = {
    "model.embed_tokens.weight": ((40, 8), np.float32),
    "model.layers.0.self_attn.q_proj.weight": ((8, 8), np.float32),
    "model.layers.0.mlp.up_proj.weight": ((12, 8), ml_dtypes.bfloat16),
    "model.norm.weight": ((8,), np.float32),
    "lm_head.weight": ((40, 8), np.float32),
}


def nested(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return out


def pretrained(shapes=FLAX_SHAPES, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    flat = {}
    for path, (shape, dtype) in shapes.items():
        if np.dtype(dtype).kind in "iu":
            flat[path] = np.asarray(rng.integers(0, 100, shape), dtype)
        else:
            flat[path] = rng.standard_normal(shape).astype(dtype)
    return nested(flat)


def finetuned(base: dict, seed: int, scale: float = 0.05) -> dict:
    """`base` plus Gaussian noise on every float leaf (integer leaves unchanged)."""
    rng = np.random.default_rng(seed)

    def perturb(x):
        if isinstance(x, dict):
            return {k: perturb(v) for k, v in x.items()}
        if np.dtype(x.dtype).kind in "iub":
            return x.copy()
        noise = scale * rng.standard_normal(x.shape) * (1 + 10 * (rng.random(x.shape) < 0.02))
        return (x.astype(np.float32) + noise).astype(x.dtype)

    return perturb(base)


def models(shapes=FLAX_SHAPES, n: int = 3, seed: int = 0) -> tuple[dict, list[dict]]:
    base = pretrained(shapes, seed)
    return base, [finetuned(base, seed + 1 + t) for t in range(n)]


def same_bits(a, b) -> bool:
    """Two trees have identical structure, dtypes and bytes."""
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(
            same_bits(a[k], b[k]) for k in a
        )
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
