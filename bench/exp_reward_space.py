"""What the reward should read: separation of the target's kind under several reward spaces.

For a finished image run (its last checkpoint), a fixed sample of the local web (300 items of the
target's kind, 900 others, drawn with seed 0 from the hidden truth) is rewarded under:

- encoder: the run's learner at its last checkpoint, or the base encoder (the config's learner
  before any training: ImageNet weights with `learner.pretrained`);
- space: raw cosines, or centred on the web sample's mean (`reward.centre`);
- background: none, the run's background reservoir (everything fetched), or the web's first
  sample (the random queries' results);
- projector: the learner's projector output (raw), for comparison.

Reported per row: ROC AUC of the reward for the kind vs the rest; the anisotropy (mean pairwise
cosine) of the target's embeddings; the spread of the target's own rewards (10th to 90th
percentile); and how many of the sample pass the target's 10th percentile alone, and with the web's
95th-percentile reference (`reward.web_percentile`). Evaluation only: the agent never reads the
hidden truth.

    python bench/exp_reward_space.py RUN_DIR --kinds mnist [--out bench/results/reward_space/NAME]
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import write_machine  # noqa: E402


def web_sample(corpus, kinds: set[str], size, rng) -> tuple[np.ndarray, np.ndarray]:
    """Corpus rows of `size` = (kind, rest) items drawn without replacement, and their kind flags."""
    hidden = corpus.hidden
    kind = np.array([s in kinds or c in kinds for s, c in zip(hidden["source"], hidden["class_name"])])
    rows = np.concatenate([rng.choice(np.flatnonzero(kind), size[0], replace=False),
                           rng.choice(np.flatnonzero(~kind), size[1], replace=False)])
    return rows, kind[rows]


def rows_for(name, rc, target, candidates, y, background, web) -> dict:
    """One table row: the reward space of `rc` over these embeddings, and what it does to the sample."""
    from sklearn.metrics import roc_auc_score

    space = rc.space(target, background, web)
    rewards = space.rewards(candidates)
    strict = np.percentile(space.calibration.reference, 10)  # the target's own 10th percentile alone
    threshold = space.calibration.threshold(10)
    return {"reward": name, "auc": round(float(roc_auc_score(y, rewards)), 3),
            "target_anisotropy": round(space.anisotropy, 4), "target_spread": round(space.calibration.spread(), 4),
            "kind_pass_target_p10": int((rewards[y] >= strict).sum()), "rest_pass_target_p10": int((rewards[~y] >= strict).sum()),
            "kind_pass_with_web_p95": int((rewards[y] >= threshold).sum()),
            "rest_pass_with_web_p95": int((rewards[~y] >= threshold).sum())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--kinds", nargs="+", required=True, help="hidden sources or classes of the target's kind")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch
    from PIL import Image

    from explorer.acquire.validate import to_pipeline_tensor
    from explorer.run.checkpoints import load_latest_checkpoint
    from explorer.run.config import load_config
    from explorer.run.image import build_learner, open_corpus
    from explorer.score.reward import RewardConfig
    from explorer.score.target import load_target
    from learners.moco import MoCoLearner

    torch.set_num_threads(args.threads)
    out = args.out or ROOT / "bench" / "results" / "reward_space" / args.run_dir.name
    cfg = load_config(args.run_dir / "config.yaml")
    corpus, target = open_corpus(cfg), load_target(cfg.target)
    rows, y = web_sample(corpus, set(args.kinds), (300, 900), np.random.default_rng(0))
    images = torch.stack([to_pipeline_tensor(Image.open(io.BytesIO(corpus.image_bytes(int(i)))), cfg.fetch.image_size)
                          for i in rows])
    checkpoint = load_latest_checkpoint(args.run_dir)
    learner = build_learner(cfg, target)
    learner.load_state_dict({**checkpoint.state["learner"], "mixture": None})
    base = MoCoLearner(learner.config)
    reservoir = torch.stack(list(checkpoint.state["background"]["items"]))
    first = checkpoint.state.get("web_sample")
    if first is None:  # runs of earlier versions: a uniform sample of the web stands in for it
        first = torch.stack([to_pipeline_tensor(Image.open(io.BytesIO(corpus.image_bytes(int(i)))),
                                                cfg.fetch.image_size)
                             for i in np.random.default_rng(1).choice(len(corpus), 2000, replace=False)])
    acquire = target.part("acquire")[0]
    table = []
    for enc_name, enc in (("learner", learner), ("base", base)):
        t, c, r, w = (enc.embed(x) for x in (acquire, images, reservoir, first))
        for centre in (False, True):
            for bg_name, bg in (("none", None), ("reservoir", r), ("first sample", w)):
                rc = RewardConfig(centre=centre, background_size=0 if bg is None else 2000)
                name = f"{enc_name}, {'centred' if centre else 'raw'}, background: {bg_name}"
                table.append(rows_for(name, rc, t, c, y, bg, w))
                print(table[-1], flush=True)
    learner.model.eval()
    with torch.no_grad():
        def projected(x):
            aug = learner.config.augment
            mean, std = torch.tensor(aug.mean).view(1, 3, 1, 1), torch.tensor(aug.std).view(1, 3, 1, 1)
            return torch.cat([learner.model.base_projector(learner.model.features(
                (learner._resize(x[i:i + 256]).float() / 255 - mean) / std)) for i in range(0, len(x), 256)]).numpy()
        t, c, w = projected(acquire), projected(images), projected(first)
        table.append(rows_for("learner projector output, raw, background: none",
                              RewardConfig(centre=False, background_size=0), t, c, y, None, w))
    out.mkdir(parents=True, exist_ok=True)
    with (out / "rows.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    lines = [f"# Reward spaces of {args.run_dir.name} (kinds: {', '.join(args.kinds)}; sample 300 kind / 900 rest)", "",
             "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in table]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_machine(out, " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]))
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
