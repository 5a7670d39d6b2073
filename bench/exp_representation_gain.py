"""Experiment 2 - representation gain: kNN and linear-probe accuracy on the target's held-out split.

base (no further SSL), target-only SSL, and SSL on target + data acquired by random, gp (softmax,
UCB), oracle, ppo and hybrid - all from the same per-seed base at equal SSL steps, 3 seeds. Runs
the missing part of the run grid (shared with experiment 1), then writes
bench/results/representation_gain/: report.md, runs.csv, summary.json, accuracy_vs_images.png,
machine.json. The README's headline table is this report's table.

    python bench/exp_representation_gain.py [--seeds 0 1 2] [--threads 1]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.exp_acquisition_efficiency import main as _main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(_main(section="representation", name="representation_gain",
                           title="Experiment 2: representation gain at equal SSL steps", doc=__doc__))
