"""The figure: normalized and absolute accuracy against the number of tasks merged."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "zero_shot": dict(color="0.45", linestyle="--", marker=None, label="zero-shot"),
    "linear": dict(color="tab:gray", marker="v", label="linear soup"),
    "task_arithmetic": dict(color="tab:blue", marker="o", linestyle=(0, (4, 2)), zorder=3, label="task arithmetic"),
    "ties": dict(color="tab:green", marker="s", label="TIES"),
    "dare": dict(color="tab:purple", marker="^", label="DARE"),
    "breadcrumbs": dict(color="tab:red", marker="D", label="Breadcrumbs"),
    "breadcrumbs_ties": dict(color="tab:orange", marker="P", label="Breadcrumbs+TIES"),
}


def plot_curves(cfg, summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Mean over seeds (line) and min-max over seeds (band) of the average normalized and
    absolute test accuracy of each model, against the number of tasks merged; the models
    re-tuned at T are drawn as hollow markers at the right edge."""
    counts = list(cfg.counts)
    T = len(cfg.tasks)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for ax, key, ylabel in ((axes[0], "norm", "normalized accuracy (merged / fine-tuned)"),
                            (axes[1], "abs", "absolute accuracy")):
        for row, by_n in summary["curves"].items():
            style = dict(STYLE.get(row, dict(label=row)))
            label = style.pop("label")
            mean = [100 * by_n[str(n)][key]["mean"] for n in counts]
            lo = [100 * by_n[str(n)][key]["min"] for n in counts]
            hi = [100 * by_n[str(n)][key]["max"] for n in counts]
            ax.plot(counts, mean, label=label, linewidth=1.8, markersize=5, **style)
            ax.fill_between(counts, lo, hi, color=style["color"], alpha=0.12, linewidth=0)
            retuned = summary["table_T"].get(f"{row} (tuned at T={T})")
            if retuned is not None:
                ax.plot([T], [100 * retuned[key]["mean"]], linestyle="none", marker=style["marker"],
                        markersize=9, markerfacecolor="none", markeredgecolor=style["color"], markeredgewidth=1.5)
        if key == "norm":
            ax.axhline(100, color="black", linewidth=0.8, linestyle=":")
        ax.set_xlabel("number of tasks merged")
        ax.set_ylabel(f"{ylabel} (%)")
        ax.set_xticks(counts)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=8)
    tuned_note = f"; hollow markers: re-tuned with all {T} tasks" if cfg.retune else ""
    fig.suptitle(
        f"Merging fine-tuned MLPs on {T} digit tasks: mean and min-max over {len(cfg.seeds)} seed(s) and task order(s)\n"
        f"hyperparameters searched on the validation split of the first {cfg.search_tasks} task(s), "
        f"scored on test splits{tuned_note}",
        fontsize=10,
    )
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
