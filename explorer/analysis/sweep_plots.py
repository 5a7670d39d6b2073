"""The sweep's figures: isoFLOP profiles with their parabolas, and the fitted law's loss contours."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from learners.budget import ScalingLaw


def law_title(law: ScalingLaw) -> str:
    return f"L = {law.E:.2f} + {law.A:.3g}/N^{law.alpha:.2f} + {law.B:.3g}/D^{law.beta:.2f}"


def _figure(width: float, height: float):
    # A bare Figure renders through Agg and touches no pyplot state (safe in tests and threads).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def plot_isoflop(rows: list[dict], fit: dict, path: Path) -> None:
    """Held-out loss vs N per budget: runs (dots), isoFLOP parabola (dashed), the law along 6·N·D = C
    (solid), the law's N_opt (star) and the parabola's vertex (cross)."""
    from matplotlib import colormaps

    law = ScalingLaw(**fit["law"])
    rows = [r for r in rows if r.get("loss") is not None]
    budgets = sorted({r["budget_flops"] for r in rows})
    n_all, loss_all = np.array([r["n_params"] for r in rows], float), np.array([r["loss"] for r in rows])
    grid = np.geomspace(n_all.min() / 1.5, n_all.max() * 1.5, 200)
    fig, ax = _figure(7.5, 4.8)
    for c, color in zip(budgets, colormaps["viridis"](np.linspace(0, 0.85, len(budgets)))):
        group = [r for r in rows if r["budget_flops"] == c]
        n, loss = np.array([r["n_params"] for r in group], float), np.array([r["loss"] for r in group])
        ax.scatter(n, loss, color=color, zorder=3, label=f"C = {c:.2g} FLOPs")
        ax.plot(grid, law.loss(grid, c / (6 * grid)), color=color, lw=1)
        n_opt, d_opt = law.compute_optimal(c)
        ax.plot(n_opt, law.loss(n_opt, d_opt), marker="*", ms=14, color=color, mec="k", zorder=4)
        if len(np.unique(n)) >= 3:  # isoFLOP parabola in log N, as isoflop_fit draws it
            k = np.polyfit(np.log(n), loss, 2)
            span = np.geomspace(n.min(), n.max(), 100)
            ax.plot(span, np.polyval(k, np.log(span)), color=color, ls="--", lw=1)
            vertex = -k[1] / (2 * k[0]) if k[0] > 0 else math.inf
            if np.log(n.min()) <= vertex <= np.log(n.max()):
                ax.plot(np.exp(vertex), np.polyval(k, vertex), marker="X", ms=9, color=color, mec="k", zorder=4)
    margin = 0.15 * (loss_all.max() - loss_all.min()) + 0.05
    ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="held-out loss (nats/token)",
           ylim=(loss_all.min() - margin, loss_all.max() + margin),
           title=f"isoFLOP profiles; fit {law_title(law)}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, title="star: law N_opt, X: parabola vertex", title_fontsize=8)
    fig.savefig(path, dpi=120)


def plot_law(rows: list[dict], fit: dict, path: Path) -> None:
    """Contours of the fitted L(N, D) with the isoFLOP lines, the runs, and the N_opt(C) frontier
    extended to the extrapolated budget."""
    from matplotlib.ticker import MaxNLocator

    law = ScalingLaw(**fit["law"])
    rows = [r for r in rows if r.get("loss") is not None]
    n, d = np.array([r["n_params"] for r in rows], float), np.array([r["tokens"] for r in rows], float)
    flops = [o["flops"] for o in fit["compute_optimal"]]
    frontier_c = np.geomspace(min(flops) / 3, max(flops) * 3, 100)
    frontier_n, frontier_d = law.compute_optimal(frontier_c)
    n_grid = np.geomspace(min(n.min(), frontier_n.min()) / 2, max(n.max(), frontier_n.max()) * 2, 150)
    d_grid = np.geomspace(min(d.min(), frontier_d.min()) / 2, max(d.max(), frontier_d.max()) * 2, 150)
    nn, dd = np.meshgrid(n_grid, d_grid)
    fig, ax = _figure(7, 5.2)
    surface = law.loss(nn, dd)
    levels = MaxNLocator(24).tick_values(surface.min(), np.percentile(surface, 90))  # where L blows up: one colour
    filled = ax.contourf(nn, dd, surface, levels=levels, cmap="viridis_r", extend="max")
    fig.colorbar(filled, ax=ax, label="fitted loss")
    for c in flops:
        ax.plot(n_grid, c / (6 * n_grid), color="w", ls=":", lw=0.8)
    ax.plot(frontier_n, frontier_d, color="r", lw=1.5, label="compute-optimal N_opt(C), D_opt(C)")
    for o in fit["compute_optimal"]:
        ax.plot(o["n_opt"], o["d_opt"], marker="*", ms=12, color="r", mec="k",
                alpha=0.5 if o["extrapolated"] else 1.0, zorder=4)
    ax.scatter(n, d, c=[r["loss"] for r in rows], cmap="viridis_r", norm=filled.norm, edgecolors="k", zorder=3,
               label="runs (colour: measured loss)")
    ax.set(xscale="log", yscale="log", xlim=(n_grid[0], n_grid[-1]), ylim=(d_grid[0], d_grid[-1]),
           xlabel="non-embedding parameters N", ylabel="training tokens D", title=law_title(law))
    ax.legend(fontsize=8, loc="upper right")
    fig.savefig(path, dpi=120)
