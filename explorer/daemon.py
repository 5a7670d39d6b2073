"""`explorer daemon`: the acquisition loop as a long-running, resumable process; `explorer status`.

State lives in the run folder (see explorer/loop.py): the checkpoint is replaced atomically after
every finished iteration, and logs written after it are truncated on resume, so a killed daemon
restarts exactly where its last checkpoint left it. SIGTERM / SIGINT set a flag that the loop
honours at its next safe point (after search+fetch, before an iteration writes its logs, or
between iterations); the interrupted iteration is abandoned and the process exits 0.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

from explorer.config import load_config
from explorer.loop import AcquisitionLoop
from explorer.runs import read_metrics


def _event(run_dir: Path, kind: str, **fields) -> None:
    with open(run_dir / "daemon.jsonl", "a") as f:
        f.write(json.dumps({"time": round(time.time(), 3), "event": kind, **fields}) + "\n")


def _recorded_port(run_dir: Path) -> int:
    """The local engine's port in the recorded backend: a resumed run keeps its URLs (and cache keys)."""
    path = run_dir / "backend.json"
    if not path.exists():
        return 0
    return urlsplit(json.loads(path.read_text()).get("url", "")).port or 0


def run_daemon(config: Path | None, run_dir: Path, *, forever: bool = False, progress: bool = False,
               log=print) -> int:
    run_dir = Path(run_dir)
    resuming = (run_dir / "checkpoint.pt").exists()
    if resuming:
        cfg = load_config(run_dir / "config.yaml")  # the run's own config, not a changed file
    elif config is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint to resume and no config was given")
    else:
        cfg = load_config(config)
    server = None
    if cfg.search.backend == "local" and not cfg.search.url:
        from explorer.cli import open_local_engine
        from explorer.corpus import default_corpus_dir

        server = open_local_engine(Path(cfg.corpus) if cfg.corpus else default_corpus_dir(),
                                   port=_recorded_port(run_dir) if resuming else 0)
    try:
        loop = AcquisitionLoop(cfg, run_dir, engine_url=server.url if server else None, progress=progress,
                               resume=resuming)

        def request_stop(signum, frame):
            loop.stop_requested = True
            log(f"received {signal.Signals(signum).name}: stopping at the next safe point")
        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        _event(run_dir, "resume" if resuming else "start", iteration=loop.iteration)
        log(f"{'resumed' if resuming else 'started'} {run_dir} at iteration {loop.iteration}")
        try:
            until = float("inf") if forever else cfg.iterations
            loop.run(until=until, log=lambda line: (log(line), _event(run_dir, "iteration", summary=line)))
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        _event(run_dir, "stop" if loop.stop_requested else "done", iteration=loop.iteration)
        log(f"{'stopped' if loop.stop_requested else 'finished'} at iteration {loop.iteration}; "
            f"checkpoint {run_dir / 'checkpoint.pt'}")
    finally:
        if server:
            server.stop()
    return 0


def run_status(run_dir: Path) -> str:
    """Progress, rates, budget left and the last errors of a run folder (read-only)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["iteration"] > 0] \
        if (run_dir / "metrics.jsonl").exists() else []
    lines = [f"run: {run_dir}  ({cfg.name}, policy {cfg.policy.name})",
             f"iterations: {len(rows)} of {cfg.iterations}"]
    if rows:
        hours = sum(r["seconds"] for r in rows) / 3600
        accepted = sum(r["accepted"] for r in rows)
        fetched = sum(r["fetched"] for r in rows)
        lines.append(f"rates: {len(rows) / hours:.1f} iterations/h, {fetched / hours / 3600:.1f} fetches/s, "
                     f"{accepted} images accepted")
        last = rows[-1]
        lines.append(f"last iteration {last['iteration']}: loss {last['ssl_loss']:.3f}, "
                     f"{last['accepted']} accepted, precision {last.get('precision_accepted')}")
        evals = [r for r in rows if "eval_knn_accuracy" in r]
        if evals:
            lines.append(f"last eval (iteration {evals[-1]['iteration']}): kNN {evals[-1]['eval_knn_accuracy']:.3f}, "
                         f"probe {evals[-1]['eval_linear_probe_accuracy']:.3f}")
        errors = [e for r in rows[-5:] for e in r.get("search_errors", [])]
        rejected: dict[str, int] = {}
        for r in rows[-5:]:
            for k, v in r.get("rejected", {}).items():
                rejected[k] = rejected.get(k, 0) + v
        lines.append(f"last 5 iterations: {len(errors)} search errors, rejected {rejected or 'none'}")
        lines += [f"  {e}" for e in errors[-3:]]
    events = run_dir / "daemon.jsonl"
    if events.exists():
        last = json.loads(events.read_text().splitlines()[-1])
        lines.append(f"daemon: last event {last['event']!r} at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last['time']))}")
    return "\n".join(lines)
