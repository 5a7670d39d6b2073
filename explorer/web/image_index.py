"""The engine's image index: every web image under a frozen ImageNet encoder, searched with faiss.

Stored beside the corpus, built once (with a progress bar) and rebuilt when stale:

    image_emb.npy       (N, D) float16 unit rows, one per corpus item in manifest order; zero rows for
                        items that are not readable images (never returned)
    image_index.json    the model (a key of `IMAGE_MODELS`), its resolution, the corpus digest (of its
                        items' sha256, in order) and the build's counts and speed; written last

An index whose model or corpus digest differs from the engine's is stale and rebuilt. Search is inner
product on unit vectors (cosine). `near_duplicates` is clip-retrieval's `deduplicate`: result
embeddings closer than cosine 0.94 form connected components, and each keeps its best-ranked member.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from explorer.web.corpus import WebCorpus
from explorer.web.image_encoder import (
    DEFAULT_IMAGE_MODEL,
    ImageDecodeError,
    ImageEncoder,
    decode_image,
)

log = logging.getLogger(__name__)

EMBEDDINGS, META, LOCK = "image_emb.npy", "image_index.json", "image_index.lock"
DEDUP_THRESHOLD = 0.94  # clip-retrieval's KnnService.get_non_uniques


def corpus_digest(root: Path) -> str:
    """The corpus's identity for its image index: sha256 over its items' content hashes, in order."""
    hashes = pq.read_table(Path(root) / "manifest.parquet", columns=["sha256"])["sha256"].to_pylist()
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def index_is_fresh(root: Path, model: str) -> bool:
    """Whether `root` holds a complete image index of `model` for the corpus as it is now."""
    meta_path = Path(root) / META
    if not meta_path.exists() or not (Path(root) / EMBEDDINGS).exists():
        return False
    meta = json.loads(meta_path.read_text())
    return meta.get("model") == model and meta.get("corpus") == corpus_digest(root)


def build_image_index(corpus: WebCorpus, encoder: ImageEncoder, *, batch_size: int = 256,
                      progress: bool = True) -> dict:
    """Embed every corpus image (see module docstring); returns the metadata written."""
    root, n = corpus.root, len(corpus)
    (root / META).unlink(missing_ok=True)  # no complete index until the new one is
    emb = np.zeros((n, encoder.dim), np.float16)
    skipped, t0 = 0, time.perf_counter()
    bar = tqdm(total=n, desc=f"image index ({encoder.name})", unit="img", disable=not progress)
    for start in range(0, n, batch_size):
        rows, pixels = [], []
        for i in range(start, min(start + batch_size, n)):
            try:
                pixels.append(decode_image(corpus.image_bytes(i), encoder.image_size))
                rows.append(i)
            except ImageDecodeError:  # a decompression bomb or broken file: the fetcher rejects it too
                skipped += 1
        if rows:
            emb[rows] = encoder.encode(torch.stack(pixels)).astype(np.float16)
        bar.update(min(batch_size, n - start))
    bar.close()
    seconds = time.perf_counter() - t0
    tmp = root / (EMBEDDINGS + ".tmp.npy")
    np.save(tmp, emb)
    tmp.replace(root / EMBEDDINGS)
    meta = {"model": encoder.name, "image_size": encoder.image_size, "dim": encoder.dim,
            "corpus": corpus_digest(root), "items": n, "indexed": n - skipped, "skipped": skipped,
            "seconds": round(seconds, 1), "images_per_second": round(n / max(seconds, 1e-9), 1)}
    (root / META).write_text(json.dumps(meta, indent=2))
    log.info("image index of %s: %d images in %.0f s (%.0f img/s)", root, n, seconds, meta["images_per_second"])
    return meta


def near_duplicates(embeddings: np.ndarray, threshold: float = DEDUP_THRESHOLD) -> np.ndarray:
    """Rows to drop from ranked (M, D) unit rows: all but the first of each group joined by cosine >
    `threshold` (clip-retrieval's connected-components deduplication)."""
    if len(embeddings) < 2:
        return np.zeros(0, np.int64)
    x = np.asarray(embeddings, np.float32)
    adjacency = csr_matrix(x @ x.T > threshold)
    _, component = connected_components(adjacency, directed=False)
    first = {}
    for row, c in enumerate(component):
        first.setdefault(int(c), row)
    return np.array([row for row, c in enumerate(component) if first[int(c)] != row], np.int64)


class ImageIndex:
    """The corpus's images under `encoder`, for nearest-neighbour search by image or by vector."""

    def __init__(self, corpus: WebCorpus, encoder: ImageEncoder, embeddings: np.ndarray):
        if embeddings.shape != (len(corpus), encoder.dim):
            raise ValueError(f"image embeddings of shape {embeddings.shape} do not fit {len(corpus)} items "
                             f"of dimension {encoder.dim}")
        self.corpus, self.encoder, self.embeddings = corpus, encoder, embeddings  # (N, D) float16
        valid = np.flatnonzero(np.abs(embeddings).sum(axis=1) > 0)
        # fp16 codes: the memory of the stored file, inner product on the decoded floats
        self._faiss = faiss.IndexIDMap(faiss.IndexScalarQuantizer(encoder.dim, faiss.ScalarQuantizer.QT_fp16,
                                                                  faiss.METRIC_INNER_PRODUCT))
        self._faiss.add_with_ids(np.ascontiguousarray(embeddings[valid], np.float32), valid.astype(np.int64))

    @classmethod
    def open(cls, corpus: WebCorpus, model: str = DEFAULT_IMAGE_MODEL, *, progress: bool = True) -> ImageIndex:
        """The corpus's image index under `model`, built first when it is missing or stale (one
        process builds it while any other that needs it waits)."""
        encoder = ImageEncoder(model)
        with open(corpus.root / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not index_is_fresh(corpus.root, model):
                build_image_index(corpus, encoder, progress=progress)
            return cls(corpus, encoder, np.load(corpus.root / EMBEDDINGS))

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def model(self) -> str:
        return self.encoder.name

    def embed(self, body: bytes) -> np.ndarray:
        """An image file's (D,) unit vector under the index's model (ImageDecodeError if unreadable)."""
        return self.encoder.encode_bytes(body)

    def search(self, vector: np.ndarray, k: int, deduplicate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(items, cosines) of the `k` images nearest a (D,) vector (normalised here), best first;
        `deduplicate` then drops near-duplicates of better-ranked results."""
        q = np.asarray(vector, np.float32).reshape(1, -1)
        if q.shape[1] != self.dim:
            raise ValueError(f"embedding_input has {q.shape[1]} dimensions; the image index ({self.model}) "
                             f"has {self.dim}")
        norm = float(np.linalg.norm(q))
        if not np.isfinite(norm) or norm == 0:
            raise ValueError("embedding_input must be a finite, non-zero vector")
        k = min(k, self._faiss.ntotal)
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        sims, ids = self._faiss.search(q / norm, k)
        keep = ids[0] >= 0
        items, sims = ids[0][keep], sims[0][keep]
        if deduplicate:
            drop = near_duplicates(self.embeddings[items])
            items, sims = np.delete(items, drop), np.delete(sims, drop)
        return items, sims
