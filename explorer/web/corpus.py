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
from explorer.web import sources

DEFAULT_SOURCES = ("fashion-mnist", "openclipart", "mnist")
HIDDEN_COLUMNS = ("source", "label", "class_name", "caption_wrong")


def explorer_home() -> Path:
    return Path(os.environ.get("EXPLORER_HOME", Path.home() / ".cache" / "explorer"))


def default_corpus_dir() -> Path:
    return explorer_home() / "corpus" / "default"


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
    """What goes into a corpus. `limit_per_source` takes a reproducible slice (for tests)."""

    sources: tuple[str, ...] = DEFAULT_SOURCES
    limit_per_source: int | None = None
    seed: int = 0
    noise: cap.CaptionNoise = field(default_factory=cap.CaptionNoise)
    web_dir: str | None = None  # the user's own web instead of the installed sources
    shard_size: int = 10_000

    def __post_init__(self):
        unknown = set(self.sources) - set(DEFAULT_SOURCES)
        if unknown:
            raise ValueError(f"unknown corpus sources {sorted(unknown)}; valid: {', '.join(DEFAULT_SOURCES)}")
        if self.limit_per_source is not None and self.limit_per_source < 1:
            raise ValueError("limit_per_source must be >= 1")


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


def _slice(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _fashion_items(spec: CorpusSpec) -> Iterator[WebItem]:
    images, labels = sources.load_fashion_mnist("train")
    idx = _slice(len(images), spec.limit_per_source, spec.seed)
    texts, wrong = cap.fashion_captions(labels[idx], seed=spec.seed, noise=spec.noise)
    for j, i in enumerate(idx):
        yield WebItem(key=f"fmnist-train-{i:05d}", png=_png(images[i]), caption=texts[j],
                      source="fashion-mnist", label=int(labels[i]),
                      class_name=sources.FASHION_CLASSES[labels[i]], caption_wrong=bool(wrong[j]))


def _mnist_items(spec: CorpusSpec) -> Iterator[WebItem]:
    images, labels = sources.load_mnist_5k()
    idx = _slice(len(images), spec.limit_per_source, spec.seed + 1)
    texts = cap.digit_captions(labels[idx], seed=spec.seed + 1)
    for j, i in enumerate(idx):
        yield WebItem(key=f"mnist-{i:04d}", png=_png(images[i]), caption=texts[j], source="mnist",
                      label=int(labels[i]), class_name=str(labels[i]))


def _openclipart_items(spec: CorpusSpec) -> Iterator[WebItem]:
    root = sources.OPENCLIPART_DIR
    files = sources.openclipart_files(root)
    for i in _slice(len(files), spec.limit_per_source, spec.seed + 2):
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
    except Exception:  # not an image: skipped, like any non-image file in the folder
        return None


def _reencode_png(body: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(body)).save(buf, format="PNG")
    return buf.getvalue()


SOURCE_READERS = {"fashion-mnist": _fashion_items, "openclipart": _openclipart_items, "mnist": _mnist_items}


def iter_items(spec: CorpusSpec) -> Iterable[WebItem]:
    if spec.web_dir:
        yield from _user_items(Path(spec.web_dir))
        return
    for name in spec.sources:
        yield from SOURCE_READERS[name](spec)


def build_corpus(out: Path, spec: CorpusSpec = CorpusSpec(), *, progress: bool = True, encoder=None) -> "WebCorpus":
    """Write a corpus directory (see module docstring). Rebuilding the same spec gives the same bytes."""
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    rows, caption_ids, distinct = [], {}, []
    shard, writer = -1, None
    items = tqdm(iter_items(spec), desc="build corpus", unit="img", disable=not progress)
    for n, item in enumerate(items):
        if n % spec.shard_size == 0:
            if writer:
                writer.close()
            shard += 1
            writer = tarfile.open(out / "shards" / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT)
        width, height = png_size(item.png)
        public = {"key": item.key, "caption": item.caption, "width": width, "height": height}
        for suffix, body in ((".png", item.png), (".txt", item.caption.encode()), (".json", json.dumps(public).encode())):
            info = tarfile.TarInfo(item.key + suffix)
            info.size, info.mtime = len(body), 0  # mtime 0: identical specs give identical shards
            writer.addfile(info, io.BytesIO(body))
        cid = caption_ids.setdefault(item.caption, len(distinct))
        if cid == len(distinct):
            distinct.append(item.caption)
        rows.append({"key": item.key, "url": f"/image/{item.key}", "caption": item.caption, "status": "success",
                     "width": width, "height": height, "sha256": hashlib.sha256(item.png).hexdigest(),
                     "shard": shard, "size": len(item.png), "caption_id": cid, "source": item.source,
                     "label": item.label, "class_name": item.class_name, "caption_wrong": item.caption_wrong})
    if writer:
        writer.close()
    if not rows:
        raise ValueError("the corpus spec selected no items")
    _fill_offsets(out, rows)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, out / "manifest.parquet")
    (out / "captions.json").write_text(json.dumps(distinct))
    encoder = encoder or _default_encoder()
    emb = encoder.encode(distinct, progress=progress).astype(np.float16)
    np.save(out / "caption_emb.npy", emb)
    counts = {s: int(c) for s, c in zip(*np.unique(table["source"].to_numpy(), return_counts=True))}
    meta = {"spec": {**asdict(spec), "noise": asdict(spec.noise)}, "items": len(rows),
            "distinct_captions": len(distinct), "per_source": counts, "format": 1}
    (out / "corpus.json").write_text(json.dumps(meta, indent=2))
    return WebCorpus(out)


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
