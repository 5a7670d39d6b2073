"""`explorer demo`: the whole loop, offline, on the default web (world), in about 10 minutes on 2 CPU cores.

1. builds the config's corpus if it is a preset not built yet (the world web, once);
2. starts the local engine on 127.0.0.1;
3. evaluates raw pixels (the trivial baseline every encoder must beat);
4. pretrains one base encoder on the target alone and evaluates it (the 'base' row);
5. runs the GP policy and the random policy (random exploration: without the target's class names
   even where the config searches them first for the GP) from that same base, and continues the base with
   target-only SSL for the same number of steps the runs train (a control: do acquired images
   help beyond more steps?). With `jobs` > 1 the three run side by side, one process each at
   cores / jobs torch threads, their iterations' lines prefixed by the run's name;
6. prints one table (written to DEMO/table.md with the web's base rate under it), where the run
   folders are and their last contact sheets.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from explorer.run.baselines import (
    base_scores,
    continue_from_base,
    pixel_scores,
    pretrain_base,
)
from explorer.run.config import ExperimentConfig, load_config, save_config
from explorer.run.experiment import local_engine_for, run_experiment
from explorer.run.sheets import last_sheet
from explorer.web.presets import open_image_corpus

POLICIES = ("gp", "random")


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


RANDOM_NOTE = ("random: queries drawn uniformly from the vocabulary, without the target's class names "
               "(random exploration, as the grids' random)")


def _policy_config(cfg: ExperimentConfig, policy: str) -> ExperimentConfig:
    """The config of one policy's run. The configured policy keeps its options and class-name queries;
    the random run is random exploration: no options and no class names (they are knowledge of the
    target, so searching them first made the demo's random a half-targeted policy)."""
    if policy == cfg.policy.name:
        spec = dataclasses.replace(cfg.policy, name=policy)
    else:
        spec = dataclasses.replace(cfg.policy, name=policy, options={}, class_name_queries=False)
    return dataclasses.replace(cfg, policy=spec, name=f"{cfg.name}-{policy}")


def _job(name: str, cfg: ExperimentConfig, out: Path, url: str, base: Path, scores: dict, threads: int,
         progress: bool):
    """One of the demo's three trainings: a policy's run (its metrics rows) or the target-only control
    (its scores). In a worker process `threads` sets torch's threads and lines carry the job's name."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    def log(line: str) -> None:
        print(f"[{name}] {line}" if threads else line, flush=True)

    if name == "target only":
        log(f"target-only SSL for {cfg.iterations * cfg.train.steps_per_iteration} more steps")
        return continue_from_base(cfg, base, progress=progress)
    log(f"{cfg.iterations} iterations x {cfg.policy.queries_per_iteration} queries x "
        f"{cfg.search.results_per_query} results")
    return run_experiment(_policy_config(cfg, name), out / name, engine_url=url, base_checkpoint=base,
                          progress=progress, base_scores=scores, log=log)


def default_jobs() -> int:
    """The demo's three trainings side by side when there are at least 2 cores, else one at a time."""
    return 3 if (os.cpu_count() or 1) >= 2 else 1


def run_demo(config_path: Path, out: Path | None = None, progress: bool = True, jobs: int | None = None) -> int:
    t0 = time.time()
    cfg = load_config(config_path)
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    out = Path(out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    corpus = open_image_corpus(cfg.corpus, progress=True)  # built now if it is a preset not built yet
    web = corpus.meta
    corpus.close()
    pixels = pixel_scores(cfg)
    base = pretrain_base(cfg, out / "base.pt", progress=progress)
    scores = base_scores(cfg, base)
    names = (*POLICIES, "target only")
    with local_engine_for(cfg, error_log=out / "engine.log") as url:
        if jobs == 1:
            results = {name: _job(name, cfg, out, url, base, scores, 0, progress) for name in names}
        else:
            threads = max(1, (os.cpu_count() or 1) // min(jobs, len(names)))
            print(f"\n== gp, random and target only side by side: {min(jobs, len(names))} processes x "
                  f"{threads} torch threads ==")
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {name: pool.submit(_job, name, cfg, out, url, base, scores, threads, False)
                           for name in names}
                results = {name: future.result() for name, future in futures.items()}
    control = results["target only"]
    lines = ["| encoder           | accepted | relevant | kNN acc | probe acc |",
             "|-------------------|---------:|---------:|--------:|----------:|",
             _row("pixels", None, pixels["pixels"]), _row("pixels (centred)", None, pixels["pixels_centred"]),
             _row("base", None, scores), _row("target only", None, control),
             _row("random", results["random"], results["random"][-1]), _row("gp", results["gp"], results["gp"][-1])]
    kind = cfg.target.name
    rate = web.get("base_rate", {}).get(kind)
    where = (f"web: {cfg.corpus or 'world'}, {web['items']:,} images, "
             + (f"{rate:.1%} of them the {kind} target's kind" if rate is not None else "base rate unknown"))
    table = "\n".join(lines)
    (out / "table.md").write_text(f"{table}\n\n{RANDOM_NOTE}\n\n{where}\n")
    (out / "summary.json").write_text(json.dumps({**pixels, "base": scores, "target_only": control,
                                                  "random": results["random"][-1], "gp": results["gp"][-1],
                                                  "web": {"items": web["items"], "base_rate": rate},
                                                  "seconds": round(time.time() - t0, 1)}, indent=2))
    print(f"\n{table}\n\n{RANDOM_NOTE}\n{where}. relevant = accepted images of the target's kind (hidden "
          f"ground truth, never seen by the agent); kNN (k={cfg.train.knn_k}) and linear probe on the target's "
          "held-out probe split.")
    print(f"run folders: {out}/gp, {out}/random  (replay one offline: explorer replay {out}/gp)")
    print("contact sheets (what each iteration accepted, by query, and the best-scored rejected): "
          f"{last_sheet(out / 'gp')}, {last_sheet(out / 'random')}; see a run in the browser: "
          f"explorer serve-run {out}/gp")
    print(f"demo took {time.time() - t0:.0f}s")
    return 0
