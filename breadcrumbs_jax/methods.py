"""Merge methods as named chains of steps, and the catalogue of standard methods.

    theta = P + delta,  delta = chain(steps)(tau_1..tau_T)

Each factory below is a few lines composing `steps`; a new method is another chain.
A method's `structure` is what decides its merge kernel's code; its `numbers` (hyperparameters as
arrays, per leaf) are the kernel's arguments, so methods of one structure share their kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp

from .band import Band
from .errors import MergeError
from .selection import evaluate
from .steps import (
    Combine,
    ElectSign,
    LeafContext,
    LeafState,
    MagnitudeBand,
    NumberedStep,
    RandomDrop,
    Scale,
    Step,
    Weight,
)


@dataclasses.dataclass(frozen=True)
class Method:
    """A named chain of steps; hashable, so it is a static argument of the jitted leaf merge."""

    name: str
    steps: tuple[Step, ...]

    def __call__(self, tau, ctx: LeafContext = LeafContext(), numbers: tuple | None = None) -> LeafState:
        """Run the chain on a [T, ...] task-vector stack, or on a function that computes it (then
        selection passes recompute it from the inputs instead of storing it). `numbers`: as
        `self.numbers` gives them for this stack (possibly traced); None: those, as constants."""
        recompute = tau if callable(tau) else None
        tau = evaluate(tau)
        if numbers is None:
            numbers = self.numbers(tau.shape, ctx)
        state = LeafState(tau=tau, weights=jnp.ones((tau.shape[0],), jnp.float32), recompute=recompute)
        for step, n in zip(self.steps, numbers, strict=True):
            state = step.apply(state, ctx, n) if isinstance(step, NumberedStep) else step(state, ctx)
        if state.delta is None:
            raise MergeError(f"method {self.name!r} never combines the task axis (add a Combine step)")
        return state

    def numbers(self, shape: tuple[int, ...], ctx: LeafContext = LeafContext()) -> tuple:
        """Each step's hyperparameters as numpy arrays for a [T, ...] task-vector stack of `shape`
        (`NumberedStep.numbers`; None for other steps): exact, computed on the host."""
        return tuple(s.numbers(shape, ctx) if isinstance(s, NumberedStep) else None for s in self.steps)

    def structure(self) -> Structure:
        """This method without its numbers: equal for methods whose merge kernels have the same code."""
        return Structure((self.name, tuple(map(_structure, self.steps))), self)

    @property
    def selector(self) -> MagnitudeBand | None:
        """The magnitude-band sparsifier of this chain, if any."""
        return next((s for s in self.steps if isinstance(s, MagnitudeBand)), None)

    @property
    def granularity(self) -> str:
        sel = self.selector
        return sel.granularity if sel else "-"

    @property
    def flat(self) -> bool:
        """Whether a leaf's merge depends on its shape only through the row-major order of its
        entries (every step built in, no `row` groups): the leaf may then be merged reshaped."""
        built_in = (MagnitudeBand, RandomDrop, Weight, ElectSign, Combine, Scale)
        return all(type(s) in built_in for s in self.steps) and self.granularity != "row"

    def with_granularity(self, granularity: str) -> Method:
        steps = tuple(
            dataclasses.replace(s, granularity=granularity) if isinstance(s, MagnitudeBand) else s
            for s in self.steps
        )
        return dataclasses.replace(self, steps=steps)

    def without_scale(self) -> Method:
        """The chain up to the combined delta (for sweeping alpha: theta = P + alpha * delta)."""
        return dataclasses.replace(self, steps=tuple(s for s in self.steps if not isinstance(s, Scale)))

    def describe(self) -> str:
        return f"{self.name}({','.join(_describe(s) for s in self.steps)})"


@dataclasses.dataclass(frozen=True)
class Structure:
    """A method as a merge kernel's static argument: compared (and hashed, and keyed in the kernel
    store) by `key` alone, its name and its steps less their numbers, so methods that differ only
    in hyperparameters share one kernel, which takes `method.numbers(...)` as an argument.
    `method` is one such method; its numbers are never read under this structure."""

    key: tuple
    method: Method = dataclasses.field(compare=False, repr=False)


def _structure(step: Step) -> Any:
    """A `NumberedStep`'s type and fields less its `NUMBERS`; any other step is itself (all of it
    decides the kernel). A built-in type goes by its name; a type from elsewhere goes as itself,
    which has no form in the kernel store's keys: the store keeps no kernels of steps it cannot read."""
    if not isinstance(step, NumberedStep):
        return step
    kind = type(step).__qualname__ if type(step).__module__.startswith(f"{__package__}.") else type(step)
    return (kind, tuple((f.name, getattr(step, f.name)) for f in dataclasses.fields(step) if f.name not in step.NUMBERS))


def _describe(step: Step) -> str:
    if isinstance(step, MagnitudeBand):
        bands = step.band if isinstance(step.band, tuple) else (step.band,)
        text = "|".join(f"{float(b.beta):g},{float(b.gamma):g}" for b in bands)
        return f"band[{text}]/{step.granularity}"
    if isinstance(step, RandomDrop):
        ps = step.p if isinstance(step.p, tuple) else (step.p,)
        return f"drop(p={'|'.join(f'{p:g}' for p in ps)},seed={step.seed})"
    if isinstance(step, Weight):
        return "weight(" + ",".join(f"{w:g}" for w in step.weights) + ")"
    if isinstance(step, Scale):
        return f"alpha={step.alpha:g}"
    if isinstance(step, Combine):
        return step.kind
    return type(step).__name__.lower()


def chain(name: str, *steps: Step) -> Method:
    """Compose steps into a method."""
    return Method(name, tuple(steps))


def _weights(weights: Sequence[float] | None) -> tuple[Step, ...]:
    return () if weights is None else (Weight(tuple(float(w) for w in weights)),)


def _per_task(**params):
    """Scalars stay scalars; if any parameter is a sequence (one value per task), every parameter
    becomes a tuple of that length (scalars repeated). Returns (number of tasks or None, params)."""
    lengths = {len(v) for v in params.values() if isinstance(v, (list, tuple))}
    if not lengths:
        return None, params
    if len(lengths) > 1:
        raise MergeError(f"per-task parameters have different lengths {sorted(lengths)}: {params}")
    n = lengths.pop()
    return n, {k: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n for k, v in params.items()}


def _one_band(beta, gamma, density, gamma_top) -> Band:
    quantile = beta is not None or gamma is not None
    mergekit = density is not None or gamma_top is not None
    if quantile and mergekit:
        raise MergeError("give either (beta, gamma) or (density, gamma_top), not both")
    if mergekit:
        return Band.from_density(0.1 if density is None else density, 0.01 if gamma_top is None else gamma_top)
    return Band.from_quantiles(0.85 if beta is None else beta, 0.993 if gamma is None else gamma)


def _band(beta=None, gamma=None, density=None, gamma_top=None) -> Band | tuple[Band, ...]:
    """One band, or one per task when any parameter is a per-task sequence."""
    n, p = _per_task(beta=beta, gamma=gamma, density=density, gamma_top=gamma_top)
    if n is None:
        return _one_band(**p)
    return tuple(_one_band(p["beta"][t], p["gamma"][t], p["density"][t], p["gamma_top"][t]) for t in range(n))


def linear(weights: Sequence[float] | None = None) -> Method:
    """Model soup: P + sum_t w_t tau_t / sum_t w_t (the weighted average of the fine-tuned models)."""
    return chain("linear", *_weights(weights), Combine("mean"))


def task_arithmetic(alpha: float = 1.0, weights: Sequence[float] | None = None) -> Method:
    """Ilharco et al. 2022: P + alpha * sum_t w_t tau_t."""
    return chain("task_arithmetic", *_weights(weights), Combine("sum"), Scale(alpha))


def breadcrumbs(
    alpha: float = 1.0,
    *,
    beta: float | None = None,
    gamma: float | None = None,
    density: float | None = None,
    gamma_top: float | None = None,
    granularity: str = "tensor",
    weights: Sequence[float] | None = None,
) -> Method:
    """Model Breadcrumbs: P + alpha * sum_t w_t m_t tau_t, m_t keeping the magnitude band
    (defaults: beta=0.85, gamma=0.993, the paper's setting). Any band parameter may be a
    sequence with one value per task (per-model bands, as mergekit's per-model density)."""
    band = _band(beta, gamma, density, gamma_top)
    return chain(
        "breadcrumbs", MagnitudeBand(band, granularity), *_weights(weights), Combine("sum"), Scale(alpha)
    )


def ties(
    alpha: float = 1.0,
    *,
    density: float | Sequence[float] = 0.2,
    granularity: str = "tensor",
    weights: Sequence[float] | None = None,
) -> Method:
    """TIES (Yadav et al. 2023): keep the top `density` (one, or one per task) by magnitude, elect
    signs, disjoint mean, scale."""
    band = tuple(map(Band.top_k, density)) if isinstance(density, (list, tuple)) else Band.top_k(density)
    return chain(
        "ties",
        MagnitudeBand(band, granularity),
        *_weights(weights),
        ElectSign(),
        Combine("disjoint_mean"),
        Scale(alpha),
    )


def dare(
    alpha: float = 1.0,
    *,
    p: float | Sequence[float] = 0.9,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> Method:
    """DARE (Yu et al. 2023) with task arithmetic: drop with probability p (one, or one per task),
    rescale by 1/(1-p), sum, scale."""
    drop = tuple(map(float, p)) if isinstance(p, (list, tuple)) else float(p)
    return chain("dare", RandomDrop(drop, int(seed)), *_weights(weights), Combine("sum"), Scale(alpha))


def breadcrumbs_ties(
    alpha: float = 1.0,
    *,
    beta: float | None = None,
    gamma: float | None = None,
    density: float | None = None,
    gamma_top: float | None = None,
    granularity: str = "tensor",
    weights: Sequence[float] | None = None,
    normalize: bool = True,
) -> Method:
    """Breadcrumbs mask, then TIES sign election; `normalize` divides each entry by the summed
    weights of the agreeing tasks (TIES' disjoint mean), else the agreeing entries are summed
    (mergekit's breadcrumbs_ties default, normalize: false)."""
    band = _band(beta, gamma, density, gamma_top)
    return chain(
        "breadcrumbs_ties",
        MagnitudeBand(band, granularity),
        *_weights(weights),
        ElectSign(),
        Combine("disjoint_mean" if normalize else "sum"),
        Scale(alpha),
    )


METHODS: dict[str, Callable[..., Method]] = {
    "linear": linear,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "breadcrumbs": breadcrumbs,
    "breadcrumbs_ties": breadcrumbs_ties,
}


def get_method(name: str, **params) -> Method:
    """Build a catalogue method by name, e.g. ``get_method('breadcrumbs', alpha=0.3, beta=0.85)``."""
    try:
        factory = METHODS[name]
    except KeyError:
        raise MergeError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None
    try:
        return factory(**params)
    except TypeError as e:
        raise MergeError(f"bad parameters for method {name!r}: {e}") from None
