"""The report's pictures (explorer/analysis/gallery.py): per condition a grid of the best-rewarded
accepted images from the shards, and each run's last contact sheet beside report.md."""

import numpy as np
from PIL import Image

from explorer.analysis.gallery import GRID_COLUMNS, GRID_ITEMS
from explorer.analysis.report import write_report
from explorer.run.ledger import read_metrics
from explorer.run.sheets import TILE, RunItems


def test_the_report_embeds_the_accepted_grid_and_the_last_sheet(tiny_run, tiny_experiment, tmp_path):
    report = write_report([tiny_run], tmp_path / "report").read_text()
    accepted = read_metrics(tiny_run / "accepted.jsonl")
    n = min(len(accepted), GRID_ITEMS)
    assert f"![the {n} best-rewarded images accepted by gp-softmax](accepted-gp-softmax.png)" in report
    sheet = "sheet-gp-softmax-0-seed0-iter-000002.png"
    assert f"({sheet})" in report
    assert (tmp_path / "report" / sheet).read_bytes() == (tiny_run / "sheets" / "iter-000002.png").read_bytes()

    grid = np.asarray(Image.open(tmp_path / "report" / "accepted-gp-softmax.png").convert("RGB"))
    assert grid.shape[0] == -(-n // GRID_COLUMNS) * (TILE + 14) + 4
    best = max(accepted, key=lambda r: r["reward"])  # the first tile is the best-rewarded image
    items = RunItems(tiny_run, tiny_experiment())
    try:
        expected = np.asarray(Image.fromarray(items.image(best["sha256"], best["url"])).resize((TILE, TILE), 0))
    finally:
        items.close()
    assert np.array_equal(grid[2:2 + TILE, 4:4 + TILE], expected)
