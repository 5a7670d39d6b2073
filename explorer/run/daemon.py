"""`explorer daemon`: the acquisition loop as a long-running, resumable process; `explorer status`.

State lives in the run folder (see explorer/run/loop.py): after every finished iteration the ledger
(SQLite, WAL) commits it and then a complete checkpoint directory is added atomically (the last K
kept); on resume the newest complete checkpoint is loaded and logs and ledger rows written after it
are cut, so a killed daemon restarts exactly where its last checkpoint left it. SIGTERM / SIGINT set a flag that the loop
honours at its next safe point (after search+fetch, before an iteration writes its logs, or
between iterations); the interrupted iteration is abandoned and the process exits 0.

Under torchrun (`torchrun --nproc_per_node N -m explorer daemon ...`) rank 0 runs all of the above
and the other ranks train beside it (explorer/run/ranks.py).
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
from explorer.run.dashboard import DashboardServer
from explorer.run.disk import DiskConfig, folder_usage, format_usage
from explorer.run.experiment import ENGINE_LOG, build_loop, local_engine_for
from explorer.run.ledger import LEDGER, RunLedger, read_metrics
from explorer.run.ranks import Ranks


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
    """The daemon in this process: the whole run, or under torchrun this rank's part of it (rank 0
    leads; every other rank follows it: explorer/run/ranks.py). Returns the exit code."""
    ranks = Ranks()
    if not ranks.leader:
        previous = ranks.ignore_stop_signals()
        try:
            ranks.follow()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        ranks.shutdown()  # only after a run rank 0 closed: a failed rank exits at once (torchrun stops the rest)
        return 0
    code = _lead(config, run_dir, ranks, forever=forever, progress=progress, status_port=status_port,
                 keep_checkpoints=keep_checkpoints, max_disk_gb=max_disk_gb, log=log)
    ranks.close()  # not after an exception: the others may be inside a collective; torchrun stops them
    ranks.shutdown()
    return code


def _lead(config: Path | None, run_dir: Path, ranks: Ranks, *, forever: bool, progress: bool,
          status_port: int | None, keep_checkpoints: int, max_disk_gb: float | None, log) -> int:
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
                          keep_checkpoints=keep_checkpoints, ranks=ranks)
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
               checkpoint=str(loop.resumed_from) if loop.resumed_from else None, ranks=ranks.world_size)
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


# What `explorer status` shows of the last iteration and the last evaluation, per modality.
STATUS_KEYS = {"image": {"last": ("iteration", "ssl_loss", "accepted", "precision_accepted", "time"),
                         "eval": ("iteration", "eval_knn_accuracy", "eval_linear_probe_accuracy")},
               "text": {"last": ("iteration", "planner_action", "train_loss", "accepted", "precision_accepted",
                                 "flops_total", "flops_remaining", "time"),
                        "eval": ("iteration", "eval_perplexity")}}


def status_summary(run_dir: Path) -> dict:
    """Progress, rates, budget left, last evaluation and last errors of a run folder (read-only)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    rows, totals = _progress(run_dir)
    keys = STATUS_KEYS[cfg.modality]
    out = {"run_dir": str(run_dir), "name": cfg.name, "modality": cfg.modality, "policy": cfg.policy.name,
           "iterations_done": len(rows), "iterations_budget": cfg.iterations}
    if rows:
        hours = max(totals["seconds"] / 3600, 1e-9)
        last, evals = rows[-1], [r for r in rows if keys["eval"][1] in r]
        out.update(iterations_per_hour=len(rows) / hours,
                   fetches_per_second=totals["fetched"] / hours / 3600,
                   accepted_total=totals["accepted_total"], queries_issued=totals["queries_issued"],
                   searches_failed=sum(s == "failed" for r in rows for s in r.get("query_status", [])),
                   all_searches_failed=[r["iteration"] for r in rows if r.get("all_searches_failed")],
                   last_iteration={k: last.get(k) for k in keys["last"]},
                   last_eval={k: evals[-1][k] for k in keys["eval"]} if evals else None,
                   recent_search_errors=[e for r in rows[-5:] for e in r.get("search_errors", [])][-3:],
                   stage_seconds=last.get("stage_seconds"),
                   recent_rejected=totals["recent_rejected"], reward=reward_health(last))
    out["disk"] = {"usage": folder_usage(run_dir), "max_bytes": cfg.disk.max_bytes}
    if (run_dir / LEDGER).exists():
        with RunLedger(run_dir / LEDGER, readonly=True) as ledger:
            out["disk"]["evicted"], out["disk"]["evicted_bytes"] = ledger.evictions()
    events = run_dir / "daemon.jsonl"
    if events.exists():
        out["last_event"] = json.loads(events.read_text().splitlines()[-1])
    return out


REWARD_KEYS = ("reward_encoder", "reward_spread", "reward_collapsed", "accept_threshold", "above_threshold",
               "candidate_spread", "accepted_nothing_for")


def reward_health(row: dict) -> dict:
    """The reward's scale in an iteration's row and, when it is in trouble, a warning in words:
    a collapsed reward (the base encoder read instead) or nothing accepted for two iterations."""
    health = {k: row.get(k) for k in REWARD_KEYS if k in row}
    if row.get("reward_collapsed"):
        health["warning"] = (f"the reward collapsed under the current encoder (target rewards spread "
                             f"{row.get('reward_spread')}); reading the {row.get('reward_encoder')} encoder")
    elif (row.get("accepted_nothing_for") or 0) >= 2:
        health["warning"] = (f"nothing accepted for {row['accepted_nothing_for']} iterations: the web may hold nothing "
                             "of the target's kind for these queries, or the target's style differs from the web's "
                             "copies of it (see README, 'When nothing is accepted')")
    return health


def _progress(run_dir: Path) -> tuple[list[dict], dict]:
    """Rows of the finished iterations (>= 1) and their totals (see `RunLedger.summary`): from the
    ledger when the run has one, else from metrics.jsonl."""
    if (run_dir / LEDGER).exists():
        with RunLedger(run_dir / LEDGER, readonly=True) as ledger:
            return [r for r in ledger.metrics() if r["iteration"] > 0], ledger.summary(recent=5)
    metrics = run_dir / "metrics.jsonl"
    rows = [r for r in read_metrics(metrics) if r["iteration"] > 0] if metrics.exists() else []
    return rows, _log_totals(rows)


def _log_totals(rows: list[dict]) -> dict:
    """`RunLedger.summary` computed from metrics rows, for run folders without a ledger."""
    rejected: dict[str, int] = {}
    for r in rows[-5:]:
        for k, v in r.get("rejected", {}).items():
            rejected[k] = rejected.get(k, 0) + v
    return {"seconds": sum(r["seconds"] for r in rows), "fetched": sum(r["fetched"] for r in rows),
            "accepted_total": sum(r["accepted"] for r in rows),
            "queries_issued": sum(len(r.get("queries", [])) for r in rows), "recent_rejected": rejected}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def run_status(run_dir: Path) -> str:
    """`status_summary` as text for `explorer status`."""
    s = status_summary(run_dir)
    lines = [f"run: {s['run_dir']}  ({s['name']}, {s['modality']}, policy {s['policy']})",
             f"iterations: {s['iterations_done']} of {s['iterations_budget']}"]
    if s["iterations_done"]:
        last, unit = s["last_iteration"], "images" if s["modality"] == "image" else "documents"
        lines.append(f"rates: {s['iterations_per_hour']:.1f} iterations/h, {s['fetches_per_second']:.1f} fetches/s, "
                     f"{s['queries_issued']} queries issued, {s['accepted_total']} {unit} accepted")
        lines.append("last iteration: " + ", ".join(f"{k} {_fmt(v)}" for k, v in last.items() if k != "time"))
        if s.get("stage_seconds"):
            lines.append("its time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["stage_seconds"].items()))
        if s["last_eval"]:
            ev = s["last_eval"]
            lines.append(f"last eval (iteration {ev['iteration']}): "
                         + ", ".join(f"{k.removeprefix('eval_')} {_fmt(v)}" for k, v in ev.items() if k != "iteration"))
        reward = {k: v for k, v in s["reward"].items() if k != "warning"}
        if reward:
            lines.append("reward: " + ", ".join(f"{k.removeprefix('reward_')} {_fmt(v)}" for k, v in reward.items()))
        if "warning" in s["reward"]:
            lines.append(f"WARNING: {s['reward']['warning']}")
        lines.append(f"last 5 iterations: rejected {s['recent_rejected'] or 'none'}; "
                     f"search errors: {len(s['recent_search_errors'])}")
        lines += [f"  {e}" for e in s["recent_search_errors"]]
        if s["searches_failed"]:
            blind = s["all_searches_failed"]
            lines.append(f"failed searches: {s['searches_failed']} (no reward, searched again within "
                         "search.failed_query_retries)" + (f"; every search failed in {len(blind)} iterations "
                                                           f"(the last: {', '.join(map(str, blind[-5:]))})"
                                                           if blind else ""))
    disk = s["disk"]
    lines.append(f"disk: {format_usage(disk['usage'], disk['max_bytes'])}"
                 + (f"; {disk['evicted']} rejected bodies evicted ({disk['evicted_bytes'] / 2**20:.1f} MiB)"
                    if disk.get("evicted") else ""))
    if "last_event" in s:
        ev = s["last_event"]
        lines.append(f"daemon: last event {ev['event']!r} at "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ev['time']))}")
    return "\n".join(lines)


class StatusServer(DashboardServer):
    """The run's dashboard (explorer/run/dashboard.py) with `status_summary` as JSON at /status."""

    def __init__(self, run_dir: Path, port: int = 0, host: str = "127.0.0.1"):
        super().__init__(run_dir, status_summary, port, host)
