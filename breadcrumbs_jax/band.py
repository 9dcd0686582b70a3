"""The Breadcrumbs magnitude band: which ranks of |tau| a group keeps, as exact fractions.

Two parameterisations (SPEC.md): quantiles (beta, gamma) and mergekit's (density, gamma_top),
with density = gamma - beta and gamma_top = 1 - gamma. Fractions are kept exactly (as the
decimal the user wrote) so that counts never lose an entry to float rounding.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from numbers import Real

from .errors import MergeError


def exact_fraction(x: Real | str | Fraction, name: str) -> Fraction:
    """The fraction the user wrote: 0.3 -> 3/10 (not the binary float 0.299999...)."""
    if isinstance(x, bool):
        raise MergeError(f"{name} must be a number, got {x!r}")
    if isinstance(x, Fraction):
        return x
    try:
        value = float(x)
    except (TypeError, ValueError):
        raise MergeError(f"{name} must be a number, got {x!r}") from None
    if not math.isfinite(value):
        raise MergeError(f"{name} must be finite, got {x!r}")
    return Fraction(x if isinstance(x, str) else repr(value))


def _check_unit(value: Fraction, name: str) -> None:
    if not 0 <= value <= 1:
        raise MergeError(f"{name} must lie in [0, 1], got {float(value):g}")


@dataclasses.dataclass(frozen=True)
class Band:
    """Keep entries whose magnitude lies between the `beta` and `gamma` quantiles of their group."""

    beta: Fraction
    gamma: Fraction

    def __post_init__(self):
        _check_unit(self.beta, "beta")
        _check_unit(self.gamma, "gamma")
        if self.beta > self.gamma:
            raise MergeError(
                f"beta ({float(self.beta):g}) must not exceed gamma ({float(self.gamma):g}): "
                "the kept band [beta, gamma] would be empty"
            )

    @classmethod
    def from_quantiles(cls, beta, gamma) -> Band:
        """Quantile style: drop the `beta` smallest fraction and everything above quantile `gamma`."""
        return cls(exact_fraction(beta, "beta"), exact_fraction(gamma, "gamma"))

    @classmethod
    def from_density(cls, density, gamma_top=0) -> Band:
        """mergekit style: keep `density` of the entries after dropping the `gamma_top` largest."""
        d = exact_fraction(density, "density")
        top = exact_fraction(gamma_top, "gamma_top")
        _check_unit(d, "density")
        _check_unit(top, "gamma_top")
        if d + top > 1:
            raise MergeError(
                f"density ({float(d):g}) + gamma_top ({float(top):g}) must not exceed 1"
            )
        return cls(1 - top - d, 1 - top)

    @classmethod
    def top_k(cls, density) -> Band:
        """Keep the `density` fraction of largest magnitudes (TIES trimming)."""
        return cls.from_density(density, 0)

    @property
    def density(self) -> Fraction:
        return self.gamma - self.beta

    @property
    def gamma_top(self) -> Fraction:
        return 1 - self.gamma

    def counts(self, n: int) -> tuple[int, int, int]:
        """(n_bot, n_keep, n_top) for a group of n entries, exactly as SPEC.md defines them."""
        n_top = math.floor(n * self.gamma_top)
        n_keep = math.floor(n * self.density)
        return n - n_keep - n_top, n_keep, n_top

    def __repr__(self) -> str:
        return (
            f"Band(beta={float(self.beta):g}, gamma={float(self.gamma):g}; "
            f"density={float(self.density):g}, gamma_top={float(self.gamma_top):g})"
        )
