"""The report's pictures: per condition, a grid of the images its runs accepted (best reward first,
read from each run's acquired/ shards) and each run's last contact sheet (explorer/run/sheets.py),
copied beside report.md so that the report folder stands on its own.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

from explorer.run.config import load_config
from explorer.run.ledger import read_metrics
from explorer.run.sheets import TILE, RunItems, draw_tile, last_sheet, sheet_font

GRID_COLUMNS, GRID_ITEMS, LABEL = 12, 48, 14  # tiles per row, tiles per condition, label pixels under a tile


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def accepted_grid(run_dirs: list[Path], out_png: Path) -> int:
    """The GRID_ITEMS best-rewarded images that the runs accepted, as one PNG; returns how many
    (0: nothing accepted or a text condition, and no file)."""
    found = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "accepted.jsonl"
        found += [(r["reward"], i, Path(run_dir), r) for i, r in enumerate(read_metrics(path))] if path.exists() else []
    best = sorted(found, key=lambda x: (-x[0], str(x[2]), x[1]))[:GRID_ITEMS]
    if not best or load_config(best[0][2] / "config.yaml").modality != "image":
        return 0
    rows = -(-len(best) // GRID_COLUMNS)
    grid = Image.new("RGB", (GRID_COLUMNS * (TILE + 4) + 4, rows * (TILE + LABEL) + 4), "white")
    draw, font, items = ImageDraw.Draw(grid), sheet_font(), {}
    try:
        for k, (reward, _, run_dir, r) in enumerate(best):
            if run_dir not in items:
                items[run_dir] = RunItems(run_dir, load_config(run_dir / "config.yaml"))
            draw_tile(grid, draw, items[run_dir].image(r["sha256"], r["url"]), 4 + (k % GRID_COLUMNS) * (TILE + 4),
                      2 + (k // GRID_COLUMNS) * (TILE + LABEL), [f"{reward:.3f}"], font)
    finally:
        for source in items.values():
            source.close()
    grid.save(out_png)
    return len(best)


def gallery_section(groups: dict[str, list], out: Path) -> list[str]:
    """The report's markdown lines for its pictures, per condition (`groups`: name -> runs with a
    `path` and a `seed`); the PNGs and sheets are written into `out`."""
    about = ("Per condition: the best-rewarded accepted images of all its runs, then each run's last contact "
             "sheet (the accepted items of its last iteration grouped by query, and the best-scored rejected ones; "
             "`explorer sheets RUN_DIR` draws every iteration's).")
    lines = ["## What the runs accepted", "", about, ""]
    for name, runs in groups.items():
        lines += [f"### {name}", ""]
        grid = out / f"accepted-{_slug(name)}.png"
        n = accepted_grid([r.path for r in runs], grid)
        if n:
            lines += [f"![the {n} best-rewarded images accepted by {name}]({grid.name})", ""]
        for k, run in enumerate(runs):
            sheet = last_sheet(run.path)
            if sheet is None:
                continue
            copy = out / f"sheet-{_slug(name)}-{k}-seed{run.seed}-{sheet.name}"
            shutil.copyfile(sheet, copy)
            what = f"last contact sheet of {name}, seed {run.seed} ({sheet.stem})"
            lines += [f"![{what}]({copy.name})" if sheet.suffix == ".png" else f"[{what}]({copy.name})", ""]
    return lines
