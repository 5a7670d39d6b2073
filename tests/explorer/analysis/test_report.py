"""explorer report: the numbers in the tables are the runs' numbers, aggregated as documented."""

import csv
import json
import math

import pytest

from explorer.analysis.report import find_runs, mean_ci, read_run, write_report
from explorer.cli import main
from explorer.run.image import ImageLoop

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_mean_ci_is_the_student_t_interval():
    mean, half, n = mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) * sd / sqrt(n), sd = 1
    assert math.isnan(mean_ci([0.5])[1]) and mean_ci([0.5])[0] == 0.5
    assert mean_ci([float("nan"), None])[2] == 0


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory, tiny_experiment, engine):
    """Two real tiny random-policy runs (seeds 0 and 1) in one folder, as a grid lays them out."""
    root = tmp_path_factory.mktemp("grid")
    for seed in (0, 1):
        cfg = tiny_experiment(seed=seed, policy={"name": "random", "queries_per_iteration": 4})
        ImageLoop(cfg, root / f"seed-{seed}" / "random", engine_url=engine.url,
                        progress=False).run(log=lambda s: None)
    return root


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_report_tables_are_the_runs_numbers(two_seeds, small_corpus, tmp_path):
    runs = find_runs([two_seeds])
    assert len(runs) == 2
    report = write_report([two_seeds], tmp_path / "report")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    finals = []
    for run_dir in runs:
        lines = _metrics(run_dir)
        accepted = sum(m["accepted"] for m in lines[1:])
        relevant = sum(m["accepted"] * (m["precision_accepted"] or 0.0) for m in lines[1:])
        finals.append((accepted, relevant / accepted, lines[-1]["eval_knn_accuracy"]))
        curve = read_run(run_dir)
        assert curve.queries[-1] == sum(len(m["queries"]) for m in lines[1:])
        assert curve.reward[-1] == pytest.approx(sum(sum(m["query_rewards"]) for m in lines[1:]))
    stats = summary["random"]
    assert stats["accepted"]["mean"] == pytest.approx(sum(f[0] for f in finals) / 2)
    assert stats["precision"]["mean"] == pytest.approx(sum(f[1] for f in finals) / 2)
    assert stats["eval_knn_accuracy"]["mean"] == pytest.approx(sum(f[2] for f in finals) / 2)
    assert stats["eval_knn_accuracy"]["n"] == 2
    # each run's base (iteration 0) is its own starting encoder: two base rows, one per run
    assert summary["base"]["eval_knn_accuracy"]["n"] == 2
    text = report.read_text()
    assert "| random | 2 |" in text and "## Representation" in text
    rate = small_corpus.meta["base_rate"]["fashion-mnist"]  # the web the runs searched, and its base rate
    assert f"Web: {small_corpus.root}, {len(small_corpus):,} images; base rate of the fashion-mnist target's " \
           f"kind: {rate:.1%}." in text
    rows = list(csv.DictReader((tmp_path / "report" / "runs.csv").open()))
    # every iteration of every run, then each run's own base (the seed's control rows)
    assert len(rows) == sum(len(_metrics(r)) for r in runs) + 2
    bases = [r for r in rows if r["condition"] == "base"]
    assert sorted(int(r["seed"]) for r in bases) == [0, 1]
    for row in bases:
        first = _metrics(runs[int(row["seed"])])[0]
        assert float(row["knn_accuracy"]) == pytest.approx(first["eval_knn_accuracy"], rel=1e-5)
    for name in ("precision_vs_queries.png", "reward_vs_queries.png", "accuracy_vs_images.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG_MAGIC


def test_runs_csv_holds_the_controls_of_each_seed(two_seeds, tmp_path):
    import shutil

    grid = tmp_path / "grid"
    shutil.copytree(two_seeds, grid)
    for seed, knn in ((0, 0.5), (1, 0.25)):  # the target-only controls a grid writes beside its runs
        (grid / f"seed-{seed}" / "target-only.json").write_text(
            json.dumps({"eval_knn_accuracy": knn, "eval_linear_probe_accuracy": knn + 0.125}))
    write_report([grid], tmp_path / "report")
    rows = [r for r in csv.DictReader((tmp_path / "report" / "runs.csv").open()) if r["condition"] == "target only"]
    assert sorted((int(r["seed"]), float(r["knn_accuracy"]), float(r["linear_probe_accuracy"])) for r in rows) == \
        [(0, 0.5, 0.625), (1, 0.25, 0.375)]


def test_report_cli_and_a_clear_error_for_a_folder_without_runs(two_seeds, tmp_path, capsys):
    assert main(["report", str(two_seeds / "seed-0" / "random"), "--out", str(tmp_path / "r")]) == 0
    assert "| random | 1 |" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no run folders"):
        write_report([tmp_path / "empty"], tmp_path / "r2")


def test_gain_per_relevant_is_the_slope_of_paired_gains_on_relevant_images():
    from types import SimpleNamespace

    from explorer.analysis.report import gain_per_relevant

    control = {"target only": {"b0": {"eval_knn_accuracy": 0.80}, "b1": {"eval_knn_accuracy": 0.70}}}
    run = lambda base, relevant, gain: SimpleNamespace(  # noqa: E731
        base=base, relevant=[0.0, relevant], knn=[0.0, control["target only"][base]["eval_knn_accuracy"] + gain])
    groups = {"gp": [run("b0", 1000, 0.003), run("b1", 3000, 0.007)],
              "random": [run("b0", 0, 0.001), run("b1", 500, 0.002)],
              "other": [SimpleNamespace(base="no control", relevant=[0.0, 9e9], knn=[0.0, 1.0])]}
    [line] = gain_per_relevant(groups, control)
    assert "all 4 acquisition runs" in line and "+0.0010 + (+0.0020 ± 0.0000) per 1,000" in line
    assert "r = 1.00" in line


def test_the_web_line_of_an_own_target_counts_the_kinds_its_truth_names(small_corpus, tmp_path):
    """A folder target has no base rate in corpus.json: the line reads the share of `target.relevant`
    (hidden sources or classes) from the manifest, and names the folder, not the path it had."""
    from types import SimpleNamespace

    import pyarrow.parquet as pq
    import yaml

    from explorer.analysis.report import web_lines

    run = tmp_path / "run"
    run.mkdir()
    kinds = ["Sandal", "mnist"]
    (run / "config.yaml").write_text(yaml.safe_dump({"corpus": str(small_corpus.root),
                                                     "target": {"name": "/home/u/my-shoes", "relevant": kinds}}))
    hidden = pq.read_table(small_corpus.root / "manifest.parquet", columns=["source", "class_name"]).to_pydict()
    share = sum(s in kinds or c in kinds for s, c in zip(hidden["source"], hidden["class_name"])) / len(small_corpus)
    assert 0 < share < 1
    assert web_lines([SimpleNamespace(path=run)]) == [
        f"Web: {small_corpus.root}, {len(small_corpus):,} images; base rate of the my-shoes target's kind "
        f"(Sandal, mnist): {share:.1%}."]
