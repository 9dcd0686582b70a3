"""Which leaf gets what: path-pattern rules, the row-axis rule, and the dry-run table.

A leaf's path is its key path joined by '/' (``params/Dense_0/kernel``). Rules are tried in
order and the first whose pattern matches decides; patterns are shell globs
(``*embed*``) or, prefixed with ``re:``, regular expressions searched in the path.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

from .errors import MergeError
from .methods import Method
from .task_vectors import is_float

Layout = Literal["flax", "torch"]
Action = Literal["merge", "base", "copy"]


@dataclasses.dataclass(frozen=True)
class LeafRule:
    """For leaves matching `pattern`: merge with `method` (default: the run's method), or keep
    the pre-trained value (`action='base'`); `out_axis` overrides the row-granularity axis."""

    pattern: str
    method: Method | None = None
    action: Literal["merge", "base"] = "merge"
    out_axis: int | None = None

    def __post_init__(self):
        if self.action not in ("merge", "base"):
            raise MergeError(f"rule {self.pattern!r}: action must be 'merge' or 'base', got {self.action!r}")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as e:
                raise MergeError(f"rule {self.pattern!r}: bad regular expression: {e}") from None

    def matches(self, path: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.search(self.pattern[3:], path) is not None
        return fnmatch.fnmatchcase(path, self.pattern)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """What happens to one leaf. `out_axis` is the output-unit axis used by `row` granularity."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    action: Action
    method: Method | None
    out_axis: int | None
    rule: str

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def default_out_axis(shape: Sequence[int], layout: Layout) -> int | None:
    """Output-unit axis of a weight: Flax kernels are [..., in, out] (last axis), PyTorch weights
    [out, in, ...] (axis 0). Leaves of rank < 2 have none (one group)."""
    if len(shape) < 2:
        return None
    if layout == "flax":
        return len(shape) - 1
    if layout == "torch":
        return 0
    raise MergeError(f"layout must be 'flax' or 'torch', got {layout!r}")


def plan_leaf(
    path: str, shape, dtype, method: Method, rules: Sequence[LeafRule] = (), layout: Layout = "flax"
) -> LeafPlan:
    """The plan for one leaf, from its path, shape and dtype only."""
    shape = tuple(int(s) for s in shape)
    dtype = str(np.dtype(dtype))
    rule = next((r for r in rules if r.matches(path)), None)
    out_axis = default_out_axis(shape, layout)
    if rule is not None and rule.out_axis is not None:
        if not -len(shape) <= rule.out_axis < len(shape):
            raise MergeError(f"rule {rule.pattern!r}: out_axis {rule.out_axis} out of range for shape {shape}", leaf=path)
        out_axis = rule.out_axis % len(shape)
    name = rule.pattern if rule else "default"
    if not is_float(dtype):
        return LeafPlan(path, shape, dtype, "copy", None, None, name)
    if rule is not None and rule.action == "base":
        return LeafPlan(path, shape, dtype, "base", None, None, name)
    chosen = rule.method if rule is not None and rule.method is not None else method
    return LeafPlan(path, shape, dtype, "merge", chosen, out_axis, name)


def plan_tree(paths, shapes, dtypes, method: Method, rules=(), layout: Layout = "flax") -> list[LeafPlan]:
    """Plans for all leaves of a tree, given their paths, shapes and dtypes."""
    return [plan_leaf(p, s, d, method, rules, layout) for p, s, d in zip(paths, shapes, dtypes)]


def format_plan(plans: Sequence[LeafPlan]) -> str:
    """The dry-run table: one line per leaf with its action, method, granularity and row axis."""
    rows = [("leaf", "shape", "dtype", "action", "method", "granularity", "row axis", "rule")]
    for p in plans:
        gran = p.method.granularity if p.method else "-"
        axis = "-" if gran != "row" or p.out_axis is None else str(p.out_axis)
        rows.append((
            p.path, "x".join(map(str, p.shape)) or "scalar", p.dtype, p.action,
            p.method.describe() if p.method else "-", gran, axis, p.rule,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
