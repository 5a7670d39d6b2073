"""What the reward should read on an own target: its background and its encoder, compared on new seeds.

Three variants of the reward (score/reward.py, `reward.*` in the config), each run from the same
per-seed bases (base.pt, the pixel and target-only controls are computed once per target and seed
and linked into every variant's folder):

- `reservoir-learner`: the demo config as it was before it took the class names and the fixed
  background (`BEFORE`): the background the reward contrasts with is a reservoir over everything
  fetched, and the reward reads the encoder being trained;
- `fixed-learner`: `reward.background_update: fixed` (the first web sample stays the background);
- `fixed-base`: `fixed` and `reward.encoder: base` (the reward reads the untrained base encoder);
- `captions` (`--variants`; not a reward variant): the GP hears the captions of each round's 8
  best-scored images as well (`policy.options.caption_feedback: 8`);
- `class-names` (`--variants`; not a reward variant): both policies search the target's class names
  (its class folders' names) first (`policy.class_name_queries`); the random run then is random with
  class names, and `random plain` (the reference's random) is the policy without them;
- `class-names-fixed`: class names first and `reward.background_update: fixed`;
- `class-names-start`: as class-names-fixed, and `reward.encoder: start`;
- `class-names-skip`, `class-names-start-skip`: as class-names-fixed and class-names-start, and
  `search.skip_seen` (each query's results are ones earlier rounds' searches did not return).

Targets: the two folders of bench/exp_own_target.py (`digits`: scikit-learn's blurry digits, a kind
the web holds in another style; `footwear`: Fashion-MNIST test footwear), each with gp (UCB, the
background heard, as configs/demo.yaml) and random at the demo's 4 iterations; and the demo's own
target (`demo`: Fashion-MNIST, configs/demo.yaml as it is, 10 iterations), gp only.

Reported per target, seed and variant (report.md, per_seed.csv): images of the kind accepted,
gp's precision, random's (folders), the own-target bar (gp >= 100 of the kind, >= 2x random's, at
precision >= 0.5), `reward_auc` by iteration, final kNN; and each variant minus `reservoir-learner`,
paired by seed, with a 95% t-interval. Where a variant changes what random does (class-names), the
bar is also checked against the reference's random (`random plain`), and `named only` counts the
gp's images of the kind that only class-name queries found (accepted.jsonl's `queries`). Each
run's metrics.jsonl, background.json, accepted.jsonl and config.yaml are copied to
OUT/TARGET/VARIANT/runs/seed-S/CONDITION/, beside that variant's bench report.

    python bench/exp_reward_variants.py --targets digits footwear   # the folders
    python bench/exp_reward_variants.py --targets demo              # the demo target
    python bench/exp_reward_variants.py --report-only               # the tables from the runs there
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.acquisition_grid import run_grid  # noqa: E402
from bench.exp_own_target import FOLDERS  # noqa: E402
from bench.machine import write_machine  # noqa: E402

# configs/demo.yaml as the variants were measured against (before it took class names and the fixed
# background, BENCHMARKS.md "The target's class names searched first"): every variant starts from it,
# so the committed results reproduce with the config as it is now
BEFORE = {"policy.class_name_queries": False, "reward.background_update": "reservoir"}
VARIANTS = {name: {**BEFORE, **options} for name, options in {
    "reservoir-learner": {},
    "fixed-learner": {"reward.background_update": "fixed"},
    "fixed-base": {"reward.background_update": "fixed", "reward.encoder": "base"},
    # not a reward variant: the GP also hears the captions of each round's 8 best-scored images
    "captions": {"policy.options.caption_feedback": 8},
    # not a reward variant: gp and random search the target's class names first
    "class-names": {"policy.class_name_queries": True},
    # class names first, and the background stays the first web sample (what configs/demo.yaml now does)
    "class-names-fixed": {"policy.class_name_queries": True, "reward.background_update": "fixed"},
    # and the reward reads the encoder the first round read, frozen (no drift from training on the finds)
    "class-names-start": {"policy.class_name_queries": True, "reward.background_update": "fixed",
                          "reward.encoder": "start"},
    # as class-names-fixed / -start, and each query skips the results earlier rounds returned (search.skip_seen)
    "class-names-skip": {"policy.class_name_queries": True, "reward.background_update": "fixed",
                         "search.skip_seen": True},
    "class-names-start-skip": {"policy.class_name_queries": True, "reward.background_update": "fixed",
                               "reward.encoder": "start", "search.skip_seen": True},
}.items()}
PREREGISTERED = ["reservoir-learner", "fixed-learner", "fixed-base"]  # BENCHMARKS.md, seeds 22-24
REFERENCE = "reservoir-learner"
TARGETS = ["digits", "footwear", "demo"]
SHARED = ["base.pt", "base.json", "pixels.json", "pixels-centred.json", "target-only.json"]
KEPT = ["metrics.jsonl", "background.json", "accepted.jsonl", "config.yaml"]
BAR = {"relevant": 100, "ratio": 2.0, "precision": 0.5}


def _setup(target: str, runs: Path) -> tuple[dict, list[str]]:
    """The overrides and conditions of a target (on top of configs/demo.yaml)."""
    if target == "demo":
        return {}, ["gp-ucb"]
    build, kinds, _ = FOLDERS[target]
    folder = build(runs)
    return ({"iterations": 4, "target.name": str(folder.resolve()), "target.acquire_size": None,
             "target.probe_train_size": None, "target.relevant": kinds}, ["random", "gp-ucb"])


def _share_bases(src: Path, dst: Path, seeds: list[int]) -> None:
    """Links the seed's base and controls from the first variant's folder, so every variant starts
    from the same encoder (and the base is trained once)."""
    for seed in seeds:
        for name in SHARED:
            a, b = src / f"seed-{seed}" / name, dst / f"seed-{seed}" / name
            if a.exists() and not b.exists():
                b.parent.mkdir(parents=True, exist_ok=True)
                os.link(a, b)


def run(target: str, runs: Path, seeds: list[int], config: Path, variants: list[str]) -> None:
    overrides, conditions = _setup(target, runs)
    first = runs / target / REFERENCE
    for variant in [REFERENCE, *[v for v in variants if v != REFERENCE]]:
        options = VARIANTS[variant]
        folder = runs / target / variant
        if folder != first:
            _share_bases(first, folder, seeds)
        print(f"=== {target}: {variant} ===", flush=True)
        run_grid(config, folder, seeds, conditions, {**overrides, **options})


def _row(run_dir: Path) -> dict:
    from explorer.analysis.report import read_run
    from explorer.run.config import load_config
    from explorer.run.ledger import read_metrics

    curves = read_run(run_dir)
    steps = read_metrics(run_dir / "metrics.jsonl")[1:]
    cfg = load_config(run_dir / "config.yaml")
    named = _class_name_queries(cfg.target.name) if cfg.policy.class_name_queries else frozenset()
    accepted = [json.loads(line) for line in (run_dir / "accepted.jsonl").read_text().splitlines() if line.strip()]
    return {"relevant": int(curves.relevant[-1]), "accepted": int(curves.accepted[-1]),
            "precision": float(curves.precision[-1]), "knn": float(curves.knn[-1]),
            "auc": [row.get("reward_auc") for row in steps],
            "named_only": sum(bool(a["relevant"]) and set(a["queries"]) <= named for a in accepted) if named else None}


@functools.lru_cache(maxsize=None)
def _class_name_queries(target: str) -> frozenset[str]:
    """The class-name queries of a target (a folder or an installed one); loaded once per target."""
    from explorer.run.loop import class_name_texts
    from explorer.score.target import TargetConfig, load_target

    return frozenset(class_name_texts(load_target(TargetConfig(name=target)).class_names))


def _bar(gp: dict, rnd: dict | None) -> tuple[float, bool | None]:
    """gp / random (kind accepted), and whether the own-target bar is met (None: no random run)."""
    if rnd is None:
        return math.nan, None
    ratio = gp["relevant"] / max(rnd["relevant"], 1)
    return ratio, (gp["relevant"] >= BAR["relevant"] and ratio >= BAR["ratio"] and gp["precision"] >= BAR["precision"])


def _interval(values: list[float]) -> str:
    from explorer.analysis.report import mean_ci

    mean, half, n = mean_ci(values)
    return f"{mean:+.1f} (n = 1)" if n < 2 else f"{mean:+.1f} ± {half:.1f} (n = {n})"


def report(runs: Path, out: Path, seeds: list[int], targets: list[str], paired_against: str | None = None) -> str:
    """report.md and per_seed.csv; the paired differences are against REFERENCE and `paired_against`."""
    from explorer.analysis.report import write_report

    rows, lines = [], ["# Reward variants and the GP's caption feedback on own targets and the demo target", "",
                       "Images of the target's kind accepted (hidden truth), gp (UCB, background heard) and "
                       "random; bar: gp >= 100 of the kind, >= 2x random's, precision >= 0.5 (folders only).", ""]
    for target in targets:
        lines += [f"## {target}", "",
                  "| seed | variant | gp kind | gp precision | random kind | gp / random | bar met | "
                  "reward_auc by iteration | gp final kNN |", "|---|---|---:|---:|---:|---:|---|---|---:|"]
        found, named_lines = {}, []
        for variant in VARIANTS:
            folder = runs / target / variant
            dirs = [folder / f"seed-{s}" / c for s in seeds for c in ("gp-ucb", "random")
                    if (folder / f"seed-{s}" / c / "metrics.jsonl").exists()]
            if not dirs:
                continue
            write_report(dirs, out / target / variant, title=f"{target}: reward {variant}", sections=("efficiency",
                         "representation"))
            for d in dirs:
                keep = out / target / variant / "runs" / d.parent.name / d.name
                keep.mkdir(parents=True, exist_ok=True)
                for name in KEPT:
                    if (d / name).exists():
                        shutil.copyfile(d / name, keep / name)
            for seed in seeds:
                gp_dir, rnd_dir = folder / f"seed-{seed}" / "gp-ucb", folder / f"seed-{seed}" / "random"
                if not (gp_dir / "metrics.jsonl").exists():
                    continue
                gp = _row(gp_dir)
                rnd = _row(rnd_dir) if (rnd_dir / "metrics.jsonl").exists() else None
                ratio, met = _bar(gp, rnd)
                found[variant, seed] = gp
                if gp["named_only"] is not None:  # random searched the class names too: also against plain random
                    plain_dir = runs / target / REFERENCE / f"seed-{seed}" / "random"
                    plain = _row(plain_dir) if (plain_dir / "metrics.jsonl").exists() else None
                    plain_ratio, plain_met = _bar(gp, plain)
                    named_lines.append(
                        f"| {seed} | {variant} | {gp['relevant']} | {gp['named_only']} | "
                        f"{rnd['relevant'] if rnd else '–'} | {plain['relevant'] if plain else '–'} | "
                        f"{'–' if plain is None else f'{plain_ratio:.1f}×'} | "
                        f"{'–' if plain_met is None else ('yes' if plain_met else 'no')} |")
                auc = ", ".join("–" if a is None else f"{a:.2f}" for a in gp["auc"])
                lines.append(f"| {seed} | {variant} | {gp['relevant']} | {gp['precision']:.2f} | "
                             f"{rnd['relevant'] if rnd else '–'} | {f'{ratio:.1f}×' if rnd else '–'} | "
                             f"{'–' if met is None else ('yes' if met else 'no')} | {auc} | {gp['knn']:.4f} |")
                rows.append({"target": target, "seed": seed, "variant": variant, "gp_relevant": gp["relevant"],
                             "gp_accepted": gp["accepted"], "gp_precision": f"{gp['precision']:.4f}",
                             "random_relevant": rnd["relevant"] if rnd else "", "bar_met": "" if met is None else met,
                             "gp_knn": f"{gp['knn']:.4f}", "reward_auc": json.dumps(gp["auc"])})
        if named_lines:
            lines += ["", "Class names searched first: the gp's images of the kind found by class-name queries only, "
                      "random with class names, and random plain (the reference's random run):", "",
                      "| seed | variant | gp kind | named only | random kind | random plain kind | gp / random plain | "
                      "bar met vs random plain |", "|---|---|---:|---:|---:|---:|---:|---|", *named_lines]
        for against in dict.fromkeys([REFERENCE, paired_against or REFERENCE]):
            lines += ["", f"Paired by seed, variant minus {against} (mean ± 95% t half-width):", ""]
            for variant in VARIANTS:
                pairs = [s for s in seeds if (variant, s) in found and (against, s) in found]
                if variant == against or not pairs:
                    continue
                kind = [found[variant, s]["relevant"] - found[against, s]["relevant"] for s in pairs]
                knn = [100 * (found[variant, s]["knn"] - found[against, s]["knn"]) for s in pairs]
                lines.append(f"- {variant}: kind accepted {_interval(kind)}; final kNN {_interval(knn)} points")
        lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        with (out / "per_seed.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-reward-variants")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reward_variants")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=TARGETS)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=PREREGISTERED,
                        help=f"run these beside {REFERENCE} (default: the three reward variants)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[22, 23, 24],
                        help="pre-registered in BENCHMARKS.md (default 22 23 24)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--report-only", action="store_true", help="only write the tables from the runs there")
    parser.add_argument("--paired-against", choices=list(VARIANTS), default=None,
                        help=f"also pair every variant against this one in the report (always: {REFERENCE})")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    if not args.report_only:
        for target in args.targets:
            run(target, args.runs, args.seeds, args.config, args.variants)
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    if not args.report_only:  # where and how each part ran; the tables come from --report-only
        write_machine(args.out / f"machine-{'-'.join(args.targets)}", command)
        print(f"runs finished in {args.runs}; the tables: --report-only")
    else:
        print(report(args.runs, args.out, args.seeds, [t for t in TARGETS if (args.runs / t).exists()],
                     args.paired_against))
    print(f"took {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
