"""Task vectors: tau = F - P leaf by leaf (float32), and back: P + scale * tau.

Integer and boolean leaves are not task vectors: their tau is zero and applying one
returns P's leaf unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_float(dtype) -> bool:
    """Floating leaves (float16/32/64, bfloat16) are merged; all others are copied from P."""
    return jnp.issubdtype(np.dtype(dtype), jnp.floating)


def difference(pretrained: jax.Array, finetuned: jax.Array) -> jax.Array:
    """One leaf's task vector, computed in float32."""
    return finetuned.astype(jnp.float32) - pretrained.astype(jnp.float32)


def task_vector(pretrained: Any, finetuned: Any) -> Any:
    """tau = F - P for every float leaf (float32); zeros for integer and boolean leaves."""

    def leaf(p, f):
        if is_float(p.dtype):
            return difference(jnp.asarray(p), jnp.asarray(f))
        return jnp.zeros_like(p)

    return jax.tree.map(leaf, pretrained, finetuned)


def apply_task_vector(pretrained: Any, tau: Any, scale: float = 1.0) -> Any:
    """P + scale * tau on float leaves, cast back to P's dtype; other leaves are P's."""

    def leaf(p, t):
        if is_float(p.dtype):
            p = jnp.asarray(p)
            return (p.astype(jnp.float32) + jnp.float32(scale) * t).astype(p.dtype)
        return p

    return jax.tree.map(leaf, pretrained, tau)
