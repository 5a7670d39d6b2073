"""The offline "web": images with alt-text captions, stored in formats users' tools read.

Layout of a corpus directory (img2dataset / webdataset conventions):

    manifest.parquet   one row per item: key, url, caption, status, width, height, sha256,
                       shard, offset, size (byte range of the PNG inside its tar shard),
                       caption_id, and the hidden ground truth: source, label, class_name,
                       caption_wrong. The search engine never serves the hidden columns;
                       only evaluation reads them.
    shards/NNNNN.tar   webdataset shards: KEY.png, KEY.txt (caption), KEY.json (public fields)
    captions.json      the distinct captions, indexed by caption_id
    caption_emb.npy    (n_captions, 384) float16 MiniLM embeddings of the distinct captions
    corpus.json        build parameters and counts
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from explorer.web import captions as cap
from explorer.web import package_images, sources
from explorer.web.freeciv import read_freeciv
from explorer.web.package_images import DECODE_ERRORS, sample_indices
from explorer.web.sources import INSTALLED_TARGETS

DEFAULT_SOURCES = ("fashion-mnist", "openclipart", "mnist")
HIDDEN_COLUMNS = ("source", "label", "class_name", "caption_wrong")
TARGET_SOURCE = "fashion-mnist"  # the Fashion-MNIST target's kind: its share of a web is the base rate
KEY_SCHEMES = ("opaque", "named")


def explorer_home() -> Path:
    return Path(os.environ.get("EXPLORER_HOME", Path.home() / ".cache" / "explorer"))


def fashion_web_dir() -> Path:
    """The first web's directory (preset `fashion-web`), which the search and index benchmarks measured."""
    return explorer_home() / "corpus" / "fashion-web"


@dataclass(frozen=True)
class WebItem:
    key: str
    png: bytes
    caption: str
    source: str
    label: int = -1
    class_name: str = ""
    caption_wrong: bool = False


@dataclass(frozen=True, kw_only=True)
class CorpusSpec:
    """What goes into a corpus. `limit_per_source` takes a reproducible slice of every source (for
    tests), `source_limits` of named ones ({"fashion-mnist": 2000}: a sample of the target's kind).
    `keys`: 'opaque' (a hash of source and id: a served URL says nothing of the hidden source) or
    'named' (the readable keys of the first corpora, 'fmnist-train-00012', kept so that they rebuild
    identically). `distinct`: drop an image whose bytes an earlier item already has."""

    sources: tuple[str, ...] = DEFAULT_SOURCES
    limit_per_source: int | None = None
    source_limits: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    noise: cap.CaptionNoise = field(default_factory=cap.CaptionNoise)
    web_dir: str | None = None  # the user's own web instead of the installed sources
    shard_size: int = 10_000
    keys: str = "opaque"
    distinct: bool = False

    def __post_init__(self):
        unknown = (set(self.sources) | set(self.source_limits)) - set(SOURCE_READERS)
        if unknown:
            raise ValueError(f"unknown corpus sources {sorted(unknown)}; valid: {', '.join(SOURCE_READERS)}")
        if any(n is not None and n < 1 for n in (self.limit_per_source, *self.source_limits.values())):
            raise ValueError("limit_per_source and source_limits must be >= 1")
        if self.keys not in KEY_SCHEMES:
            raise ValueError(f"unknown key scheme {self.keys!r}; valid: {', '.join(KEY_SCHEMES)}")

    def limit(self, source: str) -> int | None:
        limits = [n for n in (self.limit_per_source, self.source_limits.get(source)) if n is not None]
        return min(limits) if limits else None


def opaque_key(source: str, name: str) -> str:
    """16 hex digits of sha256(source, the item's id in it): stable, and no source in sight."""
    return hashlib.sha256(f"{source}\0{name}".encode()).hexdigest()[:16]


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, without decoding: some real clip art declares
    over 200 megapixels, which the fetcher must later reject, not this builder choke on."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", png[16:24])


def _png(gray28: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray28, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _fashion_items(spec: CorpusSpec) -> Iterator[WebItem]:
    images, labels = sources.load_fashion_mnist("train")
    idx = sample_indices(len(images), spec.limit("fashion-mnist"), spec.seed)
    texts, wrong = cap.fashion_captions(labels[idx], seed=spec.seed, noise=spec.noise)
    for j, i in enumerate(idx):
        yield WebItem(key=f"fmnist-train-{i:05d}", png=_png(images[i]), caption=texts[j],
                      source="fashion-mnist", label=int(labels[i]),
                      class_name=sources.FASHION_CLASSES[labels[i]], caption_wrong=bool(wrong[j]))


def _mnist_items(spec: CorpusSpec, name: str = "mnist") -> Iterator[WebItem]:
    images, labels = sources.load_mnist_5k()
    rows = np.arange(len(images)) if name == "mnist" else sources.mnist_split()[0]
    idx = rows[sample_indices(len(rows), spec.limit(name), spec.seed + 1)]
    texts = cap.digit_captions(labels[idx], seed=spec.seed + 1)
    for j, i in enumerate(idx):
        yield WebItem(key=f"mnist-{i:04d}", png=_png(images[i]), caption=texts[j], source="mnist",
                      label=int(labels[i]), class_name=str(labels[i]))


def _openclipart_items(spec: CorpusSpec) -> Iterator[WebItem]:
    root = sources.OPENCLIPART_DIR
    files = sources.openclipart_files(root)
    for i in sample_indices(len(files), spec.limit("openclipart"), spec.seed + 2):
        path = files[i]
        text, category = cap.openclipart_caption(path, root)
        rel = str(path.relative_to(root))
        yield WebItem(key="clip-" + hashlib.sha1(rel.encode()).hexdigest()[:12], png=path.read_bytes(),
                      caption=text, source="openclipart", class_name=category)


def _user_items(web_dir: Path) -> Iterator[WebItem]:
    """A folder of images; the caption is a sidecar KEY.txt when present, else the file's title.
    The first folder level, if any, is kept as the (hidden) class for evaluation."""
    files = sorted(p for p in web_dir.rglob("*") if p.is_file() and p.suffix.lower() != ".txt")
    if not files:
        raise FileNotFoundError(f"--web {web_dir}: no files found")
    for path in files:
        body = path.read_bytes()
        fmt = _image_format(body)
        if fmt is None:
            continue
        side = path.with_suffix(".txt")
        text = side.read_text(errors="replace").strip() if side.exists() else path.stem.replace("_", " ")
        rel = path.relative_to(web_dir)
        png = body if fmt == "PNG" else _reencode_png(body)
        yield WebItem(key="web-" + hashlib.sha1(str(rel).encode()).hexdigest()[:12], png=png, caption=text,
                      source="user", class_name=rel.parts[0] if len(rel.parts) > 1 else "")


def _image_format(body: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(body)) as im:
            return im.format
    except DECODE_ERRORS:  # not an image: skipped, like any non-image file in the folder
        return None


def _reencode_png(body: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(body)).save(buf, format="PNG")
    return buf.getvalue()


def _package_reader(source: str, read, seed_offset: int):
    """A `package_images`-style reader as a corpus source: its named key is source + a hash of its id."""
    def items(spec: CorpusSpec) -> Iterator[WebItem]:
        for found in read(spec.limit(source), spec.seed + seed_offset):
            named = f"{source}-{hashlib.sha1(found.name.encode()).hexdigest()[:12]}"
            yield WebItem(key=named, png=found.png, caption=found.caption, source=source, class_name=found.class_name)
    return items


def _mnist_web_items(spec: CorpusSpec) -> Iterator[WebItem]:
    """The half of the 5,000 digits that is not the `mnist` target's (`sources.mnist_split`); their
    hidden source is "mnist", the kind they are."""
    return _mnist_items(spec, "mnist-web")


SOURCE_READERS = {"fashion-mnist": _fashion_items, "openclipart": _openclipart_items, "mnist": _mnist_items,
                  "mnist-web": _mnist_web_items,
                  "oxygen-icons": _package_reader("oxygen-icons", package_images.read_oxygen, 3),
                  "noto-emoji": _package_reader("noto-emoji", package_images.read_emoji, 4),
                  "freeciv": _package_reader("freeciv", read_freeciv, 5),
                  "wesnoth": _package_reader("wesnoth", package_images.read_wesnoth, 6),
                  "tuxpaint-stamps": _package_reader("tuxpaint-stamps", package_images.read_stamps, 7),
                  "dejavu-glyphs": _package_reader("dejavu-glyphs", package_images.read_glyphs, 8),
                  "dejavu-serif-glyphs": _package_reader("dejavu-serif-glyphs", package_images.read_serif_glyphs, 9)}


def iter_items(spec: CorpusSpec) -> Iterable[WebItem]:
    if spec.web_dir:
        yield from _user_items(Path(spec.web_dir))
        return
    for name in spec.sources:
        yield from SOURCE_READERS[name](spec)


def build_corpus(out: Path, spec: CorpusSpec = CorpusSpec(), *, progress: bool = True, encoder=None) -> WebCorpus:
    """Write a corpus directory (see module docstring). Rebuilding the same spec gives the same bytes."""
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    rows, distinct, dropped = _write_shards(out, spec, progress)
    if not rows:
        raise ValueError("the corpus spec selected no items")
    _fill_offsets(out, rows)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, out / "manifest.parquet")
    (out / "captions.json").write_text(json.dumps(distinct))
    encoder = encoder or _default_encoder()
    emb = encoder.encode(distinct, progress=progress).astype(np.float16)
    np.save(out / "caption_emb.npy", emb)
    meta = {"spec": spec_json(spec), "items": len(rows),
            "distinct_captions": len(distinct), **composition(table["source"].to_pylist()),
            "distinct_images": len(set(table["sha256"].to_pylist())), "duplicates_dropped": dropped, "format": 1}
    (out / "corpus.json").write_text(json.dumps(meta, indent=2))  # written last: marks a complete build
    return WebCorpus(out)


def spec_json(spec: CorpusSpec) -> dict:
    """A spec as corpus.json records it (JSON types: lists for tuples)."""
    return json.loads(json.dumps(asdict(spec)))


def composition(sources: list[str]) -> dict:
    """Items and share per source, and the base rates: the share of each installed target's kind."""
    names, counts = np.unique(np.asarray(sources, dtype=str), return_counts=True)
    share = {str(s): float(c) / len(sources) for s, c in zip(names, counts)}
    return {"per_source": {str(s): int(c) for s, c in zip(names, counts)}, "share": share,
            "base_rate": {kind: share.get(kind, 0.0) for kind in INSTALLED_TARGETS}}


def _write_shards(out: Path, spec: CorpusSpec, progress: bool) -> tuple[list[dict], list[str], int]:
    """Writes the items into webdataset shards; returns the manifest rows (offsets still to fill), the
    distinct captions, and how many items were dropped as copies of an earlier image (`spec.distinct`)."""
    rows, caption_ids, distinct, seen, dropped = [], {}, [], set(), 0
    writer = None
    for item in tqdm(iter_items(spec), desc="build corpus", unit="img", disable=not progress):
        sha = hashlib.sha256(item.png).hexdigest()
        if spec.distinct and sha in seen:
            dropped += 1
            continue
        seen.add(sha)
        if len(rows) % spec.shard_size == 0:
            if writer:
                writer.close()
            writer = tarfile.open(out / "shards" / f"{len(rows) // spec.shard_size:05d}.tar", "w",  # noqa: SIM115
                                  format=tarfile.USTAR_FORMAT)  # closed when the next shard opens, or after the loop
        key = item.key if spec.keys == "named" else opaque_key(item.source, item.key)
        width, height = png_size(item.png)
        public = {"key": key, "caption": item.caption, "width": width, "height": height}
        for suffix, body in ((".png", item.png), (".txt", item.caption.encode()), (".json", json.dumps(public).encode())):
            info = tarfile.TarInfo(key + suffix)
            info.size, info.mtime = len(body), 0  # mtime 0: identical specs give identical shards
            writer.addfile(info, io.BytesIO(body))
        cid = caption_ids.setdefault(item.caption, len(distinct))
        if cid == len(distinct):
            distinct.append(item.caption)
        rows.append({"key": key, "url": f"/image/{key}", "caption": item.caption, "status": "success",
                     "width": width, "height": height, "sha256": sha, "shard": len(rows) // spec.shard_size,
                     "size": len(item.png), "caption_id": cid, "source": item.source, "label": item.label,
                     "class_name": item.class_name, "caption_wrong": item.caption_wrong})
    if writer:
        writer.close()
    if len({r["key"] for r in rows}) != len(rows):
        raise ValueError("two items share a key")
    return rows, distinct, dropped


def _default_encoder():
    from explorer.web.text_encoder import default_encoder
    return default_encoder()


def _fill_offsets(out: Path, rows: list[dict]) -> None:
    """Record where each PNG's bytes start inside its tar, so the engine can serve it with one pread."""
    by_key = {r["key"]: r for r in rows}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    by_key[member.name[:-4]]["offset"] = member.offset_data


class WebCorpus:
    """Read access to a built corpus: public fields for the engine, hidden ones for evaluation."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        if not (self.root / "corpus.json").exists():  # written last: its presence marks a complete build
            raise FileNotFoundError(f"no complete corpus at {self.root}: run `explorer corpus build --out {self.root}`")
        table = pq.read_table(self.root / "manifest.parquet")
        self.keys: list[str] = table["key"].to_pylist()
        self.captions: list[str] = table["caption"].to_pylist()
        self.caption_id = table["caption_id"].to_numpy()
        self.shard = table["shard"].to_numpy()
        self.offset = table["offset"].to_numpy()
        self.size = table["size"].to_numpy()
        self.width = table["width"].to_numpy()
        self.height = table["height"].to_numpy()
        self.hidden = {c: table[c].to_numpy(zero_copy_only=False) for c in HIDDEN_COLUMNS}
        self.distinct_captions: list[str] = json.loads((self.root / "captions.json").read_text())
        self.meta = json.loads((self.root / "corpus.json").read_text())
        self.index_of = {k: i for i, k in enumerate(self.keys)}
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def caption_embeddings(self) -> np.ndarray:
        return np.load(self.root / "caption_emb.npy").astype(np.float32)

    def image_bytes(self, i: int) -> bytes:
        shard = int(self.shard[i])
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.root / "shards" / f"{shard:05d}.tar", os.O_RDONLY)
        return os.pread(fd, int(self.size[i]), int(self.offset[i]))  # pread: safe across threads

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
