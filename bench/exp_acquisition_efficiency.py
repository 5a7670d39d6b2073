"""Experiment 1 - acquisition efficiency: precision of acquired data and cumulative reward vs queries.

random, gp (softmax and UCB), oracle, ppo and hybrid over the same vocabulary and query budget,
3 seeds, mean ± 95% CI. Runs the missing part of the run grid (bench/acquisition_grid.py, shared
with experiment 2), then writes bench/results/acquisition_efficiency/: report.md, runs.csv,
summary.json, precision_vs_queries.png, reward_vs_queries.png, machine.json.

    python bench/exp_acquisition_efficiency.py [--seeds 0 1 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.acquisition_grid import ROOT, add_grid_arguments, run_grid_from_args  # noqa: E402
from bench.machine import write_machine  # noqa: E402


def main(argv: list[str] | None = None, *, section: str = "efficiency", name: str = "acquisition_efficiency",
         title: str = "Experiment 1: acquisition efficiency", doc: str = __doc__) -> int:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_arguments(parser, "--runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / name)
    args = parser.parse_args(argv)
    from explorer.analysis.report import write_report

    run_dirs = run_grid_from_args(args)
    report = write_report(run_dirs, args.out, title=title, sections=(section,))
    write_machine(args.out, " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]))
    print(report.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
