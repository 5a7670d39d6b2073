"""Experiment 8 - routed LMs against dense ones at equal active FLOPs, and the routed scaling law.

Every run is a fresh LM trained on the same number of tokens of Wikipedia-lead text (the isoFLOP
sweep's data: every lead but the held-out target-topic documents, BPE 1024, `explorer sweep`'s
`train_one`) and evaluated on the held-out target documents (loss in nats per token). At each dense
size N (non-embedding parameters) the model is trained dense and routed with E experts per layer,
K = 1: a routed model does the dense model's compute per token (plus its router), so at equal
tokens the runs of one size have equal active FLOPs (6·N_active·D, reported).

    grid      sizes x E in {1 (dense), 4, 16, 64} with the S-BASE router (the default)
    routers   the other routers and the controls at E = 16, every size (S-BASE's E = 16 runs are
              shared): switch; switch-unit (the switch router with a unit output gate); hash;
              random (a random expert per token: the parameters without the routing); dense-wide
              (the dense model with 16x wider MLPs: the routed models' total parameters, all active)

Every routed row also records what its routers did on the held-out text (learners/routing.py
`routing_stats`): the mean output gate, the busiest expert's load against an even share, S-BASE's
agreement between the balanced assignment it trains with and the argmax it is evaluated with, and
two sanity losses: hash routed by scrambled token ids, S-BASE evaluated on its balanced assignment.

Seeds set the initialisation and the batch order; the data split is fixed. Reported: loss per size
and E with 95% t-intervals; the routing gain (dense - routed loss, paired by seed) per size and E;
the fit of the routed law log L = a·log N + b·log E + c·log N·log E + d (Clark et al. 2022) by least
squares over every run, with 95% intervals from a bootstrap over seeds; plots of loss vs N per E and
of the gain vs N. c > 0 means the gain of more experts shrinks as N grows.

    python bench/exp_routing.py                           # 4 sizes x (4 E + the routers and controls) x 3 seeds
    python bench/exp_routing.py --sizes 30000 --experts 1 4 --seeds 0 --steps 20 --no-routers
Outputs bench/results/routing/: report.md, runs.csv, fit.json, loss_vs_n.png, gain_vs_n.png,
machine.json. Runs (resumable: a finished run is skipped) are rows of runs/bench-routing/runs.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import finish_report  # noqa: E402

DEFAULT_RUNS = ROOT / "runs" / "bench-routing"
DEFAULT_OUT = ROOT / "bench" / "results" / "routing"
ROUTER = "sbase"
COMPARED_ROUTERS = ("switch", "switch-unit", "hash", "random", "dense-wide")
DIAGNOSTICS = ("mean_gate", "eval_load", "agreement", "loss_scrambled_ids", "loss_balanced_eval")
COMPARE_EXPERTS = 16


def sweep_config(args):
    from explorer.analysis.sweep import SweepConfig

    return SweepConfig(name="bench-routing", budgets=(1e12,), sizes=tuple(args.sizes), seq_len=128,
                       batch_size=args.batch_size, vocab_size=1024, lr=3e-3, warmup_fraction=0.05, seed=0,
                       eval_tokens=args.eval_tokens)


def run_key(size: int, router: str, experts: int, seed: int) -> str:
    return f"{size}/{router}/E{experts}/seed{seed}"


def plan_runs(args) -> list[tuple[int, str, int, int]]:
    """(size, router, experts, seed) of every run; the costliest first (largest size, most experts)."""
    runs = {(s, "dense" if e == 1 else ROUTER, e, seed) for s in args.sizes for e in args.experts for seed in args.seeds}
    if args.routers:  # S-BASE at E = COMPARE_EXPERTS too, when the grid's experts lack it
        runs |= {(s, r, COMPARE_EXPERTS, seed) for s in args.sizes for r in (ROUTER, *COMPARED_ROUTERS)
                 for seed in args.seeds}
    return sorted(runs, key=lambda r: (-r[0], -r[2], r[1], r[3]))


_TEXT = None


def _init_worker(text, threads: int) -> None:
    import torch

    global _TEXT
    _TEXT = text
    torch.set_num_threads(threads)


def train_run(base, steps: int, size: int, router: str, experts: int, seed: int) -> dict:
    """One run through `explorer sweep`'s train_one: the budget is set so that it trains `steps` steps."""
    from explorer.analysis.sweep import resolve_size, train_one
    from explorer.run.config import LMRoutingConfig
    from learners.flops import ModelShape, non_embedding_params, training_flops

    shape = resolve_size(size)[1]
    dense = non_embedding_params(ModelShape(d_model=shape.hidden_size, n_layers=shape.num_layers,
                                            n_heads=shape.num_heads, ffn_dim=shape.intermediate_size,
                                            n_kv_heads=shape.num_kv_heads))
    budget = training_flops(dense, steps * base.batch_size * base.seq_len)
    lm = LMRoutingConfig(router=router, num_experts=max(experts, 2))
    cfg = replace(base, seed=seed, lm=lm, budgets=(budget,), sizes=(size,))
    row = train_one(cfg, budget, size, _TEXT)
    return {"key": run_key(size, router, experts, seed), "size": size, "router": router, "experts": experts,
            "seed": seed, "n_dense": dense, **{k: row[k] for k in ("n_params", "n_params_total", "tokens", "flops",
                                                                    "loss", "train_loss", "steps", "d_model",
                                                                    "n_layers", "seconds")},
            **{k: row[k] for k in DIAGNOSTICS if k in row}}


def run_pool(args, train, todo: list[tuple], done: dict) -> None:
    """`train(base, args.steps, *run)` for every run of `todo`, `args.jobs` at a time in spawned
    processes of `args.threads` torch threads (the training text sent once to each); each row is
    appended to RUNS/runs.jsonl as it finishes and kept in `done` under its key."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from explorer.analysis.sweep import append_row, prepare_text

    if not todo:
        return
    base = sweep_config(args)
    text = prepare_text(base, args.runs)
    print(f"training text: {text.train_tokens:,} tokens; {args.steps} steps x {base.batch_size * base.seq_len} "
          f"tokens per run", flush=True)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(text, args.threads)) as pool:
        queue, running = list(todo), {}
        while queue or running:
            while queue and len(running) < args.jobs:
                run = queue.pop(0)
                running[pool.submit(train, base, args.steps, *run)] = run
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                running.pop(future)
                row = future.result()
                append_row(args.runs, row)
                done[row["key"]] = row
                print(f"  {row['key']}: loss {row['loss']:.4f}  ({row['seconds']:.0f} s)", flush=True)


def run_grid(args) -> list[dict]:
    """Run what runs.jsonl does not hold yet, `--jobs` at a time; returns every row of the grid."""
    from explorer.analysis.sweep import read_rows

    args.runs.mkdir(parents=True, exist_ok=True)
    done = {r["key"]: r for r in read_rows(args.runs) if "router" in r}
    wanted = plan_runs(args)
    todo = [r for r in wanted if run_key(*r) not in done]
    print(f"{len(wanted)} runs, {len(wanted) - len(todo)} already done; {args.jobs} at a time, "
          f"{args.threads} torch thread(s) each", flush=True)
    run_pool(args, train_run, todo, done)
    return [done[run_key(*r)] for r in wanted]


def t_interval(x) -> tuple[float, float]:
    """Mean and 95% t-interval half-width (nan for one value)."""
    from explorer.analysis.report import mean_ci

    return mean_ci(x)[:2]


def _design(rows: list[dict]) -> np.ndarray:
    """Columns log N, log E, log N·log E, 1 of the routed law; N is the dense size (the active
    parameters less the routers), E = 1 for dense runs."""
    n = np.log([r["n_dense"] for r in rows])
    e = np.log([r["experts"] for r in rows])
    return np.column_stack([n, e, n * e, np.ones_like(n)])


def fit_routed_law(rows: list[dict]) -> np.ndarray:
    """(a, b, c, d) of log L = a·log N + b·log E + c·log N·log E + d by least squares."""
    coef, *_ = np.linalg.lstsq(_design(rows), np.log([r["loss"] for r in rows]), rcond=None)
    return coef


def bootstrap_law(rows: list[dict], resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, 4) refits, each on every (size, E) cell's seeds drawn with replacement."""
    rng = np.random.default_rng(seed)
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["size"], r["experts"]), []).append(r)
    fits = []
    for _ in range(resamples):
        sample = [c[i] for c in cells.values() for i in rng.integers(len(c), size=len(c))]
        fits.append(fit_routed_law(sample))
    return np.array(fits)


def count_floor(args) -> dict:
    """The count unigram's and bigram's held-out loss on the grid's own training tokens (learners/ngram.py)."""
    from explorer.analysis.sweep import prepare_text
    from learners.ngram import count_baselines

    text = prepare_text(sweep_config(args), args.runs)
    return count_baselines(text.train, text.heldout, text.eos_id, text.vocab_size)


def report(rows: list[dict], args, wall: float, floor: dict | None = None) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r))  # routed rows add their routers' diagnostics
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    sizes = sorted({r["size"] for r in rows})
    grid = [r for r in rows if r["router"] in ("dense", ROUTER)]
    experts = sorted({r["experts"] for r in grid})
    by = {(r["size"], r["router"], r["experts"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    lines = ["# Routed vs dense LMs at equal active FLOPs", "",
             f"`python bench/exp_routing.py {' '.join(args.argv)}`".replace(" `", "`"), "",
             f"Every run: {rows[0]['steps']} steps x {args.batch_size} x 128 tokens = {rows[0]['tokens']:,} tokens of "
             f"Wikipedia-lead text; loss = held-out target-topic nats per token; router {ROUTER} for E > 1; "
             f"seeds {seeds} (n = {len(seeds)} per cell; initialisation and batch order). "
             f"Grid wall time {wall / 60:.1f} min ({args.jobs} runs at a time, {args.threads} thread(s) each).", "",
             *([f"Count baselines on the same training tokens, same held-out text: unigram {floor['unigram']:.3f}, "
                f"bigram {floor['bigram']:.3f} nats per token (learners/ngram.py).", ""] if floor else []),
             "## Loss (mean ± 95% t-interval half-width)", "",
             "| size | d_model x layers | N dense | " + " | ".join(f"E = {e}" for e in experts) + " |",
             "|---|---|---:|" + "---:|" * len(experts)]
    gains = {}
    for s in sizes:
        cells = []
        first = next(r for r in grid if r["size"] == s)
        for e in experts:
            losses = [by[(s, "dense" if e == 1 else ROUTER, e, seed)]["loss"] for seed in seeds
                      if (s, "dense" if e == 1 else ROUTER, e, seed) in by]
            m, h = t_interval(losses)
            cells.append(f"{m:.4f} ± {h:.4f}")
            if e > 1:
                diff = [by[(s, "dense", 1, seed)]["loss"] - by[(s, ROUTER, e, seed)]["loss"] for seed in seeds
                        if (s, "dense", 1, seed) in by and (s, ROUTER, e, seed) in by]
                gains[(s, e)] = t_interval(diff)
        lines.append(f"| {s:,} | {first['d_model']} x {first['n_layers']} | {first['n_dense']:,} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Routing gain: dense loss - routed loss, paired by seed (> 0: routing helps)", "",
              "| size | " + " | ".join(f"E = {e}" for e in experts if e > 1) + " |",
              "|---|" + "---:|" * (len(experts) - 1)]
    for s in sizes:
        lines.append(f"| {s:,} | " + " | ".join(f"{gains[(s, e)][0]:+.4f} ± {gains[(s, e)][1]:.4f}"
                                                 for e in experts if e > 1) + " |")
    lines += ["", "Parameters (non-embedding; active = dense + routers, total = all experts):", "",
              "| size | E | active | total | FLOPs per run (6·N_active·D) | seconds per run (mean) |",
              "|---|---:|---:|---:|---:|---:|"]
    for s in sizes:
        for e in experts:
            rs = [r for r in grid if r["size"] == s and r["experts"] == e]
            lines.append(f"| {s:,} | {e} | {rs[0]['n_params']:,} | {rs[0]['n_params_total']:,} | "
                         f"{rs[0]['flops']:.3g} | {np.mean([r['seconds'] for r in rs]):.0f} |")
    if any(r["router"] in COMPARED_ROUTERS for r in rows):
        lines += router_table(rows, sizes, seeds)
    coef = fit_routed_law(grid)
    boot = bootstrap_law(grid, args.resamples)
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    names = ("a", "b", "c", "d")
    fit = {"form": "log L = a log N + b log E + c log N log E + d", "n_runs": len(grid),
           **{k: float(v) for k, v in zip(names, coef)},
           "interval_95": {k: [float(l_), float(h_)] for k, l_, h_ in zip(names, lo, hi)},
           "resamples": args.resamples}
    residual = np.log([r["loss"] for r in grid]) - _design(grid) @ coef
    fit["rmse_log_loss"] = float(np.sqrt(np.mean(residual ** 2)))
    (out / "fit.json").write_text(json.dumps(fit, indent=1) + "\n")
    lines += ["", "## The routed law, fitted to the grid", "",
              f"log L = a·log N + b·log E + c·log N·log E + d over {len(grid)} runs (N: dense non-embedding "
              f"parameters, E = 1 dense); 95% intervals from {args.resamples} bootstrap refits over seeds; "
              f"RMSE {fit['rmse_log_loss']:.4f} in log loss.", "",
              "| | estimate | 95% interval |", "|---|---:|---|"]
    lines += [f"| {k} | {v:+.5f} | [{lo_:+.5f}, {hi_:+.5f}] |" for k, v, lo_, hi_ in zip(names, coef, lo, hi)]
    slope = {s: coef[1] + coef[2] * math.log(next(r["n_dense"] for r in grid if r["size"] == s)) for s in sizes}
    lines += ["", "d log L / d log E = b + c·log N at each size (negative: more experts lower the loss): "
              + ", ".join(f"{s:,}: {v:+.4f}" for s, v in slope.items()) + "."]
    _plots(grid, experts, sizes, gains, out)
    finish_report(out, lines, "python bench/exp_routing.py " + " ".join(args.argv))


def _paired(by: dict, size: int, left: tuple, right: tuple, seeds, key: str = "loss", right_key: str = "loss"):
    """(mean, 95% half-width, n) of right[right_key] - left[key] over the seeds that have both runs
    (> 0: `left`'s is the lower loss)."""
    diff = [by[(size, *right, seed)][right_key] - by[(size, *left, seed)][key] for seed in seeds
            if (size, *left, seed) in by and (size, *right, seed) in by and key in by[(size, *left, seed)]]
    return (*t_interval(diff), len(diff)) if diff else (float("nan"), float("nan"), 0)


def router_table(rows: list[dict], sizes, seeds) -> list[str]:
    """Every router and control at E = COMPARE_EXPERTS beside dense: parameters, FLOPs, wall time,
    loss, its gain over dense (paired by seed) and over dense-wide (the same total parameters), and
    what its routers did."""
    by = {(r["size"], r["router"], r["experts"], r["seed"]): r for r in rows}
    e = COMPARE_EXPERTS
    names = [("dense", 1), *((name, e) for name in (ROUTER, *COMPARED_ROUTERS))]
    lines = ["", f"## Routers and controls at E = {e}", "",
             f"Gains are dense-side loss minus this row's, paired by seed (> 0: this row is better), mean ± 95% "
             f"t-interval half-width. *vs dense-wide*: against the dense model with {e}x wider MLPs, which has "
             "the routed models' total parameters (all active). Sanity columns: hash routed by scrambled ids "
             "(its loss minus the normal one: > 0 means the routing by token carries the gain), S-BASE evaluated "
             "on its balanced assignment (idem, the argmax protocol's loss minus it).", "",
             "| size | row | active params | total params | FLOPs per run | s per run | loss | gain vs dense | "
             "gain vs dense-wide | mean gate | eval load | S-BASE agreement | sanity |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in sizes:
        for name, experts in names:
            rs = [by[(s, name, experts, seed)] for seed in seeds if (s, name, experts, seed) in by]
            if not rs:
                continue
            m, h = t_interval([r["loss"] for r in rs])
            gain = _paired(by, s, (name, experts), ("dense", 1), seeds) if name != "dense" else None
            wide = _paired(by, s, (name, experts), ("dense-wide", e), seeds) if name not in ("dense", "dense-wide") \
                else None

            def mean_of(key):
                values = [r[key] for r in rs if r.get(key) is not None]
                return f"{np.mean(values):.3f}" if values else "-"
            sanity = "-"
            if name == "hash":
                d = _paired(by, s, ("hash", e), ("hash", e), seeds, key="loss", right_key="loss_scrambled_ids")
                sanity = f"scrambled ids {d[0]:+.3f} ± {d[1]:.3f}"
            elif name == ROUTER:
                d = _paired(by, s, (ROUTER, e), (ROUTER, e), seeds, key="loss_balanced_eval", right_key="loss")
                sanity = f"argmax − balanced {d[0]:+.3f} ± {d[1]:.3f}"
            lines.append(f"| {s:,} | {name}{'' if name == 'dense' else f' E={e}'} | {rs[0]['n_params']:,} | "
                         f"{rs[0]['n_params_total']:,} | {rs[0]['flops']:.3g} | "
                         f"{np.mean([r['seconds'] for r in rs]):.0f} | "
                         f"{m:.4f} ± {h:.4f} | "
                         + (f"{gain[0]:+.4f} ± {gain[1]:.4f}" if gain else "-") + " | "
                         + (f"{wide[0]:+.4f} ± {wide[1]:.4f}" if wide else "-") + " | "
                         f"{mean_of('mean_gate')} | {mean_of('eval_load')} | {mean_of('agreement')} | {sanity} |")
    return lines


def _plots(grid, experts, sizes, gains, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for e in experts:
        xs = [next(r["n_dense"] for r in grid if r["size"] == s) for s in sizes]
        ys = [np.mean([r["loss"] for r in grid if r["size"] == s and r["experts"] == e]) for s in sizes]
        ax.plot(xs, ys, "o-", label="dense" if e == 1 else f"E = {e}")
    ax.set(xscale="log", yscale="log", xlabel="dense non-embedding parameters N", ylabel="held-out loss",
           title="loss vs N per expert count")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_vs_n.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for e in experts[1:]:
        xs = [next(r["n_dense"] for r in grid if r["size"] == s) for s in sizes]
        m = np.array([gains[(s, e)][0] for s in sizes])
        h = np.nan_to_num(np.array([gains[(s, e)][1] for s in sizes]))
        ax.errorbar(xs, m, yerr=h, fmt="o-", capsize=3, label=f"E = {e}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="dense non-embedding parameters N", ylabel="dense - routed loss (nats/token)",
           title="routing gain vs N (95% intervals)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gain_vs_n.png", dpi=120)
    plt.close(fig)


def lm_grid_parser(doc: str, *, seeds: list[int], steps: int, jobs: int, runs: Path,
                   out: Path) -> argparse.ArgumentParser:
    """The options every LM grid of this kind takes (sizes, seeds, steps, batch, evaluation tokens,
    jobs, threads, folders); the script adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog="\n\n".join(doc.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[30_000, 100_000, 300_000, 1_000_000],
                   help="dense non-embedding parameter counts (a LLaMA shape is chosen for each)")
    p.add_argument("--seeds", type=int, nargs="+", default=seeds)
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps per run (every run: the same tokens)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=32_768)
    p.add_argument("--jobs", type=int, default=jobs, help="runs at a time, each in its own process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--runs", type=Path, default=runs, help="where runs.jsonl and the tokenizer live")
    p.add_argument("--out", type=Path, default=out)
    return p


def main(argv=None) -> int:
    p = lm_grid_parser(__doc__, seeds=[0, 1, 2], steps=500, jobs=2, runs=DEFAULT_RUNS, out=DEFAULT_OUT)
    p.add_argument("--experts", type=int, nargs="+", default=[1, 4, 16, 64], help="E per routed layer; 1 = dense")
    p.add_argument("--no-routers", dest="routers", action="store_false",
                   help=f"skip the router comparison ({', '.join(COMPARED_ROUTERS)} at E = {COMPARE_EXPERTS})")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap refits of the routed law")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if 1 not in args.experts:
        p.error("--experts must include 1: every gain is measured against the dense run")
    t0 = time.time()
    rows = run_grid(args)
    report(rows, args, time.time() - t0, count_floor(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
