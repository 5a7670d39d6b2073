"""Running and replaying text experiments (what `explorer run` / `replay` do for modality: text)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from explorer.run.config import ExperimentConfig, load_config
from explorer.run.text_agent import open_text_corpus
from explorer.run.text_loop import TextAcquisitionLoop

TEXT_DECISION_KEYS = ("queries", "query_rewards", "accepted_urls", "planner_action", "lm_size", "train_loss")


def compare_text_decisions(recorded: list[dict], replayed: list[dict]) -> list[str]:
    """Differences between a recorded text run and its replay, in the keys that make up its decisions."""
    diffs = []
    if len(recorded) != len(replayed):
        diffs.append(f"{len(recorded)} recorded iterations but {len(replayed)} replayed")
    for a, b in zip(recorded, replayed):
        diffs += [f"iteration {a['iteration']}: {key} differs: {a.get(key)!r} != {b.get(key)!r}"
                  for key in TEXT_DECISION_KEYS if a.get(key) != b.get(key)]
    return diffs


@contextlib.contextmanager
def local_text_engine_for(cfg: ExperimentConfig, progress: bool = False, error_log: Path | None = None):
    """Yields the URL of the engine a text config needs: a started local engine over its text web, or None."""
    if cfg.search.backend != "local" or cfg.search.url:
        yield None
        return
    from explorer.web.engine import HybridIndex, SearchServer
    from explorer.web.text_encoder import default_encoder

    with SearchServer(HybridIndex(open_text_corpus(cfg, progress), default_encoder()), error_log=error_log,
                      html_documents=cfg.search.serve_html) as server:
        yield server.url


def run_text_experiment(cfg: ExperimentConfig, run_dir: Path, *, engine_url: str | None = None,
                        progress: bool = True, resume: bool = False, log=print) -> list[dict]:
    run_dir = Path(run_dir)
    if (run_dir / "metrics.jsonl").exists() and not resume:
        raise FileExistsError(f"{run_dir} already holds a run; choose another --out")
    with contextlib.ExitStack() as stack:
        run_dir.mkdir(parents=True, exist_ok=True)
        url = engine_url or stack.enter_context(local_text_engine_for(cfg, progress, error_log=run_dir / "engine.log"))
        loop = TextAcquisitionLoop(cfg, run_dir, engine_url=url, progress=progress, resume=resume)
        return loop.run(log=log)


def replay_text_run(run_dir: Path, *, progress: bool = True, log=print) -> list[str]:
    """Re-run a recorded text run from its cache alone; returns the differences in its decisions."""
    run_dir = Path(run_dir)
    loop = TextAcquisitionLoop(load_config(run_dir / "config.yaml"), run_dir, replay=True, progress=progress)
    replayed = loop.run(log=log)
    recorded = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return compare_text_decisions(recorded, replayed)
