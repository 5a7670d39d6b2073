"""Named corpus compositions (`explorer corpus build --preset NAME`, a config's `corpus: NAME`).

    world        the default: a web that is mostly not the target: 1,900 Fashion-MNIST train
                 images (<= 5%), openclipart, the 2,500 MNIST digits that are not the `mnist`
                 target's (<= 10%: the second target's kind), and real images from Debian packages
                 (icons, emoji, game sprites, stamps, font glyphs of two faces), every image
                 distinct, opaque keys.
    fashion-web  the first web: all 60,000 Fashion-MNIST train images, openclipart, 5,000 MNIST
                 digits, with readable keys. 82% of it is the target's kind, so any image is about
                 as good as a relevant one; kept unchanged so that the benchmarks measured on it
                 (their configs name it) rebuild it.

A preset's corpus lives in $EXPLORER_HOME/corpus/NAME and is built on first use.
"""

from __future__ import annotations

import fcntl
import json
import warnings
from pathlib import Path

from explorer.web.corpus import (
    TARGET_SOURCE,
    CorpusSpec,
    WebCorpus,
    build_corpus,
    explorer_home,
    spec_json,
)

WORLD_SOURCES = ("fashion-mnist", "openclipart", "mnist-web", "oxygen-icons", "noto-emoji", "freeciv", "wesnoth",
                 "tuxpaint-stamps", "dejavu-glyphs", "dejavu-serif-glyphs")
WORLD_TARGET_SAMPLE = 1_900  # Fashion-MNIST train images in the world web: 4.5% of it

CORPUS_PRESETS: dict[str, CorpusSpec] = {
    "world": CorpusSpec(sources=WORLD_SOURCES, source_limits={TARGET_SOURCE: WORLD_TARGET_SAMPLE}, distinct=True),
    "fashion-web": CorpusSpec(keys="named"),
}
DEFAULT_PRESET = "world"  # a config without `corpus`, and every command's --corpus default


def preset_dir(name: str) -> Path:
    if name not in CORPUS_PRESETS:
        raise KeyError(f"unknown corpus preset {name!r}; valid: {', '.join(CORPUS_PRESETS)}")
    return explorer_home() / "corpus" / name


def corpus_location(corpus: str | Path | None) -> tuple[Path, str | None]:
    """A config's `corpus`: None (the default preset) or a preset name -> (the preset's directory,
    its name); anything else is a corpus directory -> (it, None)."""
    name = DEFAULT_PRESET if corpus is None else str(corpus)
    if name in CORPUS_PRESETS:
        return preset_dir(name), name
    return Path(corpus), None


BEFORE_FIELDS = {"source_limits": {}, "keys": "named", "distinct": False}  # what builds had before these fields


def built_spec(meta: dict) -> dict:
    """The spec a corpus was built from (corpus.json), fields added since at what builds did before them."""
    return {**BEFORE_FIELDS, **meta.get("spec", {})}


def ensure_corpus(corpus: str | Path | None) -> None:
    """The corpus a config names, built now if it is a preset not built yet (`open_image_corpus`)."""
    open_image_corpus(corpus, progress=True).close()


def open_image_corpus(corpus: str | Path | None, progress: bool = False) -> WebCorpus:
    """The corpus a config names, building a preset's on first use (a few minutes, once), and again
    when the preset has changed since its corpus was built. Processes that start together build it
    once: the first holds a lock on the preset while it builds, the others wait and open its build."""
    root, preset = corpus_location(corpus)
    if preset is not None and _needs_build(root, preset):
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(root.parent / f".{preset}.lock", "w") as lock:
            if not _try_lock(lock):
                if progress:
                    print(f"waiting for another process to finish building the {preset!r} corpus in {root} ...")
                fcntl.flock(lock, fcntl.LOCK_EX)
            if _needs_build(root, preset):  # (another process may have built it while this one waited)
                meta = root / "corpus.json"
                if meta.exists():
                    warnings.warn(f"the {preset!r} corpus in {root} was built from an earlier version of the "
                                  "preset: rebuilding it", stacklevel=2)
                    meta.unlink()  # an interrupted rebuild is then rebuilt again, never opened half-written
                if progress:
                    print(f"building the {preset!r} corpus in {root} (once; a few minutes) ...")
                return build_corpus(root, CORPUS_PRESETS[preset], progress=progress)
    if preset is None and not root.exists():
        raise FileNotFoundError(f"corpus {str(corpus)!r} is neither a preset ({', '.join(CORPUS_PRESETS)}) "
                                "nor a corpus directory")
    return WebCorpus(root)


def _needs_build(root: Path, preset: str) -> bool:
    """Whether a preset's directory lacks a finished build of the preset as it is now."""
    meta = root / "corpus.json"
    return not meta.exists() or built_spec(json.loads(meta.read_text())) != spec_json(CORPUS_PRESETS[preset])


def _try_lock(lock) -> bool:
    """Takes the lock if it is free (True); False while another process holds it."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def composition_table(meta: dict) -> str:
    """corpus.json's composition as lines: items and share per source, then the base rate."""
    lines = [f"  {source:20s} {n:7,d}  {meta['share'][source]:6.1%}"
             for source, n in sorted(meta["per_source"].items(), key=lambda kv: -kv[1])]
    lines.append(f"  {'total':20s} {meta['items']:7,d}  ({meta.get('distinct_images', meta['items']):,} distinct images)")
    for kind, rate in meta["base_rate"].items():  # (corpora built before the second target name one)
        lines.append(f"base rate: {rate:.1%} of the web is the {kind} target's kind")
    return "\n".join(lines)
