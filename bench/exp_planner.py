"""Experiment 7 - the compute planner against fixed strategies, at equal total FLOPs.

The text science config (`configs/text-science.yaml`) with a total FLOP budget that ends every run
(training, queries, fetching and MiniLM scoring all charged; evaluation logged, not charged) and
iterations of 128 training steps. What each iteration buys is chosen by `text.strategy`:

    planner          the plan of least predicted final loss under the planner's law, repeated tokens
                     discounted, each round charged what the run's rounds cost (plan_with_costs)
    compute-optimal  acquire while the law's compute-optimal D exceeds the tokens at hand (decide)
    always-acquire   query every iteration, never grow
    never-acquire    train the starting model on the target alone
    grow-only        never query; compute goes to the model: the largest size allowed (micro)
    acquire-first-half  a fixed schedule: rounds back to back, no training between them, until half
                     the budget is spent; then train (text.strategy acquire_first, acquire_share 0.5)
    planner-fixed-point  with --calibration-added-tokens: the planner whose overfitting point stays
                     where the target alone put it (the planner's then moves with the unique tokens)

at two budgets (`--budgets`): where training on the target alone is the best use of the FLOPs
(3e12) and where the target alone overfits and acquiring pays (5e12); `--budgets 3e12 5e12 8e12`
adds a larger one (~48 min with two seeds, `--seeds 0 1`). Seeds set the target split, the
LM's initialisation and batch order, and the policy. First, the planner's R* (how fast repeated
tokens lose their worth) is fitted to its own run on the target alone at `--calibration-budget`
(8e12: a curve that passes its lowest held-out loss and overfits well beyond it; a seed not
compared, `--calibration-seed`; `explorer plan --repeats`). Reported: final
held-out target perplexity per strategy and budget with 95% t-intervals, the paired difference of
the planner from each fixed strategy, and every decision the planner took with its reason
(decisions.md).

From a pretrained start (`configs/text-base-planner.yaml`, BENCHMARKS.md 7c) every run also holds
out part of its target and keeps the weights of its lowest validation loss (the perplexity
reported is theirs); the calibration run is read on that validation split and also sets the
planner's overfitting point (`text.max_passes`) and its law's level at the run's size. With
`--calibration-added-tokens T` a second calibration run trains on the target with T tokens of web
documents its reward accepts (drawn uniformly from the web, no hidden label), evaluated at the same
spacing in passes, and the overfitting point moves with the unique tokens as the two runs say
(`text.max_passes_exponent`, BENCHMARKS.md 7d).

    python bench/exp_planner.py                        # 2 budgets x 4 strategies x 3 seeds: ~25 min
    python bench/exp_planner.py --budgets 4e12 --seeds 0 --strategies planner never-acquire
    python bench/exp_planner.py --config configs/text-base-planner.yaml --seeds 20 21 22 23 24 \
        --budgets 3e12 8e12 --strategies planner always-acquire never-acquire acquire-first-half \
        --calibration-tokens 8192 --calibration-pretrain 8192 \
        --set text.tokens_per_iteration=65536 --set iterations=100   # 7c: ~20 min (16e12 too: ~50)
Outputs bench/results/planner/: report.md, decisions.md, runs.csv, summary.json, machine.json.
Runs (resumable; a finished run is skipped) in runs/bench-planner/B-BUDGET/seed-S/STRATEGY/ and
runs/bench-planner/calibration/seed-S/.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.exp_text_acquisition import read_metrics, run_all, text_bench_parser, text_bench_setup  # noqa: E402
from bench.machine import write_machine  # noqa: E402

STRATEGIES = {"planner": "planner", "planner-fixed-point": "planner", "compute-optimal": "compute_optimal",
              "always-acquire": "acquire", "never-acquire": "train", "grow-only": "grow",
              "acquire-first-half": "acquire_first"}
PLANNERS = ("planner", "planner-fixed-point")  # start once the calibration is read
DEFAULT_STRATEGIES = ["planner", "always-acquire", "never-acquire", "grow-only"]
DEFAULT_RUNS = ROOT / "runs" / "bench-planner"
# Iterations are a cap only: the budget ends every run first.
OVERRIDES = {"iterations": 60, "text.tokens_per_iteration": 131072}
CALIBRATION_TOKENS = 32768  # the calibration run evaluates four times as often as the compared runs
CALIBRATION_SEED = 100
CALIBRATION_BUDGET = 8e12


def finished(run_dir: Path) -> bool:
    """A run is done when its last row has no budget left for another training step (or hit the cap)."""
    return (run_dir / "done.json").exists()


def calibration_run(config: Path, runs: Path, seed: int, budget: float, overrides: dict,
                    tokens: int = CALIBRATION_TOKENS, pretrain: int | None = None) -> tuple:
    """The run the planner's R* is fitted to: the target alone, seed `seed` (not one of the compared
    seeds), budget `budget`, evaluated every `tokens` (after `pretrain` tokens: default the config's)."""
    from explorer.run.config import load_config

    cfg = load_config(config, {**OVERRIDES, **overrides, "seed": seed, "text.flop_budget": budget,
                               "text.strategy": "train", "text.tokens_per_iteration": tokens,
                               **({} if pretrain is None else {"text.pretrain_tokens": pretrain})})
    return f"calibration: seed {seed}, budget {budget:.0e}, target alone", cfg, runs / "calibration" / f"seed-{seed}"


def added_calibration(config: Path, runs: Path, seed: int, budget: float, overrides: dict, tokens: int,
                      added: int, pretrain: int | None, jobs: int, threads: int) -> Path:
    """The second calibration run: as `calibration_run`'s, with `added` tokens of web documents in its
    stream from the start, drawn uniformly and kept where the run's reward accepts them
    (exp_text_value's accepted source: no hidden label), so its overfitting point is read on a
    larger set like the one acquisition makes. It is evaluated at the first run's spacing in passes
    (every `tokens`·U2/U1 tokens: patience then spans the same passes), so the first runs before it."""
    from bench.exp_text_value import value_run
    from explorer.analysis.plan import run_unique_tokens
    from explorer.run.experiment import local_engine_for

    label, cfg, first = calibration_run(config, runs, seed, budget, overrides, tokens, pretrain)
    run_dir = first.with_name(f"{first.name}-accepted-{added}")
    if finished(run_dir):
        return run_dir
    if not finished(first):
        run_all([(label, cfg, first)], runs / "engine.log", jobs, threads, done=mark_done)
    unique = run_unique_tokens(first)
    step = cfg.text.tokens_per_step
    scale = lambda n: max(step, round(n * (unique + added) / unique / step) * step)  # noqa: E731
    _, cfg, _ = calibration_run(config, runs, seed, budget, overrides, scale(tokens), scale(cfg.text.pretrain_tokens))
    print(f"== calibration: seed {seed}, budget {budget:.0e}, the target with {added} tokens of web documents "
          f"its reward accepts, evaluated every {scale(tokens)} tokens ==", flush=True)
    t0 = time.time()
    with local_engine_for(cfg, progress=True, error_log=runs / "engine.log") as url:
        value_run(cfg, run_dir, "accepted", added, url)
    mark_done(run_dir, cfg, read_metrics(run_dir), t0)
    return run_dir


def calibration_fit(run_dir: Path, seed: int, budget: float, added_dir: Path | None = None) -> dict:
    """The planner's R*, fitted to the calibration run (`explorer plan --repeats`). A run with a
    validation split is read on it, and also gives the planner its overfitting point (`max_passes`)
    and its law's level and D-term at the run's size (`calibrated_law`): the learner keeps its best
    weights, and a pretrained start is far from the from-scratch law. With `added_dir` (the run
    with web documents added) the overfitting point also moves with the unique tokens: the exponent
    of the two runs' (`text.max_passes_exponent`), for the planner (not its fixed-point twin)."""
    from explorer.analysis.plan import (
        calibrated_law,
        format_overfit_exponent,
        format_repeat_fit,
        overfit_exponent,
        overfit_points,
        repeat_decay_from_run,
    )
    from explorer.run.config import load_config

    fit = repeat_decay_from_run(run_dir)
    print(format_repeat_fit(fit, run_dir), flush=True)
    out = {"seed": seed, "budget": budget, "run": str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT)
           else str(run_dir), "r_star": round(fit.r_star, 3), "points": fit.points,
           "overfit_after_passes": round(fit.overfit_after, 2), "rmse": round(fit.rmse, 5),
           "offset": fit.offset, "scale": fit.scale}
    cfg = load_config(run_dir / "config.yaml")
    if cfg.text.validation_fraction:
        n_params = read_metrics(run_dir)[0]["n_params"]
        out.update(loss="validation", max_passes=round(fit.overfit_after, 3),
                   law={k: round(v, 6) for k, v in calibrated_law(cfg.text.law, fit, n_params).items()})
        if added_dir is not None:
            points = overfit_points([run_dir, added_dir])
            print(format_overfit_exponent([run_dir, added_dir], points), flush=True)
            out.update(max_passes_at=points[0][0], max_passes_exponent=round(overfit_exponent(points), 4),
                       added={"run": str(added_dir.relative_to(ROOT)) if added_dir.is_relative_to(ROOT)
                                else str(added_dir), "unique_tokens": points[1][0],
                                "overfit_after_passes": round(points[1][1], 2)})
    return out


def planner_overrides(fit: dict | None, moving: bool = True) -> dict:
    """What the calibration sets in the planner's config (`moving` False: not the overfitting point's
    exponent, for the planner-fixed-point twin)."""
    if not fit:
        return {}
    moves = moving and "max_passes_exponent" in fit
    return {"text.repeat_decay": fit["r_star"],
            **({"text.max_passes": fit["max_passes"], "text.law": fit["law"]} if "max_passes" in fit else {}),
            **({"text.max_passes_exponent": fit["max_passes_exponent"], "text.max_passes_at": fit["max_passes_at"]}
               if moves else {})}


def run_cost(cfg, calibration_seed: int = CALIBRATION_SEED) -> float:
    """What orders the queue: a run's FLOP budget (the calibration, a target-alone run evaluated more often,
    first)."""
    return cfg.text.flop_budget * (2.0 if cfg.text.strategy == "train" and cfg.seed == calibration_seed else 1.0)


def mark_done(run_dir: Path, cfg, rows: list[dict], t0: float | None = None) -> None:
    """Done: the iterations or the budget ran out, or the validation loss stalled (`text.patience`)."""
    stalled = cfg.text.patience is not None and rows and rows[-1].get("val_stalled", 0) >= cfg.text.patience
    if rows and (stalled or rows[-1]["iteration"] >= cfg.iterations or rows[-1]["flops_remaining"] <
                 6.0 * rows[-1]["n_params"] * cfg.text.tokens_per_step):
        seconds = None if t0 is None else time.time() - t0
        (run_dir / "done.json").write_text(json.dumps({"seconds": seconds}) + "\n")


def grid_runs(config: Path, runs: Path, budgets: list[float], seeds: list[int], strategies: list[str],
              overrides: dict, fit: dict | None = None) -> list[tuple]:
    """The grid's (label, cfg, run_dir) not yet finished, seed by seed (`fit`: the calibration's)."""
    from explorer.run.config import load_config

    todo = []
    for seed in seeds:
        for budget in budgets:
            for name in strategies:
                mine = planner_overrides(fit, moving=name == "planner") if name in PLANNERS else {}
                cfg = load_config(config, {**OVERRIDES, **overrides, "seed": seed, "text.flop_budget": budget,
                                           "text.strategy": STRATEGIES[name], **mine})
                run_dir = runs / f"B-{budget:.0e}" / f"seed-{seed}" / name
                if not finished(run_dir):
                    todo.append((f"budget {budget:.0e}, seed {seed}: {name}", cfg, run_dir))
    return todo


def run_benchmark(args, overrides: dict) -> dict | None:
    """The calibration run and the grid, `args.jobs` at a time: the fixed strategies run alongside the
    calibration, the planner's runs once its R* is known. Returns the calibration's fit (None without one)."""
    grid = lambda strategies, fit=None: grid_runs(args.config, args.runs, args.budgets, args.seeds,  # noqa: E731
                                                  strategies, overrides, fit)
    fixed = [name for name in args.strategies if name not in PLANNERS]
    planner = [name for name in args.strategies if name in PLANNERS]
    if args.calibration_seed < 0:
        run_all(grid(args.strategies), args.runs / "engine.log", args.jobs, args.threads, done=mark_done,
                cost=run_cost)
        return None
    budget = args.calibration_budget
    label, cfg, calibration_dir = calibration_run(args.config, args.runs, args.calibration_seed, budget, overrides,
                                                  args.calibration_tokens, args.calibration_pretrain)
    added_dir = added_calibration(args.config, args.runs, args.calibration_seed, budget, overrides,
                                  args.calibration_tokens, args.calibration_added_tokens, args.calibration_pretrain,
                                  args.jobs, args.threads) if args.calibration_added_tokens else None
    fit: dict = {}

    def done(run_dir, cfg, rows, t0):
        mark_done(run_dir, cfg, rows, t0)
        if run_dir == calibration_dir:  # R* is known: the planner's runs can start
            fit.update(calibration_fit(calibration_dir, args.calibration_seed, budget, added_dir))
            return grid(planner, fit)
        return []

    if finished(calibration_dir):
        fit.update(calibration_fit(calibration_dir, args.calibration_seed, budget, added_dir))
        todo = grid(fixed) + grid(planner, fit)
    else:
        todo = [(label, cfg, calibration_dir)] + grid(fixed)
    run_all(todo, args.runs / "engine.log", args.jobs, args.threads, done=done,
            cost=lambda cfg: run_cost(cfg, args.calibration_seed))
    return fit


def summarise(run_dir: Path) -> dict:
    from learners.flops import FlopLedger

    rows = read_metrics(run_dir)
    last = rows[-1]
    actions = [r["planner_action"] for r in rows[1:]]
    # with a validation split the run's result is its kept weights (the lowest validation loss)
    ppl = last.get("best_eval_perplexity", last["eval_perplexity"])
    kept = next((r for r in rows if r["iteration"] == last.get("best_iteration")), last)
    return {"perplexity": ppl, "log_ppl": math.log(ppl), "last_perplexity": last["eval_perplexity"],
            "best_iteration": last.get("best_iteration"),
            # passes over the unique tokens when the kept weights were taken (where the run stopped improving)
            "kept_passes": kept["tokens_trained"] / kept["tokens_available"],
            "iterations": len(rows) - 1, "rounds": actions.count("acquire"),
            "grew": any(a == "grow_model" for a in actions), "lm_size": last["lm_size"],
            "tokens_trained": last["tokens_trained"], "unique_tokens": last["tokens_available"],
            "train_flops": last["flops"]["train"],
            "acquisition_flops": sum(last["flops"][k] for k in ("query", "fetch", "score")),
            "charged_flops": FlopLedger(spent=dict(last["flops"])).charged, "budget": last["flop_budget"],
            "actions": actions, "reasons": [r["planner"]["reason"] for r in rows[1:]],
            # the count floor of the target's own tokens (runs since the count baselines; nan before)
            **{f"count_{n}_ppl": math.exp(rows[0][f"count_{n}_loss"]) if f"count_{n}_loss" in rows[0] else math.nan
               for n in ("unigram", "bigram")}}


def write_report(results: dict[float, dict[int, dict[str, dict]]], out: Path, calibration: dict | None = None) -> Path:
    from explorer.analysis.report import fmt, mean_ci

    out.mkdir(parents=True, exist_ok=True)
    with (out / "runs.csv").open("w", newline="") as f:
        fields = ["budget", "seed", "strategy", "perplexity", "last_perplexity", "best_iteration", "iterations",
                  "rounds", "lm_size", "tokens_trained", "unique_tokens", "kept_passes", "train_flops",
                  "acquisition_flops", "charged_flops", "count_unigram_ppl", "count_bigram_ppl"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for budget, seeds in results.items():
            for seed, strategies in seeds.items():
                for name, s in strategies.items():
                    writer.writerow({"budget": budget, "seed": seed, "strategy": name, **s})
    lines = ["# Experiment 7: the planner against fixed strategies at equal total FLOPs", "",
             "Mean ± 95% t-interval over seeds. Δ log ppl = the fixed strategy's log-perplexity minus the "
             "planner's, same seed: positive means the planner is better.", "",
             "| budget (FLOPs) | strategy | n | held-out ppl | Δ log ppl (planner better) | rounds | final size "
             "| tokens trained | unique tokens | passes | passes at the kept weights "
             "| acquisition share of the FLOPs |",
             "|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    if calibration:
        lines[2:2] = [f"The planner's R* = {calibration['r_star']:g} (text.repeat_decay) was fitted to its own run on the "
                      f"target alone, seed {calibration['seed']} (not compared), budget {calibration['budget']:.0e}: "
                      f"{calibration['points']} evaluations from its steepest fall to its lowest held-out loss, after "
                      f"{calibration['overfit_after_passes']:g} passes over the target; rmse {calibration['rmse']:g} "
                      f"(`explorer plan --repeats {calibration['run']}`).", ""]
        if "max_passes" in calibration:
            law = calibration["law"]
            lines[3:3] = [f"Read on the run's own validation split (not the held-out documents), the calibration "
                          f"also set the planner's overfitting point, text.max_passes = {calibration['max_passes']:g} "
                          f"passes, and its law's level and D-term at the run's size: E = {law['E']:.4g}, "
                          f"B = {law['B']:.4g} (beta {law['beta']:g} kept). Every run keeps the weights of its "
                          "lowest validation loss; the held-out perplexity reported is theirs.", ""]
        if "added" in calibration:
            second = calibration["added"]
            lines[4:4] = [f"A second calibration run, the target with web documents its reward accepts added "
                          f"({second['unique_tokens']:.0f} unique tokens against {calibration['max_passes_at']:.0f}), "
                          f"had its lowest validation loss after {second['overfit_after_passes']:g} passes: the "
                          f"planner's overfitting point moves with the unique tokens U as {calibration['max_passes']:g}"
                          f"·(U / {calibration['max_passes_at']:.0f})^{calibration['max_passes_exponent']:g} "
                          "(text.max_passes_exponent); planner-fixed-point is the same planner without it "
                          f"(`explorer plan --repeats {calibration['run']} {second['run']}`).", ""]
    summary: dict = {"calibration": calibration} if calibration else {}
    decisions = ["# Decisions of the planner (first seed of each budget)", ""]
    for budget, seeds in results.items():
        names = [n for n in STRATEGIES if any(n in s for s in seeds.values())]
        for n in ("unigram", "bigram"):  # the floor: counts on the target's own tokens (each seed's, once)
            floor = mean_ci(next(iter(s.values()))[f"count_{n}_ppl"] for s in seeds.values())
            if floor[2]:
                lines.append(f"| {budget:.1e} | count {n} (the target's tokens) | {floor[2]} | {fmt(*floor[:2], 1)} "
                             "| | | | | | | | |")
        for name in names:
            mine = {seed: s[name] for seed, s in seeds.items() if name in s}
            ppl = mean_ci(m["perplexity"] for m in mine.values())
            cell = ""
            if name != "planner":
                diffs = np.array([m["log_ppl"] - seeds[seed]["planner"]["log_ppl"] for seed, m in mine.items()
                                  if "planner" in seeds[seed]])
                d = mean_ci(diffs)
                cell = f"{fmt(d[0], d[1], 4)} ({' / '.join(f'{x:+.4f}' for x in diffs)})"
                summary.setdefault(f"{budget:.0e}", {})[name] = {"delta_log_ppl_vs_planner": d[:2],
                                                                 "per_seed": diffs.tolist()}
            summary.setdefault(f"{budget:.0e}", {}).setdefault(name, {})["perplexity"] = ppl[:2]
            sizes = sorted({m["lm_size"] for m in mine.values()})
            passes = [m["tokens_trained"] / m["unique_tokens"] for m in mine.values()]
            kept = [m["kept_passes"] for m in mine.values()]
            share = [m["acquisition_flops"] / m["charged_flops"] for m in mine.values()]  # of the FLOPs charged
            lines.append(f"| {budget:.1e} | {name} | {len(mine)} | {fmt(*ppl[:2], 1)} | {cell} "
                         f"| {fmt(*mean_ci(m['rounds'] for m in mine.values())[:2], 1)} | {', '.join(sizes)} "
                         f"| {fmt(*mean_ci(m['tokens_trained'] for m in mine.values())[:2], 0)} "
                         f"| {fmt(*mean_ci(m['unique_tokens'] for m in mine.values())[:2], 0)} "
                         f"| {fmt(*mean_ci(passes)[:2], 2)} | {fmt(*mean_ci(kept)[:2], 2)} "
                         f"| {fmt(*mean_ci(share)[:2], 2)} |")
        first = next(iter(seeds))
        if "planner" in seeds[first]:
            p = seeds[first]["planner"]
            decisions += [f"## budget {budget:.1e}, seed {first}", ""]
            decisions += [f"{i + 1}. **{a}**: {r}" for i, (a, r) in enumerate(zip(p["actions"], p["reasons"]))]
            decisions.append("")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "decisions.md").write_text("\n".join(decisions) + "\n")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = text_bench_parser(__doc__, DEFAULT_RUNS, ROOT / "bench" / "results" / "planner", [0, 1, 2])
    parser.add_argument("--budgets", type=float, nargs="+", default=[3e12, 5e12],
                        help="total FLOP budgets (default 3e12 5e12; 8e12 as well takes ~2x longer)")
    parser.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES, choices=list(STRATEGIES),
                        help="compute-optimal is not run by default: under the prior law its D_opt (millions of "
                             "tokens) always exceeds the web's, so it decides as always-acquire")
    parser.add_argument("--calibration-seed", type=int, default=CALIBRATION_SEED,
                        help="seed of the run on the target alone that the planner's R* (text.repeat_decay) is "
                             "fitted to; -1: none, the planner keeps the config's R*")
    parser.add_argument("--calibration-budget", type=float, default=CALIBRATION_BUDGET,
                        help="the calibration run's FLOP budget (default %(default).0e: the target alone "
                             "overfits well before it ends, so the fit sees the curve's lowest point)")
    parser.add_argument("--calibration-tokens", type=int, default=CALIBRATION_TOKENS,
                        help="tokens trained between the calibration run's evaluations (default %(default)s)")
    parser.add_argument("--calibration-pretrain", type=int, default=None,
                        help="the calibration run's tokens before its first evaluation (default: the config's "
                             "text.pretrain_tokens); smaller where the target alone overfits within a few passes")
    parser.add_argument("--calibration-added-tokens", type=int, default=0, metavar="T",
                        help="a second calibration run with T tokens of web documents added to the target (drawn "
                             "uniformly, kept where the run's reward accepts them): the planner's overfitting "
                             "point then moves with the unique tokens "
                             "(text.max_passes_exponent, fitted to the two runs); 'planner-fixed-point' is the "
                             "planner without it (default 0: one calibration, a fixed point)")
    args = parser.parse_args(argv)
    if "planner-fixed-point" in args.strategies and not args.calibration_added_tokens:
        parser.error("planner-fixed-point differs from planner only with --calibration-added-tokens")
    if args.calibration_added_tokens < 0 or args.calibration_added_tokens and args.calibration_seed < 0:
        parser.error("--calibration-added-tokens needs a calibration seed and T >= 0")
    if args.calibration_seed in args.seeds:
        parser.error("--calibration-seed must not be one of the compared --seeds")
    overrides = text_bench_setup(args)
    calibration = run_benchmark(args, overrides)
    results: dict[float, dict[int, dict[str, dict]]] = {}
    for budget in args.budgets:
        for seed in args.seeds:
            for name in STRATEGIES:
                run_dir = args.runs / f"B-{budget:.0e}" / f"seed-{seed}" / name
                if finished(run_dir):
                    results.setdefault(budget, {}).setdefault(seed, {})[name] = summarise(run_dir)
    report = write_report(results, args.out, calibration)
    write_machine(args.out, "python bench/exp_planner.py " + " ".join(argv or sys.argv[1:]))
    print(report.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
