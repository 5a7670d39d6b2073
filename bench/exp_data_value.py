"""Experiment 0 - the value of data: how much can acquisition give at this budget?

Before any policy comparison means anything, the learner must be able to use data. From one base
per seed (the science config's: `train.pretrain_steps` on the target alone), every condition trains
the same number of SSL steps as an acquisition run (`iterations x steps_per_iteration`), each batch
holding the same target images, plus images drawn once from the local web:

    target only          nothing added (the control every difference is taken against)
    target only, 2x steps  twice the steps on the target alone (its schedule stretched to match):
                         as many images processed as a run whose acquired share is at its cap, so
                         what more compute alone gives is visible
    oracle N             N web images whose hidden source is the target's kind (Fashion-MNIST train)
    uniform N            N web images drawn uniformly (the local web is ~82% Fashion-MNIST)
    distractor N         N web images that are not of the target's kind (clip-art and digits)

Web images copying a probe_test image (signature cosine >= 0.99) are never drawn. A seed varies the
encoder's heads, batches and augmentations, the mixture and the drawn images. Reported: kNN and
linear-probe accuracy and their paired difference from the same seed's target-only run, mean ± 95%
t-interval over seeds, and that difference in standard errors (mean / (sd / sqrt(n))).

    python bench/exp_data_value.py          # seeds 0-2; oracle N in 1000 5000 20000, the others N = 5000
    python bench/exp_data_value.py --seeds 0 1 2 3 4 --sizes 5000 --sources oracle
Outputs bench/results/data_value/: report.md, runs.csv, summary.json, machine.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.acquisition_grid import seeded  # noqa: E402
from bench.machine import print_report  # noqa: E402

SOURCES = ("oracle", "uniform", "distractor")
DEFAULT_RUNS = ROOT / "runs" / "bench-data-value"


def web_pool(cfg, source: str) -> np.ndarray:
    """Corpus rows a source draws from (the hidden truth decides what is of the target's kind)."""
    from explorer.run.image import ground_truth, open_corpus

    corpus = open_corpus(cfg)
    truth = ground_truth(cfg, corpus)
    relevant = np.array([truth.is_relevant(i) for i in range(len(corpus))])
    return {"oracle": np.flatnonzero(relevant), "uniform": np.arange(len(corpus)),
            "distractor": np.flatnonzero(~relevant)}[source]


def draw_images(cfg, source: str, n: int, seed: int):
    """n decodable web images of `source`, none a copy of a probe_test image; uint8 (n, 3, S, S)."""
    import torch

    from explorer.acquire.validate import decode_batch
    from explorer.run.image import open_corpus
    from explorer.score.reward import image_signature, near_duplicates
    from explorer.score.target import load_target

    corpus = open_corpus(cfg)
    pool = np.random.default_rng(10_000 + seed).permutation(web_pool(cfg, source))
    probe_sig = image_signature(load_target(cfg.target).part("probe_test")[0])
    kept, start = [], 0
    while sum(len(k) for k in kept) < n and start < len(pool):
        rows = pool[start:start + 2 * n]
        start += len(rows)
        images, _ = decode_batch([corpus.image_bytes(int(i)) for i in rows], size=cfg.fetch.image_size)
        if len(images):
            images = images[~near_duplicates(image_signature(images), probe_sig, cfg.reward.decontaminate_threshold)]
        kept.append(images)
    images = torch.cat(kept)[:n]
    if len(images) < n:
        print(f"  {source}: only {len(images)} usable images for N={n}", flush=True)
    return images


def conditions(sources: list[str], sizes: list[int], compare_size: int,
               stretch: bool = True) -> list[tuple[str, str | None, int, int]]:
    """(name, source, N, steps scale) of every condition: oracle at every size, the other sources at
    `compare_size`; the 2x-steps target-only control unless `stretch` is False."""
    rows = [("target only", None, 0, 1)] + ([("target only, 2x steps", None, 0, 2)] if stretch else [])
    return rows + [(f"{source} {n}", source, n, 1) for source in sources
                   for n in (sizes if source == "oracle" else [compare_size])]


def run_grid(config: Path, out: Path, seeds: list[int], sources: list[str], sizes: list[int],
             compare_size: int, overrides: dict | None = None, stretch: bool = True) -> list[dict]:
    """Runs what is missing (results cached as JSON per run); returns every run's scores."""
    from bench.acquisition_grid import _base  # one base per seed, as the policy grid's
    from explorer.run.baselines import continue_from_base
    from explorer.run.config import load_config
    from explorer.web.presets import ensure_corpus

    base_cfg = load_config(config, overrides)
    ensure_corpus(base_cfg.corpus)
    rows = []
    for seed in seeds:
        cfg = seeded(base_cfg, seed)
        seed_dir = out / f"seed-{seed}"
        base = _base(cfg, seed_dir)
        for name, source, n, scale in conditions(sources, sizes, compare_size, stretch):
            path = seed_dir / f"{name.replace(' ', '-').replace(',', '')}.json"
            if not path.exists():
                print(f"== seed {seed}: {name} ==", flush=True)
                extra = draw_images(cfg, source, n, seed) if source else None
                steps = scale * cfg.iterations * cfg.train.steps_per_iteration
                scores = continue_from_base(cfg, base, steps=steps, extra=extra)
                path.write_text(json.dumps({**scores, "images_added": 0 if extra is None else len(extra)}) + "\n")
            rows.append({"condition": name, "seed": seed, **json.loads(path.read_text())})
    return rows


def seed_differences(rows: list[dict], name: str, reference: str, key: str) -> np.ndarray:
    """Per seed (in row order), `name`'s score minus the same seed's `reference` score."""
    control = {r["seed"]: r[key] for r in rows if r["condition"] == reference}
    return np.array([r[key] - control[r["seed"]] for r in rows if r["condition"] == name and r["seed"] in control])


def paired(rows: list[dict], name: str, key: str) -> tuple[float, float, float, int]:
    """Mean, 95% half-width, mean / standard error, n of (condition - same seed's target only)."""
    from scipy import stats

    diffs = seed_differences(rows, name, "target only", key)
    if len(diffs) < 2:
        return (float(diffs.mean()) if len(diffs) else math.nan), math.nan, math.nan, len(diffs)
    se = diffs.std(ddof=1) / math.sqrt(len(diffs))
    half = stats.t.ppf(0.975, len(diffs) - 1) * se
    return float(diffs.mean()), float(half), float(diffs.mean() / se) if se > 0 else math.inf, len(diffs)


def write_report(rows: list[dict], out: Path, pixels: dict) -> Path:
    from explorer.analysis.report import fmt, mean_ci

    out.mkdir(parents=True, exist_ok=True)
    with (out / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["condition", "seed", "eval_knn_accuracy", "eval_linear_probe_accuracy",
                                               "images_added", "steps", "seconds"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    names = list(dict.fromkeys(r["condition"] for r in rows))
    lines = ["# Experiment 0: the value of data at this budget", "",
             "Mean ± 95% t-interval over seeds; Δ = paired difference from the same seed's target-only run, "
             "with Δ / SE (standard error of the paired differences).", "",
             "| condition | n | images added | kNN | probe | Δ kNN | Δ kNN / SE | Δ probe | Δ probe / SE |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, scores in pixels.items():
        lines.append(f"| {name.replace('_centred', ' (centred)')} | - | - | {scores['eval_knn_accuracy']:.3f} "
                     f"| {scores['eval_linear_probe_accuracy']:.3f} | | | | |")
    summary = {}
    for name in names:
        mine = [r for r in rows if r["condition"] == name]
        knn, probe = (mean_ci(r[k] for r in mine) for k in ("eval_knn_accuracy", "eval_linear_probe_accuracy"))
        dk, dp = (paired(rows, name, k) for k in ("eval_knn_accuracy", "eval_linear_probe_accuracy"))
        added = int(np.mean([r.get("images_added", 0) for r in mine]))
        delta = "| | | | |" if name == "target only" else (
            f"| {dk[0]:+.4f} ± {dk[1]:.4f} | {dk[2]:.1f} | {dp[0]:+.4f} ± {dp[1]:.4f} | {dp[2]:.1f} |")
        lines.append(f"| {name} | {len(mine)} | {added} | {fmt(*knn[:2])} | {fmt(*probe[:2])} {delta}")
        summary[name] = {"n": len(mine), "knn": knn[:2], "probe": probe[:2], "delta_knn": dk, "delta_probe": dp}
    lines += ["", "Is it the content or just more images? Paired differences between sources at the same N "
              "(mean ± 95% t-interval; per seed):", "", "| contrast | n | Δ kNN | per seed | Δ probe |",
              "|---|---:|---:|---|---:|"]
    for a, b in (("oracle", "distractor"), ("uniform", "distractor"), ("oracle", "uniform")):
        for name_a in [n for n in names if n.startswith(a + " ")]:
            name_b = b + name_a[len(a):]
            if name_b not in names:
                continue
            knn_diffs, probe_diffs = (seed_differences(rows, name_a, name_b, key)
                                      for key in ("eval_knn_accuracy", "eval_linear_probe_accuracy"))
            knn, probe = mean_ci(knn_diffs), mean_ci(probe_diffs)
            per_seed = " / ".join(f"{d:+.4f}" for d in knn_diffs)
            lines.append(f"| {name_a} − {name_b} | {len(knn_diffs)} | {fmt(*knn[:2], 4)} | {per_seed} "
                         f"| {fmt(*probe[:2], 4)} |")
            summary[f"{name_a} - {name_b}"] = {"n": len(knn_diffs), "delta_knn": knn[:2], "delta_probe": probe[:2]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "science.yaml")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="run folder (default runs/bench-data-value)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_value")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000], help="N of the oracle rows")
    parser.add_argument("--compare-size", type=int, default=5000, help="N of the uniform and distractor rows")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--no-stretch", action="store_true",
                        help="skip the 'target only, 2x steps' control (it costs twice a run)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set target.acquire_size=500 (use another --runs)")
    args = parser.parse_args(argv)
    import torch

    from explorer.run.baselines import pixel_scores
    from explorer.run.config import load_config, parse_overrides

    torch.set_num_threads(args.threads)
    t0 = time.time()
    overrides = parse_overrides(args.set)
    rows = run_grid(args.config, args.runs, args.seeds, args.sources, args.sizes, args.compare_size, overrides,
                    stretch=not args.no_stretch)
    report = write_report(rows, args.out, pixel_scores(load_config(args.config, overrides)))
    print_report(args.out, report, argv, t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
