"""`explorer demo`: the whole loop, offline, on the default corpus, in about 10 minutes on 2 CPU cores.

1. builds the config's corpus if it is a preset not built yet (the default one, or `corpus: world`);
2. starts the local engine on 127.0.0.1;
3. evaluates raw pixels (the trivial baseline every encoder must beat);
4. pretrains one base encoder on the target alone and evaluates it (the 'base' row);
5. runs the GP policy and the random policy from that same base;
6. continues the base with target-only SSL for the same number of steps the runs train (a
   control: do acquired images help beyond more steps?);
7. prints one table, where the run folders are and their last contact sheets.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from explorer.run.baselines import continue_from_base, pixel_scores, pretrain_base
from explorer.run.config import load_config, save_config
from explorer.run.experiment import local_engine_for, run_experiment
from explorer.run.sheets import last_sheet
from explorer.web.presets import open_image_corpus


def _ensure_corpus(cfg) -> None:
    """The config's corpus, built now if it is a preset not built yet (explorer.web.presets)."""
    open_image_corpus(cfg.corpus, progress=True).close()


def _row(name: str, metrics: list[dict] | None, scores: dict) -> str:
    """One table row: images accepted, how many of them are relevant (hidden truth), accuracies."""
    if metrics:
        accepted = sum(m.get("accepted", 0) for m in metrics[1:])
        relevant = round(sum((m.get("precision_accepted") or 0.0) * m.get("accepted", 0) for m in metrics[1:]))
        acquired = f"{accepted:8d} | {relevant:8d}"
    else:
        acquired = f"{'-':>8s} | {'-':>8s}"
    return (f"| {name:17s} | {acquired} | {scores.get('eval_knn_accuracy', float('nan')):7.3f} "
            f"| {scores.get('eval_linear_probe_accuracy', float('nan')):9.3f} |")


def run_demo(config_path: Path, out: Path | None = None, progress: bool = True) -> int:
    t0 = time.time()
    cfg = load_config(config_path)
    out = Path(out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    _ensure_corpus(cfg)
    pixels = pixel_scores(cfg)
    base = pretrain_base(cfg, out / "base.pt", progress=progress)
    results, base_scores = {}, None
    with local_engine_for(cfg, error_log=out / "engine.log") as url:
        for policy in ("gp", "random"):
            options = cfg.policy.options if policy == cfg.policy.name else {}  # gp options are not random's
            run_cfg = dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, name=policy, options=options),
                                          name=f"{cfg.name}-{policy}")
            print(f"\n== {policy} policy: {cfg.iterations} iterations x {cfg.policy.queries_per_iteration} queries ==")
            results[policy] = run_experiment(run_cfg, out / policy, engine_url=url, base_checkpoint=base,
                                             progress=progress, base_scores=base_scores)
            base_scores = {k: v for k, v in results[policy][0].items() if k.startswith("eval_")}  # evaluated once
    print(f"\ncontrol: target-only SSL for {cfg.iterations * cfg.train.steps_per_iteration} more steps")
    control = continue_from_base(cfg, base, progress=progress)
    base_scores = results["gp"][0]
    lines = ["| encoder           | accepted | relevant | kNN acc | probe acc |",
             "|-------------------|---------:|---------:|--------:|----------:|",
             _row("pixels", None, pixels["pixels"]), _row("pixels (centred)", None, pixels["pixels_centred"]),
             _row("base", None, base_scores), _row("target only", None, control),
             _row("random", results["random"], results["random"][-1]), _row("gp", results["gp"], results["gp"][-1])]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({**pixels, "base": base_scores, "target_only": control,
                                                  "random": results["random"][-1], "gp": results["gp"][-1]}, indent=2))
    print(f"\n{table}\n\nrelevant = accepted images that are Fashion-MNIST (hidden ground truth, never seen by "
          f"the agent); kNN (k={cfg.train.knn_k}) and linear probe on the target's held-out probe split.")
    print(f"run folders: {out}/gp, {out}/random  (replay one offline: explorer replay {out}/gp)")
    print("contact sheets (what each iteration accepted, by query, and the best-scored rejected): "
          f"{last_sheet(out / 'gp')}, {last_sheet(out / 'random')}; see a run in the browser: "
          f"explorer serve-run {out}/gp")
    print(f"demo took {time.time() - t0:.0f}s")
    return 0
