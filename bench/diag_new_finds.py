"""Where a run's images of the target's kind came from, round by round: new finds or repeats. A diagnostic.

For each image run given, per iteration, from its ledger (`fetches`: every result fetched, with its
status) and the local web's hidden truth (`target.relevant` of the run's config):

- `kind`: results of the target's kind the round fetched and decoded (a result fetched again counts);
- `new`: those not fetched in any earlier round of the run;
- `new accepted`: of the new ones, how many the round accepted (`accepted` in the ledger);
- `accepted`: all the round accepted of the kind, new or fetched before (their sum over rounds is
  the run's images of the kind accepted, as the bench reports count them);
- `repeats`: results of the kind fetched again (`kind` - `new`): already accepted ones earn their
  query nothing, earlier-rejected ones are scored again.

So it tells a policy that cannot reach more of the kind (few new) from a reward that refuses what
the policy reaches (many new, few accepted).

    python bench/diag_new_finds.py \
        runs/bench-class-names-start/digits/class-names-{fixed,start}/seed-3{4,5,6}/{gp-ucb,random} \
        --out bench/results/class_names_start/new_finds_digits.md
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import print_and_save  # noqa: E402
from explorer.run.config import load_config  # noqa: E402
from explorer.run.image import ground_truth  # noqa: E402
from explorer.web.presets import open_image_corpus  # noqa: E402


def new_finds(run: Path, truth) -> list[dict]:
    """Per iteration: {iteration, kind, new, new_accepted, accepted} from the run's ledger."""
    with contextlib.closing(sqlite3.connect(f"file:{run / 'ledger.sqlite'}?mode=ro", uri=True)) as db:
        fetches = db.execute("SELECT iteration, url FROM fetches WHERE status IN ('decoded', 'already_accepted') "
                             "ORDER BY iteration").fetchall()
        accepted = set(db.execute("SELECT iteration, url FROM accepted").fetchall())
    rows, seen = {}, set()
    for iteration in sorted({i for i, _ in fetches}):
        urls = [u for i, u in fetches if i == iteration]
        kind = [u for u in urls if truth.relevant(u)]
        new = [u for u in kind if u not in seen]
        rows[iteration] = {"iteration": iteration, "kind": len(kind), "new": len(new),
                           "new_accepted": sum((iteration, u) in accepted for u in new),
                           "accepted": sum((iteration, u) in accepted for u in kind)}
        seen.update(urls)
    return list(rows.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="image run folders (each with ledger.sqlite, config.yaml)")
    ap.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = ap.parse_args(argv)
    lines = ["| run | iteration | kind fetched | new | new accepted | accepted | repeats |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    corpora = {}
    for run in args.runs:
        cfg = load_config(run / "config.yaml")
        if cfg.corpus not in corpora:
            corpora[cfg.corpus] = open_image_corpus(cfg.corpus)
        truth = ground_truth(cfg, corpora[cfg.corpus])
        if truth is None:
            raise SystemExit(f"{run}: its web has no hidden truth for its target (target.relevant)")
        totals = {"iteration": "all", "kind": 0, "new": 0, "new_accepted": 0, "accepted": 0}
        for row in [*new_finds(run, truth), totals]:
            lines.append(f"| {run} | {row['iteration']} | {row['kind']} | {row['new']} | {row['new_accepted']} "
                         f"| {row['accepted']} | {row['kind'] - row['new']} |")
            if row is not totals:
                totals.update({k: totals[k] + row[k] for k in ("kind", "new", "new_accepted", "accepted")})
    print_and_save("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
