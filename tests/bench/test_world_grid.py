"""bench/exp_world_grid.py: the plan it runs and the paired differences it reports."""

import csv
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import exp_world_grid as grid  # noqa: E402


@pytest.mark.parametrize("name, frozen_stages", [("grid-world.yaml", 4), ("grid-world-2.yaml", 5)])
def test_the_committed_plans_load_and_their_overrides_are_config_fields(name, frozen_stages):
    from explorer.run.config import load_config

    plan = grid.load_plan(REPO / "configs" / name)
    assert len(plan["seeds"]) >= 5 and set(plan["targets"]) == {"fashion-mnist", "mnist"}
    for config in plan["targets"].values():
        resolved = load_config(REPO / config, plan.get("set") or {})  # an unknown field raises
        assert resolved.learner.frozen_stages == frozen_stages  # the learner each plan ran (BENCHMARKS 0c, 0d)
    command = grid.grid_command(plan, plan["targets"]["mnist"], Path("out"), threads=1)
    seeds = command[command.index("--seeds") + 1:command.index("--conditions")]
    assert seeds == [str(s) for s in plan["seeds"]]


def test_a_plan_without_seeds_is_refused(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("targets: {mnist: configs/world-mnist.yaml}\nconditions: [random]\n")
    with pytest.raises(ValueError, match="seeds"):
        grid.load_plan(path)


def test_differences_are_paired_by_seed(tmp_path):
    path = tmp_path / "runs.csv"
    rows = [("target only", 1, "", 0.80, 0.90), ("target only", 2, "", 0.70, 0.80),
            ("random", 1, 0, 0.10, 0.10), ("random", 1, 20, 0.81, 0.90),  # the last iteration counts
            ("random", 2, 20, 0.72, 0.80), ("gp-ucb", 1, 20, 0.83, 0.91), ("gp-ucb", 2, 20, 0.75, 0.81),
            ("oracle", 1, 20, 0.84, 0.92), ("oracle", 2, 20, 0.76, 0.82)]
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["condition", "seed", "iteration", "knn_accuracy", "linear_probe_accuracy"])
        out.writerows(rows)
    finals = grid.final_rows(path)
    lines = grid.difference_lines(finals, [1, 2])
    # gp - random: +2 and +3 points, per seed, not +3 and +2 or a difference of means over other seeds
    assert "| kNN: gp-ucb − random | +2.00 | +3.00 | +2.50 ± 6.35 (2) |" in lines
    assert "| kNN: oracle − target only | +4.00 | +6.00 |" in " ".join(lines)
    # gp's gain (3 + 5) over the oracle's (4 + 6)
    assert "80% of the oracle's" in grid.share_line(finals, [1, 2])
