"""The model: a Flax nnx MLP body (merged) and a linear head (one per task, frozen).

Parameters travel as nnx `State` pytrees: ``graphdef, params = nnx.split(model)``, with
``params['body']`` the part that is fine-tuned and merged and ``params['head']`` the head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

INPUTS, CLASSES = 64, 10


class Body(nnx.Module):
    """Two GELU layers: 64 -> hidden -> hidden."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(INPUTS, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.gelu(self.fc2(nnx.gelu(self.fc1(x))))


class Classifier(nnx.Module):
    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.body = Body(hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.body(x))


def init(hidden: int, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """A freshly initialised classifier, split into its graph and its parameter State."""
    return nnx.split(Classifier(hidden, rngs=nnx.Rngs(seed)))


def logits(graphdef: nnx.GraphDef, body: nnx.State, head: nnx.State, x: jax.Array) -> jax.Array:
    """[N, 10] logits of the classifier assembled from a body and a head."""
    return nnx.merge(graphdef, nnx.State({"body": body, "head": head}))(x)


def features(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array) -> jax.Array:
    """[N, hidden] outputs of the body."""
    return nnx.merge(graphdef, params).body(x)


def prototype_head(template: nnx.State, feats: jax.Array, labels: jax.Array) -> nnx.State:
    """A nearest-class-mean head over `feats`: logit_c = <f, mu_c> - |mu_c|^2 / 2, the
    analogue of the paper's zero-shot heads (built from a few labelled examples, not trained)."""
    onehot = jax.nn.one_hot(labels, CLASSES, dtype=feats.dtype)
    mu = (onehot.T @ feats) / jnp.sum(onehot, axis=0)[:, None]  # [10, hidden]
    head = jax.tree.map(lambda a: a, template)
    nnx.replace_by_pure_dict(head, {"kernel": mu.T, "bias": -0.5 * jnp.sum(mu * mu, axis=1)})
    return head
