"""`explorer demo`: the whole loop, offline, on the default corpus, in a few minutes on 2 CPU cores.

1. builds the default corpus if it is missing;
2. starts the local engine on 127.0.0.1;
3. pretrains one base encoder on the target alone and evaluates it (the 'base' row);
4. continues the base with target-only SSL for the same number of steps the runs train (a
   control: do acquired images help beyond more steps?);
5. runs the GP policy and the random policy from that same base;
6. prints one table and where the run folders are.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from explorer.config import load_config, save_config
from explorer.corpus import CorpusSpec, build_corpus, default_corpus_dir
from explorer.runs import local_engine_for, run_experiment


def _ensure_corpus(cfg) -> None:
    root = Path(cfg.corpus) if cfg.corpus else default_corpus_dir()
    if not (root / "corpus.json").exists():
        print(f"building the offline web corpus in {root} (once; a few minutes) ...")
        build_corpus(root, CorpusSpec())


def _pretrain_base(cfg, out: Path, progress: bool) -> Path:
    """One shared starting point: SSL on the target alone."""
    from explorer.agent import build_learner
    from explorer.target import load_target

    learner = build_learner(cfg, load_target(cfg.target))
    print(f"pretraining the base encoder on the target: {cfg.train.pretrain_steps} steps")
    learner.train_steps(learner.mixture, cfg.train.pretrain_steps, progress=progress)
    learner.save(out / "base.pt")
    return out / "base.pt"


def _target_only(cfg, base: Path, progress: bool) -> dict:
    """The base, trained further on the target alone for as many steps as an acquisition run."""
    import torch

    from explorer.agent import build_learner
    from explorer.evaluation import evaluate_embeddings
    from explorer.target import load_target

    target = load_target(cfg.target)
    learner = build_learner(cfg, target)
    learner.load_state_dict(torch.load(base, map_location="cpu", weights_only=True))
    steps = cfg.iterations * cfg.train.steps_per_iteration
    print(f"control: target-only SSL for {steps} more steps")
    learner.train_steps(learner.mixture, steps, progress=progress)
    (tx, ty), (vx, vy) = target.part("probe_train"), target.part("probe_test")
    scores = evaluate_embeddings(learner.embed(tx), ty, learner.embed(vx), vy, k=cfg.train.knn_k)
    return {f"eval_{k}": v for k, v in scores.items()}


def _row(name: str, metrics: list[dict] | None, scores: dict) -> str:
    if metrics:
        acc = sum(m.get("accepted", 0) for m in metrics[1:])
        prec = [m["precision_accepted"] for m in metrics[1:] if m.get("precision_accepted") is not None]
        weights = [m["accepted"] for m in metrics[1:] if m.get("precision_accepted") is not None]
        p = sum(a * b for a, b in zip(prec, weights)) / max(sum(weights), 1)
        acquired = f"{acc:8d}  {p:9.3f}"
    else:
        acquired = f"{'-':>8s}  {'-':>9s}"
    return (f"| {name:12s} | {acquired} | {scores.get('eval_knn_accuracy', float('nan')):7.3f} "
            f"| {scores.get('eval_linear_probe_accuracy', float('nan')):7.3f} |")


def run_demo(config_path: Path, out: Path | None = None, progress: bool = True) -> int:
    t0 = time.time()
    cfg = load_config(config_path)
    out = Path(out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    _ensure_corpus(cfg)
    base = _pretrain_base(cfg, out, progress)
    results = {}
    with local_engine_for(cfg) as url:
        for policy in ("gp", "random"):
            options = cfg.policy.options if policy == cfg.policy.name else {}  # gp options are not random's
            run_cfg = dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, name=policy, options=options),
                                          name=f"{cfg.name}-{policy}")
            print(f"\n== {policy} policy: {cfg.iterations} iterations x {cfg.policy.queries_per_iteration} queries ==")
            results[policy] = run_experiment(run_cfg, out / policy, engine_url=url, base_checkpoint=base,
                                             progress=progress)
    control = _target_only(cfg, base, progress)
    base_scores = results["gp"][0]
    lines = ["| encoder      | accepted  precision |  kNN acc | probe acc |",
             "|--------------|--------------------:|--------:|----------:|",
             _row("base", None, base_scores), _row("target only", None, control),
             _row("random", results["random"], results["random"][-1]), _row("gp", results["gp"], results["gp"][-1])]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({"base": base_scores, "target_only": control,
                                                  "random": results["random"][-1], "gp": results["gp"][-1]}, indent=2))
    print(f"\n{table}\n\nprecision = share of accepted images that are Fashion-MNIST (hidden ground truth); "
          f"kNN (k={cfg.train.knn_k}) and linear probe on the target's held-out split.")
    print(f"run folders: {out}/gp, {out}/random  (replay one offline: explorer replay {out}/gp)")
    print(f"demo took {time.time() - t0:.0f}s")
    return 0
