"""The rows every results table has beside the method: raw pixels, the base encoder, and the base
trained further on the target alone (or on the target plus a fixed set of images) for as many
steps as an acquisition run trains.

All of them are evaluated like the runs are: kNN and linear probe of the encoder's embeddings of
the target's labelled probe_train / probe_test split (`explorer.score.evaluation`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from explorer.run.config import ExperimentConfig
from explorer.run.image import build_learner, evaluate_learner
from explorer.score.evaluation import eval_metrics, pixel_baselines
from explorer.score.target import TargetSet, load_target


def pixel_scores(cfg: ExperimentConfig, target: TargetSet | None = None) -> dict[str, dict[str, float]]:
    """{'pixels': ..., 'pixels_centred': ...}: the same evaluation on raw grey pixels."""
    target = target or load_target(cfg.target)
    (tx, ty), (vx, vy) = target.part("probe_train"), target.part("probe_test")
    return {name: eval_metrics(scores) for name, scores in pixel_baselines(tx, ty, vx, vy, k=cfg.train.knn_k).items()}


def pretrain_base(cfg: ExperimentConfig, path: Path, *, progress: bool = False, log=print) -> Path:
    """The shared starting point of compared runs: `train.pretrain_steps` SSL steps on the target alone."""
    learner = build_learner(cfg, load_target(cfg.target))
    log(f"pretraining the base encoder on the target: {cfg.train.pretrain_steps} steps")
    learner.train_steps(learner.mixture, cfg.train.pretrain_steps, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    learner.save(path)
    return path


def load_base(cfg: ExperimentConfig, base: Path, target: TargetSet):
    """The config's learner for `target`, with the base checkpoint's weights and state."""
    learner = build_learner(cfg, target)
    learner.load_state_dict(torch.load(base, map_location="cpu", weights_only=True))
    return learner


def base_scores(cfg: ExperimentConfig, base: Path) -> dict[str, float]:
    """The base encoder's evaluation, as iteration 0 of a run from it computes it (the 'base' row)."""
    target = load_target(cfg.target)
    return evaluate_learner(load_base(cfg, base, target), target, cfg.train.knn_k)


def continue_from_base(cfg: ExperimentConfig, base: Path, *, steps: int | None = None,
                       extra: torch.Tensor | None = None, progress: bool = False) -> dict[str, float]:
    """Train the base `steps` more SSL steps (default: as many as a run's iterations) on the target,
    plus `extra` images in the mixture if given; evaluate.
    The lr and momentum schedules end where this training ends (from the base's step on), so a
    longer control is not trained at the end value of a shorter schedule.

    With no extra images this is the target-only control; with a fixed set of web images it
    measures what data of that kind is worth at this budget (bench/exp_data_value.py)."""
    steps = cfg.iterations * cfg.train.steps_per_iteration if steps is None else steps
    if cfg.learner.total_steps is None:  # the schedule ends where this training ends
        cfg = dataclasses.replace(cfg, learner=dataclasses.replace(
            cfg.learner, total_steps=cfg.train.pretrain_steps + steps))
    target = load_target(cfg.target)
    learner = load_base(cfg, base, target)
    if extra is not None and len(extra):
        learner.mixture.add_accepted(extra)
    t0 = time.time()
    learner.train_steps(learner.mixture, steps, progress=progress)
    return {**evaluate_learner(learner, target, cfg.train.knn_k), "steps": steps,
            "seconds": round(time.time() - t0, 1)}
