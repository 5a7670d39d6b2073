"""bench/acquisition_grid.py: a run whose every search failed is not counted as a result."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import acquisition_grid as grid  # noqa: E402


def _run(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [{"iteration": 0}, *rows]) + "\n")
    return folder


def test_a_run_whose_searches_all_failed_is_set_aside_with_the_engines_answer(tmp_path):
    failed = {"all_searches_failed": True, "search_errors": ["HTTP 400: this engine serves no image index"]}
    run = _run(tmp_path / "seed-1" / "knn-retrieval", [failed, failed])
    with pytest.raises(RuntimeError, match="serves no image index"):
        grid._check_searched(run)
    assert not run.exists() and len(list(run.parent.glob("knn-retrieval.failed-*"))) == 1
    # one iteration with an answer is a run (a transient outage is the loop's to retry, not the grid's)
    grid._check_searched(_run(tmp_path / "seed-1" / "random", [failed, {"all_searches_failed": False}]))
