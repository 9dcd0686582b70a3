"""The merge report: per leaf and task, what the mask kept and dropped, as data and as a table."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """One leaf. Per-task tuples are indexed like the fine-tuned models. `min_kept`/`max_kept`
    are the smallest and largest kept |tau| (the effective thresholds); None without a mask."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    action: str
    method: str
    granularity: str
    kept: tuple[int, ...] = ()
    dropped_low: tuple[int, ...] = ()
    dropped_high: tuple[int, ...] = ()
    min_kept: tuple[float | None, ...] = ()
    max_kept: tuple[float | None, ...] = ()

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def empty_tasks(self) -> tuple[int, ...]:
        """Tasks whose mask keeps nothing of this (non-empty) leaf."""
        return tuple(t for t, k in enumerate(self.kept) if k == 0 and self.size > 0)


@dataclasses.dataclass(frozen=True)
class MergeReport:
    task_names: tuple[str, ...]
    leaves: tuple[LeafReport, ...]

    def empty(self) -> list[tuple[str, str]]:
        """(leaf, task) pairs whose mask kept no entry: such a task contributes nothing there."""
        return [(lr.path, self.task_names[t]) for lr in self.leaves for t in lr.empty_tasks]

    def totals(self) -> dict[str, int]:
        merged = [lr for lr in self.leaves if lr.kept]
        return {
            "entries": sum(lr.size for lr in merged) * len(self.task_names),
            "kept": sum(sum(lr.kept) for lr in merged),
            "dropped_low": sum(sum(lr.dropped_low) for lr in merged),
            "dropped_high": sum(sum(lr.dropped_high) for lr in merged),
        }

    def to_dict(self) -> dict:
        return {"task_names": list(self.task_names), "leaves": [dataclasses.asdict(lr) for lr in self.leaves]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def table(self, max_rows: int | None = None) -> str:
        """One row per leaf and task: kept / dropped low / dropped high, kept %, thresholds."""
        head = ("leaf", "task", "action", "method", "n", "kept", "low", "high", "kept%", "min|tau|", "max|tau|")
        rows = [head]
        for lr in self.leaves:
            if not lr.kept:
                rows.append((lr.path, "*", lr.action, lr.method, str(lr.size), "-", "-", "-", "-", "-", "-"))
                continue
            for t, name in enumerate(self.task_names):
                pct = 100.0 * lr.kept[t] / lr.size if lr.size else 0.0
                flag = "  <- keeps nothing" if t in lr.empty_tasks else ""
                rows.append((
                    lr.path, name, lr.action, lr.method, str(lr.size), str(lr.kept[t]),
                    str(lr.dropped_low[t]), str(lr.dropped_high[t]), f"{pct:.2f}",
                    _num(lr.min_kept[t]), _num(lr.max_kept[t]) + flag,
                ))
        if max_rows is not None and len(rows) > max_rows + 1:
            rows = rows[: max_rows + 1] + [("...", f"{len(rows) - 1 - max_rows} more rows")]
        widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        tot = self.totals()
        if tot["entries"]:
            lines.append(
                f"total: kept {tot['kept']} of {tot['entries']} task-vector entries "
                f"({100.0 * tot['kept'] / tot['entries']:.2f} %), dropped low {tot['dropped_low']}, "
                f"dropped high {tot['dropped_high']}"
            )
        empty = self.empty()
        if empty:
            lines.append(f"WARNING: {len(empty)} (leaf, task) pairs keep no entries, e.g. {empty[0][0]} / {empty[0][1]}")
        return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def leaf_report(plan, stats: dict | None, n_tasks: int) -> LeafReport:
    """Build a LeafReport from a LeafPlan and the (host) stats of its jitted merge."""
    method = plan.method.describe() if plan.method else "-"
    gran = plan.method.granularity if plan.method else "-"
    base = dict(path=plan.path, shape=plan.shape, dtype=plan.dtype, action=plan.action, method=method, granularity=gran)
    if plan.action != "merge":
        return LeafReport(**base)
    if not stats:  # no mask: every entry is kept
        n = plan.size
        return LeafReport(**base, kept=(n,) * n_tasks, dropped_low=(0,) * n_tasks, dropped_high=(0,) * n_tasks,
                          min_kept=(None,) * n_tasks, max_kept=(None,) * n_tasks)

    def finite(xs: Sequence[float]) -> tuple[float | None, ...]:
        return tuple(float(x) if abs(float(x)) != float("inf") else None for x in xs)

    return LeafReport(
        **base,
        kept=tuple(int(x) for x in stats["kept"]),
        dropped_low=tuple(int(x) for x in stats["dropped_low"]),
        dropped_high=tuple(int(x) for x in stats["dropped_high"]),
        min_kept=finite(stats["min_kept"]),
        max_kept=finite(stats["max_kept"]),
    )
