"""Acceptance by value: how the reward separates the target's kind from the rest of the web.

Under an encoder of the science config (its base: `train.pretrain_steps` SSL steps on the target,
or a checkpoint given with --base), every web source is sampled and rewarded against the target
two ways: `plain` (`knn_reward`, k from the config) and `contrast` (`contrast_reward`: minus
`reward.background_weight` x the similarity to the background sample a run draws, the results of
the same `reward.background_queries` vocabulary queries, searched in-process). Each reward is read
on the target's own scale (`RewardCalibration`, built the same way). For each acceptance
percentile: the share of each source that passes, the median percentile of each source (what a
result adds to a query's yield), the precision a uniform draw over the web would have after
acceptance, and the AUC of the target's kind against each other source. This is the measurement
behind the defaults `reward.accept_percentile` and `reward.background_weight`.

    python bench/bench_acceptance.py [--per-source 2000] [--base runs/bench-acquisition/seed-1/base.pt --seed 1]
Outputs bench/results/acceptance/ (or --out): acceptance.csv, summary.json, machine.json.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import write_machine

PERCENTILES = (1, 5, 10, 25, 50)


def sample_source(corpus, source: str, n: int, size: int, seed: int = 0):
    import torch

    from explorer.acquire.validate import decode_batch

    rows = np.flatnonzero(np.asarray(corpus.hidden["source"]) == source)
    rows = np.random.default_rng(seed).permutation(rows)[: 2 * n]
    images, _ = decode_batch([corpus.image_bytes(int(i)) for i in rows], size=size)
    return images[:n] if len(images) else torch.empty(0, 3, size, size, dtype=torch.uint8)


def background_sample(cfg, corpus, learner_size: int):
    """The images of the background queries a run of `cfg` would draw (explorer.run.loop), searched
    in-process on the local engine's ranking; (images, their corpus rows)."""
    import torch

    from explorer.acquire.validate import decode_batch
    from explorer.run.image import image_vocabulary
    from explorer.run.loop import background_queries
    from explorer.web.corpus import _default_encoder
    from explorer.web.engine import HybridIndex

    ranking = HybridIndex(corpus, _default_encoder())
    rows: dict[int, None] = {}
    for text in background_queries(cfg, image_vocabulary(cfg, corpus)):
        hits, _ = ranking.search(text, 0, cfg.search.results_per_query)
        rows.update(dict.fromkeys(int(h.item) for h in hits))
    if not rows:
        return torch.empty(0, 3, learner_size, learner_size, dtype=torch.uint8), []
    images, results = decode_batch([corpus.image_bytes(i) for i in rows], size=learner_size)
    return images, [i for i, r in zip(rows, results) if r.ok]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "science.yaml")
    parser.add_argument("--base", type=Path, default=None, help="encoder checkpoint (default: pretrain the base)")
    parser.add_argument("--seed", type=int, default=None,
                        help="the grid seed the base belongs to: the config is seeded as the grid seeds it, "
                             "so the background queries are that seed's (default: the config's seed)")
    parser.add_argument("--per-source", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "acceptance")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch
    from sklearn.metrics import roc_auc_score

    from explorer.run.baselines import load_base, pretrain_base
    from explorer.run.config import load_config
    from explorer.run.image import open_corpus
    from explorer.score.reward import TargetIndex
    from explorer.score.target import load_target

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    if args.seed is not None:
        from bench.acquisition_grid import seeded

        cfg = seeded(cfg, args.seed)
    target = load_target(cfg.target)
    base = args.base or pretrain_base(cfg, args.out / "base.pt")
    learner = load_base(cfg, base, target)
    index = TargetIndex(learner.embed(target.part("acquire")[0]))
    corpus = open_corpus(cfg)
    hidden = np.asarray(corpus.hidden["source"])
    sources = sorted(set(hidden))
    counts = {s: int((hidden == s).sum()) for s in sources}
    bg_images, bg_rows = background_sample(cfg, corpus, cfg.fetch.image_size)
    background = TargetIndex(learner.embed(bg_images)) if len(bg_rows) else None
    bg_sources = {s: int((hidden[bg_rows] == s).sum()) for s in sources}
    print(f"background: {cfg.reward.background_queries} queries, {len(bg_rows)} images {bg_sources}")
    embedded = {s: learner.embed(sample_source(corpus, s, args.per_source, cfg.fetch.image_size)) for s in sources}
    relevant = "fashion-mnist"
    rows, summary = [], {"background": {"queries": cfg.reward.background_queries, "images": len(bg_rows),
                                        "by_source": bg_sources}}
    rewards_of = {"plain": dataclasses.replace(cfg.reward, background_weight=0.0), "contrast": cfg.reward}
    for name, rc in rewards_of.items():
        calibration = rc.calibrate(index, background)
        rewards = {s: rc.image_rewards(e, index, background) for s, e in embedded.items()}
        auc = {s: float(roc_auc_score(np.r_[np.ones(len(rewards[relevant])), np.zeros(len(r))],
                                      np.r_[rewards[relevant], r])) for s, r in rewards.items() if s != relevant}
        median_pct = {s: float(np.median(calibration.percentile(r))) for s, r in rewards.items()}
        summary[name] = {"background_weight": rc.background_weight, "auc_vs": auc, "median_percentile": median_pct}
        for q in PERCENTILES:
            passed = {s: float((r >= calibration.threshold(q)).mean()) for s, r in rewards.items()}
            kept = {s: counts[s] * passed[s] for s in sources}  # a uniform draw over the web, after acceptance
            summary[name][q] = {"recall_target_kind": passed[relevant],
                                "precision_uniform_web": kept[relevant] / max(sum(kept.values()), 1e-9),
                                **{f"pass_{s}": passed[s] for s in sources}}
            rows += [{"reward": name, "source": s, "web_items": counts[s], "sampled": len(embedded[s]),
                      "percentile": q, "threshold": round(calibration.threshold(q), 4),
                      "pass_rate": round(passed[s], 4), "reward_median": round(float(np.median(rewards[s])), 4),
                      "median_percentile": round(median_pct[s], 4)} for s in sources]
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "acceptance.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_machine(args.out, " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]))
    for name in rewards_of:
        print(f"\n{name} reward (background weight {summary[name]['background_weight']})")
        print("percentile  " + "  ".join(f"{s:>13s}" for s in sources) + "  precision(uniform web)")
        for q in PERCENTILES:
            print(f"{q:10d}  " + "  ".join(f"{summary[name][q][f'pass_{s}']:13.3f}" for s in sources)
                  + f"  {summary[name][q]['precision_uniform_web']:.3f}")
        print("median pct  " + "  ".join(f"{summary[name]['median_percentile'][s]:13.3f}" for s in sources))
        print("AUC of " + relevant + " vs " + ", ".join(f"{s} {a:.3f}" for s, a in summary[name]["auc_vs"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
