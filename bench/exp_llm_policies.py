"""Experiment 8 - the pretrained-LLM query writer: does PPO make it better than its prompt alone?

Conditions of the run grid (bench/acquisition_grid.py, configs/science.yaml, the same per-seed
bases, targets and query budget as experiments 1 and 2): random, gp-ucb, llm-prompt (Gemma 3 270M
from the prompt alone: past queries with their rewards), ppo (the same LM and prompt, LoRA
adapters tuned with PPO on the query rewards), hybrid (GP seeds reworded by the LM) and the
byte-level LM trained from scratch (ppo-tiny, hybrid-tiny). Reported per iteration, mean ± 95%
t-interval over seeds: relevant images accepted so far (hidden ground truth) and the mean query
reward; for the LLM policies the seconds spent generating and in the PPO update, the KL to the
reference and the clean-up verdicts; and paired differences at the last iteration (ppo − random,
ppo − llm-prompt). Runs what is missing first.

    python bench/exp_llm_policies.py                   # seeds 0 1 2
    python bench/exp_llm_policies.py --seeds 0 --conditions random llm-prompt ppo
Outputs bench/results/llm_policies/: report.md, curves.csv, summary.json, machine.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.acquisition_grid import ROOT, add_grid_arguments, run_grid_from_args  # noqa: E402
from bench.machine import finish_report  # noqa: E402

CONDITIONS = ["random", "gp-ucb", "llm-prompt", "ppo", "hybrid", "hybrid-prompt", "ppo-tiny", "hybrid-tiny"]
PAIRS = [("ppo", "random"), ("ppo", "llm-prompt"), ("llm-prompt", "random"), ("hybrid", "random"),
         ("hybrid", "gp-ucb"),  # hybrid minus the GP alone: what the LM's rewordings add
         ("hybrid", "hybrid-prompt")]  # hybrid minus its never-updated twin: what PPO adds to it


def curves(run_dir: Path) -> dict | None:
    """Per iteration: relevant accepted so far, mean query reward, the policy's seconds and KL."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][1:]
    relevant = np.cumsum([round((r.get("precision_accepted") or 0.0) * r["accepted"]) for r in rows])
    stats = [r.get("policy_stats") or {} for r in rows]
    control = json.loads((run_dir.parent / "target-only.json").read_text())["eval_knn_accuracy"]
    knn = rows[-1].get("eval_knn_accuracy") if rows else None
    return {"iterations": len(rows), "relevant": relevant.tolist(), "accepted": sum(r["accepted"] for r in rows),
            "knn": knn, "delta_knn": None if knn is None else knn - control,
            "reward": [float(np.mean([q for q in r["query_rewards"] if q is not None] or [0.0])) for r in rows],
            "generate_s": [s.get("generate_seconds") for s in stats], "ppo_s": [s.get("ppo_seconds") for s in stats],
            "kl": [s.get("kl_to_reference") for s in stats], "seconds": [r.get("seconds") for r in rows],
            "cleanup": stats[-1].get("cleanup", {}) if stats else {}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_arguments(parser, "--runs")
    parser.set_defaults(conditions=CONDITIONS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "llm_policies")
    parser.add_argument("--report-only", action="store_true", help="report the runs there are; run nothing")
    args = parser.parse_args(argv)
    from explorer.analysis.report import fmt, mean_ci

    if not args.report_only:
        run_grid_from_args(args)
    runs = {name: {seed: c for seed in args.seeds if (c := curves(args.grid / f"seed-{seed}" / name))}
            for name in args.conditions}
    length = max((c["iterations"] for seeds in runs.values() for c in seeds.values()), default=0)
    runs = {name: {seed: c for seed, c in seeds.items() if c["iterations"] == length}  # finished runs only
            for name, seeds in runs.items()}
    runs = {name: seeds for name, seeds in runs.items() if seeds}
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "curves.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["condition", "seed", "iteration", "relevant_so_far", "mean_query_reward", "generate_s",
                         "ppo_s", "kl_to_reference", "seconds"])
        for name, seeds in runs.items():
            for seed, c in seeds.items():
                for i in range(c["iterations"]):
                    writer.writerow([name, seed, i + 1, c["relevant"][i], round(c["reward"][i], 6), c["generate_s"][i],
                                     c["ppo_s"][i], c["kl"][i], c["seconds"][i]])
    iterations = length
    per_iter = lambda name, key, i: mean_ci(c[key][i] for c in runs[name].values() if i < len(c[key]))  # noqa: E731
    head = "| condition | n | " + " | ".join(f"it {i + 1}" for i in range(iterations)) + " |"
    rule = "|---|---:|" + "---:|" * iterations
    lines = ["# Experiment 8: the pretrained-LLM query writer", "",
             f"Seeds {', '.join(map(str, args.seeds))} of the run grid ({args.config.name}); mean ± 95% t-interval "
             "over seeds.", "", "Relevant images accepted so far (hidden ground truth):", "", head, rule]
    summary: dict = {"relevant": {}, "reward": {}, "pairs": {}, "cost": {}}
    for name, seeds in runs.items():
        cells = [fmt(*per_iter(name, "relevant", i)[:2], 0) for i in range(iterations)]
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cells) + " |")
        summary["relevant"][name] = [per_iter(name, "relevant", i)[:2] for i in range(iterations)]
    lines += ["", "Mean query reward per iteration (what PPO is trained on):", "", head, rule]
    for name, seeds in runs.items():
        cells = [fmt(*per_iter(name, "reward", i)[:2], 3) for i in range(iterations)]
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cells) + " |")
        summary["reward"][name] = [per_iter(name, "reward", i)[:2] for i in range(iterations)]
    lines += ["", "Paired differences in relevant images at the last iteration (same seed):", "",
              "| difference | n | mean ± 95% | per seed |", "|---|---:|---:|---|"]
    for a, b in PAIRS:
        if a in runs and b in runs:
            both = sorted(set(runs[a]) & set(runs[b]))
            diffs = [runs[a][s]["relevant"][-1] - runs[b][s]["relevant"][-1] for s in both]
            d = mean_ci(diffs)
            lines.append(f"| {a} − {b} | {d[2]} | {fmt(d[0], d[1], 0)} | {' / '.join(f'{x:+d}' for x in diffs)} |")
            summary["pairs"][f"{a} - {b}"] = {"mean_ci": d[:2], "per_seed": diffs}
    lines += ["", "At the last iteration: accepted images, their precision, kNN accuracy of the encoder and its "
              "paired difference from the same seed's target-only control (equal SSL steps):", "",
              "| condition | n | accepted | relevant | precision | kNN acc | Δ kNN vs target only |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, seeds in runs.items():
        cs = list(seeds.values())
        lines.append(f"| {name} | {len(cs)} | {fmt(*mean_ci(c['accepted'] for c in cs)[:2], 0)} "
                     f"| {fmt(*mean_ci(c['relevant'][-1] for c in cs)[:2], 0)} "
                     f"| {fmt(*mean_ci(c['relevant'][-1] / c['accepted'] for c in cs if c['accepted'])[:2], 2)} "
                     f"| {fmt(*mean_ci(c['knn'] for c in cs)[:2], 4)} | {fmt(*mean_ci(c['delta_knn'] for c in cs)[:2], 4)} |")
    llm = [n for n in runs if n in ("llm-prompt", "ppo", "hybrid", "hybrid-prompt")]
    if llm:
        lines += ["", "Cost per iteration (the loop's own timing, `policy_stats` in metrics.jsonl) and the KL of "
                  "ppo's samples to the reference after its update:", "",
                  "| condition | iteration s | of which generation s | of which PPO update s | KL to reference "
                  "| clean-up verdicts (run total, seed " + str(args.seeds[0]) + ") |", "|---|---:|---:|---:|---:|---|"]
        for name in llm:
            cost = {k: mean_ci(v for c in runs[name].values() for v in c[k] if v is not None)[:2]
                    for k in ("seconds", "generate_s", "ppo_s", "kl")}
            first = runs[name].get(args.seeds[0]) or next(iter(runs[name].values()))
            lines.append(f"| {name} | {fmt(*cost['seconds'], 0)} | {fmt(*cost['generate_s'], 1)} "
                         f"| {fmt(*cost['ppo_s'], 1)} | {fmt(*cost['kl'], 2)} "
                         f"| {', '.join(f'{k} {v}' for k, v in first['cleanup'].items())} |")
            summary["cost"][name] = cost
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    finish_report(args.out, lines, "python bench/exp_llm_policies.py " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
