"""Search backends: one small protocol, a registry, and httpx clients for real engines' JSON APIs.

    local           explorer's own engine (`explorer serve`), SearXNG dialect with a page size
    searxng         any SearXNG instance: GET /search?q=..&format=json&categories=images&pageno=N
    clip-retrieval  any clip-retrieval knn service: POST /knn-service {"text": .., "num_images": N}
    replay          the recorded backend of a run, answered from its cache alone (no socket opens)

Every answer goes through a `ResponseCache` keyed by the exact request, so a run's searches can be
replayed bit for bit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import httpx

from explorer.cache import CachedResponse, CacheMode, ResponseCache, canonical_request

USER_AGENT = "explorer/0.1 (active data acquisition; +https://pypi.org/project/explorer)"


class SearchError(RuntimeError):
    """An engine could not be reached, refused, or answered something that is not its JSON shape."""


@dataclass(frozen=True)
class SearchResult:
    query: str
    rank: int              # 0-based position in the engine's answer
    image_url: str
    page_url: str
    caption: str
    score: float | None = None
    result_id: str | None = None


class SearchBackend(Protocol):
    name: str

    def search(self, query: str, n: int) -> list[SearchResult]: ...

    def describe(self) -> dict[str, Any]: ...   # what `build_backend` needs to rebuild it (for replay)


class CachedHttp:
    """httpx client whose answers go through the cache according to `mode`."""

    def __init__(self, cache: ResponseCache | None, mode: CacheMode | str = CacheMode.READWRITE,
                 timeout: float = 20.0, retries: int = 2):
        self.cache, self.mode = cache, CacheMode(mode)
        if self.mode is CacheMode.REPLAY and cache is None:
            raise ValueError("replay needs a cache")
        self._client = None if self.mode is CacheMode.REPLAY else httpx.Client(
            timeout=timeout, headers={"User-Agent": USER_AGENT}, follow_redirects=True,
            transport=httpx.HTTPTransport(retries=retries))

    def request(self, method: str, url: str, *, params: dict | None = None, json_body=None,
                description: str) -> CachedResponse:
        key = ResponseCache.request_key(method, url, params, json_body)
        if self.mode is CacheMode.REPLAY:
            return self.cache.require(key, description)
        if self.mode is CacheMode.READWRITE and self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        try:
            r = self._client.request(method, url, params=params, json=json_body)
        except httpx.HTTPError as e:
            raise SearchError(f"{description}: {type(e).__name__}: {e}") from e
        answer = CachedResponse(url=str(r.url), status=r.status_code, headers=dict(r.headers), body=r.content,
                                fetched_at=time.time(), request=canonical_request(method, url, params, json_body))
        if self.cache is not None:
            self.cache.put(key, answer)
        return answer

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _json(answer: CachedResponse, description: str):
    if answer.status != 200:
        raise SearchError(f"{description}: HTTP {answer.status}: {answer.body[:200]!r}")
    try:
        return json.loads(answer.body)
    except ValueError as e:
        raise SearchError(f"{description}: answer is not JSON ({e}): {answer.body[:200]!r}") from e


def _field(obj: dict, name: str, kind: type | tuple, where: str):
    if not isinstance(obj, dict) or name not in obj:
        raise SearchError(f"{where}: field {name!r} is missing")
    value = obj[name]
    if not isinstance(value, kind):
        raise SearchError(f"{where}: field {name!r} should be {getattr(kind, '__name__', kind)}, "
                          f"got {type(value).__name__}")
    return value


def parse_searxng(payload, query: str, start_rank: int, where: str) -> list[SearchResult]:
    """SearXNG JSON -> results; entries without an image (`img_src`/`thumbnail_src`) are skipped."""
    out = []
    for i, r in enumerate(_field(payload, "results", list, where)):
        here = f"{where}: results[{i}]"
        image = r.get("img_src") or r.get("thumbnail_src") if isinstance(r, dict) else None
        if not image:
            continue
        if not isinstance(image, str):
            raise SearchError(f"{here}: field 'img_src' should be str")
        score = r.get("score")
        out.append(SearchResult(query=query, rank=start_rank + len(out), image_url=image,
                                page_url=str(r.get("url") or image), caption=str(r.get("title") or ""),
                                score=float(score) if isinstance(score, (int, float)) else None))
    return out


def parse_clip_retrieval(payload, query: str, where: str) -> list[SearchResult]:
    if not isinstance(payload, list):
        raise SearchError(f"{where}: expected a JSON list of results, got {type(payload).__name__}")
    out = []
    for i, r in enumerate(payload):
        here = f"{where}: [{i}]"
        url = _field(r, "url", str, here)
        sim = r.get("similarity")
        out.append(SearchResult(query=query, rank=i, image_url=url, page_url=url, caption=str(r.get("caption") or ""),
                                score=float(sim) if isinstance(sim, (int, float)) else None,
                                result_id=None if r.get("id") is None else str(r["id"])))
    return out


SEARCH_BACKENDS: dict[str, Callable[..., SearchBackend]] = {}


def register_backend(name: str):
    def deco(cls):
        cls.name = name
        SEARCH_BACKENDS[name] = cls
        return cls
    return deco


@register_backend("searxng")
class SearxngBackend:
    """Any SearXNG instance with the JSON format enabled; pages until `n` image results."""

    per_page_param: str | None = None  # SearXNG itself has no page-size parameter
    parse = staticmethod(parse_searxng)  # answer JSON -> results; text backends parse documents

    def __init__(self, url: str, *, http: CachedHttp, max_pages: int = 5, per_page: int = 20,
                 categories: str = "images"):
        self.url, self.http = url.rstrip("/"), http
        self.max_pages, self.per_page, self.categories = max_pages, per_page, categories

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "max_pages": self.max_pages, "per_page": self.per_page,
                "categories": self.categories}

    def search(self, query: str, n: int) -> list[SearchResult]:
        results: list[SearchResult] = []
        for page in range(1, self.max_pages + 1):
            params = {"q": query, "format": "json", "pageno": page, "categories": self.categories}
            if self.per_page_param:
                params[self.per_page_param] = self.per_page
            where = f"{self.name} search {query!r} page {page} at {self.url}"
            answer = self.http.request("GET", f"{self.url}/search", params=params, description=where)
            batch = self.parse(_json(answer, where), query, len(results), where)
            results.extend(batch)
            if len(results) >= n or not batch:
                break
        return results[:n]


@register_backend("local")
class LocalBackend(SearxngBackend):
    """explorer's own engine (`explorer serve`): SearXNG's JSON plus a page size."""

    per_page_param = "per_page"

    def __init__(self, url: str, *, http: CachedHttp, max_pages: int = 5, per_page: int = 50,
                 categories: str = "images"):
        super().__init__(url, http=http, max_pages=max_pages, per_page=per_page, categories=categories)


@register_backend("clip-retrieval")
class ClipRetrievalBackend:
    """A clip-retrieval knn service (text -> image neighbours)."""

    def __init__(self, url: str, *, http: CachedHttp, indice_name: str = "laion5B-L-14"):
        self.url, self.http, self.indice_name = url.rstrip("/"), http, indice_name

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "indice_name": self.indice_name}

    def search(self, query: str, n: int) -> list[SearchResult]:
        body = {"text": query, "image": None, "image_url": None, "embedding_input": None, "modality": "image",
                "num_images": n, "indice_name": self.indice_name, "num_result_ids": n, "use_mclip": False,
                "deduplicate": True, "use_safety_model": False, "use_violence_detector": False,
                "aesthetic_score": "", "aesthetic_weight": 0.5}
        where = f"clip-retrieval search {query!r} at {self.url}"
        answer = self.http.request("POST", f"{self.url}/knn-service", json_body=body, description=where)
        return parse_clip_retrieval(_json(answer, where), query, where)[:n]


def build_backend(name: str, *, cache: ResponseCache | None, mode: CacheMode | str = CacheMode.READWRITE,
                  recorded: dict | None = None, **kwargs) -> SearchBackend:
    """A registered backend. `replay` rebuilds the `recorded` backend (its `describe()`) on the cache alone."""
    if name == "replay":
        if not recorded:
            raise ValueError("the replay backend needs the recorded backend's description")
        recorded = dict(recorded)
        return build_backend(recorded.pop("name"), cache=cache, mode=CacheMode.REPLAY, **recorded)
    if name not in SEARCH_BACKENDS:
        raise KeyError(f"unknown search backend {name!r}; valid: {', '.join(sorted([*SEARCH_BACKENDS, 'replay']))}")
    return SEARCH_BACKENDS[name](http=CachedHttp(cache, mode), **kwargs)


def search_many(backend: SearchBackend, queries: Sequence[str], n: int, *, concurrency: int = 8,
                ) -> list[list[SearchResult] | SearchError]:
    """All queries, `concurrency` at a time; a failed query yields its SearchError, in input order."""
    def one(q: str):
        try:
            return backend.search(q, n)
        except SearchError as e:
            return e

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(one, queries))
