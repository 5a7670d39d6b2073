"""`explorer daemon`: the acquisition loop as a long-running, resumable process; `explorer status`.

State lives in the run folder (see explorer/run/loop.py): after every finished iteration the ledger
(SQLite, WAL) commits it and then a complete checkpoint directory is added atomically (the last K
kept); on resume the newest complete checkpoint is loaded and logs and ledger rows written after it
are cut, so a killed daemon restarts exactly where its last checkpoint left it. SIGTERM / SIGINT set a flag that the loop
honours at its next safe point (after search+fetch, before an iteration writes its logs, or
between iterations); the interrupted iteration is abandoned and the process exits 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

from explorer.run.checkpoints import has_checkpoint
from explorer.run.config import load_config, save_config
from explorer.run.dashboard import StatusServer
from explorer.run.disk import DiskConfig
from explorer.run.experiment import ENGINE_LOG, build_loop, local_engine_for
from explorer.run.status import run_status, status_summary  # noqa: F401 (`explorer status`, read beside the daemon)


def _event(run_dir: Path, kind: str, **fields) -> None:
    with open(run_dir / "daemon.jsonl", "a") as f:
        f.write(json.dumps({"time": round(time.time(), 3), "event": kind, **fields}) + "\n")


def _recorded_port(run_dir: Path) -> int:
    """The local engine's port in the recorded backend: a resumed run keeps its URLs (and cache keys)."""
    path = run_dir / "backend.json"
    if not path.exists():
        return 0
    return urlsplit(json.loads(path.read_text()).get("url", "")).port or 0


EXIT_STOPPED = 3  # the disk budget is spent or the disk is full; the state is resumable


def run_daemon(config: Path | None, run_dir: Path, *, forever: bool = False, progress: bool = False,
               status_port: int | None = None, keep_checkpoints: int = 3, max_disk_gb: float | None = None,
               log=print) -> int:
    run_dir = Path(run_dir)
    resuming = has_checkpoint(run_dir)
    if resuming:
        cfg = load_config(run_dir / "config.yaml")  # the run's own config, not a changed file
    elif config is None and (run_dir / "config.yaml").exists():  # stopped before its first checkpoint
        cfg = load_config(run_dir / "config.yaml")
        log(f"{run_dir} has no checkpoint yet: starting it again from its config.yaml")
    elif config is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint to resume and no config was given")
    else:
        cfg = load_config(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    if max_disk_gb is not None and max_disk_gb != cfg.disk.max_gb:
        cfg = dataclasses.replace(cfg, disk=DiskConfig(max_gb=max_disk_gb))
        if resuming:  # a later resume without the option keeps the new budget
            save_config(cfg, run_dir / "config.yaml")
        _event(run_dir, "disk_budget", max_gb=max_disk_gb)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(local_engine_for(cfg, run_dir / ENGINE_LOG,
                                                   port=_recorded_port(run_dir) if resuming else 0))
        loop = build_loop(cfg, run_dir, engine_url=url, progress=progress, resume=resuming,
                          keep_checkpoints=keep_checkpoints)
        stack.callback(loop.close)
        if status_port is not None:
            status = StatusServer(run_dir, status_port)
            stack.callback(status.stop)
            log(f"dashboard at {status.root}/ (JSON at {status.url})")

        def request_stop(signum, frame):
            loop.stop_requested = True
            log(f"received {signal.Signals(signum).name}: stopping at the next safe point")
        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        _event(run_dir, "resume" if resuming else "start", iteration=loop.iteration,
               checkpoint=str(loop.resumed_from) if loop.resumed_from else None)
        log(f"{'resumed' if resuming else 'started'} {run_dir} at iteration {loop.iteration}")
        try:
            until = float("inf") if forever else cfg.iterations
            loop.run(until=until, log=lambda line: (log(line), _event(run_dir, "iteration", summary=line)))
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if loop.stopped_by:
            _event(run_dir, "stopped", iteration=loop.iteration, reason=loop.stopped_by)
            log(f"stopped at iteration {loop.iteration}: {loop.stopped_by}")
            return EXIT_STOPPED
        _event(run_dir, "stop" if loop.stop_requested else "done", iteration=loop.iteration)
        log(f"{'stopped' if loop.stop_requested else 'finished'} at iteration {loop.iteration}; "
            f"checkpoints in {run_dir / 'checkpoints'}")
    return 0
