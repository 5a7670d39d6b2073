"""Running, replaying and comparing experiments (what `explorer run`, `replay` and `demo` do)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from explorer.run.config import ExperimentConfig, load_config
from explorer.run.ledger import read_metrics
from explorer.run.loop import AcquisitionLoop, compare_decisions

ENGINE_LOG = "engine.log"  # the local engine's request errors, in the run folder


@contextlib.contextmanager
def local_engine_for(cfg: ExperimentConfig, error_log: Path | None = None):
    """Yields the URL of the engine a config needs: a started local engine, or None. The engine's
    request errors are appended to `error_log` (not printed)."""
    if cfg.search.backend != "local" or cfg.search.url:
        yield None
        return
    from explorer.run.agent import open_corpus
    from explorer.web.engine import HybridIndex, SearchServer
    from explorer.web.text_encoder import default_encoder

    with SearchServer(HybridIndex(open_corpus(cfg), default_encoder()), error_log=error_log) as server:
        yield server.url


def run_experiment(cfg: ExperimentConfig, run_dir: Path, *, engine_url: str | None = None,
                   base_checkpoint: Path | None = None, progress: bool = True, keep_checkpoints: int = 3,
                   base_scores: dict | None = None, log=print) -> list[dict]:
    if cfg.modality == "text":  # the LM loop over the text web (explorer.run.text_loop)
        from explorer.run.text_experiment import run_text_experiment
        return run_text_experiment(cfg, run_dir, engine_url=engine_url, progress=progress, log=log)
    if (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"{run_dir} already holds a run; choose another --out")
    with contextlib.ExitStack() as stack:
        run_dir.mkdir(parents=True, exist_ok=True)
        url = engine_url or stack.enter_context(local_engine_for(cfg, error_log=run_dir / ENGINE_LOG))
        loop = AcquisitionLoop(cfg, run_dir, engine_url=url, base_checkpoint=base_checkpoint, progress=progress,
                               keep_checkpoints=keep_checkpoints, base_scores=base_scores)
        stack.callback(loop.close)
        return loop.run(log=log)


def replay_run(run_dir: Path, *, progress: bool = True, log=print) -> list[str]:
    """Re-run a recorded run from its cache alone; returns the differences in its decisions."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.modality == "text":
        from explorer.run.text_experiment import replay_text_run
        return replay_text_run(run_dir, progress=progress, log=log)
    base = json.loads((run_dir / "run.json").read_text()).get("base_checkpoint")
    if base and not Path(base).exists():
        raise FileNotFoundError(f"the run started from {base}, which is gone: replay needs it")
    loop = AcquisitionLoop(cfg, run_dir, replay=True, base_checkpoint=Path(base) if base else None,
                           progress=progress)
    try:
        replayed = loop.run(log=log)
    finally:
        loop.close()
    return compare_decisions(read_metrics(run_dir / "metrics.jsonl"), replayed)


def default_run_dir(cfg: ExperimentConfig, root: Path = Path("runs")) -> Path:
    return root / f"{cfg.name}-{cfg.policy.name}-{time.strftime('%Y%m%d-%H%M%S')}"
