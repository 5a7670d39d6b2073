"""The policy grid on the world web, on both installed targets, from one pre-registered plan.

The plan (`configs/grid-world.yaml`) names the targets' configs, the seeds, the conditions and the
config overrides; it is committed before the grid runs (BENCHMARKS.md, section 0c). Each target's
grid is `bench/acquisition_grid.py` (one base per seed, a target-only control and the raw-pixel
baselines beside every seed's runs); the targets run side by side, one process each at
`--threads` torch threads, so 2 targets x 1 thread use 2 cores. Finished runs are skipped, so the
command can be stopped and run again.

Writes, per target, OUT/<target>/report.md, runs.csv (every run's curve and every seed's controls:
base, target only, pixels, with kNN and probe) and summary.json; and OUT/report.md, the paired
differences the plan's analysis names (per seed, then mean ± 95% t-interval).

    python bench/exp_world_grid.py                       # the committed plan
    python bench/exp_world_grid.py --plan my-plan.yaml --runs runs/my-grid --out bench/results/my-grid
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import print_report  # noqa: E402

# (left, right): the paired differences of the analysis, per seed, kNN and probe
DIFFERENCES = [("gp-ucb", "random"), ("gp-ucb", "target only"), ("oracle", "target only"),
               ("random", "target only"), ("knn-retrieval", "target only"), ("gp-ucb", "knn-retrieval"),
               ("oracle", "gp-ucb")]
KEYS = {"kNN": "knn_accuracy", "probe": "linear_probe_accuracy"}


def load_plan(path: Path) -> dict:
    plan = yaml.safe_load(path.read_text()) or {}
    missing = [k for k in ("targets", "seeds", "conditions") if not plan.get(k)]
    if missing:
        raise ValueError(f"{path}: the plan needs {', '.join(missing)}")
    for name, config in plan["targets"].items():
        if not (ROOT / config).exists():
            raise FileNotFoundError(f"{path}: target {name}'s config {config} does not exist")
    return plan


def grid_command(plan: dict, config: str, out: Path, threads: int) -> list[str]:
    command = [sys.executable, str(ROOT / "bench" / "acquisition_grid.py"), "--config", str(ROOT / config),
               "--out", str(out), "--threads", str(threads), "--seeds", *map(str, plan["seeds"]),
               "--conditions", *plan["conditions"]]
    for key, value in (plan.get("set") or {}).items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    return command


def run_targets(plan: dict, runs: Path, threads: int, jobs: int) -> None:
    """Each target's grid in its own process, `jobs` at a time; logs in RUNS/<target>.log."""
    runs.mkdir(parents=True, exist_ok=True)
    pending = list(plan["targets"].items())
    running: list[tuple[str, subprocess.Popen, object]] = []
    failed = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    while pending or running:
        while pending and len(running) < jobs:
            name, config = pending.pop(0)
            log = (runs / f"{name}.log").open("a")
            print(f"== {name}: {config} (log {runs / f'{name}.log'})", flush=True)
            running.append((name, subprocess.Popen(grid_command(plan, config, runs / name, threads),
                                                   stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(2)
        for name, proc, log in list(running):
            if proc.poll() is not None:
                running.remove((name, proc, log))
                log.close()
                print(f"== {name}: {'done' if proc.returncode == 0 else f'FAILED ({proc.returncode})'}", flush=True)
                if proc.returncode:
                    failed.append(name)
    if failed:
        raise SystemExit(f"grids failed: {', '.join(failed)} (see their logs in {runs}; run again to resume)")


def final_rows(runs_csv: Path) -> dict[str, dict[int, dict[str, float]]]:
    """condition -> seed -> {knn_accuracy, linear_probe_accuracy, relevant, accepted} at the end."""
    import csv

    out: dict[str, dict[int, dict[str, float]]] = {}
    for row in csv.DictReader(runs_csv.open()):
        values = {k: float(row[k]) for k in (*KEYS.values(), "relevant", "accepted") if row.get(k)}
        out.setdefault(row["condition"], {})[int(row["seed"])] = values  # later iterations overwrite earlier
    return out


def difference_lines(finals: dict, seeds: list[int]) -> list[str]:
    from explorer.analysis.report import mean_ci

    lines = ["| difference | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± 95% CI (n) |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for metric, key in KEYS.items():
        for left, right in DIFFERENCES:
            if left not in finals or right not in finals:
                continue
            diffs = [100 * (finals[left][s][key] - finals[right][s][key])
                     if s in finals[left] and s in finals[right] else None for s in seeds]
            mean, half, n = mean_ci(diffs)
            cells = " | ".join("-" if d is None else f"{d:+.2f}" for d in diffs)
            ci = f"{mean:+.2f} ± {half:.2f} ({n})" if n > 1 else f"{mean:+.2f} ({n})"
            lines.append(f"| {metric}: {left} − {right} | {cells} | {ci} |")
    return lines


def share_line(finals: dict, seeds: list[int], method: str = "gp-ucb") -> str:
    """The method's gain over target only as a share of the oracle's, from the mean gains (kNN)."""
    if not all(c in finals for c in (method, "oracle", "target only")):
        return ""
    key = KEYS["kNN"]
    gain = [finals[method][s][key] - finals["target only"][s][key] for s in seeds]
    oracle = [finals["oracle"][s][key] - finals["target only"][s][key] for s in seeds]
    share = sum(gain) / sum(oracle) if sum(oracle) else float("nan")
    return f"{method}'s kNN gain over target only is {100 * share:.0f}% of the oracle's (ratio of the mean gains)."


def write_report(plan: dict, runs: Path, out: Path) -> Path:
    from explorer.analysis.report import find_runs, read_run, web_lines
    from explorer.analysis.report import write_report as target_report

    lines = ["# The policy grid on the world web", "",
             f"Seeds {', '.join(map(str, plan['seeds']))} (n = {len(plan['seeds'])}); conditions "
             f"{', '.join(plan['conditions'])}; overrides {plan.get('set') or {}}. Differences in accuracy "
             "points, paired by seed (same base, same probe split); mean ± 95% Student-t half-width.", ""]
    for name in plan["targets"]:
        target_out = out / name
        target_report([runs / name], target_out, title=f"World grid: {name}", sections=("efficiency", "representation"))
        finals = final_rows(target_out / "runs.csv")
        seeds = plan["seeds"]
        lines += [f"## {name}", "", *web_lines([read_run(p) for p in find_runs([runs / name])]), "",
                  f"Per-condition tables and every run's curve: `{name}/report.md`, "
                  f"`{name}/runs.csv`.", "", *difference_lines(finals, seeds), "", share_line(finals, seeds), ""]
        relevant = {c: [finals[c][s].get("relevant") for s in seeds if s in finals[c]]
                    for c in plan["conditions"] if c in finals}
        lines += ["Relevant images accepted per seed: " +
                  "; ".join(f"{c} {', '.join(f'{v:.0f}' for v in vals if v is not None)}"
                            for c, vals in relevant.items()), ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=Path, default=ROOT / "configs" / "grid-world.yaml")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-world-grid", help="run folders")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "world_grid")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per target's process")
    parser.add_argument("--jobs", type=int, default=2, help="targets run at once")
    parser.add_argument("--report-only", action="store_true", help="only write the report from the runs")
    args = parser.parse_args(argv)
    plan = load_plan(args.plan)
    t0 = time.time()
    if not args.report_only:
        run_targets(plan, args.runs, args.threads, args.jobs)
    report = write_report(plan, args.runs, args.out)
    print_report(args.out, report, argv, t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
