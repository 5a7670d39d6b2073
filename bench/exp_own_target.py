"""Experiment 3 - a user's own target folder: does the agent find more of the user's kind than random?

Two folders, each through the same path as `explorer run --target FOLDER` (the folder is split by
fractions: half the target, a quarter each for the evaluation):

- `footwear`: 600 Fashion-MNIST *test* footwear images (sandals, sneakers, ankle boots; one folder
  per class, as a user would sort them, plus a loose README). The web's Fashion-MNIST *train*
  images of all ten classes are the same style (footwear is 30% of them; shirts, bags and dresses
  are the same style of image but not the user's kind). The user's kind: class Sandal, Sneaker or
  Ankle boot.
- `digits`: scikit-learn's 1,797 8x8 digits, scaled to 28 px (blurry), in one folder per digit: a
  kind the web holds in another style (MNIST, sharp, 6.8% of the web) and a source the web does
  not hold. The user's kind: source mnist.

The web is the default offline web: Fashion-MNIST train, clip-art and digits. The hidden truth
(`target.relevant`) is read by evaluation only. The gp with the config's options (`--gp
gp-softmax` for the softmax acquisition) and random, from per-seed bases. Reported: images of the
kind acquired, their share of everything accepted, and gp / random per seed.

    python bench/exp_own_target.py [--folder footwear|digits] [--config configs/science.yaml] [--seeds 0 1 2]
Outputs bench/results/own_target[_FOLDER]/: report.md, runs.csv, summary.json, per_seed.csv, machine.json.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.acquisition_grid import run_grid  # noqa: E402
from bench.machine import write_machine  # noqa: E402

FOOTWEAR = {5: "Sandal", 7: "Sneaker", 9: "Ankle boot"}
DEFAULT_RUNS = ROOT / "runs" / "bench-own-target"


def export_folder(root: Path, per_class: int = 200) -> Path:
    """The user's folder: `per_class` test images of each footwear class as PNGs, in class folders."""
    from PIL import Image

    from explorer.web.sources import FASHION_MNIST_DIR

    if (root / "README.txt").exists():
        return root
    with gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    for label, name in FOOTWEAR.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == label)[:per_class]:
            Image.fromarray(images[i]).save(root / name / f"{i:05d}.png")
    (root / "README.txt").write_text("photos of my shoes, sorted by kind\n")
    return root


def export_digits(root: Path) -> Path:
    """The user's folder of blurry digits: scikit-learn's 8x8 digits scaled to 28 px, one folder per digit."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / "README.txt").exists():
        return root
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        pixels = (image / 16 * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((28, 28), Image.Resampling.BILINEAR).save(root / str(label) / f"{i:04d}.png")
    (root / "README.txt").write_text("scans of handwritten digits, sorted by digit\n")
    return root


FOLDERS = {  # name -> (folder builder, its kind in the web's hidden truth, result folder suffix)
    "footwear": (lambda runs: export_folder(runs / "my-shoes"), list(FOOTWEAR.values()), ""),
    "digits": (lambda runs: export_digits(runs / "my-digits"), ["mnist"], "_digits"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "science.yaml")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS)
    parser.add_argument("--folder", choices=sorted(FOLDERS), default="footwear", help="the user's folder (see above)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default bench/results/own_target, own_target_digits for --folder digits)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--gp", default="gp-ucb", choices=["gp-ucb", "gp-softmax"],
                        help="the gp condition of bench/acquisition_grid.py (default gp-ucb, the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, as `explorer run --set` does (e.g. --set iterations=4)")
    args = parser.parse_args(argv)
    import torch

    from explorer.analysis.report import read_run, write_report
    from explorer.run.config import parse_overrides

    torch.set_num_threads(args.threads)
    t0 = time.time()
    build, kinds, suffix = FOLDERS[args.folder]
    args.out = args.out or ROOT / "bench" / "results" / f"own_target{suffix}"
    folder = build(args.runs)
    overrides = {"target.name": str(folder.resolve()), "target.acquire_size": None,
                 "target.probe_train_size": None, "target.relevant": kinds, **parse_overrides(args.set)}
    run_dirs = run_grid(args.config, args.runs / args.folder, args.seeds, ["random", args.gp], overrides)
    report = write_report(run_dirs, args.out, title=f"Experiment 3: a user's own target folder ({args.folder})")
    runs = [read_run(p) for p in run_dirs]
    with (args.out / "per_seed.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["seed", "gp_relevant", "random_relevant", "ratio", "gp_share", "random_share"])
        for seed in args.seeds:
            mine = {r.condition: r for r in runs if r.seed == seed}
            gp, rnd = mine[args.gp], mine["random"]
            out.writerow([seed, int(gp.relevant[-1]), int(rnd.relevant[-1]),
                          f"{gp.relevant[-1] / max(rnd.relevant[-1], 1):.2f}",
                          f"{gp.precision[-1]:.3f}", f"{rnd.precision[-1]:.3f}"])
    write_machine(args.out, " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]))
    print(report.read_text())
    print((args.out / "per_seed.csv").read_text())
    print(f"took {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
