"""`explorer plan`: from finished text runs to what the next FLOPs should buy.

Observations are runs with `n_params` (non-embedding), `tokens` and final `loss`, given as a list of
dicts or a JSON / CSV file of them. `plan_from_runs` fits the scaling law with bootstrap intervals,
splits the budget compute-optimally and decides: acquire text, grow the model, or train; with a
routed law (bench/exp_routing.py's fit.json, `load_routed_law`) also whether restarting at the same
active size with more experts per routed layer beats that. `format_plan` renders the result for a
terminal. `repeat_decay_from_run` fits the planner's R*
(how fast repeated tokens lose their worth) to a text run that trained on its target alone.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from learners.budget import (
    Decision,
    FitConfig,
    LawFit,
    LawIntervals,
    RepeatFit,
    RoutedLaw,
    bootstrap_intervals,
    decide,
    fit_repeat_decay,
    fit_scaling_law,
)
from learners.flops import ModelShape

OBSERVATION_KEYS = ("n_params", "tokens", "loss")


def load_observations(source: str | Path | Iterable[Mapping]) -> list[dict[str, float]]:
    """Runs as dicts with n_params, tokens, loss: from a list, a .json (list or {"runs": [...]}), a
    .jsonl (one run per line, as `explorer sweep` writes sweep.jsonl) or a .csv."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix.lower() == ".csv":
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        elif path.suffix.lower() == ".jsonl":
            from explorer.run.ledger import read_metrics

            rows = read_metrics(path)
        else:
            data = json.loads(path.read_text())
            rows = data["runs"] if isinstance(data, dict) else data
    else:
        rows = list(source)
    runs = []
    for i, row in enumerate(rows):
        missing = [k for k in OBSERVATION_KEYS if k not in row]
        if missing:
            raise KeyError(f"run {i} lacks {missing}; every run needs {', '.join(OBSERVATION_KEYS)}")
        runs.append({k: float(row[k]) for k in OBSERVATION_KEYS})
    return runs


@dataclass(kw_only=True, frozen=True)
class Plan:
    fit: LawFit
    intervals: LawIntervals | None  # None when bootstrapping was switched off
    budget_flops: float
    tokens_available: float
    current_params: float
    n_opt: float  # compute-optimal non-embedding parameters for the budget
    d_opt: float  # compute-optimal tokens for the budget
    decision: Decision


def load_routed_law(path: str | Path) -> RoutedLaw:
    """The routed law a, b, c, d from a JSON file (bench/exp_routing.py's fit.json, or {a, b, c, d})."""
    data = json.loads(Path(path).read_text())
    missing = [k for k in "abcd" if k not in data]
    if missing:
        raise KeyError(f"{path}: a routed law needs {', '.join(missing)} "
                       "(log L = a log N + b log E + c log N log E + d)")
    return RoutedLaw(**{k: float(data[k]) for k in "abcd"})


def plan_from_runs(observations: str | Path | Iterable[Mapping], budget_flops: float, tokens_available: float,
                   *, current_params: float | None = None, n_resamples: int = 100, level: float = 0.8,
                   seed: int = 0, fit_config: FitConfig | None = None, grow_factor: float = 2.0,
                   size_table: dict[str, ModelShape] | None = None, routed: RoutedLaw | None = None,
                   experts: int = 1, expert_options: tuple[int, ...] = ()) -> Plan:
    """Fit, bootstrap (`n_resamples` = 0 skips it) and decide for `budget_flops` of remaining compute.

    `current_params` defaults to the largest model among the runs (the one most recently grown to).
    With a `routed` law and `expert_options`, restarting with more experts is weighed too (`decide`).
    """
    runs = load_observations(observations)
    n, d, loss = (np.array([r[k] for r in runs]) for k in OBSERVATION_KEYS)
    fit = fit_scaling_law(n, d, loss, fit_config)
    intervals = None
    if n_resamples > 0:
        intervals = bootstrap_intervals(n, d, loss, fit.law, n_resamples=n_resamples, level=level, seed=seed)
    current = float(n.max()) if current_params is None else float(current_params)
    n_opt, d_opt = (float(x) for x in fit.law.compute_optimal(budget_flops))
    decision = decide(fit.law, budget_flops, tokens_available, current, grow_factor=grow_factor,
                      size_table=size_table, routed=routed, experts=experts, expert_options=tuple(expert_options))
    return Plan(fit=fit, intervals=intervals, budget_flops=float(budget_flops),
                tokens_available=float(tokens_available), current_params=current, n_opt=n_opt, d_opt=d_opt,
                decision=decision)


def _interval(plan: Plan, name: str) -> str:
    if plan.intervals is None:
        return ""
    low, high = plan.intervals.bounds[name]
    return f"  [{low:.4g}, {high:.4g}]"


def format_plan(plan: Plan) -> str:
    """A readable multi-line summary: the law with intervals, the optimal split, the decision."""
    law = plan.fit.law
    level = ""
    if plan.intervals is not None:
        level = f" ({plan.intervals.level:.0%} bootstrap CI, {plan.intervals.n_resamples} resamples)"
    lines = [f"scaling law L(N, D) = E + A/N^alpha + B/D^beta from {plan.fit.n_observations} runs{level}:"]
    for name, value in law.as_dict().items():
        lines.append(f"  {name:<6} = {value:.4g}{_interval(plan, name)}")
    lines += [
        f"  N_opt ~ C^{law.n_exponent:.3f}{_interval(plan, 'n_exponent')},"
        f"  D_opt ~ C^{law.d_exponent:.3f}{_interval(plan, 'd_exponent')}",
        f"budget {plan.budget_flops:.3g} FLOPs: N_opt = {plan.n_opt:.3g} params, D_opt = {plan.d_opt:.3g} tokens "
        f"({plan.d_opt / plan.n_opt:.1f} tokens/param), predicted loss {float(law.loss(plan.n_opt, plan.d_opt)):.3f}",
        f"have: {plan.current_params:.3g} params, {plan.tokens_available:.3g} tokens",
        f"decision: {plan.decision.action} -> N = {plan.decision.n_target:.3g}, D = {plan.decision.d_target:.3g}"
        + (f", {plan.decision.experts} experts per routed layer" if plan.decision.experts else ""),
        f"  {plan.decision.reason}",
    ]
    return "\n".join(lines)


def repeat_decay_from_run(run_dir: str | Path) -> RepeatFit:
    """R* for `text.repeat_decay`, fitted to a text run (`metrics.jsonl`, `config.yaml`) that only
    trained: one LM size, no acquisition, so every evaluation after the first pass saw repeats.
    Its law's beta shapes the curve (`learners.budget.fit_repeat_decay`). A run with a validation
    split (`text.validation_fraction`) is read on its own validation loss, not the held-out one; the
    fit's `overfit_after` is then `text.max_passes`."""
    from explorer.run.config import load_config

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise FileNotFoundError(f"{metrics}: no metrics; give the folder of a text run")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows or "tokens_available" not in rows[0]:
        raise ValueError(f"{metrics}: not a text run (rows lack tokens_available)")
    unique, sizes = {r["tokens_available"] for r in rows}, {r["lm_size"] for r in rows}
    if len(unique) > 1 or len(sizes) > 1:
        raise ValueError(f"{run_dir}: its text grew ({min(unique)} -> {max(unique)} tokens) or its LM changed size "
                         f"({', '.join(sorted(sizes))}); fit R* to a run on the target alone (text.strategy: train)")
    beta = load_config(run_dir / "config.yaml").text.law["beta"]
    loss = "val_loss" if all("val_loss" in r for r in rows) else "eval_loss"
    return fit_repeat_decay(float(unique.pop()), [r["tokens_trained"] for r in rows],
                            [r[loss] for r in rows], beta=beta)


def run_unique_tokens(run_dir: str | Path) -> float:
    """The unique tokens a run that only trained held (`tokens_available` of its metrics)."""
    rows = (json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip())
    return float(next(rows)["tokens_available"])


def overfit_exponent(points: list[tuple[float, float]]) -> float:
    """How a model's overfitting point moves with its unique tokens: the slope of log(passes at the
    lowest validation loss) over log(unique tokens), least squares over `points` (unique, passes)
    of runs of one size on sets of different sizes (`text.max_passes_exponent`)."""
    unique, passes = np.log(np.array(points, dtype=float)).T
    if len(points) < 2 or np.ptp(unique) < math.log(1.5):
        raise ValueError("the overfitting point's exponent needs runs on at least two sets of unique tokens, the "
                         f"largest at least 1.5x the smallest; got {[round(u) for u, _ in points]}")
    return float(np.polyfit(unique, passes, 1)[0])


def calibrated_law(law: dict[str, float], fit: RepeatFit, n_params: float) -> dict[str, float]:
    """`law` with its level and D-term set to a calibration run's curve at that run's size: at
    `n_params` it predicts fit.offset + fit.scale·D'^(-beta) (the run's own curve); A and alpha, which
    only matter for other sizes, are kept. For a learner whose start the law was not fitted to (a
    pretrained base: the from-scratch law's level and scale are far off)."""
    return {**law, "E": fit.offset - law["A"] / n_params ** law["alpha"], "B": fit.scale}


def overfit_points(runs: list[str | Path]) -> list[tuple[float, float]]:
    """(unique tokens, passes at the lowest validation loss) of each run that only trained."""
    return [(run_unique_tokens(r), repeat_decay_from_run(r).overfit_after) for r in runs]


def format_overfit_exponent(runs: list[str | Path], points: list[tuple[float, float]] | None = None) -> str:
    """The overfitting point of each run (that only trained) and how it moves with the unique tokens."""
    points = points or overfit_points(runs)
    lines = [f"{r}: lowest loss after {p:.2f} passes over {u:.0f} unique tokens" for r, (u, p) in zip(runs, points)]
    exponent = overfit_exponent(points)
    smallest = min(points)
    lines.append(f"overfitting point = {smallest[1]:.3g}·(U / {smallest[0]:.0f})^{exponent:.3g} passes "
                 f"(text.max_passes {smallest[1]:.3g}, text.max_passes_at {smallest[0]:.0f}, "
                 f"text.max_passes_exponent {exponent:.3g})")
    return "\n".join(lines)


def format_repeat_fit(fit: RepeatFit, run_dir: str | Path) -> str:
    return (f"R* = {fit.r_star:.3g} (text.repeat_decay) from {run_dir}: its loss (validation where it has one, "
            f"else held-out) = {fit.offset:.4g} + {fit.scale:.4g}·D'^(-beta) over {fit.points} evaluations, its "
            f"steepest fall to its lowest (after {fit.overfit_after:.1f} passes over the target; later ones "
            f"overfit), rmse {fit.rmse:.4f}")
