"""`explorer status`: progress, rates, budget left, last evaluation and last errors of a run folder,
read-only (the daemon may be writing it: the ledger is read in WAL mode). The dashboard
(explorer/run/dashboard.py) serves the same summary as JSON at /status.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from explorer.run.config import load_config
from explorer.run.disk import folder_usage, format_usage
from explorer.run.ledger import LEDGER, RunLedger, read_metrics

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
    rows, totals = finished_iterations(run_dir)
    keys = STATUS_KEYS[cfg.modality]
    out = {"run_dir": str(run_dir), "name": cfg.name, "modality": cfg.modality, "policy": cfg.policy.name,
           "iterations_done": len(rows), "iterations_budget": cfg.iterations}
    if rows:
        hours = max(totals["seconds"] / 3600, 1e-9)
        last, evals = rows[-1], [r for r in rows if keys["eval"][1] in r]
        out.update(iterations_per_hour=len(rows) / hours,
                   fetches_per_second=totals["fetched"] / hours / 3600,
                   accepted_total=totals["accepted_total"], queries_issued=totals["queries_issued"],
                   last_iteration={k: last.get(k) for k in keys["last"]},
                   last_eval={k: evals[-1][k] for k in keys["eval"]} if evals else None,
                   recent_search_errors=[e for r in rows[-5:] for e in r.get("search_errors", [])][-3:],
                   recent_rejected=totals["recent_rejected"])
    out["disk"] = {"usage": folder_usage(run_dir), "max_bytes": cfg.disk.max_bytes}
    if (run_dir / LEDGER).exists():
        with RunLedger(run_dir / LEDGER, readonly=True) as ledger:
            out["disk"]["evicted"], out["disk"]["evicted_bytes"] = ledger.evictions()
    events = run_dir / "daemon.jsonl"
    if events.exists():
        out["last_event"] = json.loads(events.read_text().splitlines()[-1])
    return out


def finished_iterations(run_dir: Path, *, start: bool = False) -> tuple[list[dict], dict]:
    """Rows of the finished iterations (>= 1; with `start`, iteration 0 too) and the totals of those
    >= 1 (see `RunLedger.summary`): from the ledger when the run has one, else from metrics.jsonl."""
    first = 0 if start else 1
    if (run_dir / LEDGER).exists():
        with RunLedger(run_dir / LEDGER, readonly=True) as ledger:
            return [r for r in ledger.metrics() if r["iteration"] >= first], ledger.summary(recent=5)
    metrics = run_dir / "metrics.jsonl"
    rows = [r for r in read_metrics(metrics) if r["iteration"] >= first] if metrics.exists() else []
    return rows, _log_totals([r for r in rows if r["iteration"] > 0])


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
        if s["last_eval"]:
            ev = s["last_eval"]
            lines.append(f"last eval (iteration {ev['iteration']}): "
                         + ", ".join(f"{k.removeprefix('eval_')} {_fmt(v)}" for k, v in ev.items() if k != "iteration"))
        lines.append(f"last 5 iterations: rejected {s['recent_rejected'] or 'none'}; "
                     f"search errors: {len(s['recent_search_errors'])}")
        lines += [f"  {e}" for e in s["recent_search_errors"]]
    disk = s["disk"]
    lines.append(f"disk: {format_usage(disk['usage'], disk['max_bytes'])}"
                 + (f"; {disk['evicted']} rejected bodies evicted ({disk['evicted_bytes'] / 2**20:.1f} MiB)"
                    if disk.get("evicted") else ""))
    if "last_event" in s:
        ev = s["last_event"]
        lines.append(f"daemon: last event {ev['event']!r} at "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ev['time']))}")
    return "\n".join(lines)
