"""`explorer demo` (explorer/run/demo.py) end to end on the small corpus with the tiny learner: the
gp run, the random run and the target-only control in three worker processes, and one table."""

import json

from explorer.run.config import ExperimentConfig, from_dict, save_config
from explorer.run.demo import RANDOM_NOTE, _policy_config, run_demo


def test_the_demos_random_run_is_random_exploration_without_the_class_names():
    """The configured GP keeps its options and searches the class names first; the random run gets
    neither (the names are knowledge of the target: with them the demo's random was half targeted)."""
    cfg = from_dict(ExperimentConfig, {"name": "demo", "policy": {
        "name": "gp", "class_name_queries": True, "options": {"acquisition": "ucb", "explore_first": 16}}})
    gp, random = _policy_config(cfg, "gp"), _policy_config(cfg, "random")
    assert (gp.name, gp.policy.name, gp.policy.class_name_queries) == ("demo-gp", "gp", True)
    assert gp.policy.options == {"acquisition": "ucb", "explore_first": 16}
    assert (random.name, random.policy.name, random.policy.class_name_queries) == ("demo-random", "random", False)
    assert random.policy.options == {}
    assert random.policy.queries_per_iteration == gp.policy.queries_per_iteration


def test_the_demo_runs_its_three_trainings_side_by_side_and_writes_one_table(tiny_experiment, small_corpus,
                                                                               tmp_path, capfd):
    config = tmp_path / "demo.yaml"
    save_config(tiny_experiment(name="demo"), config)
    assert run_demo(config, tmp_path / "demo", progress=False, jobs=3) == 0
    out = capfd.readouterr().out
    assert "3 processes x" in out
    for name in ("gp", "random"):  # each worker's iteration lines carry its name
        assert f"[{name}] iter 2: 4 queries," in out
        rows = [json.loads(line) for line in (tmp_path / "demo" / name / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and rows[0]["iteration"] == 0
    assert "[target only] target-only SSL for 4 more steps" in out
    table = (tmp_path / "demo" / "table.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:8]] == ["pixels", "pixels (centred)", "base",
                                                                 "target only", "random", "gp"]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    gp_rows = [json.loads(line) for line in (tmp_path / "demo" / "gp" / "metrics.jsonl").read_text().splitlines()]
    accepted = sum(r.get("accepted", 0) for r in gp_rows[1:])
    assert f"| gp                | {accepted:8d} |" in table[7]  # the table counts the run's own rows
    assert summary["gp"]["eval_knn_accuracy"] == gp_rows[-1]["eval_knn_accuracy"]
    # both runs started from the one base, evaluated once in the parent: their row 0 is the base row
    base = [json.loads((tmp_path / "demo" / n / "metrics.jsonl").read_text().splitlines()[0]) for n in ("gp", "random")]
    assert base[0]["eval_knn_accuracy"] == base[1]["eval_knn_accuracy"] == summary["base"]["eval_knn_accuracy"]
    assert RANDOM_NOTE in table and RANDOM_NOTE in out
    rate = small_corpus.meta["base_rate"]["fashion-mnist"]
    assert table[-1] == f"web: {small_corpus.root}, {len(small_corpus):,} images, {rate:.1%} of them the " \
                        "fashion-mnist target's kind"
