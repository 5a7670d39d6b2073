"""The LM's regime: at which learning rate and training length does held-out loss fall with size?

Dense LMs of the routing benchmark's sizes (bench/exp_routing.py: LLaMA shapes from 30k to 1M
non-embedding parameters, BPE 1024 on the Wikipedia leads, held-out target-topic text) are trained
for the same number of steps (so the same tokens) at each learning rate of a small grid, cosine to
10% after a 5% warm-up, and evaluated on the held-out text beside the count unigram and bigram on
the same training tokens (learners/ngram.py). The report gives, per size, the loss at every lr and
the best one; per lr, whether the loss falls with N (each step down, paired by seed); and how far
the best run at the largest size is below the bigram. What it is for: choosing the lr rule and the
steps that the routing benchmark, the isoFLOP sweep and the planner's law are then run at.

    python bench/exp_lm_regime.py                                  # 4 sizes x 3 lrs x 2,000 steps, seed 0
    python bench/exp_lm_regime.py --sizes 30000 100000 --lrs 3e-3 --steps 50 --out /tmp/regime

Outputs OUT (default bench/results/lm_regime/): report.md, runs.csv, loss_vs_n.png, machine.json.
Runs (resumable: a finished run is skipped) are rows of RUNS/runs.jsonl.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.exp_routing import count_floor, lm_grid_parser, run_pool, t_interval  # noqa: E402
from bench.machine import finish_report  # noqa: E402

DEFAULT_RUNS = ROOT / "runs" / "bench-lm-regime"
DEFAULT_OUT = ROOT / "bench" / "results" / "lm_regime"


def run_key(size: int, lr: float, steps: int, seed: int) -> str:
    return f"{size}/lr{lr:g}/steps{steps}/seed{seed}"


def train_dense(base, steps: int, size: int, lr: float, seed: int) -> dict:
    from bench.exp_routing import train_run

    row = train_run(replace(base, lr=lr), steps, size, "dense", 1, seed)
    return {**row, "key": run_key(size, lr, steps, seed), "lr": lr}


def run_all(args) -> list[dict]:
    """Train what runs.jsonl does not hold yet, `--jobs` at a time; every wanted row, in plan order."""
    from explorer.analysis.sweep import read_rows

    args.runs.mkdir(parents=True, exist_ok=True)
    done = {r["key"]: r for r in read_rows(args.runs) if "lr" in r}
    wanted = sorted(((s, lr, args.steps, seed) for s in args.sizes for lr in args.lrs for seed in args.seeds),
                    key=lambda r: (-r[0], r[1], r[3]))  # the costliest first
    todo = [r for r in wanted if run_key(*r) not in done]
    print(f"{len(wanted)} runs, {len(wanted) - len(todo)} already done; {args.jobs} at a time, "
          f"{args.threads} torch thread(s) each", flush=True)
    run_pool(args, train_dense, [(size, lr, seed) for size, lr, _, seed in todo], done)
    return [done[run_key(*r)] for r in wanted]


def report(rows: list[dict], args, wall: float, floor: dict) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    sizes, lrs = sorted({r["size"] for r in rows}), sorted({r["lr"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["size"], r["lr"], r["seed"]): r for r in rows}

    def losses(s, lr):
        return [by[(s, lr, seed)]["loss"] for seed in seeds if (s, lr, seed) in by]

    mean = {(s, lr): float(np.mean(losses(s, lr))) for s in sizes for lr in lrs}
    best = {s: min(lrs, key=lambda lr: mean[(s, lr)]) for s in sizes}
    lines = ["# The LM's regime: held-out loss by size, learning rate and training length", "",
             f"`python bench/exp_lm_regime.py {' '.join(args.argv)}`".replace(" `", "`"), "",
             f"Every run: dense, {args.steps} steps x {args.batch_size} x 128 tokens = "
             f"{args.steps * args.batch_size * 128:,} tokens of Wikipedia-lead text, cosine to 10% of the lr after a "
             f"5% warm-up; loss = held-out target-topic nats per token; seeds {seeds} (n = {len(seeds)} per cell). "
             f"Wall time {wall / 60:.1f} min ({args.jobs} runs at a time, {args.threads} thread(s) each).", "",
             f"Count baselines fitted on all {floor['train_tokens']:,} training tokens (a run sees "
             f"{args.steps * args.batch_size * 128 / floor['train_tokens']:.2f}x that many, packed in its own order), "
             f"same held-out text: unigram {floor['unigram']:.3f}, bigram {floor['bigram']:.3f} nats per token "
             "(learners/ngram.py).", "",
             "## Loss (mean ± 95% t-interval half-width when n > 1); best lr per size in bold", "",
             "| size | d_model x layers | N | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best − bigram |",
             "|---|---|---:|" + "---:|" * (len(lrs) + 1)]
    for s in sizes:
        first = next(r for r in rows if r["size"] == s)
        cells = []
        for lr in lrs:
            m, h = t_interval(losses(s, lr))
            cell = f"{m:.4f}" + (f" ± {h:.4f}" if math.isfinite(h) else "")
            cells.append(f"**{cell}**" if lr == best[s] else cell)
        lines.append(f"| {s:,} | {first['d_model']} x {first['n_layers']} | {first['n_params']:,} | "
                     + " | ".join(cells) + f" | {mean[(s, best[s])] - floor['bigram']:+.4f} |")
    lines += ["", "## Does loss fall with N? Each step up in size: smaller − larger loss, paired by seed "
              "(> 0: the larger model is better)", "",
              "| lr | " + " | ".join(f"{a:,} → {b:,}" for a, b in zip(sizes, sizes[1:])) + " |",
              "|---|" + "---:|" * (len(sizes) - 1)]
    for lr in [*lrs, "best"]:
        cells = []
        for a, b in zip(sizes, sizes[1:]):
            la, lb = (best[a], best[b]) if lr == "best" else (lr, lr)
            diff = [by[(a, la, seed)]["loss"] - by[(b, lb, seed)]["loss"] for seed in seeds
                    if (a, la, seed) in by and (b, lb, seed) in by]
            m, h = t_interval(diff)
            cells.append(f"{m:+.4f}" + (f" ± {h:.4f}" if math.isfinite(h) else ""))
        lines.append(f"| {lr if lr == 'best' else f'{lr:g}'} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds per run (mean): " + ", ".join(
        f"{s:,}: {np.mean([r['seconds'] for r in rows if r['size'] == s]):.0f}" for s in sizes) + "."]
    _plot(rows, sizes, lrs, mean, floor, out)
    finish_report(out, lines, "python bench/exp_lm_regime.py " + " ".join(args.argv))


def _plot(rows, sizes, lrs, mean, floor, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = {s: next(r["n_params"] for r in rows if r["size"] == s) for s in sizes}
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for lr in lrs:
        ax.plot([n[s] for s in sizes], [mean[(s, lr)] for s in sizes], "o-", label=f"lr {lr:g}")
    ax.axhline(floor["bigram"], color="grey", ls="--", lw=0.8, label="count bigram")
    ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="held-out loss (nats/token)",
           title="dense LM: loss vs N per learning rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_vs_n.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = lm_grid_parser(__doc__, seeds=[0], steps=2000, jobs=1, runs=DEFAULT_RUNS, out=DEFAULT_OUT)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="peak learning rates")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    rows = run_all(args)
    report(rows, args, time.time() - t0, count_floor(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
