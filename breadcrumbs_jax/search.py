"""Hyperparameter search for merge methods against a user-supplied validation function.

A merge with a global scale is linear in it: theta(alpha) = P + alpha * delta. For each
setting of the other parameters (band, density, drop rate) the combined delta is computed
once, by one merge without the `Scale` step, and alpha is swept over it; with a JAX
validation function the sweep is one vmapped, jitted call. Search on validation data and
report on test data: `search` only ever sees what `validate` computes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .errors import MergeError
from .merge import MergeResult, _check_structure, default_names, merge
from .methods import METHODS, Method
from .paths import flatten
from .plan import LeafRule, Layout
from .steps import Scale
from .task_vectors import apply_task_vector, is_float, task_vector

DEFAULT_ALPHAS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""The paper's reference code searches alpha in (0, 1]."""


def combined_delta(
    pretrained: Any,
    finetuned: Sequence[Any],
    method: Method,
    *,
    rules: Sequence[LeafRule] = (),
    layout: Layout = "flax",
    names: Sequence[str] | None = None,
) -> MergeResult:
    """The unscaled update: `params` holds delta (float32, zero on leaves kept at P), so that
    ``scale(pretrained, delta, alpha)`` equals ``merge(pretrained, finetuned, method with alpha)``.

    It is `merge` itself, run on the task vectors over a zero base with the method's `Scale`
    step removed, so masks, sign election and DARE's random drops are the very same; results
    agree to one float32 rounding (XLA may fuse the merge kernel's arithmetic differently).
    Holds every task vector in memory, in float32."""
    if any(r.method is not None for r in rules):
        raise MergeError("rules with their own method cannot share the swept alpha; search them separately")
    finetuned = list(finetuned)
    names = tuple(names) if names is not None else default_names(len(finetuned))
    base_paths, base_leaves, _ = flatten(pretrained)
    for f, name in zip(finetuned, names):
        _check_structure(base_paths, f, name)
    for path, leaf in zip(base_paths, base_leaves):
        if is_float(leaf.dtype) and not bool(jnp.all(jnp.isfinite(leaf))):
            raise MergeError("contains NaN or Inf", leaf=path, source="pretrained")
    taus = [task_vector(pretrained, f) for f in finetuned]
    zero = jax.tree.map(jnp.zeros_like, taus[0]) if taus else pretrained
    return merge(zero, taus, method.without_scale(), rules=rules, layout=layout, names=names)


@jax.jit
def scale(pretrained: Any, delta: Any, alpha) -> Any:
    """theta = P + alpha * delta (float leaves, in float32, cast to P's dtypes; others are P's)."""
    return apply_task_vector(pretrained, delta, alpha)


@jax.jit
def scale_many(pretrained: Any, delta: Any, alphas) -> Any:
    """`scale` for each alpha in `alphas`: every leaf gains a leading axis of len(alphas)."""
    return jax.vmap(apply_task_vector, in_axes=(None, None, 0))(pretrained, delta, alphas)


def merge_setting(
    pretrained: Any,
    finetuned: Sequence[Any],
    method: str | Callable[..., Method],
    params: Mapping[str, Any],
    *,
    rules: Sequence[LeafRule] = (),
    layout: Layout = "flax",
    names: Sequence[str] | None = None,
) -> Any:
    """The merged params of one setting (e.g. a search's `best.params`), computed as `search`
    scores it: with an `alpha`, ``scale(P, combined_delta(...), alpha)``, so the merge kernels
    compiled for the search are reused whatever alpha won."""
    name, factory = _factory(method)
    params = dict(params)
    alpha = params.pop("alpha", None)
    built = _build(name, factory, params)
    if alpha is not None and not _scales(built):
        raise MergeError(f"method {name!r} has no global scale: alpha={alpha} does not apply")
    if alpha is None:
        return merge(pretrained, finetuned, built, rules=rules, layout=layout, names=names).params
    delta = combined_delta(pretrained, finetuned, built, rules=rules, layout=layout, names=names).params
    return scale(pretrained, delta, float(alpha))


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """All combinations of the values in `grid` (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def random_points(space: Mapping[str, Any], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` random settings: a list or tuple of values is sampled uniformly from; a pair
    ``(low, high)`` given as a dict ``{'low': a, 'high': b}`` is sampled uniformly in [a, b]."""
    rng = np.random.default_rng(seed)

    def draw(spec):
        if isinstance(spec, Mapping):
            return float(rng.uniform(spec["low"], spec["high"]))
        return spec[int(rng.integers(len(spec)))]

    return [{k: draw(v) for k, v in space.items()} for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class Trial:
    """One evaluated setting: the method's parameters (alpha included when swept) and its score."""

    params: dict[str, Any]
    score: float


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Every trial in evaluation order; `best` is the highest score (the first one on ties)."""

    method: str
    trials: tuple[Trial, ...]

    @property
    def best(self) -> Trial:
        return max(self.trials, key=lambda t: t.score)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "best": dataclasses.asdict(self.best),
            "trials": [dataclasses.asdict(t) for t in self.trials],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def table(self, top: int | None = 10) -> str:
        """The `top` trials by score, best first."""
        ranked = sorted(self.trials, key=lambda t: -t.score)[:top]
        rows = [(f"{t.score:.4f}", ", ".join(f"{k}={v:g}" for k, v in t.params.items()) or "-") for t in ranked]
        w = max(len("score"), *(len(r[0]) for r in rows))
        lines = [f"{'score'.ljust(w)}  {self.method} parameters", f"{'-' * w}  {'-' * 20}"]
        return "\n".join(lines + [f"{s.ljust(w)}  {p}" for s, p in rows])


def _factory(method: str | Callable[..., Method]) -> tuple[str, Callable[..., Method]]:
    if callable(method):
        return getattr(method, "__name__", "method"), method
    try:
        return method, METHODS[method]
    except KeyError:
        raise MergeError(f"unknown method {method!r}; known: {', '.join(METHODS)}") from None


def _scales(method: Method) -> bool:
    return any(isinstance(s, Scale) for s in method.steps)


def _build(name: str, factory: Callable[..., Method], params: Mapping[str, Any]) -> Method:
    try:
        return factory(**params)
    except TypeError as e:
        raise MergeError(f"bad parameters for method {name!r}: {e}") from None


def search(
    pretrained: Any,
    finetuned: Sequence[Any],
    method: str | Callable[..., Method],
    points: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    validate: Callable[[Any], Any],
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    vectorized: bool = False,
    rules: Sequence[LeafRule] = (),
    layout: Layout = "flax",
    names: Sequence[str] | None = None,
) -> SearchResult:
    """Score every setting of `method` by `validate(merged params)` (higher is better).

    `method` is a catalogue name ('breadcrumbs') or a factory returning a `Method`; `points`
    is a grid (dict of value lists, every combination is tried, see `grid_points`) or a list
    of settings (e.g. from `random_points`), without alpha. If the method has a `Scale` step,
    each setting is merged once and every alpha in `alphas` is scored on P + alpha * delta.
    With `vectorized=True`, `validate` must be a JAX function of the params; it is vmapped
    over the alphas (all len(alphas) merged trees are in memory at once)."""
    name, factory = _factory(method)
    settings = grid_points(points) if isinstance(points, Mapping) else [dict(p) for p in points]
    if not settings:
        raise MergeError(f"no settings to search for method {name!r}")
    if any("alpha" in s for s in settings):
        raise MergeError("alpha is swept by `alphas`; leave it out of the search points")
    alphas = [float(a) for a in alphas]
    batched = jax.jit(jax.vmap(lambda p, d, a: validate(apply_task_vector(p, d, a)), in_axes=(None, None, 0)))
    trials = []
    for setting in settings:
        built = _build(name, factory, setting)
        if not _scales(built):
            merged = merge(pretrained, finetuned, built, rules=rules, layout=layout, names=names).params
            trials.append(Trial(setting, float(validate(merged))))
            continue
        if not alphas:
            raise MergeError(f"method {name!r} scales its update: give at least one alpha")
        delta = combined_delta(pretrained, finetuned, built, rules=rules, layout=layout, names=names).params
        if vectorized:
            scores = np.asarray(batched(pretrained, delta, jnp.asarray(alphas, jnp.float32)))
        else:
            scores = [validate(scale(pretrained, delta, a)) for a in alphas]
        trials.extend(Trial({**setting, "alpha": a}, float(s)) for a, s in zip(alphas, scores))
    return SearchResult(name, tuple(trials))
