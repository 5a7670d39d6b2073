"""bench/bench_gpu.py runs on the CPU (CI has no GPU) and writes its table: learner rates, model FLOPs
per step and, given a peak, the utilisation."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import bench_gpu  # noqa: E402


def test_the_gpu_bench_runs_on_the_cpu_and_reports_utilisation(tmp_path):
    assert bench_gpu.main(["--device", "cpu", "--only", "moco-demo", "lm-demo", "--steps", "1",
                           "--peak-tflops", "1", "--out", str(tmp_path)]) == 0
    rows = {r["bench"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert set(rows) == {"moco-demo", "lm-demo"}
    for r in rows.values():
        assert r["rate"] > 0 and r["flops_per_step"] > 0
        assert r["mfu"] == round(r["flops_per_step"] / r["step_s"] / 1e12, 4)
    # MoCo's count covers two views forward and backward plus the momentum branch: > 2x the online forward
    assert rows["moco-demo"]["flops_per_step"] > 1e9
    assert "| moco-demo |" in (tmp_path / "report.md").read_text()
