"""The run grid behind experiments 1 and 2: every acquisition policy x seeds, from per-seed bases.

A seed varies everything that is random: the encoder's heads and the batch order and
augmentations (`learner.seed`), the acquired pool's eviction (`mixture.seed`) and the policy
(`seed`). For each seed: raw pixels are evaluated (`pixels.json`); one base encoder is pretrained
on the target alone and evaluated (the 'base' row); a target-only control continues it for as many
SSL steps as an acquisition run trains (`target-only.json`); then every condition (a policy with
its options) runs the configured loop from that same base against one local engine. All runs
train the same number of SSL steps, each batch holding the same target images as the control's,
so differences come from the acquired data (see learners/mixture.py).

Finished runs are kept and skipped, a run cut short resumes from its checkpoint, so the grid can be
stopped and continued. Nothing here is tuned on the evaluation split: the policies use their
defaults (the science config's for the gp), and every seed that ran is reported.

    python bench/acquisition_grid.py                          # 3 seeds x 6 conditions on configs/science.yaml
    python bench/acquisition_grid.py --seeds 0 --conditions random gp-softmax
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policies.ppo_llm import PPO_EARLIER_DEFAULTS  # noqa: E402

# name -> (policy, options); gp-ucb has the science and demo configs' options, gp-softmax changes
# only the acquisition (both: a quarter of every batch uniform, GPConfig.explore_share)
CONDITIONS = {
    "random": ("random", {}),
    "gp-softmax": ("gp", {"acquisition": "softmax", "explore_first": 16}),
    "gp-ucb": ("gp", {"acquisition": "ucb", "explore_first": 16}),
    "oracle": ("oracle", {}),
    "knn-retrieval": ("knn-retrieval", {}),  # the target's images as queries to the engine's image index
    "llm-prompt": ("llm-prompt", {}),  # Gemma 3 270M from the prompt alone: the ablation of PPO
    # the same LM and prompt, LoRA adapters tuned with PPO, at the options the grid measured it with
    # (policies.ppo_llm.PPO_EARLIER_DEFAULTS); the policy's defaults since are ppo-meaning-nofound's
    "ppo": ("ppo", PPO_EARLIER_DEFAULTS),
    "ppo-meaning-nofound": ("ppo", {}),  # BENCHMARKS 8's simulated configuration, now `ppo` with no options
    "hybrid": ("hybrid", {}),
    "hybrid-prompt": ("hybrid", {"ppo_updates": 0}),  # the same GP + Gemma rewrites, never updated
    "ppo-tiny": ("ppo", {"model": "tiny"}),  # the byte-level LM trained from scratch (before Gemma)
    "hybrid-tiny": ("hybrid", {"model": "tiny"}),
}
DEFAULT_RUNS = ROOT / "runs" / "bench-acquisition"


def _finished(run_dir: Path, iterations: int) -> bool:
    from explorer.run.ledger import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return False
    rows = read_metrics(path)
    return len(rows) == iterations + 1 and "eval_knn_accuracy" in rows[-1]


def seeded(cfg, seed: int):
    """`cfg` with every seed set to `seed`: policy, learner (heads, batches, views) and mixture."""
    return dataclasses.replace(cfg, seed=seed, learner=dataclasses.replace(cfg.learner, seed=seed),
                               mixture=dataclasses.replace(cfg.mixture, seed=seed))


def _base(cfg, seed_dir: Path) -> Path:
    """The seed's base encoder, pretrained once, and its scores (base.json)."""
    from explorer.run.baselines import base_scores, pretrain_base

    path = seed_dir / "base.pt"
    if not path.exists():
        pretrain_base(cfg, path)
    if not (seed_dir / "base.json").exists():
        (seed_dir / "base.json").write_text(json.dumps(base_scores(cfg, path)) + "\n")
    return path


def _controls(cfg, base: Path, seed_dir: Path) -> None:
    """pixels.json, pixels-centred.json and target-only.json beside the seed's runs."""
    from explorer.run.baselines import continue_from_base, pixel_scores

    if not (seed_dir / "pixels-centred.json").exists():
        scores = pixel_scores(cfg)
        (seed_dir / "pixels.json").write_text(json.dumps(scores["pixels"]) + "\n")
        (seed_dir / "pixels-centred.json").write_text(json.dumps(scores["pixels_centred"]) + "\n")
    path = seed_dir / "target-only.json"
    if not path.exists():
        path.write_text(json.dumps(continue_from_base(cfg, base)) + "\n")


def _condition(cfg, name: str, seed: int):
    """The config with the condition's policy; options the config sets for that same policy stay
    (under the condition's own), so `--set policy.options.KEY=VALUE` reaches the gp conditions."""
    policy, options = CONDITIONS[name]
    options = {**cfg.policy.options, **options} if cfg.policy.name == policy else options
    return dataclasses.replace(cfg, name=f"{cfg.name}-{name}-s{seed}",
                               policy=dataclasses.replace(cfg.policy, name=policy, options=options))


def run_grid(config: Path, out: Path, seeds: list[int], conditions: list[str],
             overrides: dict | None = None) -> list[Path]:
    """Runs what is missing; returns every run folder of the grid. `overrides`: dotted config fields
    set on top of the config file (as `explorer run --set` does)."""
    from explorer.run.checkpoints import prune_checkpoints
    from explorer.run.config import load_config, save_config
    from explorer.run.experiment import local_engine_for
    from explorer.run.image import ImageLoop
    from explorer.web.presets import ensure_corpus

    base_cfg = load_config(config, overrides)
    ensure_corpus(base_cfg.corpus)
    run_dirs = []
    out.mkdir(parents=True, exist_ok=True)
    from policies import searches_by_image

    by_image = any(searches_by_image(CONDITIONS[name][0]) for name in conditions)
    with local_engine_for(base_cfg, error_log=out / "engine.log", image_index=by_image) as url:
        for seed in seeds:
            cfg = seeded(base_cfg, seed)
            seed_dir = out / f"seed-{seed}"
            print(f"== seed {seed}: base and controls ==", flush=True)
            base = _base(cfg, seed_dir)
            _controls(cfg, base, seed_dir)
            for name in conditions:
                run_dir = seed_dir / name
                run_dirs.append(run_dir)
                if _finished(run_dir, cfg.iterations):
                    continue
                print(f"== seed {seed}: {name} ==", flush=True)
                run_cfg = _condition(cfg, name, seed)
                run_dir.mkdir(parents=True, exist_ok=True)
                save_config(run_cfg, run_dir / "config.yaml")
                loop = ImageLoop(run_cfg, run_dir, engine_url=url, base_checkpoint=base, progress=False,
                                       resume=True, base_scores=json.loads((seed_dir / "base.json").read_text()))
                loop.run(log=lambda msg: print(msg, flush=True))
                _check_searched(run_dir)
                prune_checkpoints(run_dir, keep=1)  # finished: its last checkpoint is all it needs
    return run_dirs


def _check_searched(run_dir: Path) -> None:
    """A run none of whose searches succeeded measured nothing: set it aside (so that the next
    attempt starts it again) and stop the grid with the engine's answer."""
    from explorer.run.ledger import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")[1:]
    if rows and all(row.get("all_searches_failed") for row in rows):
        failed = run_dir.with_name(f"{run_dir.name}.failed-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(failed)
        error = next((e for row in rows for e in row.get("search_errors", [])), "no error recorded")
        raise RuntimeError(f"every search of {run_dir} failed (moved to {failed.name}); first error: {error}")


def add_grid_arguments(parser: argparse.ArgumentParser, grid_flag: str) -> None:
    """The grid's options (its folder under `grid_flag`), shared by the experiments that use it."""
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "science.yaml")
    parser.add_argument(grid_flag, dest="grid", type=Path, default=DEFAULT_RUNS,
                        help="grid folder (default runs/bench-acquisition)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set iterations=20 (as explorer run --set)")


def run_grid_from_args(args: argparse.Namespace) -> list[Path]:
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from explorer.run.config import parse_overrides

    return run_grid(args.config, args.grid, args.seeds, args.conditions, parse_overrides(args.set))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_arguments(parser, "--out")
    args = parser.parse_args(argv)
    t0 = time.time()
    run_grid_from_args(args)
    print(f"grid complete in {args.grid} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
