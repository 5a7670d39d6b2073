"""Running, replaying and comparing experiments (what `explorer run`, `replay`, `daemon` and `demo`
do), for either modality: `build_loop` picks the modality's loop from the config."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from explorer.run.config import ExperimentConfig, load_config
from explorer.run.image import ImageLoop, open_corpus
from explorer.run.ledger import read_metrics
from explorer.run.loop import RunLoop, compare_decisions
from explorer.run.text import TextLoop, open_text_corpus
from policies import searches_by_image

ENGINE_LOG = "engine.log"  # the local engine's request errors, in the run folder
LOOPS = {"image": ImageLoop, "text": TextLoop}  # modality -> its loop


def build_loop(cfg: ExperimentConfig, run_dir: Path, **options) -> RunLoop:
    """The modality's loop over `run_dir`; `options` are its constructor's (engine_url, replay,
    progress, resume, keep_checkpoints; images also base_checkpoint, base_scores)."""
    return LOOPS[cfg.modality](cfg, run_dir, **options)


def open_web(cfg: ExperimentConfig, progress: bool = False):
    """The corpus the local engine serves for a config: its image corpus or its text web."""
    if cfg.modality == "text":
        return open_text_corpus(cfg, progress)
    return open_corpus(cfg, progress)


@contextlib.contextmanager
def local_engine_for(cfg: ExperimentConfig, error_log: Path | None = None, *, progress: bool = False,
                     port: int = 0, image_index: bool | None = None):
    """Yields the URL of the engine a config needs: a started local engine over its corpus (with its
    image index when the policy queries by example, or when `image_index` says so: a grid whose
    other policies do), or None. The engine's request errors are appended to `error_log` (not printed)."""
    if cfg.search.backend != "local" or cfg.search.url:
        yield None
        return
    from explorer.web.engine import HybridIndex, SearchServer
    from explorer.web.image_index import ImageIndex
    from explorer.web.text_encoder import default_encoder

    web = open_web(cfg, progress)
    by_image = cfg.modality == "image" and (searches_by_image(cfg.policy.name) if image_index is None else image_index)
    with SearchServer(HybridIndex(web, default_encoder()), port=port, error_log=error_log,
                      html_documents=cfg.modality == "text" and cfg.search.serve_html,
                      image_index=ImageIndex.open(web, progress=progress) if by_image else None) as server:
        yield server.url


def run_experiment(cfg: ExperimentConfig, run_dir: Path, *, engine_url: str | None = None,
                   base_checkpoint: Path | None = None, progress: bool = True, keep_checkpoints: int = 3,
                   base_scores: dict | None = None, resume: bool = False, log=print) -> list[dict]:
    """Run a config into a new run folder (or continue it, `resume`); returns the metrics rows."""
    run_dir = Path(run_dir)
    if (run_dir / "metrics.jsonl").exists() and not resume:
        raise FileExistsError(f"{run_dir} already holds a run; choose another --out")
    options = {"base_checkpoint": base_checkpoint, "base_scores": base_scores} if cfg.modality == "image" else {}
    with contextlib.ExitStack() as stack:
        run_dir.mkdir(parents=True, exist_ok=True)
        url = engine_url or stack.enter_context(local_engine_for(cfg, run_dir / ENGINE_LOG, progress=progress))
        loop = build_loop(cfg, run_dir, engine_url=url, progress=progress, keep_checkpoints=keep_checkpoints,
                          resume=resume, **options)
        stack.callback(loop.close)
        return loop.run(log=log)


def replay_run(run_dir: Path, *, progress: bool = True, log=print) -> list[str]:
    """Re-run a recorded run from its cache alone; returns the differences in its decisions."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    options = {}
    if cfg.modality == "image":
        base = json.loads((run_dir / "run.json").read_text()).get("base_checkpoint")
        if base and not Path(base).exists():
            raise FileNotFoundError(f"the run started from {base}, which is gone: replay needs it")
        options["base_checkpoint"] = Path(base) if base else None
    loop = build_loop(cfg, run_dir, replay=True, progress=progress, **options)
    try:
        replayed = loop.run(log=log)
    finally:
        loop.close()
    return compare_decisions(read_metrics(run_dir / "metrics.jsonl"), replayed, loop.DECISION_KEYS)


def default_run_dir(cfg: ExperimentConfig, root: Path = Path("runs")) -> Path:
    return root / f"{cfg.name}-{cfg.policy.name}-{time.strftime('%Y%m%d-%H%M%S')}"
