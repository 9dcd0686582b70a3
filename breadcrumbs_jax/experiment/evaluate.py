"""Accuracy of a body with each task's head on each task's data (jitted, vmapped over tasks)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from .model import logits


def accuracy(graphdef: nnx.GraphDef, body: nnx.State, head: nnx.State, x, y) -> jax.Array:
    return jnp.mean(jnp.argmax(logits(graphdef, body, head, x), axis=-1) == y)


def task_accuracies(graphdef: nnx.GraphDef, body: nnx.State, heads: nnx.State, x, y) -> jax.Array:
    """[T] accuracies of one body (e.g. a merged one) with heads [T, ...] on x [T, N, 64], y [N].

    A JAX function of `body`: usable under jit and vmap (the vectorized alpha sweep)."""
    return jax.vmap(lambda h, xt: accuracy(graphdef, body, h, xt, y))(heads, x)


@functools.partial(jax.jit, static_argnames="graphdef")
def shared_body(graphdef: nnx.GraphDef, body: nnx.State, heads: nnx.State, x, y) -> jax.Array:
    """`task_accuracies`, jitted."""
    return task_accuracies(graphdef, body, heads, x, y)


@functools.partial(jax.jit, static_argnames="graphdef")
def own_body(graphdef: nnx.GraphDef, bodies: nnx.State, heads: nnx.State, x, y) -> jax.Array:
    """[T] accuracies of each task's own body (bodies [T, ...]) on its task."""
    return jax.vmap(lambda b, h, xt: accuracy(graphdef, b, h, xt, y))(bodies, heads, x)
