"""Contact sheets: what one iteration took and why, as a picture a person can look at.

    RUN_DIR/sheets/iter-NNNNNN.png    images: the accepted images grouped by the query that found
                                      them (query text, the query's reward, each image's reward), then
                                      a strip of the best-scored candidates it turned down, with why
    RUN_DIR/sheets/iter-NNNNNN.html   text: the same as a page of documents (title, first lines, reward)

A sheet is built from what the run folder records, never from the loop's memory: the iteration's
metrics row (its queries, their rewards and `rejected_best`, the best-scored candidates not
accepted), its accepted.jsonl records, the pixels of accepted images from acquired/ (the shards)
and everything else (rejected images, documents, a replay's accepted images) from the fetched
bodies in cache/. So `explorer sheets RUN_DIR` rebuilds the sheets of a finished run exactly as the
live run wrote them. A body the disk budget evicted shows as an empty tile marked "evicted".
At most MAX_TILES accepted and MAX_REJECTED rejected items are drawn: the cost of a sheet does not
grow with the size of a round.
"""

from __future__ import annotations

import html
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from explorer.acquire.cache import ResponseCache, atomic_write_bytes
from explorer.acquire.documents import answer_to_document
from explorer.acquire.fetch import answer_to_result, request_key
from explorer.run.config import ExperimentConfig, load_config
from explorer.run.disk import is_disk_full
from explorer.run.ledger import read_metrics
from learners.shards import INDEX, ShardStore

SHEETS = "sheets"
ACQUIRED = "acquired"  # the image run folder's shards (explorer/run/image.py)
MAX_TILES = 96        # accepted items drawn per sheet (the best by reward; the rest are counted)
MAX_REJECTED = 8      # best-scored rejected items recorded per iteration and drawn
TILE, LABEL, COLUMNS, LINE = 64, 14, 12, 16  # pixels: thumbnail side, label under it, tiles per row, text line
NEAR_DUPLICATE, LOW_REWARD = "duplicate", "low reward"  # why a scored candidate was turned down


# -- what the loop records ---------------------------------------------------------------------
def best_rejected(cand, rewards: np.ndarray, accepted: np.ndarray, chosen: np.ndarray, fields) -> list[dict]:
    """The MAX_REJECTED best-rewarded candidates of a round that were not accepted, best first, for
    the metrics row: url, sha256, reward, the positions of the queries that found it, why it was
    turned down (`chosen`: the reward's accept mask, so a chosen one lost to a near-duplicate
    filter) and the modality's record `fields(cand, j)` (a document's title)."""
    rewards = np.asarray(rewards, np.float64)
    left = np.setdiff1d(np.flatnonzero(np.isfinite(rewards)), accepted)
    order = left[np.argsort(-rewards[left], kind="stable")][:MAX_REJECTED]
    return [{"url": cand.urls[j], "sha256": cand.sha256[j], "reward": round(float(rewards[j]), 6),
             "queries": list(cand.queries_of[j]), "reason": NEAR_DUPLICATE if chosen[j] else LOW_REWARD,
             **fields(cand, j)} for j in order]


# -- what a sheet holds --------------------------------------------------------------------------
@dataclass
class Group:
    """The accepted items one query found (an item found by several queries goes to the first)."""

    query: str
    reward: float | None
    items: list[dict] = field(default_factory=list)  # accepted.jsonl records, best reward first
    total: int | None = None  # items accepted, when only the best `items` are drawn (MAX_TILES)


@dataclass
class SheetContent:
    iteration: int
    groups: list[Group]
    rejected: list[dict]  # the row's rejected_best
    others: list[tuple[str, float | None]]  # queries with nothing accepted
    counts: str  # "12 accepted of 80 decoded (100 fetched)"


def sheet_content(row: dict, records: list[dict]) -> SheetContent:
    """The groups of one iteration from its metrics row and accepted records."""
    texts, rewards = row.get("queries", []), row.get("query_rewards", [])
    groups = {q: Group(q, rewards[i] if i < len(rewards) else None) for i, q in enumerate(texts)}
    for r in sorted(records, key=lambda r: -r["reward"]):
        query = next((q for q in r.get("queries", []) if q in groups), None)
        groups.setdefault(query or "(no query)", Group(query or "(no query)", None)).items.append(r)
    usable = row.get("decoded", row.get("valid"))
    return SheetContent(row["iteration"], [g for g in groups.values() if g.items], row.get("rejected_best", []),
                        [(g.query, g.reward) for g in groups.values() if not g.items],
                        f"{len(records)} accepted of {usable} usable ({row.get('fetched')} fetched)")


def _reward(value) -> str:
    return "-" if value is None else f"{value:.3f}"


# -- where the items come from -----------------------------------------------------------------
class RunItems:
    """Accepted images from acquired/ by key, anything else from the fetched bodies in cache/."""

    def __init__(self, run_dir: Path, cfg: ExperimentConfig):
        self.cfg, self.cache = cfg, ResponseCache(Path(run_dir) / "cache")
        shards = Path(run_dir) / ACQUIRED
        self.store = (ShardStore(shards, cfg.fetch.image_size, readonly=True)
                      if cfg.modality == "image" and (shards / INDEX).exists() else None)
        self.rows = {k: i for i, k in enumerate(self.store.keys)} if self.store else {}

    def image(self, sha256: str, url: str) -> np.ndarray | None:
        """uint8 (S, S, 3), or None when the body is gone (evicted by the disk budget)."""
        if sha256 in self.rows:
            return self.store.read(np.array([self.rows[sha256]]))[0].permute(1, 2, 0).numpy()
        answer = self.cache.get(request_key(url))
        result = answer_to_result(url, answer, self.cfg.fetch) if answer is not None else None
        return result.image.permute(1, 2, 0).numpy() if result is not None and result.image is not None else None

    def text(self, url: str) -> str | None:
        answer = self.cache.get(request_key(url))
        return answer_to_document(url, answer, self.cfg.text.min_chars).text if answer is not None else None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


# -- drawing --------------------------------------------------------------------------------------
def sheet_font():
    return ImageFont.load_default(size=11)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """`text` cut to `width` pixels (with an ellipsis)."""
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _rows_of(n: int) -> int:
    return -(-n // COLUMNS)


def render_image_sheet(content: SheetContent, items: RunItems) -> Image.Image:
    """The PNG of one image iteration (see the module docstring)."""
    shown = _cap(content.groups)
    tiles_h = TILE + LABEL
    height = (LINE * 2 + sum(LINE + _rows_of(len(g.items)) * tiles_h for g in shown)
              + (LINE if content.others else 0)
              + (LINE + tiles_h + LABEL if content.rejected else 0) + 4)
    width = COLUMNS * (TILE + 4) + 4
    sheet = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(sheet), sheet_font()
    y = 2
    draw.text((4, y), _fit(draw, f"iteration {content.iteration}: {content.counts}", width - 8, font),
              fill="black", font=font)
    y += LINE * 2
    for g in shown:
        count = (f"{g.total} accepted, best {len(g.items)} shown" if (g.total or 0) > len(g.items)
                 else f"{len(g.items)} accepted")
        draw.text((4, y), _fit(draw, f"{g.query!r}  query reward {_reward(g.reward)}  ({count})", width - 8, font),
                  fill=(20, 60, 160), font=font)
        y += LINE
        for k, r in enumerate(g.items):
            x, ty = 4 + (k % COLUMNS) * (TILE + 4), y + (k // COLUMNS) * tiles_h
            draw_tile(sheet, draw, items.image(r["sha256"], r["url"]), x, ty, [_reward(r["reward"])], font)
        y += _rows_of(len(g.items)) * tiles_h
    if content.others:
        line = "nothing accepted: " + ", ".join(f"{q!r} {_reward(v)}" for q, v in content.others)
        draw.text((4, y), _fit(draw, line, width - 8, font), fill="gray", font=font)
        y += LINE
    if content.rejected:
        draw.text((4, y), "best-scored rejected", fill=(160, 30, 30), font=font)
        y += LINE
        for k, r in enumerate(content.rejected[:COLUMNS]):
            draw_tile(sheet, draw, items.image(r["sha256"], r["url"]), 4 + k * (TILE + 4), y,
                  [_reward(r["reward"]), r["reason"]], font)
    return sheet


def _cap(groups: list[Group]) -> list[Group]:
    """The groups with the MAX_TILES best-rewarded items among them."""
    rewards = sorted((r["reward"] for g in groups for r in g.items), reverse=True)
    if len(rewards) <= MAX_TILES:
        return groups
    bar = rewards[MAX_TILES - 1]
    capped, left = [], MAX_TILES
    for g in groups:
        keep = [r for r in g.items if r["reward"] >= bar][:left]
        left -= len(keep)
        if keep:
            capped.append(Group(g.query, g.reward, keep, len(g.items)))
    return capped


def draw_tile(sheet: Image.Image, draw: ImageDraw.ImageDraw, pixels: np.ndarray | None, x: int, y: int,
          labels: list[str], font) -> None:
    if pixels is None:
        draw.rectangle((x, y, x + TILE - 1, y + TILE - 1), outline="gray")
        draw.text((x + 4, y + TILE // 2 - 6), "evicted", fill="gray", font=font)
    else:
        sheet.paste(Image.fromarray(pixels).resize((TILE, TILE), Image.Resampling.NEAREST), (x, y))
        draw.rectangle((x - 1, y - 1, x + TILE, y + TILE), outline=(215, 215, 215))  # a white image still shows
    for k, label in enumerate(labels):
        draw.text((x, y + TILE + k * (LABEL - 2)), _fit(draw, label, TILE + 2, font), fill="black", font=font)


def render_text_sheet(content: SheetContent, items: RunItems, lines: int = 3) -> str:
    """The HTML page of one text iteration; every string from the web is escaped."""
    esc = html.escape

    def doc(r: dict, extra: str = "") -> str:
        text = items.text(r["url"])
        head = "evicted" if text is None else "\n".join(text.strip().splitlines()[:lines])[:400]
        return (f"<li><b>{esc(r.get('title') or '(untitled)')}</b> reward {_reward(r['reward'])}{extra}"
                f"<br><code>{esc(r['url'])}</code><pre>{esc(head)}</pre></li>")

    parts = [f"<!doctype html><meta charset='utf-8'><title>iteration {content.iteration}</title>",
             f"<h2>iteration {content.iteration}: {esc(content.counts)}</h2>"]
    for g in content.groups:
        parts.append(f"<h3>{esc(repr(g.query))} query reward {_reward(g.reward)}</h3><ul>")
        parts += [doc(r) for r in g.items[:MAX_TILES]] + ["</ul>"]
    if content.others:
        parts.append("<p>nothing accepted: " + esc(", ".join(f"{q!r} {_reward(v)}" for q, v in content.others))
                     + "</p>")
    if content.rejected:
        parts += ["<h3>best-scored rejected</h3><ul>"]
        parts += [doc(r, f" ({esc(r['reason'])})") for r in content.rejected] + ["</ul>"]
    return "\n".join(parts) + "\n"


# -- writing --------------------------------------------------------------------------------------
def sheet_path(run_dir: Path, iteration: int, modality: str, prefix: str = "") -> Path:
    return Path(run_dir) / SHEETS / f"{prefix}iter-{iteration:06d}.{'png' if modality == 'image' else 'html'}"


def write_sheet(run_dir: Path, cfg: ExperimentConfig, row: dict, records: list[dict], prefix: str = "",
                items: RunItems | None = None) -> Path | None:
    """The sheet of the iteration of `row` with its accepted `records`; None for an iteration without
    a search round (iteration 0, a text planner's training-only step)."""
    if "queries" not in row or row["iteration"] == 0:
        return None
    own = items is None
    items = items or RunItems(run_dir, cfg)
    try:
        content = sheet_content(row, records)
        path = sheet_path(run_dir, row["iteration"], cfg.modality, prefix)
        if cfg.modality == "image":
            buffer = io.BytesIO()
            render_image_sheet(content, items).save(buffer, format="PNG", compress_level=1)
            data = buffer.getvalue()
        else:
            data = render_text_sheet(content, items).encode()
        atomic_write_bytes(path, data)
        return path
    finally:
        if own:
            items.close()


def record_sheet(run_dir: Path, cfg: ExperimentConfig, row: dict, records: list[dict]) -> Path | None:
    """`write_sheet` for the live loop: a sheet that cannot be drawn is a warning, not a stopped
    run (`explorer sheets` draws it again later); a full disk stops the run as anywhere else."""
    try:
        return write_sheet(run_dir, cfg, row, records)
    except Exception as e:  # a picture never stops a run
        if is_disk_full(e):
            raise
        warnings.warn(f"no contact sheet for iteration {row.get('iteration')}: {type(e).__name__}: {e}",
                      stacklevel=2)
        return None


def rebuild_sheets(run_dir: Path, *, replay: bool = False) -> list[Path]:
    """Every sheet of a run folder from its logs (a replay's from replay-metrics.jsonl and
    replay-accepted.jsonl, as sheets/replay-iter-NNNNNN.*)."""
    run_dir, prefix = Path(run_dir), "replay-" if replay else ""
    metrics, accepted = run_dir / f"{prefix}metrics.jsonl", run_dir / f"{prefix}accepted.jsonl"
    if not metrics.exists():
        raise FileNotFoundError(f"{metrics} does not exist: not a run folder"
                                + (" with a replay (run `explorer replay` first)" if replay else ""))
    cfg = load_config(run_dir / "config.yaml")
    by_iteration: dict[int, list[dict]] = {}
    for r in read_metrics(accepted) if accepted.exists() else []:
        by_iteration.setdefault(r["iteration"], []).append(r)
    items = RunItems(run_dir, cfg)
    try:
        paths = [write_sheet(run_dir, cfg, row, by_iteration.get(row["iteration"], []), prefix, items)
                 for row in read_metrics(metrics)]
    finally:
        items.close()
    return [p for p in paths if p is not None]


def last_sheet(run_dir: Path) -> Path | None:
    """The newest sheet of a run folder (not a replay's), or None."""
    found = sorted(p for p in (Path(run_dir) / SHEETS).glob("iter-*.*") if p.suffix in (".png", ".html"))
    return found[-1] if found else None
