"""What the contact sheets and the dashboard cost a run: seconds per iteration against the iteration.

For every iteration of a recorded run folder (`--run`, e.g. `explorer demo`'s gp run) it draws the
iteration's contact sheet as the live loop does (`explorer.run.sheets.record_sheet`: open the shards
and the cache, draw, write the PNG; best of `--repeats`) and compares it with the iteration's own
`seconds` in metrics.jsonl. The goal: under 5% of an iteration at demo settings. It also times one
dashboard page (`GET /`) and one thumbnail (`GET /item/KEY.png`), which a browser asks for every
`refresh` seconds while the run goes on.

    python bench/bench_sheets.py --run runs/demo-.../gp      # seconds
Outputs bench/results/sheets/: report.md, results.json, machine.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import write_machine
from explorer.run.config import load_config
from explorer.run.daemon import status_summary
from explorer.run.dashboard import respond
from explorer.run.ledger import read_metrics
from explorer.run.sheets import record_sheet

GOAL = 0.05  # of an iteration's seconds


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished run folder (explorer demo's gp run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sheets")
    args = ap.parse_args()
    cfg = load_config(args.run / "config.yaml")
    accepted: dict[int, list[dict]] = {}
    for r in read_metrics(args.run / "accepted.jsonl"):
        accepted.setdefault(r["iteration"], []).append(r)
    rows = []
    for row in read_metrics(args.run / "metrics.jsonl"):
        if row["iteration"] == 0 or "queries" not in row:
            continue
        records = accepted.get(row["iteration"], [])
        seconds = best_of(args.repeats, lambda row=row, records=records: record_sheet(args.run, cfg, row, records))
        rows.append({"iteration": row["iteration"], "accepted": len(records), "sheet_seconds": round(seconds, 4),
                     "iteration_seconds": row["seconds"], "share": round(seconds / row["seconds"], 5)})
    newest = read_metrics(args.run / "accepted.jsonl")[-1]["sha256"]
    page = best_of(args.repeats, lambda: respond(args.run, "/", status_summary))
    thumb = best_of(args.repeats, lambda: respond(args.run, f"/item/{newest}.png", status_summary))
    worst = max(r["share"] for r in rows)
    results = {"run": str(args.run), "iterations": rows, "worst_share": worst, "goal": GOAL,
               "page_seconds": round(page, 4), "thumbnail_seconds": round(thumb, 4)}
    lines = [f"# Contact sheets and dashboard: cost per iteration ({args.run.name})", "",
             "| iteration | accepted | sheet s | iteration s | share |", "|---:|---:|---:|---:|---:|",
             *(f"| {r['iteration']} | {r['accepted']} | {r['sheet_seconds']:.3f} | {r['iteration_seconds']:.1f} "
               f"| {100 * r['share']:.2f}% |" for r in rows), "",
             (f"worst share {100 * worst:.2f}% (goal < {100 * GOAL:.0f}%); dashboard page {1000 * page:.0f} ms, "
              f"one thumbnail {1000 * thumb:.0f} ms (best of {args.repeats}).")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_machine(args.out, " ".join(sys.argv))
    print("\n".join(lines))
    return 0 if worst < GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
