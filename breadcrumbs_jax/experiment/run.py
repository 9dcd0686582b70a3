"""The whole experiment: pre-train, fine-tune, checkpoint, search, merge, evaluate, report.

For each seed: split the digits, pre-train the classifier, build each task's few-shot head,
fine-tune the body on every task, save all checkpoints with Orbax and restore them for
merging. Tasks are taken in a random order (from the seed); every method's hyperparameters
are searched on the *validation* splits of the first `search_tasks` tasks, then kept fixed
while the first 2, 4, ..., T tasks are merged and scored on their *test* splits. With
`retune`, each method is also searched again with all T tasks, to show what the transfer
from few tasks costs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ..errors import MergeError
from ..methods import METHODS as ALL_METHODS
from ..search import DEFAULT_ALPHAS, merge_setting, search
from . import evaluate, model, train
from .tasks import DEFAULT_TASKS, check_tasks, digits, task_inputs

METHODS: tuple[str, ...] = tuple(ALL_METHODS)

DEFAULT_GRIDS: dict[str, dict[str, tuple]] = {
    "linear": {},
    "task_arithmetic": {},
    "ties": {"density": (0.2, 0.4)},
    "dare": {"p": (0.5, 0.9)},
    "breadcrumbs": {"density": (0.2, 0.4), "gamma_top": (0.01, 0.05)},
    "breadcrumbs_ties": {"density": (0.2, 0.4), "gamma_top": (0.01, 0.05)},
}
"""Search grids besides alpha (swept over `Config.alphas` for every method that scales)."""

ALPHAS: tuple[float, ...] = DEFAULT_ALPHAS + (1.25, 1.5, 2.0, 3.0)


@dataclasses.dataclass(frozen=True)
class Config:
    tasks: tuple[str, ...] = DEFAULT_TASKS
    seeds: tuple[int, ...] = (0, 1, 2)
    hidden: int = 256
    pretrain_steps: int = 2000
    pretrain_lr: float = 1e-3
    finetune_steps: int = 300
    finetune_lr: float = 3e-4
    batch: int = 64
    shots: int = 2
    search_tasks: int = 2
    counts: tuple[int, ...] = ()
    methods: tuple[str, ...] = METHODS
    grids: Mapping[str, Mapping[str, tuple]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_GRIDS))
    alphas: tuple[float, ...] = ALPHAS
    retune: bool = True

    def __post_init__(self):
        check_tasks(self.tasks)
        T = len(self.tasks)
        if not self.seeds:
            raise MergeError("give at least one seed")
        if T < 2:
            raise MergeError(f"need at least 2 tasks to merge, got {T}")
        if not 1 <= self.search_tasks <= T:
            raise MergeError(f"search_tasks must lie in [1, {T}], got {self.search_tasks}")
        if not self.counts:
            object.__setattr__(self, "counts", tuple(range(2, T + 1, 2)) + ((T,) if T % 2 else ()))
        if any(not 1 <= n <= T for n in self.counts):
            raise MergeError(f"counts of tasks merged must lie in [1, {T}], got {self.counts}")
        unknown = [m for m in self.methods if m not in self.grids]
        if unknown:
            raise MergeError(f"unknown method(s) {', '.join(unknown)}, or no search grid for them; known: "
                             f"{', '.join(self.grids)}")

    @classmethod
    def quick(cls, **overrides) -> Config:
        """A seconds-long configuration for tests: 4 tasks, a tiny model, one point per grid."""
        base = dict(
            tasks=("rot90", "flip_lr", "invert", "permute"), seeds=(0,), hidden=32, pretrain_steps=300,
            finetune_steps=100, finetune_lr=1e-3, search_tasks=2, alphas=(0.5, 1.0), retune=False,
            grids={"linear": {}, "task_arithmetic": {}, "ties": {"density": (0.4,)}, "dare": {"p": (0.5,)},
                   "breadcrumbs": {"density": (0.4,), "gamma_top": (0.01,)},
                   "breadcrumbs_ties": {"density": (0.4,), "gamma_top": (0.01,)}},
        )
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["grids"] = {m: {k: list(v) for k, v in g.items()} for m, g in self.grids.items()}
        return d


Log = Callable[[str], None]


def _shifted(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pre-training data: every image and its 8 one-pixel shifts, flattened."""
    moves = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]
    xs = np.concatenate([np.roll(x, m, axis=(1, 2)).reshape(len(x), 64) for m in moves])
    return xs.astype(np.float32), np.tile(y, len(moves))


def _save(path: Path, state: nnx.State) -> None:
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path.absolute(), nnx.to_pure_dict(state), force=True)


def _restore(path: Path, like: nnx.State) -> nnx.State:
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(like))
    with ocp.StandardCheckpointer() as ckptr:
        pure = ckptr.restore(path.absolute(), target)
    state = jax.tree.map(lambda a: a, like)
    nnx.replace_by_pure_dict(state, pure)
    return state


def _by_task(names: Sequence[str], values) -> dict[str, float]:
    return {n: float(v) for n, v in zip(names, np.asarray(values))}


def run_seed(cfg: Config, seed: int, ckpt_dir: Path, log: Log = lambda s: None) -> dict[str, Any]:
    """One seed of the experiment; checkpoints go to `ckpt_dir`. Returns its results (JSON-able)."""
    t0 = time.perf_counter()
    names = cfg.tasks
    T = len(names)
    data = digits(seed)
    x = {s: task_inputs(names, getattr(data, s).x) for s in ("train", "val", "test")}
    y = {s: getattr(data, s).y for s in ("train", "val", "test")}
    keys = jax.random.split(jax.random.key(seed), 3)

    graphdef, params = model.init(cfg.hidden, seed)
    params = train.pretrain(graphdef, params, *_shifted(data.train.x, data.train.y), keys[0],
                            steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, batch=cfg.batch)
    shots = np.concatenate([np.flatnonzero(y["train"] == c)[: cfg.shots] for c in range(model.CLASSES)])
    heads = train.stack([
        model.prototype_head(params["head"], model.features(graphdef, params, x["train"][t][shots]), y["train"][shots])
        for t in range(T)
    ])
    bodies = train.finetune(graphdef, params["body"], heads, x["train"], y["train"], jax.random.split(keys[1], T),
                            steps=cfg.finetune_steps, lr=cfg.finetune_lr, batch=cfg.batch)
    t_train = time.perf_counter() - t0

    # Every model goes through its Orbax checkpoint: the merge reads what was saved.
    finetuned_states = [nnx.State({"body": b, "head": h}) for b, h in zip(train.unstack(bodies, T), train.unstack(heads, T))]
    _save(ckpt_dir / "pretrained", params)
    for name, state in zip(names, finetuned_states):
        _save(ckpt_dir / name, state)
    pre = _restore(ckpt_dir / "pretrained", params)["body"]
    restored = [_restore(ckpt_dir / n, s) for n, s in zip(names, finetuned_states)]
    fts = [s["body"] for s in restored]
    heads = train.stack([s["head"] for s in restored])
    t_ckpt = time.perf_counter() - t0 - t_train

    zero_shot = evaluate.shared_body(graphdef, pre, heads, x["test"], y["test"])
    finetuned = evaluate.own_body(graphdef, train.stack(fts), heads, x["test"], y["test"])
    log(f"seed {seed}: trained in {t_train:.1f} s; zero-shot {float(np.mean(zero_shot)):.3f}, "
        f"fine-tuned {float(np.mean(finetuned)):.3f} (test, mean over {T} tasks)")

    order = [int(i) for i in np.random.default_rng(seed).permutation(T)]

    def subset(idx, split):
        idx = np.asarray(idx)
        return jax.tree.map(lambda a: a[idx], heads), x[split][idx]

    def tuned(n: int) -> dict[str, Any]:
        """Each method's best setting on the validation splits of the first n tasks of the order."""
        h, xv = subset(order[:n], "val")
        validate = lambda body: evaluate.task_accuracies(graphdef, body, h, xv, y["val"]).mean()  # noqa: E731
        out = {}
        for m in cfg.methods:
            res = search(pre, [fts[i] for i in order[:n]], m, [{}] if not cfg.grids[m] else cfg.grids[m],
                         validate, alphas=cfg.alphas, vectorized=True)
            out[m] = {"params": res.best.params, "val_score": res.best.score, "trials": len(res.trials)}
        return out

    def scored(n: int, m: str, params: Mapping[str, Any]) -> dict[str, float]:
        tasks = order[:n]
        body = merge_setting(pre, [fts[i] for i in tasks], m, params)
        h, xt = subset(tasks, "test")
        return _by_task([names[i] for i in tasks], evaluate.shared_body(graphdef, body, h, xt, y["test"]))

    chosen = tuned(cfg.search_tasks)
    log(f"seed {seed}: searched on the validation split of {[names[i] for i in order[: cfg.search_tasks]]}: "
        + "; ".join(f"{m} {_fmt(c['params'])}" for m, c in chosen.items()))
    merged = {m: {str(n): scored(n, m, chosen[m]["params"]) for n in cfg.counts} for m in cfg.methods}
    result = {
        "seed": seed,
        "order": [names[i] for i in order],
        "search_tasks": [names[i] for i in order[: cfg.search_tasks]],
        "zero_shot": _by_task(names, zero_shot),
        "finetuned": _by_task(names, finetuned),
        "search": chosen,
        "merged": merged,
    }
    if cfg.retune:
        retuned = tuned(T)
        for m in cfg.methods:
            retuned[m]["test"] = scored(T, m, retuned[m]["params"])
        result["retuned"] = retuned
    result["seconds"] = {"train": t_train, "checkpoints": t_ckpt, "total": time.perf_counter() - t0}
    log(f"seed {seed}: done in {result['seconds']['total']:.1f} s")
    return result


def _fmt(params: Mapping[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v:g}" for k, v in params.items()) + ")" if params else "(-)"


def _stats(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}


def _averages(acc: Mapping[str, float], ft: Mapping[str, float]) -> tuple[float, float]:
    """(mean absolute accuracy, mean normalized accuracy) over the tasks in `acc`."""
    return float(np.mean(list(acc.values()))), float(np.mean([acc[t] / ft[t] for t in acc]))


def summarize(cfg: Config, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Across seeds: per number of tasks merged and method, absolute and normalized accuracy
    (mean, std, min, max over seeds); the zero-shot model over the same tasks; at n = T the
    per-task accuracies (means over seeds)."""
    T = len(cfg.tasks)
    curves: dict[str, dict[str, dict]] = {}
    rows = ["zero_shot", *cfg.methods]
    for row in rows:
        curves[row] = {}
        for n in cfg.counts:
            pairs = []
            for r in runs:
                tasks = r["order"][:n]
                acc = {t: r["zero_shot"][t] for t in tasks} if row == "zero_shot" else r["merged"][row][str(n)]
                pairs.append(_averages(acc, r["finetuned"]))
            curves[row][str(n)] = {"abs": _stats([p[0] for p in pairs]), "norm": _stats([p[1] for p in pairs])}

    def full(getter) -> dict:
        per_task = {t: float(np.mean([getter(r)[t] for r in runs])) for t in cfg.tasks}
        pairs = [_averages(getter(r), r["finetuned"]) for r in runs]
        return {"per_task": per_task, "abs": _stats([p[0] for p in pairs]), "norm": _stats([p[1] for p in pairs])}

    table = {"zero_shot": full(lambda r: r["zero_shot"]), "finetuned": full(lambda r: r["finetuned"])}
    if T in cfg.counts:
        for m in cfg.methods:
            table[m] = full(lambda r, m=m: r["merged"][m][str(T)])
    if cfg.retune:
        for m in cfg.methods:
            table[f"{m} (tuned at T={T})"] = full(lambda r, m=m: r["retuned"][m]["test"])
    return {"curves": curves, "table_T": table}


def format_table(cfg: Config, summary: Mapping[str, Any]) -> str:
    """Markdown: accuracy of every model on every task at T (means over seeds), then the
    normalized-accuracy curve (the plot's numbers)."""
    T, seeds = len(cfg.tasks), len(cfg.seeds)
    short = [t[:8] for t in cfg.tasks]
    head = ["model", *short, "avg acc", "avg norm acc"]
    lines = [
        f"Test accuracy (%) with all T={T} tasks merged; mean over {seeds} seed(s), ± std of the averages. "
        f"Hyperparameters searched on the validation split of {cfg.search_tasks} task(s).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for row, v in summary["table_T"].items():
        cells = [f"{100 * v['per_task'][t]:.1f}" for t in cfg.tasks]
        cells += [f"{100 * v['abs']['mean']:.1f} ± {100 * v['abs']['std']:.1f}",
                  f"{100 * v['norm']['mean']:.1f} ± {100 * v['norm']['std']:.1f}"]
        lines.append("| " + " | ".join([row, *cells]) + " |")
    counts = list(cfg.counts)
    lines += [
        "",
        f"Normalized accuracy (%) against the number of tasks merged (mean ± std over {seeds} seed/order(s); "
        f"hyperparameters fixed from the search on {cfg.search_tasks} task(s)):",
        "",
        "| model | " + " | ".join(f"n={n}" for n in counts) + " |",
        "|---|" + "|".join(["---:"] * len(counts)) + "|",
    ]
    for row, by_n in summary["curves"].items():
        cells = [f"{100 * by_n[str(n)]['norm']['mean']:.1f} ± {100 * by_n[str(n)]['norm']['std']:.1f}" for n in counts]
        lines.append("| " + " | ".join([row, *cells]) + " |")
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(cfg: Config, out: str | os.PathLike, *, plot: bool = True, log: Log = lambda s: None) -> dict[str, Any]:
    """Run every seed, write `out`/checkpoints/seed<s>/..., results.json, results.md and
    (with `plot`) normalized_accuracy.png. Returns the results dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs = [run_seed(cfg, s, out / "checkpoints" / f"seed{s}", log) for s in cfg.seeds]
    summary = summarize(cfg, runs)
    results = {"config": cfg.to_dict(), "runs": runs, "summary": summary, "seconds": time.perf_counter() - start}
    _write(out / "results.json", json.dumps(results, indent=1))
    _write(out / "results.md", format_table(cfg, summary) + "\n")
    if plot:
        from .plot import plot_curves

        plot_curves(cfg, summary, out / "normalized_accuracy.png")
    results["seconds"] = time.perf_counter() - start
    return results
