"""The local search engine: hybrid BM25 + MiniLM ranking over a corpus's captions, served over HTTP.

It serves an image corpus (`explorer.web.corpus.WebCorpus`) or a document corpus
(`explorer.web.text_corpus.TextCorpus`, whose "captions" are its documents' search texts): the corpus's
`media` attribute ("image" when absent) picks how items are served (`SERVED_MEDIA`).

Ranking works on distinct captions (many items share one): BM25 over stemmed caption words and
cosine similarity of MiniLM embeddings (faiss inner product) each nominate their top
`candidates` captions; on that union the score is

    score = bm25_weight * bm25 / max(bm25) + (1 - bm25_weight) * cosine

and captions scoring below `min_score` are dropped: like a real engine, a query that matches little
returns little, instead of filling its pages with the corpus's most common items. (With the default
weights, a caption that shares no stemmed word with the query needs a cosine of at least 0.5.)
Each caption expands to its items in a fixed pseudo-random order (so paging is stable).

The HTTP API speaks two real engines' dialects, so the same clients work against the real things:
    GET  /search?q=..&format=json&pageno=1[&per_page=20]   SearXNG's JSON (results: url, img_src, title, ...)
    POST /knn-service  {"text" | "image" | "embedding_input": .., "num_images": N}
                                                              clip-retrieval's [{url, caption, similarity, id}]
    GET  /indices-list                                        clip-retrieval's list of index names
Text corpora answer /search with SearXNG's general results (url, title, content snippet).
    GET  /image/KEY                                           the item's PNG bytes (image corpora)
    GET  /doc/KEY                                             the document's UTF-8 text (text corpora)
    GET  /healthz
Hidden ground-truth columns are never served.

The knn service reads a request as clip-retrieval's back end does (explorer/web/knn_service.py): the
caption index `explorer` takes `text` or `embedding_input` (a MiniLM vector, searched by cosine alone;
both modalities rank it, as it is the only text-space index; `deduplicate` keeps one item per caption,
since items sharing a caption share its embedding); the image index `explorer-image`, when the engine
has one (explorer/web/image_index.py), takes `image` (base64 bytes, embedded by the engine's own
image model) or `embedding_input` in that model's space. Similarities stay within [-1, 1].
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import bm25s
import faiss
import numpy as np
import Stemmer

from explorer.web.corpus import WebCorpus
from explorer.web.knn_service import IMAGE_INDEX, KNN_INDEX, KnnRequest, knn_request

if TYPE_CHECKING:
    from explorer.web.image_index import ImageIndex

log = logging.getLogger(__name__)

MAX_PER_PAGE = 100


@dataclass(frozen=True)
class Hit:
    item: int      # row in the corpus manifest
    score: float


class HybridIndex:
    """Ranks corpus items for a text query (see module docstring)."""

    def __init__(self, corpus: WebCorpus, encoder, *, bm25_weight: float = 0.5, candidates: int = 1000,
                 min_score: float = 0.25):
        if not 0.0 <= bm25_weight <= 1.0:
            raise ValueError(f"bm25_weight must be in [0, 1], got {bm25_weight}")
        self.corpus, self.encoder = corpus, encoder
        self.bm25_weight, self.candidates, self.min_score = bm25_weight, candidates, min_score
        self._stemmer = Stemmer.Stemmer("english")
        self._bm25 = bm25s.BM25()
        self._bm25.index(self._tokenize(corpus.distinct_captions), show_progress=False)
        emb = np.ascontiguousarray(corpus.caption_embeddings())  # (U, 384) L2-normalised
        self._dense = faiss.IndexFlatIP(emb.shape[1])
        self._dense.add(emb)
        self._encode_lock = threading.Lock()  # one forward at a time: torch threads already use all cores
        # Items of each caption, in an order fixed by a hash of the key.
        order = sorted(range(len(corpus)), key=lambda i: hashlib.sha1(corpus.keys[i].encode()).digest())
        groups: dict[int, list[int]] = {}
        for i in order:
            groups.setdefault(int(corpus.caption_id[i]), []).append(i)
        self._items_of = groups

    @functools.lru_cache(maxsize=4096)  # noqa: B019  (one index per server; queries repeat across runs)
    def _embed_query(self, query: str) -> np.ndarray:
        """(1, 384) MiniLM embedding; the encoder forward is most of a query's cost."""
        with self._encode_lock:
            return self.encoder.encode([query])

    def _tokenize(self, texts):
        return bm25s.tokenize(texts, stopwords="en", stemmer=self._stemmer, show_progress=False)

    def rank_captions(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """(caption ids, scores), best first."""
        n = len(self.corpus.distinct_captions)
        k = min(self.candidates, n)
        tokens = bm25s.tokenize([query], stopwords="en", stemmer=self._stemmer, show_progress=False,
                                return_ids=False)[0]
        bm25 = self._bm25.get_scores(tokens) if tokens else np.zeros(n, np.float32)
        q = self._embed_query(query)
        cos_top, dense_ids = self._dense.search(q, k)
        lexical_ids = np.argpartition(-bm25, k - 1)[:k] if k < n else np.arange(n)
        ids = np.union1d(dense_ids[0][dense_ids[0] >= 0], lexical_ids[bm25[lexical_ids] > 0])
        cos = self._dense.reconstruct_batch(ids) @ q[0] if len(ids) else np.zeros(0, np.float32)
        top = bm25.max()
        lexical = bm25[ids] / top if top > 0 else np.zeros(len(ids), np.float32)
        score = self.bm25_weight * lexical + (1 - self.bm25_weight) * cos
        order = np.lexsort((ids, -score))  # ties broken by caption id: deterministic
        order = order[score[order] >= self.min_score]
        return ids[order], score[order]

    def rank_by_embedding(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(caption ids, cosines) of the `k` captions nearest a (384,) vector (normalised here)."""
        q = np.asarray(vector, np.float32).reshape(1, -1)
        if q.shape[1] != self._dense.d:
            raise ValueError(f"embedding_input has {q.shape[1]} dimensions; this index has {self._dense.d}")
        norm = float(np.linalg.norm(q))
        if not np.isfinite(norm) or norm == 0:
            raise ValueError("embedding_input must be a finite, non-zero vector")
        cos, ids = self._dense.search(q / norm, min(k, self._dense.ntotal))
        keep = ids[0] >= 0
        return ids[0][keep], cos[0][keep]

    def search(self, query: str, offset: int = 0, limit: int = 20) -> tuple[list[Hit], int]:
        """One page of hits, and how many hits the query has in all."""
        return self.expand(*self.rank_captions(query), offset, limit)

    def expand(self, ids: np.ndarray, scores: np.ndarray, offset: int, limit: int,
               one_per_caption: bool = False) -> tuple[list[Hit], int]:
        """Ranked captions -> one page of their items (or of one item each), and the total."""
        hits, total = [], 0
        for cid, score in zip(ids, scores):
            items = self._items_of[int(cid)][:1] if one_per_caption else self._items_of[int(cid)]
            lo, hi = max(offset - total, 0), max(offset + limit - total, 0)
            hits.extend(Hit(i, float(score)) for i in items[lo:hi])
            total += len(items)
        return hits, total


class ImageItems:
    """Image corpora: /image/KEY is the PNG; results are SearXNG image results."""

    route, category = "image", "images"

    def __init__(self, corpus):
        self.corpus = corpus

    def body(self, i: int) -> tuple[bytes, str]:
        return self.corpus.image_bytes(i), "image/png"

    def result(self, i: int, url: str) -> dict:
        c = self.corpus
        return {"url": url, "img_src": url, "thumbnail_src": url, "title": c.captions[i], "content": "",
                "template": "images.html", "img_format": "png", "resolution": f"{c.width[i]} x {c.height[i]}"}


class DocumentItems:
    """Text corpora: /doc/KEY is the document's text (or, with `html`, a web page holding it);
    results are SearXNG general results."""

    route, category = "doc", "general"

    def __init__(self, corpus, html: bool = False):
        self.corpus, self.html = corpus, html

    def body(self, i: int) -> tuple[bytes, str]:
        if self.html:
            return self.corpus.document_page(i), "text/html; charset=utf-8"
        return self.corpus.document_bytes(i), "text/plain; charset=utf-8"

    def result(self, i: int, url: str) -> dict:
        return {"url": url, "title": self.corpus.titles[i], "content": self.corpus.snippet(i),
                "template": "default.html"}


SERVED_MEDIA = {"image": ImageItems, "text": DocumentItems}


def served_items(corpus, html_documents: bool = False) -> ImageItems | DocumentItems:
    media = getattr(corpus, "media", "image")
    if media not in SERVED_MEDIA:
        raise ValueError(f"unknown corpus media {media!r}; valid: {', '.join(SERVED_MEDIA)}")
    if media == "text":
        return DocumentItems(corpus, html=html_documents)
    if html_documents:
        raise ValueError("html_documents applies to a text corpus only")
    return SERVED_MEDIA[media](corpus)


def _handler(index: HybridIndex, html_documents: bool = False, images: ImageIndex | None = None):
    corpus = index.corpus
    items = served_items(corpus, html_documents)
    prefix = f"/{items.route}/"
    indices = (KNN_INDEX, IMAGE_INDEX) if images is not None else (KNN_INDEX,)

    def ranked(req: KnnRequest, image: bytes | None, limit: int) -> list[Hit]:
        """The request's hits on its index (see explorer/web/knn_service.py); ValueError if it cannot have any."""
        if req.indice_name == IMAGE_INDEX:
            if req.text is not None:
                raise ValueError(f"indice {IMAGE_INDEX!r} holds images under {images.model}, which embeds no "
                                 f"text: send 'image' or an 'embedding_input' of {images.dim} numbers, or search "
                                 f"the captions with indice_name {KNN_INDEX!r}")
            if req.modality != "image":
                raise ValueError(f"indice {IMAGE_INDEX!r} has only an image index: use modality 'image'")
            vector = images.embed(image) if image is not None else req.embedding
            return [Hit(int(i), float(s)) for i, s in zip(*images.search(vector, limit, req.deduplicate))]
        if image is not None:
            raise ValueError(f"indice {KNN_INDEX!r} ranks captions under MiniLM and cannot embed an image: send "
                             f"image queries to indice_name {IMAGE_INDEX!r}")
        caption_ids = (index.rank_captions(req.text) if req.embedding is None
                       else index.rank_by_embedding(req.embedding, limit))
        return index.expand(*caption_ids, 0, limit, one_per_caption=req.deduplicate)[0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
        server_version = "explorer-engine/0.1"

        def log_message(self, *args):  # quiet: a search engine logs elsewhere
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json"):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj):
            self._send(status, json.dumps(obj).encode())

        def _base(self) -> str:
            host, port = self.server.server_address[:2]
            return f"http://{host}:{port}"

        def do_GET(self):
            url = urlsplit(self.path)
            if url.path == "/healthz":
                return self._json(200, {"status": "ok", "items": len(corpus)})
            if url.path.startswith(prefix):
                i = corpus.index_of.get(url.path[len(prefix):])
                if i is None:
                    return self._json(404, {"error": f"no such {items.route}"})
                return self._send(200, *items.body(i))
            if url.path == "/search":
                return self._searxng(parse_qs(url.query))
            if url.path == "/indices-list":
                return self._json(200, list(indices))
            self._json(404, {"error": f"no route {url.path}"})

        def do_POST(self):
            if urlsplit(self.path).path != "/knn-service":
                return self._json(404, {"error": "no route"})
            try:
                n = int(self.headers.get("Content-Length", "0"))
                req = knn_request(json.loads(self.rfile.read(n)), indices)
                limit = min(req.num_result_ids, 10 * MAX_PER_PAGE)
                hits = ranked(req, self._image_of(req), limit)
            except ValueError as e:  # JSONDecodeError and unreadable images included
                return self._json(400, {"error": f"bad knn-service request: {e}"})
            base, answer = self._base(), []
            for rank, h in enumerate(hits):  # as clip-back: url and caption for the first num_images only
                meta = ({"url": f"{base}{prefix}{corpus.keys[h.item]}", "caption": corpus.captions[h.item]}
                        if rank < req.num_images else {})
                answer.append({**meta, "similarity": round(min(1.0, max(-1.0, h.score)), 6), "id": h.item})
            self._json(200, answer)

        def _image_of(self, req: KnnRequest) -> bytes | None:
            """The query image's bytes: the decoded `image`, or this engine's own /image/KEY for an
            `image_url` (it downloads nothing)."""
            if req.image_url is None:
                return req.image
            url = urlsplit(req.image_url)
            own = {self._base().removeprefix("http://"), self.headers.get("Host")}
            i = corpus.index_of.get(url.path[len(prefix):]) if url.path.startswith(prefix) else None
            if url.netloc not in own or i is None:
                raise ValueError("this engine downloads no image_url but its own /image/KEY: send the image "
                                 "bytes base64-encoded as 'image'")
            return corpus.image_bytes(i)

        def _searxng(self, qs: dict):
            q = (qs.get("q") or [""])[0].strip()
            try:
                page = int((qs.get("pageno") or ["1"])[0])
                per_page = int((qs.get("per_page") or ["20"])[0])
            except ValueError:
                return self._json(400, {"error": "pageno and per_page must be integers"})
            if not q or page < 1 or not 1 <= per_page <= MAX_PER_PAGE:
                return self._json(400, {"error": f"need q, pageno >= 1 and 1 <= per_page <= {MAX_PER_PAGE}"})
            hits, total = index.search(q, (page - 1) * per_page, per_page)
            base = self._base()
            results = []
            for rank, h in enumerate(hits):
                link = f"{base}{prefix}{corpus.keys[h.item]}"
                results.append({**items.result(h.item, link), "engine": "explorer", "engines": ["explorer"],
                                "category": items.category, "score": round(h.score, 6),
                                "positions": [(page - 1) * per_page + rank + 1]})
            self._json(200, {"query": q, "number_of_results": total, "results": results, "answers": [],
                             "corrections": [], "infoboxes": [], "suggestions": [], "unresponsive_engines": []})

    return Handler


class _QuietHTTPServer(ThreadingHTTPServer):
    """Request errors (a client that hung up mid-answer, say) go to a log file, not the terminal."""

    error_log: Path | None = None

    def handle_error(self, request, client_address):
        kind, error, _ = sys.exc_info()
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {client_address[0]}:{client_address[1]} {kind.__name__}: {error}"
        if self.error_log is None:
            log.debug("engine: %s", line)
            return
        try:
            with open(self.error_log, "a") as f:
                f.write(line + "\n")
                if not isinstance(error, (ConnectionError, TimeoutError)):  # a real fault: keep its traceback
                    f.write(traceback.format_exc())
        except OSError as e:  # the log itself failed (disk full): never let it reach the terminal
            log.debug("engine: %s (error log unwritable: %s)", line, e)


class SearchServer:
    """The engine on 127.0.0.1 in a background thread; `with SearchServer(...) as s: s.url`.

    `error_log`: a file that request errors are appended to (by default they are only logged at
    debug level), so a client that hangs up never prints a traceback into the user's terminal.
    `html_documents`: a text corpus's documents are served as web pages (text/html) instead of
    text/plain. `image_index`: the corpus's images under an image model, served as the knn service's
    second index (explorer/web/knn_service.py)."""

    def __init__(self, index: HybridIndex, host: str = "127.0.0.1", port: int = 0,
                 error_log: Path | None = None, html_documents: bool = False, image_index: ImageIndex | None = None):
        self.httpd = _QuietHTTPServer((host, port), _handler(index, html_documents, image_index))
        self.httpd.error_log = Path(error_log) if error_log else None
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "SearchServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="search-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread:
            self._thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def open_local_engine(corpus_dir: Path, port: int = 0, min_score: float = 0.25, error_log: Path | None = None,
                      image_index: bool = False, progress: bool = True):
    """Load a corpus, index it and start the engine on 127.0.0.1 (a started `SearchServer`); with
    `image_index`, also its image index (built first when missing or stale)."""
    from explorer.web.image_index import ImageIndex
    from explorer.web.text_encoder import default_encoder

    corpus = WebCorpus(corpus_dir)
    images = ImageIndex.open(corpus, progress=progress) if image_index else None
    index = HybridIndex(corpus, default_encoder(), min_score=min_score)
    return SearchServer(index, port=port, error_log=error_log, image_index=images).start()
