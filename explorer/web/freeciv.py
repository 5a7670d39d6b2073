"""Freeciv's sprites (`freeciv-data`): cut from the tilesets' sheets by the .spec files' tag grids.

A .spec file names its sheet (`[file] gfx = "amplio2/units"`) and, per `[grid_*]` section, the
cell size and offsets and a table of (row, column, tag): the tag is what the game calls the
sprite ("u.warriors"), which becomes its caption ("warriors unit, amplio2"). `[extra]` sections
list single-file sprites (flags, large building pictures). Each sheet is cut once even when
several tilesets share it; of a spec with a `-large` twin only the large one is read (the same
pictures at two sizes). Empty or single-colour cells (grid lines, masks) are dropped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from explorer.web.package_images import (
    DECODE_ERRORS,
    SourceImage,
    encode_png,
    sample_indices,
    skip,
)

FREECIV_DIR = Path(os.environ.get("EXPLORER_FREECIV_DIR", "/usr/share/games/freeciv"))
# tag prefix -> the word a caption uses for it
TAG_KINDS = {"u": "unit", "b": "building", "f": "flag", "t": "terrain", "tx": "terrain extra", "r": "road",
             "city": "city", "cd": "city", "s": "specialist", "citizen": "citizen", "explode": "explosion",
             "upkeep": "upkeep", "unit": "unit badge", "gov": "government", "a": "advance", "spec": "specialist",
             "icon": "icon", "cursor": "cursor", "user": "interface", "mask": "mask", "grid": "grid",
             "base": "base", "extra": "extra", "road": "road", "ts": "terrain special", "w": "wonder"}


@dataclass(frozen=True)
class Sprite:
    sheet: Path  # the PNG the sprite is cut from (or the whole file, for `[extra]` sprites)
    box: tuple[int, int, int, int] | None  # (left, top, right, bottom) in the sheet; None: whole file
    tag: str
    tileset: str


def _value(section: str, name: str) -> int | None:
    m = re.search(rf"^\s*{name}\s*=\s*(-?\d+)", section, re.MULTILINE)
    return int(m.group(1)) if m else None


def _sections(text: str) -> list[tuple[str, str]]:
    text = re.sub(r"\s;.*$|^;.*$", "", text, flags=re.MULTILINE)  # comments
    parts = re.split(r"^\[([\w-]+)\]\s*$", text, flags=re.MULTILINE)
    return list(zip(parts[1::2], parts[2::2]))


def _grid_sprites(body: str, sheet: Path, tileset: str) -> list[Sprite]:
    x0, y0, dx, dy = (_value(body, k) for k in ("x_top_left", "y_top_left", "dx", "dy"))
    if None in (x0, y0, dx, dy):
        return []
    border = _value(body, "pixel_border") or 0
    sprites = []
    for row, col, tag in re.findall(r"^\s*(\d+)\s*,\s*(\d+)\s*,\s*\"([^\"]+)\"", body, re.MULTILINE):
        left, top = x0 + int(col) * (dx + border), y0 + int(row) * (dy + border)
        sprites.append(Sprite(sheet, (left, top, left + dx, top + dy), tag, tileset))
    return sprites


def _extra_sprites(body: str, root: Path, tileset: str) -> list[Sprite]:
    return [Sprite(root / f"{file}.png", None, tag, tileset)
            for tag, file in re.findall(r"^\s*\"([^\"]+)\"\s*,\s*\"([^\"]+)\"", body, re.MULTILINE) if tag != "tag"]


def spec_files(root: Path = FREECIV_DIR) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: run `apt-get install freeciv-data` (scripts/setup.sh does)")
    specs = sorted(root.glob("*/*.spec"))
    names = {p.with_suffix("").as_posix() for p in specs}
    return [p for p in specs if p.with_suffix("").as_posix() + "-large" not in names]


def freeciv_sprites(root: Path = FREECIV_DIR) -> list[Sprite]:
    """Every sprite of every tileset, each sheet cell once, in a stable order."""
    sprites, seen = [], set()
    for spec in spec_files(root):
        sections = _sections(spec.read_text(errors="replace"))
        gfx = next((re.search(r"gfx\s*=\s*\"([^\"]+)\"", b) for s, b in sections if s == "file"), None)
        for section, body in sections:
            if section.startswith("grid") and gfx:
                found = _grid_sprites(body, root / f"{gfx.group(1)}.png", spec.parent.name)
            elif section == "extra":
                found = _extra_sprites(body, root, spec.parent.name)
            else:
                continue
            for sprite in found:
                if (sprite.sheet, sprite.box) not in seen:
                    seen.add((sprite.sheet, sprite.box))
                    sprites.append(sprite)
    return sprites


def sprite_caption(tag: str, tileset: str) -> str:
    """'u.warriors' -> 'warriors unit, amplio2'; 't.l0.desert1' -> 'l0 desert1 terrain, trident'."""
    kind, _, rest = tag.partition(".")
    words = " ".join(re.split(r"[._\s]+", rest)).strip()
    return f"{words} {TAG_KINDS.get(kind, kind)}, {tileset}".strip()


def _informative(cell: Image.Image) -> bool:
    """A cell with something drawn in it: visible pixels of more than one colour."""
    rgba = np.asarray(cell.convert("RGBA"))
    visible = rgba[rgba[..., 3] > 0][:, :3]
    return len(visible) > 0 and bool((visible != visible[0]).any())


def read_freeciv(limit: int | None, seed: int) -> Iterator[SourceImage]:
    sprites = freeciv_sprites(FREECIV_DIR)
    sheets: dict[Path, Image.Image | None] = {}
    for i in sample_indices(len(sprites), limit, seed):
        s = sprites[i]
        if s.sheet not in sheets:
            try:
                with Image.open(s.sheet) as im:
                    sheets[s.sheet] = im.convert("RGBA")
            except DECODE_ERRORS as e:  # a missing or damaged sheet: its sprites are skipped
                skip(s.sheet, e)
                sheets[s.sheet] = None
        sheet = sheets[s.sheet]
        if sheet is None:
            continue
        cell = sheet.crop(s.box) if s.box else sheet
        if s.box and (s.box[2] > sheet.width or s.box[3] > sheet.height) or not _informative(cell):
            continue
        name = f"{s.sheet.relative_to(FREECIV_DIR)}:{s.box or ''}"
        yield SourceImage(name, encode_png(cell), sprite_caption(s.tag, s.tileset), s.tag.partition(".")[0])
