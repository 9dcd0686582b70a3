# %% [markdown]
# # Merging Flax nnx models with breadcrumbs_jax
#
# An nnx model's parameters are a `State` pytree (`nnx.split`), so `breadcrumbs_jax.merge`
# takes them as they are; leaf paths read `fc1/kernel` (the Variable's `.value` is not part
# of the name). Run the cells in order (VS Code / Jupytext), or the whole file with python.

# %%
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import breadcrumbs_jax as bj
from breadcrumbs_jax.search import search


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(4, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 1, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.gelu(self.fc1(x)))


model = MLP(nnx.Rngs(0))
graphdef, pretrained = nnx.split(model)
print(bj.dry_run(pretrained, bj.breadcrumbs(alpha=0.5)))

# %% [markdown]
# Three "fine-tunings": each fits a different target function of the inputs, starting from
# the same pre-trained weights.

# %%
x = jax.random.normal(jax.random.key(1), (256, 4))
targets = [jnp.sin(x[:, :1]), jnp.cos(x[:, 1:2]), x[:, 2:3] * x[:, 3:4]]


def finetune(params, y, steps=200):
    opt = optax.adam(1e-2)
    loss = lambda p: jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)  # noqa: E731

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    s = opt.init(params)
    for _ in range(steps):
        params, s = step(params, s)
    return params


finetuned = [finetune(pretrained, y) for y in targets]

# %% [markdown]
# Merge with Breadcrumbs (drop the 1 % largest and keep the next 30 % of each task vector,
# per tensor) and rebuild a model from the merged State with `nnx.merge` (or write it into
# an existing model in place with `nnx.update(model, result.params)`). The report says what
# each mask kept: the 1-entry bias of fc2 keeps nothing at this density, and says so.

# %%
result = bj.merge(pretrained, finetuned, bj.breadcrumbs(alpha=0.8, density=0.3, gamma_top=0.01))
print(result.report.table(max_rows=8))
merged_model = nnx.merge(graphdef, result.params)


def mse(params, y):
    return float(jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2))


for t, (name, y) in enumerate(zip(("sin", "cos", "product"), targets)):
    print(f"{name:8s} pre-trained {mse(pretrained, y):.3f}  fine-tuned {mse(finetuned[t], y):.3f}  "
          f"merged {float(jnp.mean((merged_model(x) - y) ** 2)):.3f}")

# %% [markdown]
# Search alpha and the band on a validation function (here: mean error over the three
# targets; use held-out data in practice). Alpha is swept over one combined delta per band,
# vmapped, because the merge is linear in alpha.

# %%
def validate(params):
    m = nnx.merge(graphdef, params)
    return -sum(jnp.mean((m(x) - y) ** 2) for y in targets) / len(targets)


res = search(pretrained, finetuned, "breadcrumbs", {"density": [0.1, 0.3, 0.6], "gamma_top": [0.0, 0.01]},
             validate, alphas=[0.2, 0.4, 0.6, 0.8, 1.0], vectorized=True)
print(res.table(top=5))
best = bj.merge(pretrained, finetuned, bj.get_method("breadcrumbs", **res.best.params)).params
print("best:", res.best.params, "mean error", -float(validate(best)))
