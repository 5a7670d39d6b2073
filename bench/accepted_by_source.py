"""What each run of a grid accepted, by the web's hidden source: counts, rewards, thresholds.

Reads only the run folders (accepted.jsonl, metrics.jsonl, ledger.sqlite) and the corpus manifest's
hidden `source` column, so an explanation of a run (which kind of image its policy went after,
whether the reward told them apart) can be checked against what the run recorded.

    python bench/accepted_by_source.py [runs/bench-acquisition] [--out bench/results/acquisition_efficiency]

Writes accepted_by_source.md and .csv beside the report: per run, the images accepted of each
source with their reward's median and 10th / 90th percentiles, the accept threshold of each
iteration, and the concepts of the last iteration's queries.
"""

from __future__ import annotations

import argparse
import csv
import json
import sqlite3
import sys
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def source_of_urls(corpus) -> callable:
    """url -> hidden source of the local web item it serves (None for a url of another host)."""
    def source(url: str) -> str | None:
        path = urlsplit(url).path
        if not path.startswith("/image/"):
            return None
        i = corpus.index_of.get(path[len("/image/"):])
        return None if i is None else str(corpus.hidden["source"][i])
    return source


def summarise(run_dir: Path, source) -> list[dict]:
    accepted = [json.loads(line) for line in (run_dir / "accepted.jsonl").read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    thresholds = " / ".join(f"{r['accept_threshold']:.3f}" for r in rows[1:] if r.get("accept_threshold") is not None)
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        last = db.execute("SELECT MAX(iteration) FROM queries").fetchone()[0]
        queries = [t for (t,) in db.execute("SELECT text FROM queries WHERE iteration = ? ORDER BY position", (last,))]
    rewards = defaultdict(list)
    for a in accepted:
        rewards[source(a["url"]) or "other"].append(a["reward"])
    out = []
    for kind in sorted(rewards):
        r = np.asarray(rewards[kind])
        out.append({"run": f"{run_dir.parent.name}/{run_dir.name}", "source": kind, "accepted": len(r),
                    "reward_p10": float(np.percentile(r, 10)), "reward_median": float(np.median(r)),
                    "reward_p90": float(np.percentile(r, 90)), "thresholds": thresholds,
                    "last_queries": ", ".join(queries)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", nargs="?", type=Path, default=ROOT / "runs" / "bench-acquisition")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "acquisition_efficiency")
    args = parser.parse_args(argv)
    from explorer.run.config import load_config
    from explorer.run.image import open_corpus

    run_dirs = sorted(p.parent for p in args.grid.glob("seed-*/*/accepted.jsonl"))
    if not run_dirs:
        parser.error(f"no run folders with accepted.jsonl under {args.grid}")
    corpus = open_corpus(load_config(run_dirs[0] / "config.yaml"))
    source = source_of_urls(corpus)
    rows = [row for run_dir in run_dirs for row in summarise(run_dir, source)]
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "accepted_by_source.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# Accepted images by hidden source", "",
             "Reward = mean cosine to the k nearest target images under the encoder of that iteration, minus "
             "`reward.background_weight` x the mean cosine to the k nearest images of the background sample "
             "(the plain similarity when the run had no background); thresholds = the target's own "
             "10th-percentile reward, contrasted the same way, per iteration.", "",
             "| run | source | accepted | reward p10 / median / p90 | thresholds per iteration |",
             "|---|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['source']} | {r['accepted']} | {r['reward_p10']:.3f} / "
                     f"{r['reward_median']:.3f} / {r['reward_p90']:.3f} | {r['thresholds']} |")
    lines += ["", "Last iteration's queries:", ""]
    for run in dict.fromkeys(r["run"] for r in rows):
        lines.append(f"- {run}: {next(r['last_queries'] for r in rows if r['run'] == run)}")
    (args.out / "accepted_by_source.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
