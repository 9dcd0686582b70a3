"""Training with optax: pre-training (body and head) and per-task fine-tuning of the body
under a frozen head, all tasks at once (vmapped), each one jitted `lax.scan` over steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .model import logits


def _loss(body, head, graphdef, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(graphdef, body, head, x), y).mean()


def _fit_body(graphdef, body, head, x, y, key, *, steps, lr, batch, train_head):
    """Adam on minibatches drawn with replacement; the head is trained only if `train_head`."""
    params = (body, head) if train_head else body
    opt = optax.adam(lr)

    def step(carry, k):
        params, state = carry
        i = jax.random.randint(k, (batch,), 0, x.shape[0])
        if train_head:
            grads = jax.grad(lambda p: _loss(p[0], p[1], graphdef, x[i], y[i]))(params)
        else:
            grads = jax.grad(_loss)(params, head, graphdef, x[i], y[i])
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, steps))
    return params


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "lr", "batch"))
def pretrain(graphdef: nnx.GraphDef, params: nnx.State, x, y, key, *, steps: int, lr: float, batch: int) -> nnx.State:
    """Train body and head on (x [N, 64], y [N]); returns the parameter State."""
    body, head = _fit_body(graphdef, params["body"], params["head"], x, y, key,
                           steps=steps, lr=lr, batch=batch, train_head=True)
    return nnx.State({"body": body, "head": head})


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "lr", "batch"))
def finetune(graphdef: nnx.GraphDef, body: nnx.State, heads: nnx.State, x, y, keys, *, steps: int, lr: float,
             batch: int) -> nnx.State:
    """Fine-tune `body` on every task at once: heads [T, ...] (frozen), x [T, N, 64], y [N],
    keys [T]; returns the T fine-tuned bodies stacked on a leading axis."""
    fit = functools.partial(_fit_body, graphdef, steps=steps, lr=lr, batch=batch, train_head=False)
    return jax.vmap(lambda h, xt, k: fit(body, h, xt, y, k))(heads, x, keys)


def unstack(tree, n: int) -> list:
    """[T, ...] stacked pytree -> list of T pytrees."""
    return [jax.tree.map(lambda a, t=t: a[t], tree) for t in range(n)]


def stack(trees) -> object:
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)
