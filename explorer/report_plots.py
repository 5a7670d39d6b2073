"""The report's figures (matplotlib, Agg): mean curve per condition with a 95% band over seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from explorer.report import RunCurves, mean_ci


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def _band(runs: list[RunCurves], x_attr: str, y_attr: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean x, mean y and the y half-width per iteration, over the runs that reached it."""
    length = min(len(getattr(r, y_attr)) for r in runs)
    xs, ys, hs = [], [], []
    for i in range(length):
        xs.append(np.mean([getattr(r, x_attr)[i] for r in runs]))
        mean, half, _ = mean_ci(getattr(r, y_attr)[i] for r in runs)
        ys.append(mean)
        hs.append(half if np.isfinite(half) else 0.0)
    return np.array(xs), np.array(ys), np.array(hs)


def _curve(ax, runs: list[RunCurves], x_attr: str, y_attr: str, label: str) -> None:
    x, y, h = _band(runs, x_attr, y_attr)
    line, = ax.plot(x, y, marker="o", markersize=3, label=f"{label} (n={len(runs)})")
    ax.fill_between(x, y - h, y + h, color=line.get_color(), alpha=0.2, linewidth=0)


def plot_efficiency(groups: dict[str, list[RunCurves]], out: Path) -> None:
    plt = _pyplot()
    for y_attr, ylabel, name in (("precision", "precision of accepted images (cumulative)", "precision_vs_queries"),
                                 ("reward", "cumulative query reward", "reward_vs_queries")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, runs in groups.items():
            _curve(ax, runs, "queries", y_attr, label)
        ax.set_xlabel("queries issued")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)


def plot_accuracy(groups: dict[str, list[RunCurves]], control: dict[str, dict[str, dict]], out: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (y_attr, key, title) in zip(axes, (("knn", "eval_knn_accuracy", "kNN accuracy"),
                                               ("probe", "eval_linear_probe_accuracy", "linear-probe accuracy"))):
        for label, runs in groups.items():
            _curve(ax, runs, "accepted", y_attr, label)
        for (name, per_seed), style in zip(control.items(), (":", "--")):
            mean = mean_ci(s.get(key) for s in per_seed.values())[0]
            if np.isfinite(mean):
                ax.axhline(mean, color="gray", linestyle=style, label=f"{name} (n={len(per_seed)})")
        ax.set_xlabel("images acquired (accepted for training)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_images.png", dpi=120)
    plt.close(fig)
