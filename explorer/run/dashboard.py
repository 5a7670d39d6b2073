"""The run's dashboard: a read-only HTTP server over a run folder (`explorer daemon --status-port P`
while it runs, `explorer serve-run RUN_DIR` after).

    GET /                    the page: iteration, rates, disk, the planner's last decision (text), the
                             evaluation curve, the last iterations' queries with their rewards, the
                             newest accepted images (or documents), the last contact sheet;
                             ?refresh=N reloads it every N seconds (default 10)
    GET /status              `explorer status` as JSON (`status_summary` of explorer/run/daemon.py)
    GET /item/<key>.png      an accepted image, read from acquired/ by its key
    GET /sheets/<name>       a contact sheet (explorer/run/sheets.py)

Every string that came from the web or from an LLM (query texts, titles, URLs, rejection reasons)
is HTML-escaped before it reaches the page, and the Content-Security-Policy allows no script at
all, so a hostile caption is text twice over. Only GET is served; nothing in the run folder is
written. The server listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import html
import io
import json
import re
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from explorer.run.config import load_config
from explorer.run.disk import format_usage
from explorer.run.ledger import LEDGER, RunLedger, read_metrics
from explorer.run.sheets import ACQUIRED, SHEETS, last_sheet
from learners.shards import INDEX, ShardStore

NEWEST, RECENT_ROWS, DEFAULT_REFRESH = 24, 3, 10  # items shown, iterations whose queries are listed, seconds
HEADERS = {"Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
                                      "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
ITEM = re.compile(r"/item/([0-9a-zA-Z_-]{1,128})\.png")
SHEET = re.compile(r"/sheets/((?:replay-)?iter-\d{6}\.(?:png|html))")
CURVES = {"image": ("eval_knn_accuracy", "eval_linear_probe_accuracy"), "text": ("eval_perplexity",)}
esc = html.escape


def tail_records(path: Path, n: int, chunk: int = 1 << 18) -> list[dict]:
    """The last `n` rows of a JSON-lines log, read from its end (a log of any length costs the same)."""
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - chunk))
        lines = f.read().decode("utf-8", "replace").splitlines()[-n - 1:]
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # the first, cut line of the chunk, or one being appended
            pass
    return out[-n:]


def curve_svg(rows: list[dict], keys: tuple[str, ...], width: int = 420, height: int = 160) -> str:
    """The evaluation metrics `keys` over iterations as an inline SVG (numbers only, nothing from the web)."""
    points = {k: [(r["iteration"], r[k]) for r in rows if r.get(k) is not None] for k in keys}
    values = [v for pts in points.values() for _, v in pts]
    if not values:
        return "<p>no evaluation yet</p>"
    its = [i for pts in points.values() for i, _ in pts]
    lo, hi, first, last = min(values), max(values), min(its), max(its)
    span, x_span = (hi - lo) or 1.0, (last - first) or 1

    def xy(i, v):
        return f"{30 + (i - first) / x_span * (width - 40):.1f},{height - 20 - (v - lo) / span * (height - 40):.1f}"
    colours = ("#1f5fb4", "#c0392b", "#2e8b57")
    lines = [f"<polyline fill='none' stroke='{c}' stroke-width='2' points='{' '.join(xy(i, v) for i, v in pts)}'/>"
             + "".join(f"<circle r='3' fill='{c}' cx='{xy(i, v).split(',')[0]}' cy='{xy(i, v).split(',')[1]}'/>"
                       for i, v in pts) for c, pts in zip(colours, points.values()) if pts]
    legend = " ".join(f"<tspan fill='{c}'>{k.removeprefix('eval_')}</tspan>" for c, k in zip(colours, keys))
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' class='curve'>"
            f"<text x='30' y='12' font-size='11'>{legend}</text>"
            f"<text x='0' y='24' font-size='10'>{hi:.3g}</text><text x='0' y='{height - 20}' font-size='10'>{lo:.3g}"
            f"</text><text x='30' y='{height - 4}' font-size='10'>iteration {first}</text>"
            f"<text x='{width - 80}' y='{height - 4}' font-size='10'>iteration {last}</text>{''.join(lines)}</svg>")


def _facts(s: dict) -> str:
    done = f"{s['iterations_done']} of {s['iterations_budget']}"
    facts = [("run", f"{s['name']} ({s['modality']}, policy {s['policy']})"), ("iteration", done)]
    if s["iterations_done"]:
        unit = "images" if s["modality"] == "image" else "documents"
        facts += [("rates", f"{s['iterations_per_hour']:.1f} iterations/h, {s['fetches_per_second']:.1f} fetches/s"),
                  ("acquired", f"{s['accepted_total']} {unit} from {s['queries_issued']} queries"),
                  ("rejected (last 5)", ", ".join(f"{k} {v}" for k, v in s["recent_rejected"].items()) or "none"),
                  ("search errors (last 5)", "; ".join(s["recent_search_errors"]) or "none")]
    facts.append(("disk", format_usage(s["disk"]["usage"], s["disk"]["max_bytes"])))
    if "last_event" in s:
        facts.append(("daemon", s["last_event"]["event"]))
    return "<table class='facts'>" + "".join(f"<tr><th>{esc(k)}</th><td id='{esc(k.split()[0])}'>{esc(str(v))}</td>"
                                             "</tr>" for k, v in facts) + "</table>"


def _planner(rows: list[dict]) -> str:
    decided = [r for r in rows if "planner_action" in r]
    if not decided:
        return ""
    last = decided[-1]
    reason = (last.get("planner") or {}).get("reason", "")
    return (f"<h2>planner</h2><p>iteration {last['iteration']}: <b>{esc(str(last['planner_action']))}</b> "
            f"{esc(str(reason))}</p>")


def _number(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def _queries(rows: list[dict]) -> str:
    out = ["<h2>last queries</h2><div class='recent'>"]
    for r in [r for r in rows if r.get("queries")][-RECENT_ROWS:][::-1]:
        rewards = r.get("query_rewards", [])
        cells = "".join(f"<tr><td class='query'>{esc(q)}</td><td>{_number(rewards[i] if i < len(rewards) else None)}</td></tr>"
                        for i, q in enumerate(r["queries"]))
        out.append(f"<div><h3>iteration {r['iteration']}: {r.get('accepted', 0)} accepted</h3>"
                   f"<table class='queries'><tr><th>query</th><th>reward</th></tr>{cells}</table></div>")
    return "".join(out) + "</div>"


def _newest(run_dir: Path, modality: str) -> str:
    records = tail_records(run_dir / "accepted.jsonl", NEWEST)[::-1]
    if not records:
        return ""
    if modality == "text":
        items = "".join(f"<li>{esc(r.get('title') or '')} <small>({r['reward']:.3f}, {esc(r['url'])})</small></li>"
                        for r in records)
        return f"<h2>newest accepted</h2><ul class='docs'>{items}</ul>"
    tiles = "".join(f"<figure><img class='thumb' src='/item/{esc(r['sha256'])}.png' "
                    f"alt='{esc(r['url'])}' title='{esc(' | '.join(r.get('queries', [])))}'>"
                    f"<figcaption>{r['reward']:.3f}<br><span class='query'>{esc(', '.join(r.get('queries', [])))}"
                    "</span></figcaption></figure>" for r in records if ITEM.fullmatch(f"/item/{r['sha256']}.png"))
    return f"<h2>newest accepted</h2><div class='tiles'>{tiles}</div>"


STYLE = ("body{font-family:sans-serif;margin:1em;max-width:1100px}th{text-align:left;padding-right:1em}"
         ".tiles{display:flex;flex-wrap:wrap}figure{margin:4px;width:72px;font-size:10px;overflow:hidden}"
         "img.thumb{width:64px;height:64px;image-rendering:pixelated}.queries td{padding-right:1em}"
         "img.sheet{max-width:100%;border:1px solid #ccc}.recent{display:flex;gap:2em;align-items:flex-start}")


def iteration_rows(run_dir: Path) -> list[dict]:
    """Every recorded metrics row, iteration 0 (where the curve starts) included: from the ledger when
    the run has one (it may be written while it is read), else from metrics.jsonl."""
    if (run_dir / LEDGER).exists():
        with RunLedger(run_dir / LEDGER, readonly=True) as ledger:
            return ledger.metrics()
    return read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []


def dashboard_page(run_dir: Path, summary: dict, refresh: int = DEFAULT_REFRESH) -> str:
    """The HTML of `GET /` (see the module docstring) for the run's status `summary`."""
    run_dir = Path(run_dir)
    rows = iteration_rows(run_dir)
    sheet = last_sheet(run_dir)
    sheet_html = ("" if sheet is None else f"<h2>last contact sheet</h2><a href='/sheets/{sheet.name}'>"
                  + (f"<img class='sheet' src='/sheets/{sheet.name}' alt='{sheet.name}'>" if sheet.suffix == ".png"
                     else sheet.name) + "</a>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='{refresh}'>"
            f"<title>explorer: {esc(summary['name'])} iteration {summary['iterations_done']}</title>"
            f"<style>{STYLE}</style></head><body><h1>{esc(summary['name'])}</h1>{_facts(summary)}"
            f"{_planner(rows)}<h2>evaluation</h2>{curve_svg(rows, CURVES[summary['modality']])}"
            f"{_queries(rows)}{_newest(run_dir, summary['modality'])}{sheet_html}"
            f"<p><a href='/status'>/status</a> (JSON)</p></body></html>")


def item_png(run_dir: Path, key: str) -> bytes | None:
    """An accepted image of acquired/ as PNG, or None when the key is not there."""
    folder = Path(run_dir) / ACQUIRED
    if not (folder / INDEX).exists():
        return None
    store = ShardStore(folder, load_config(Path(run_dir) / "config.yaml").fetch.image_size, readonly=True)
    try:
        if key not in store.keys:
            return None
        pixels = store.read(np.array([store.keys.index(key)]))[0].permute(1, 2, 0).numpy()
    finally:
        store.close()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _refresh(query: str) -> int:
    values = parse_qs(query).get("refresh", [str(DEFAULT_REFRESH)])
    if not values[0].isdigit() or not 1 <= int(values[0]) <= 3600:
        raise ValueError(f"refresh must be a whole number of seconds from 1 to 3600, got {values[0]!r}")
    return int(values[0])


def respond(run_dir: Path, target: str, status_summary) -> tuple[int, str, bytes]:
    """(HTTP status, content type, body) of a GET for `target` (a path with its query);
    `status_summary(run_dir)` is the run's status as a dict."""
    url = urlsplit(target)
    try:
        refresh = _refresh(url.query) if url.path == "/" else DEFAULT_REFRESH
    except ValueError as e:
        return 400, "application/json", json.dumps({"error": str(e)}).encode()
    try:
        if url.path == "/status":
            return 200, "application/json", json.dumps(status_summary(run_dir)).encode()
        if url.path == "/":
            return 200, "text/html; charset=utf-8", dashboard_page(run_dir, status_summary(run_dir), refresh).encode()
        if (m := ITEM.fullmatch(url.path)) and (png := item_png(run_dir, m.group(1))) is not None:
            return 200, "image/png", png
        if (m := SHEET.fullmatch(url.path)) and (path := Path(run_dir) / SHEETS / m.group(1)).is_file():
            kind = "image/png" if path.suffix == ".png" else "text/html; charset=utf-8"
            return 200, kind, path.read_bytes()
    except (OSError, ValueError, KeyError, sqlite3.Error) as e:  # a run folder being created
        return 503, "application/json", json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
    return 404, "application/json", json.dumps({"error": "GET /, /status, /item/<key>.png or /sheets/<name>"}).encode()


class DashboardServer:
    """The dashboard of a run folder on `host` (127.0.0.1 by default), in a background thread;
    `status_summary(run_dir)` gives the page's status and /status."""

    def __init__(self, run_dir: Path, status_summary, port: int = 0, host: str = "127.0.0.1"):
        run_dir = Path(run_dir)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                code, kind, data = respond(run_dir, self.path, status_summary)
                self.send_response(code)
                for name, value in {**HEADERS, "Content-Type": kind, "Content-Length": str(len(data))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.root = f"http://{host}:{self.httpd.server_address[1]}"
        self.url = f"{self.root}/status"
        threading.Thread(target=self.httpd.serve_forever, name="status", daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
