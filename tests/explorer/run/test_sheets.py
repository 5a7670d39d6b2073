"""Contact sheets (explorer/run/sheets.py): the live loop writes one per iteration, grouped by query,
with the best-scored rejected items, and `rebuild_sheets` draws the same picture from the run folder."""

import numpy as np
import pytest
from PIL import Image

from explorer.run.ledger import read_metrics
from explorer.run.sheets import (
    COLUMNS,
    LINE,
    MAX_REJECTED,
    TILE,
    RunItems,
    rebuild_sheets,
    sheet_content,
    sheet_path,
)


def _accepted_by_iteration(run_dir):
    out = {}
    for r in read_metrics(run_dir / "accepted.jsonl"):
        out.setdefault(r["iteration"], []).append(r)
    return out


def test_every_iteration_gets_a_sheet_grouped_by_query(tiny_run):
    rows = read_metrics(tiny_run / "metrics.jsonl")
    accepted = _accepted_by_iteration(tiny_run)
    assert sorted(p.name for p in (tiny_run / "sheets").iterdir()) == ["iter-000001.png", "iter-000002.png"]
    for row in rows[1:]:
        records = accepted.get(row["iteration"], [])
        content = sheet_content(row, records)
        # every accepted item is drawn once, under the first of its queries
        assert sum(len(g.items) for g in content.groups) == len(records) == row["accepted"]
        for g in content.groups:
            assert all(r["queries"][0] == g.query for r in g.items)
            assert g.reward == row["query_rewards"][row["queries"].index(g.query)]
        # the best-scored rejected: not accepted, best first, each with a reason
        best = row["rejected_best"]
        assert 0 < len(best) <= MAX_REJECTED
        assert not {r["url"] for r in best} & set(row["accepted_urls"])
        assert [r["reward"] for r in best] == sorted((r["reward"] for r in best), reverse=True)
        assert all(r["reason"] in ("duplicate", "low reward") for r in best)
        image = Image.open(sheet_path(tiny_run, row["iteration"], "image"))
        tile_rows = sum(-(-len(g.items) // COLUMNS) for g in content.groups)
        expected = (LINE * 2 + len(content.groups) * LINE + tile_rows * (TILE + 14) + (LINE if content.others else 0)
                    + LINE + TILE + 14 + 14 + 4)
        assert image.size[1] == expected


def test_tiles_show_the_accepted_images_from_the_shards_and_rejected_ones_from_the_cache(tiny_run, tiny_experiment):
    row = read_metrics(tiny_run / "metrics.jsonl")[1]
    content = sheet_content(row, _accepted_by_iteration(tiny_run)[1])
    sheet = np.asarray(Image.open(sheet_path(tiny_run, 1, "image")).convert("RGB"))
    items = RunItems(tiny_run, tiny_experiment())
    try:
        first = content.groups[0].items[0]
        assert first["sha256"] in items.rows  # read from acquired/
        expected = np.asarray(Image.fromarray(items.image(first["sha256"], first["url"])).resize((TILE, TILE), 0))
        y = 2 + LINE * 3  # the top margin, the counts line and its gap, the group header
        assert np.array_equal(sheet[y:y + TILE, 4:4 + TILE], expected)
        rejected = row["rejected_best"][0]
        assert rejected["sha256"] not in items.rows
        assert items.image(rejected["sha256"], rejected["url"]) is not None  # decoded again from cache/
    finally:
        items.close()


def test_rebuilding_from_the_finished_run_draws_the_live_sheets(tiny_run):
    live = {p.name: np.asarray(Image.open(p)) for p in (tiny_run / "sheets").iterdir()}
    for p in (tiny_run / "sheets").iterdir():
        p.unlink()
    rebuilt = rebuild_sheets(tiny_run)
    assert sorted(p.name for p in rebuilt) == sorted(live)
    for p in rebuilt:
        assert np.array_equal(np.asarray(Image.open(p)), live[p.name]), p.name


def test_a_replayed_run_draws_the_recorded_sheets(tiny_run, tmp_path):
    import shutil

    from explorer.run.experiment import replay_run

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    assert replay_run(copy, progress=False, log=lambda line: None) == []
    assert not list((copy / "sheets").glob("replay-*"))  # a replay writes no sheets of its own
    replayed = rebuild_sheets(copy, replay=True)
    assert [p.name for p in replayed] == ["replay-iter-000001.png", "replay-iter-000002.png"]
    for p in replayed:  # the same decisions, the same rejected candidates, the same picture
        live = tiny_run / "sheets" / p.name.removeprefix("replay-")
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(live))), p.name


def test_an_evicted_rejected_body_is_an_empty_tile_not_an_error(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    shutil.rmtree(copy / "cache" / "blobs")  # every fetched body gone; the shards keep the accepted ones
    rebuild_sheets(copy)

    def first_rejected_tile(run_dir):
        sheet = np.asarray(Image.open(sheet_path(run_dir, 1, "image")).convert("L"))
        y = sheet.shape[0] - 4 - TILE - 2 * 14
        return sheet[y + 1:y + TILE - 1, 5:4 + TILE - 1]

    assert (first_rejected_tile(copy) > 200).mean() > 0.9  # an empty box with the word "evicted"
    assert (first_rejected_tile(tiny_run) <= 200).mean() > 0.1  # the live sheet drew the image


def test_rebuilding_a_folder_without_logs_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        rebuild_sheets(tmp_path)
    with pytest.raises(FileNotFoundError, match="explorer replay"):
        rebuild_sheets(tmp_path, replay=True)
