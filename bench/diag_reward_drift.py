"""Why does a run refuse images of the target's kind that it finds after round 1? A diagnostic.

Scores two groups of a finished image run's images again: the images of the kind that round 1
accepted, and the new images of the kind that rounds 2 and later decoded (the hidden truth:
`target.relevant` of the run's config). Each group is scored under three encoders, with the run's
end-of-run background and each encoder's own acceptance threshold (the target's own
`reward.accept_percentile`-th percentile):

- the final learner (what the last rounds read, after training on what was accepted);
- the untrained ImageNet base (`reward.encoder: base`);
- the start encoder: the seed's shared base (`base.pt`, what round 1 read; `reward.encoder: start`).

    python bench/diag_reward_drift.py runs/bench-class-names/digits/class-names/seed-28/gp-ucb

The run folder is copied to a temporary folder first (loading a run opens its ledger).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explorer.run.config import load_config  # noqa: E402
from explorer.run.image import ImageLoop  # noqa: E402
from explorer.web.pixels import to_pipeline_tensor  # noqa: E402

NO_ENGINE = "http://127.0.0.1:9"  # nothing is searched: the loop only needs a backend to open


def groups(run: Path, loop: ImageLoop) -> dict[str, torch.Tensor]:
    """{name: uint8 images}: round 1's accepted images of the kind, and later rounds' new ones."""
    corpus, truth = loop.corpus, loop.truth
    key = lambda url: url.rsplit("/", 1)[1]  # noqa: E731
    accepted = [json.loads(line) for line in (run / "accepted.jsonl").read_text().splitlines() if line.strip()]
    first = [key(a["url"]) for a in accepted if a["iteration"] == 1 and a["relevant"]]
    with sqlite3.connect(run / "ledger.sqlite") as db:
        rows = db.execute("SELECT iteration, url FROM fetches WHERE status = 'decoded' ORDER BY iteration").fetchall()
    seen, later = set(), []
    for iteration, url in rows:
        if iteration > 1 and url not in seen and truth.relevant(url):
            later.append(key(url))
        seen.add(url)
    later = list(dict.fromkeys(later))

    def images(keys):
        return torch.stack([to_pipeline_tensor(Image.open(io.BytesIO(corpus.image_bytes(corpus.index_of[k]))),
                                               loop.cfg.fetch.image_size) for k in keys])
    return {"round 1, accepted": images(first), "later rounds, new": images(later)}


def score(loop: ImageLoop, encoder, found: dict[str, torch.Tensor]) -> list[str]:
    threshold = loop.space.calibration.threshold(loop.cfg.reward.accept_percentile)
    lines = []
    for name, x in found.items():
        r = loop.space.rewards(encoder.embed(x))
        lines.append(f"{name:18s} n = {len(x):4d}: above the threshold {threshold:.3f}: {np.mean(r >= threshold):.0%} "
                     f"(median reward {np.median(r):.3f})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished image run folder with a checkpoint and ledger.sqlite")
    parser.add_argument("--base", type=Path, default=None, help="the start encoder (default RUN/../base.pt)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = args.base or args.run.parent / "base.pt"
    with tempfile.TemporaryDirectory() as tmp:
        def open_copy(name: str, reward_encoder: str | None = None) -> ImageLoop:
            run = Path(tmp) / name
            shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("cache", "tensorboard", "sheets"))
            cfg = load_config(run / "config.yaml")
            if reward_encoder:
                cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, encoder=reward_encoder))
            return ImageLoop(cfg, run, resume=True, progress=False, engine_url=NO_ENGINE)

        loop = open_copy("learner")
        found = groups(loop.run_dir, loop)
        print(f"{args.run}\n\nthe final learner:")
        print("\n".join(score(loop, loop.learner, found)))
        loop.learner.load_state_dict(torch.load(base, map_location="cpu", weights_only=True))
        loop.refresh_index()
        print("\nthe start encoder (the seed's base.pt, what round 1 read):")
        print("\n".join(score(loop, loop.learner, found)))
        loop.close()
        loop = open_copy("base", reward_encoder="base")
        print("\nthe untrained ImageNet base (reward.encoder: base):")
        print("\n".join(score(loop, loop.base_encoder(), found)))
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
