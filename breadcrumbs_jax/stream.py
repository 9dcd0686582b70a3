"""Merging checkpoints on disk, leaf by leaf.

For each leaf the pre-trained and the T fine-tuned checkpoints are read, the leaf is merged
by `merge_leaves` (the same driver as the in-memory `merge`, hence the same bits) and written
to the output at once, then freed. Kernels run asynchronously: the next leaf is read while this
leaf's kernel runs, and this leaf is written while the next one's runs. Peak memory is about
2 (T + 1) + 1 leaves (this leaf's inputs, the next leaf's, the output) plus the kernel's scratch
and a constant, not T models. `global`
granularity is the exception: its thresholds need every leaf it covers, of every model, in
memory at once.

Everything that can be checked from metadata (missing leaves, shapes, dtypes, the target)
is checked before anything is written; the output is staged beside the target and moved
there only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np

from .errors import MergeError
from .io import LeafInfo, LeafSource, format_for, open_sink, open_source, staged_output
from .io.base import check_target, empty_aligned, read_into
from .merge import merge_leaves, warn_empty
from .methods import Method
from .paths import SEP
from .plan import LeafPlan, LeafRule, format_plan, plan_leaf
from .report import MergeReport

VOCAB_MODES = ("error", "shared")


@dataclasses.dataclass(frozen=True)
class SharedRows:
    """A leaf whose models differ in size along one axis (a vocabulary): only the first `rows`
    entries along `axis`, which every model has, are merged; the rest of the output is the
    pre-trained model's."""

    axis: int
    rows: int
    full_shape: tuple[int, ...]

    def index(self, part: str) -> tuple[slice, ...]:
        cut = slice(None, self.rows) if part == "shared" else slice(self.rows, None)
        return (slice(None),) * self.axis + (cut,)


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """What a streaming merge will do: per-leaf plans (in write order), shared-row leaves,
    and the output's leaves."""

    plans: list[LeafPlan]
    shared: dict[str, SharedRows]
    outputs: list[LeafInfo]
    names: tuple[str, ...]

    def describe(self) -> str:
        """The dry-run text: the per-leaf table, shared-row notes, totals."""
        lines = [format_plan(self.plans)]
        for path, s in self.shared.items():
            lines.append(f"shared rows: {path}: merging the first {s.rows} of {s.full_shape[s.axis]} "
                         f"along axis {s.axis}; the rest is the pre-trained model's")
        changed = sorted({o.dtype for o, p in zip(self.outputs, self.plans) if o.dtype != p.dtype})
        if changed:
            lines.append(f"output dtype: {', '.join(changed)} for the merged float leaves")
        size = sum(o.nbytes for o in self.outputs)
        counts = {a: sum(p.action == a for p in self.plans) for a in ("merge", "base", "copy")}
        lines.append(f"{len(self.plans)} leaves ({counts['merge']} merged, {counts['base']} kept from the "
                     f"pre-trained model, {counts['copy']} copied), {len(self.names)} fine-tuned models, "
                     f"output {size / 2**20:.1f} MiB")
        return "\n".join(lines)


def _component_key(path: str) -> tuple[str, ...]:
    return tuple(path.split(SEP))


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return not patterns or any(LeafRule(p).matches(path) for p in patterns)


def _shared_rows(path: str, base: LeafInfo, others: Sequence[tuple[str, LeafInfo]], vocab: str) -> SharedRows | None:
    """None if all shapes equal the pre-trained one; SharedRows if they differ along one axis and
    vocab == 'shared'; otherwise a MergeError naming the model and the sizes."""
    axes = set()
    for name, info in others:
        if info.shape == base.shape:
            continue
        diff = [a for a in range(len(base.shape)) if len(info.shape) == len(base.shape) and info.shape[a] != base.shape[a]]
        if len(diff) != 1:
            raise MergeError(f"shape {info.shape} differs from the pre-trained {base.shape}", leaf=path, source=name)
        a = diff[0]
        if vocab != "shared":
            raise MergeError(
                f"shape {info.shape} differs from the pre-trained {base.shape}: {info.shape[a]} vs {base.shape[a]} "
                f"entries along axis {a} (a vocabulary mismatch? 'vocab: shared' merges the first "
                f"{min(info.shape[a], base.shape[a])} rows only)", leaf=path, source=name,
            )
        axes.add(a)
    if not axes:
        return None
    if len(axes) > 1:
        raise MergeError(f"models differ from the pre-trained {base.shape} along several axes {sorted(axes)}", leaf=path)
    a = axes.pop()
    rows = min([base.shape[a]] + [i.shape[a] for _, i in others])
    return SharedRows(a, rows, base.shape)


def plan_stream(
    base: LeafSource,
    models: Sequence[LeafSource],
    method: Method,
    *,
    rules: Sequence[LeafRule] = (),
    layout: str | None = None,
    names: Sequence[str] | None = None,
    out_dtype=None,
    vocab: str = "error",
    include: Sequence[str] = (),
) -> StreamPlan:
    """Plan a streaming merge from metadata alone, checking that every model has every leaf
    (matching `include`, if given) with the pre-trained shape and dtype."""
    if not models:
        raise MergeError("no fine-tuned models given (T = 0): nothing to merge")
    if vocab not in VOCAB_MODES:
        raise MergeError(f"vocab must be one of {VOCAB_MODES}, got {vocab!r}")
    names = tuple(names) if names is not None else tuple(m.name for m in models)
    if len(names) != len(models):
        raise MergeError(f"{len(names)} names given for {len(models)} fine-tuned models")
    infos = {p: i for p, i in base.leaves().items() if _matches(p, include)}
    if not infos:
        raise MergeError("no leaves to merge" + (f" match include {list(include)}" if include else ""), source=base.name)
    others = []
    for m, name in zip(models, names):
        leaves = m.leaves()
        missing = [p for p in infos if p not in leaves]
        if missing:
            raise MergeError(f"missing from this model ({len(missing)} leaves missing)", leaf=missing[0], source=name)
        extra = [p for p in leaves if p not in infos and _matches(p, include)]
        if extra:
            raise MergeError(f"not in the pre-trained model ({len(extra)} extra leaves)", leaf=extra[0], source=name)
        others.append(leaves)
    layout = layout or base.layout
    plans, shared, outputs = [], {}, []
    for path in sorted(infos, key=_component_key):
        info = infos[path]
        for leaves, name in zip(others, names):
            if leaves[path].dtype != info.dtype:
                raise MergeError(f"dtype {leaves[path].dtype} differs from the pre-trained {info.dtype}", leaf=path, source=name)
        s = _shared_rows(path, info, [(n, leaves[path]) for n, leaves in zip(names, others)], vocab)
        shape = info.shape
        if s is not None:
            shared[path] = s
            shape = shape[: s.axis] + (s.rows,) + shape[s.axis + 1 :]
        plan = plan_leaf(path, shape, info.dtype, method, rules, layout)
        plans.append(plan)
        outputs.append(LeafInfo(path, info.shape, output_dtype(plan, out_dtype)))
    return StreamPlan(plans, shared, outputs, names)


def output_dtype(plan: LeafPlan, out_dtype=None) -> str:
    """The dtype `merge_leaf` gives a leaf: copied leaves keep theirs; merged leaves are cast to
    `out_dtype` (default: their own) as JAX represents it (float64 is float32 without x64)."""
    if plan.action == "copy":
        return plan.dtype
    dtype = np.dtype(out_dtype if out_dtype is not None else plan.dtype)
    return str(np.dtype(jax.dtypes.canonicalize_dtype(dtype))) if plan.action == "merge" else str(dtype)


@contextlib.contextmanager
def _sources(base, models) -> Iterator[tuple[LeafSource, list[LeafSource]]]:
    """Paths opened as sources (and closed after); sources given as such pass through."""
    with contextlib.ExitStack() as stack:

        def get(x):
            if isinstance(x, LeafSource):
                return x
            src = open_source(x)
            stack.callback(src.close)
            return src

        yield get(base), [get(m) for m in models]


def merge_checkpoints(
    base: str | os.PathLike | LeafSource,
    models: Sequence[str | os.PathLike | LeafSource],
    target: str | os.PathLike,
    method: Method,
    *,
    rules: Sequence[LeafRule] = (),
    layout: str | None = None,
    names: Sequence[str] | None = None,
    out_dtype=None,
    format: str | None = None,
    shard_size: int | None = None,
    vocab: str = "error",
    include: Sequence[str] = (),
    overwrite: bool = False,
    progress: bool = False,
    report_path: str | os.PathLike | None = None,
) -> MergeReport:
    """Merge checkpoints on disk (any mix of Orbax, safetensors, msgpack) into a new checkpoint
    at `target` (format: `format`, else by the target's suffix, else Orbax), leaf by leaf.

    `vocab='shared'` merges leaves whose models differ along one axis (vocabularies) over the
    rows all share; `include` (path patterns) restricts the merge, and the output, to matching
    leaves. The report is returned and, with `report_path`, written there as JSON."""
    target = Path(target)
    check_target(target, overwrite)
    with _sources(base, models) as (base_src, sources):
        sp = plan_stream(base_src, sources, method, rules=rules, layout=layout, names=names,
                         out_dtype=out_dtype, vocab=vocab, include=include)
        with staged_output(target, overwrite=overwrite) as staging:
            sink = open_sink(format or format_for(target), staging, sp.outputs, like=base_src, shard_size=shard_size)
            report = _run(sp, base_src, sources, sink, out_dtype, progress)
            sink.commit()
    warn_empty(report)
    if report_path is not None:
        tmp = Path(f"{report_path}.tmp")
        tmp.write_text(report.to_json())
        os.replace(tmp, report_path)
    return report


def _run(sp: StreamPlan, base: LeafSource, models: Sequence[LeafSource], sink, out_dtype, progress: bool) -> MergeReport:
    plan_of = {p.path: p for p in sp.plans}
    plans = [plan_of[p] for p in sink.order]
    out_infos = {o.path: o for o in sp.outputs}
    # leaves go to the device at once, so no host copy outlives its transfer; on CPU, where the device
    # takes host memory as it is, they stay numpy arrays (merge_leaf may view them), as do 'copy'
    # leaves everywhere
    on_host = jax.default_backend() == "cpu"

    def load(plan: LeafPlan):
        s = sp.shared.get(plan.path)
        index = None if s is None else s.index("shared")
        put = (lambda x: x) if plan.action == "copy" or on_host else jax.device_put
        stack = empty_aligned((len(models), *plan.shape), plan.dtype)  # the kernel takes one [T, ...] stack
        for t, m in enumerate(models):
            read_into(m, plan.path, index, stack[t, ...])  # a view even of a 0-d leaf
        return put(base.read(plan.path, index)), put(stack)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(p.size * np.dtype(p.dtype).itemsize for p in plans) * (len(models) + 1)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging", dynamic_ncols=True)
    reports = []
    try:
        kind = "host" if on_host else "device"
        leaves = merge_leaves(plans, load, names=sp.names, out_dtype=out_dtype, compile_ahead=kind,
                              ready_first=not sink.in_order)
        for k, (plan, merged, report) in enumerate(leaves):
            array = np.asarray(merged)
            del merged
            s = sp.shared.get(plan.path)
            if s is not None and s.rows < s.full_shape[s.axis]:
                tail = base.read(plan.path, s.index("rest")).astype(array.dtype)
                array = np.concatenate([array, tail], axis=s.axis)
            if str(array.dtype) != out_infos[plan.path].dtype:
                raise RuntimeError(f"{plan.path}: merged to {array.dtype}, planned {out_infos[plan.path].dtype}")
            sink.write(plan.path, array)
            reports.append(report)
            if bar is not None:
                bar.update(plan.size * np.dtype(plan.dtype).itemsize * (len(models) + 1))
                bar.set_postfix_str(f"leaf {k + 1}/{len(plans)}", refresh=False)
            del array
    finally:
        if bar is not None:
            bar.close()
    order = {p.path: i for i, p in enumerate(sp.plans)}
    return MergeReport(sp.names, tuple(sorted(reports, key=lambda r: order[r.path])))


def dry_run_checkpoints(base, models, method: Method, **kw) -> str:
    """The per-leaf table of what `merge_checkpoints` would do, from metadata only."""
    with _sources(base, models) as (base_src, sources):
        return plan_stream(base_src, sources, method, **kw).describe()
