"""Acceptance by value: how the reward separates the target's kind from the rest of the web.

Under an encoder of the science config (its base: `train.pretrain_steps` SSL steps on the target,
or a checkpoint given with --base), every web source is sampled, rewarded against the target
(`knn_reward`, k from the config) and read on the target's own scale (`RewardCalibration`). For
each acceptance percentile, the share of each source that passes, and the precision a uniform draw
over the web would have after acceptance. This is the measurement behind the default
`reward.accept_percentile`.

    python bench/bench_acceptance.py [--per-source 2000] [--base runs/bench-acquisition/seed-0/base.pt]
Outputs bench/results/acceptance/: acceptance.csv, summary.json, machine.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import write_machine  # noqa: E402

PERCENTILES = (1, 5, 10, 25, 50)


def sample_source(corpus, source: str, n: int, size: int, seed: int = 0):
    import torch

    from explorer.validate import decode_batch

    rows = np.flatnonzero(np.asarray(corpus.hidden["source"]) == source)
    rows = np.random.default_rng(seed).permutation(rows)[: 2 * n]
    images, _ = decode_batch([corpus.image_bytes(int(i)) for i in rows], size=size)
    return images[:n] if len(images) else torch.empty(0, 3, size, size, dtype=torch.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "science.yaml")
    parser.add_argument("--base", type=Path, default=None, help="encoder checkpoint (default: pretrain the base)")
    parser.add_argument("--per-source", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "acceptance")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    from explorer.agent import build_learner, open_corpus
    from explorer.baselines import pretrain_base
    from explorer.config import load_config
    from explorer.scoring import RewardCalibration, TargetIndex, knn_reward
    from explorer.target import load_target

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    target = load_target(cfg.target)
    base = args.base or pretrain_base(cfg, args.out / "base.pt")
    learner = build_learner(cfg, target)
    learner.load_state_dict(torch.load(base, map_location="cpu", weights_only=True))
    index = TargetIndex(learner.embed(target.part("acquire")[0]))
    calibration = RewardCalibration.of(index, cfg.reward.k)
    corpus = open_corpus(cfg)
    sources = sorted(set(corpus.hidden["source"]))
    counts = {s: int((np.asarray(corpus.hidden["source"]) == s).sum()) for s in sources}
    rows, passed = [], {}
    for source in sources:
        images = sample_source(corpus, source, args.per_source, cfg.fetch.image_size)
        rewards = knn_reward(learner.embed(images), index, cfg.reward.k)
        for q in PERCENTILES:
            share = float((rewards >= calibration.threshold(q)).mean())
            passed[(source, q)] = share
            rows.append({"source": source, "web_items": counts[source], "sampled": len(images), "percentile": q,
                         "threshold": round(calibration.threshold(q), 4), "pass_rate": round(share, 4),
                         "reward_median": round(float(np.median(rewards)), 4)})
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "acceptance.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    relevant = "fashion-mnist"
    summary = {}
    for q in PERCENTILES:  # a uniform draw over the web, after acceptance
        kept = {s: counts[s] * passed[(s, q)] for s in sources}
        summary[q] = {"recall_target_kind": passed[(relevant, q)],
                      "precision_uniform_web": kept[relevant] / max(sum(kept.values()), 1e-9),
                      **{f"pass_{s}": passed[(s, q)] for s in sources}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_machine(args.out, " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]))
    print("percentile  " + "  ".join(f"{s:>13s}" for s in sources) + "  precision(uniform web)")
    for q in PERCENTILES:
        print(f"{q:10d}  " + "  ".join(f"{passed[(s, q)]:13.3f}" for s in sources)
              + f"  {summary[q]['precision_uniform_web']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
