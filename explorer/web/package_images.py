"""Real images from Debian packages that are mostly not the target: icons, emoji, game sprites,
font glyphs. Each reader lists its candidates in a stable order, takes a reproducible slice of
them (`sample_indices`), and yields `SourceImage`s: PNG bytes, a caption from the package's own
file names or metadata (noisy, like alt text), and a hidden class for evaluation.

A file that cannot be read or decoded is skipped with a `BrokenSourceFile` warning, never fatal:
a package may ship a damaged file, and one file must not stop a build of tens of thousands.
"""

from __future__ import annotations

import io
import os
import re
import unicodedata
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OXYGEN_DIR = Path(os.environ.get("EXPLORER_OXYGEN_DIR", "/usr/share/icons/oxygen/base"))
EMOJI_FONT = Path(os.environ.get("EXPLORER_EMOJI_FONT", "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"))
WESNOTH_DIR = Path(os.environ.get("EXPLORER_WESNOTH_DIR", "/usr/share/games/wesnoth/1.16/data/core/images"))
STAMPS_DIR = Path(os.environ.get("EXPLORER_STAMPS_DIR", "/usr/share/tuxpaint/stamps"))
GLYPH_FONT = Path(os.environ.get("EXPLORER_GLYPH_FONT", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"))
SERIF_GLYPH_FONT = Path(os.environ.get("EXPLORER_SERIF_GLYPH_FONT", "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf"))
OXYGEN_MAX_SIZE = 128  # the largest icon size taken (one size per icon: no picture at several sizes)
# Wesnoth folders of pictures (halo/, masks/, themes/ ... are effects and interface parts)
WESNOTH_FOLDERS = ("units", "portraits", "terrain", "attacks", "items", "scenery", "projectiles")
GLYPH_SIZE = 48  # px: a glyph is drawn centred on a white square of this side


class SourceImage(NamedTuple):
    name: str  # the item's id inside its source, stable across builds
    png: bytes
    caption: str
    class_name: str  # hidden: the folder, context or category it came from


# what decoding a damaged image raises (PIL: OSError for truncated or unidentified files, SyntaxError
# for a broken PNG chunk, DecompressionBombError for absurd sizes)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class BrokenSourceFile(UserWarning):
    """A source file was skipped because it could not be read or decoded."""


def sample_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    """All of 0..n-1, or a sorted reproducible sample of `limit` of them."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def skip(what, error: Exception) -> None:
    warnings.warn(f"skipping {what}: {type(error).__name__}: {error}", BrokenSourceFile, stacklevel=2)


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def checked_png(path: Path) -> bytes | None:
    """The file's bytes when it is a PNG that decodes (re-encoded if it is another format), else None."""
    try:
        body = path.read_bytes()
        with Image.open(io.BytesIO(body)) as im:
            im.load()
            return body if im.format == "PNG" else encode_png(im)
    except DECODE_ERRORS as e:  # a damaged or unreadable file: skipped, the build goes on
        skip(path, e)
        return None


def _require(path: Path, package: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `apt-get install {package}` (scripts/setup.sh does)")
    return path


def _words(text: str) -> str:
    return " ".join(re.split(r"[-_\s.]+", text)).strip()


# -- oxygen-icon-theme ---------------------------------------------------------------------------
def oxygen_files(root: Path = OXYGEN_DIR) -> list[tuple[str, str, Path]]:
    """(context, icon name, file) per distinct icon, at its largest size <= OXYGEN_MAX_SIZE, sorted."""
    best: dict[tuple[str, str], tuple[int, Path]] = {}
    for size_dir in _require(root, "oxygen-icon-theme").iterdir():
        m = re.fullmatch(r"(\d+)x\d+", size_dir.name)
        if not m or int(m.group(1)) > OXYGEN_MAX_SIZE:
            continue
        for path in size_dir.glob("*/*.png"):
            key = (path.parent.name, path.stem)
            if key not in best or best[key][0] < int(m.group(1)):
                best[key] = (int(m.group(1)), path)
    return [(context, name, best[(context, name)][1]) for context, name in sorted(best)]


def read_oxygen(limit: int | None, seed: int) -> Iterator[SourceImage]:
    """'places/folder-documents.png' -> 'folder documents (places)'."""
    files = oxygen_files(OXYGEN_DIR)
    for i in sample_indices(len(files), limit, seed):
        context, name, path = files[i]
        png = checked_png(path)
        if png is not None:
            yield SourceImage(f"{context}/{name}", png, f"{_words(name)} ({context})", context)


# -- fonts-noto-color-emoji ----------------------------------------------------------------------
def emoji_codepoints(font) -> dict[str, tuple[int, ...]]:
    """Glyph name -> the code points it draws: single characters from the cmap, sequences (ZWJ,
    skin tones, flags) from the GSUB ligatures that form them."""
    reverse = {}
    for cp, glyph in sorted(font.getBestCmap().items()):
        reverse.setdefault(glyph, (cp,))
    for lookup in font["GSUB"].table.LookupList.Lookup:
        for sub in lookup.SubTable:
            sub = getattr(sub, "ExtSubTable", sub)
            for first, ligatures in getattr(sub, "ligatures", {}).items():
                for lig in ligatures:
                    parts = [reverse.get(g) for g in (first, *lig.Component)]
                    if all(parts) and lig.LigGlyph not in reverse:
                        reverse[lig.LigGlyph] = tuple(cp for p in parts for cp in p)
    return reverse


_SILENT = {0x200D, 0xFE0F, 0xFE0E}  # joiners and variation selectors name nothing visible


def emoji_caption(codepoints: tuple[int, ...]) -> str:
    names = [unicodedata.name(chr(cp), f"U+{cp:04X}").lower() for cp in codepoints if cp not in _SILENT]
    return ", ".join(names) + " emoji"


def read_emoji(limit: int | None, seed: int) -> Iterator[SourceImage]:
    """Each colour emoji's bitmap (a PNG inside the font's CBDT table), captioned by its Unicode names."""
    from fontTools.ttLib import TTFont

    font = TTFont(_require(EMOJI_FONT, "fonts-noto-color-emoji"))
    strike = font["CBDT"].strikeData[0]
    codepoints = emoji_codepoints(font)
    names = sorted(g for g in strike if g in codepoints)
    for i in sample_indices(len(names), limit, seed):
        glyph = strike[names[i]]
        try:
            glyph.decompile()
            png = glyph.imageData
            with Image.open(io.BytesIO(png)) as im:
                im.load()
        except DECODE_ERRORS as e:
            skip(f"emoji glyph {names[i]}", e)
            continue
        cps = codepoints[names[i]]  # hidden class: the base character ('dog face' for a dog face emoji)
        yield SourceImage(names[i], png, emoji_caption(cps), unicodedata.name(chr(cps[0]), "emoji").lower())


# -- wesnoth-1.16-data ---------------------------------------------------------------------------
def wesnoth_files(root: Path = WESNOTH_DIR) -> list[Path]:
    _require(root, "wesnoth-1.16-data")
    return sorted(p for folder in WESNOTH_FOLDERS for p in (root / folder).rglob("*.png"))


def wesnoth_caption(rel: Path) -> str:
    """'units/human-loyalists/knight/knight-n-attack3.png' -> 'knight n attack3 - human loyalists knight units'."""
    folders = " ".join(_words(p) for p in reversed(rel.parts[:-1]))
    return f"{_words(rel.stem)} - {folders}"


def read_wesnoth(limit: int | None, seed: int) -> Iterator[SourceImage]:
    files = wesnoth_files(WESNOTH_DIR)
    for i in sample_indices(len(files), limit, seed):
        rel = files[i].relative_to(WESNOTH_DIR)
        png = checked_png(files[i])
        if png is not None:
            yield SourceImage(str(rel), png, wesnoth_caption(rel), "/".join(rel.parts[:2]))


# -- tuxpaint-stamps-default ---------------------------------------------------------------------
def stamp_caption(path: Path, root: Path) -> str:
    """The stamp's English description (first line of its .txt sidecar, else its file name) and its
    folders: 'animals/amphibians/frog-1.png' -> 'A frog. - animals amphibians'."""
    side = path.with_suffix(".txt")
    text = side.read_text(errors="replace").splitlines()[0].strip() if side.exists() else ""
    folders = " ".join(_words(p) for p in path.relative_to(root).parts[:-1])
    return f"{text or _words(path.stem)} - {folders}"


def read_stamps(limit: int | None, seed: int) -> Iterator[SourceImage]:
    """Tux Paint's rubber stamps: photos and drawings of animals, food, vehicles ... (PNG only)."""
    files = sorted(_require(STAMPS_DIR, "tuxpaint-stamps-default").rglob("*.png"))
    for i in sample_indices(len(files), limit, seed):
        png = checked_png(files[i])
        if png is not None:
            rel = files[i].relative_to(STAMPS_DIR)
            yield SourceImage(str(rel), png, stamp_caption(files[i], STAMPS_DIR), rel.parts[0])


# -- glyphs of an installed font -----------------------------------------------------------------
def font_characters(path: Path = GLYPH_FONT) -> list[int]:
    """The font's named, visible characters (no spaces, controls or marks alone), in code-point order."""
    from fontTools.ttLib import TTFont

    cmap = TTFont(_require(path, "fonts-dejavu-core")).getBestCmap()
    return [cp for cp in sorted(cmap) if unicodedata.name(chr(cp), "") and unicodedata.category(chr(cp))[0] in "LNPS"]


def _font_glyphs(path: Path, limit: int | None, seed: int, prefix: str = "", suffix: str = "") -> Iterator[SourceImage]:
    """Each character of the font at `path` drawn black on white, captioned with its Unicode name
    and `suffix`; named `prefix` + its code point."""
    chars = font_characters(path)
    font = ImageFont.truetype(str(path), int(GLYPH_SIZE * 0.7))
    for i in sample_indices(len(chars), limit, seed):
        ch = chr(chars[i])
        image = Image.new("L", (GLYPH_SIZE, GLYPH_SIZE), 255)
        ImageDraw.Draw(image).text((GLYPH_SIZE / 2, GLYPH_SIZE / 2), ch, fill=0, font=font, anchor="mm")
        category = unicodedata.category(ch)
        yield SourceImage(f"{prefix}U+{ord(ch):04X}", encode_png(image), unicodedata.name(ch).lower() + suffix, category)


def read_glyphs(limit: int | None, seed: int) -> Iterator[SourceImage]:
    """DejaVu Sans's characters, captioned with their Unicode names ('latin small letter a')."""
    return _font_glyphs(GLYPH_FONT, limit, seed)


def read_serif_glyphs(limit: int | None, seed: int) -> Iterator[SourceImage]:
    """DejaVu Serif's characters, captioned 'latin small letter a (serif)'."""
    return _font_glyphs(SERIF_GLYPH_FONT, limit, seed, prefix="serif/", suffix=" (serif)")
