"""Search backends: one small protocol, a registry, and httpx clients for real engines' JSON APIs.

    local           explorer's own engine (`explorer serve`), SearXNG dialect with a page size
    searxng         any SearXNG instance: GET /search?q=..&format=json&categories=images&pageno=N
    clip-retrieval  any clip-retrieval knn service: POST /knn-service {"text": .., "num_images": N}
                    (image queries: {"image": base64, ..} or {"embedding_input": ..} under `image_model`)
    replay          the recorded backend of a run, answered from its cache alone (no socket opens)

A query is a string, or an `ImageQuery` (image file bytes: a query by example), which the backends
of a knn service answer with `search_image` (the local engine's image index, clip-retrieval's
`image` / `embedding_input`; `search_one` dispatches). Every answer goes through a `ResponseCache`
keyed by the exact request (an image query's holds the image itself, or its embedding), so a run's
searches can be replayed bit for bit. Only successes are stored: a transport failure, 403, 429, 5xx,
an answer that is not JSON, or a SearXNG page with no results because its engines failed raises a
`SearchError` that names the cause and the fix, and the next run asks again. In a replay, a request
the recording has no answer for fails the same way (`UnrecordedAnswer`, a SearchError): the recorded
run's search failed there too.

A query's results are distinct by image URL, each at the rank of its first occurrence in the
engine's answer (engines repeat results across pages). SearXNG-style paging stops at `n` distinct
results, at the first short or empty page, at a page with nothing new, and when the engine's
`number_of_results` is reached; a page that fails after earlier pages answered keeps their results,
marked partial (`SearchResults.partial`). Given `known` URLs (a run's earlier results,
`search.skip_seen`), a text query skips them and pages on until it has `n` others: a page of known
results alone does not end the paging, a page with nothing the query had not already been given
does. clip-retrieval has no pages: it asks for `known_depth` times as many neighbours instead.

Real engines defend themselves, so the client behaves like a polite browser (`HttpPolicy`): Accept
and Accept-Language headers (SearXNG's bot detection answers 429 without them), a pace between
request starts to one engine, `Retry-After` and bounded exponential backoff on 429 / 5xx /
transport errors, a byte cap on answers, and the fetcher's address guard (explorer.acquire.netguard): the
configured engine's own host:port is allowed, a redirect anywhere else non-public is refused.
Each backend sets its defaults (SearXNG: one query at a time, 1 s apart); backend options of the
same names as `HttpPolicy`'s fields override them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import httpx

from explorer.acquire.backoff import retry_delay
from explorer.acquire.cache import CachedResponse, CacheMiss, CacheMode, ResponseCache, canonical_request
from explorer.acquire.netguard import (
    BlockedDestination,
    NetGuard,
    guarded_sync_transport,
    netloc_of,
)
from explorer.web.knn_service import IMAGE_INDEX

USER_AGENT = "explorer/0.1 (active data acquisition; +https://pypi.org/project/explorer)"
# What a browser sends; SearXNG's bot detection refuses requests whose Accept lacks text/html, or
# that have no Accept-Language, or whose Accept-Encoding lacks gzip or deflate.
BROWSER_HEADERS = {"User-Agent": USER_AGENT, "Accept": "application/json, text/html;q=0.9, */*;q=0.8",
                   "Accept-Language": "en-US,en;q=0.9", "Accept-Encoding": "gzip, deflate"}


class SearchError(RuntimeError):
    """An engine could not be reached, refused, or answered something that is not its JSON shape."""


class UnrecordedAnswer(SearchError, CacheMiss):
    """A replay asked for a search answer the recorded run never got (or its cache lost)."""


@dataclass(frozen=True)
class SearchResult:
    query: str
    rank: int              # 0-based position in the engine's answer
    image_url: str
    page_url: str
    caption: str
    score: float | None = None
    result_id: str | None = None


class SearchResults(list):
    """A query's results (SearchResult, distinct by image URL). `partial` names the failure that
    ended its paging after earlier pages answered (None: the answer is complete)."""

    partial: str | None = None


def distinct_results(results: Sequence[SearchResult], seen: set[str] | None = None) -> list[SearchResult]:
    """`results` without repeats of an image URL (nor of one in `seen`, which gains the new ones):
    each URL once, at its first occurrence's rank."""
    seen = set() if seen is None else seen
    out = []
    for r in results:
        if r.image_url not in seen:
            seen.add(r.image_url)
            out.append(r)
    return out


@dataclass(frozen=True)
class ImageQuery:
    """A query by example: image file bytes; `label` names it in results and logs."""

    image: bytes = field(repr=False)
    label: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.image).hexdigest()


class SearchBackend(Protocol):
    name: str

    def search(self, query: str, n: int, known: Collection[str] = ()) -> list[SearchResult]: ...

    def describe(self) -> dict[str, Any]: ...   # what `build_backend` needs to rebuild it (for replay)


@dataclass(kw_only=True, frozen=True)
class HttpPolicy:
    """How a search client talks to one engine; backend options of these names override a backend's
    defaults (`http_defaults`)."""

    timeout: float = 20.0
    retries: int = 3
    """Extra attempts after transport errors, 429 and 5xx; other answers are never retried."""
    backoff_base: float = 1.0
    """Seconds; retry k waits min(backoff_max, base * 2**k) jittered to [50%, 100%], unless the
    engine sent Retry-After."""
    backoff_max: float = 30.0
    retry_after_max: float = 120.0
    """A longer Retry-After is cut to this."""
    min_interval_s: float = 0.0
    """Least time between two request starts to this engine, over all threads."""
    max_bytes: int = 8 * 2**20
    """Decoded answer size limit; a longer answer is refused."""
    ssrf_guard: bool = True
    """Connect only to public addresses or the engine's own host:port (explorer.acquire.netguard)."""
    seed: int = 0
    """Backoff jitter RNG."""

    def __post_init__(self):
        for name in ("timeout", "max_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HttpPolicy.{name} must be > 0, got {getattr(self, name)}")
        for name in ("retries", "backoff_base", "backoff_max", "retry_after_max", "min_interval_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"HttpPolicy.{name} must be >= 0, got {getattr(self, name)}")


HTTP_POLICY_FIELDS = tuple(f.name for f in fields(HttpPolicy))
Refusal = Callable[[Any], "str | None"]
"""Looks at a parsed 200 answer: None when it is a success, else why not (it is then not cached)."""

_STATUS_HINTS = {
    429: "rate-limited; the engine asks this client to slow down: raise the backend's min_interval_s",
    403: "the engine refuses this client",
}


class _Pace:
    """Request starts to one engine at least `interval` apart, across threads; a Retry-After
    pushes every thread's next start back."""

    def __init__(self, interval: float):
        self.interval, self._next, self._lock = interval, 0.0, threading.Lock()

    def wait_turn(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        time.sleep(start - now)

    def hold_off(self, seconds: float) -> None:
        with self._lock:
            self._next = max(self._next, time.monotonic() + seconds)


class CachedHttp:
    """httpx client for one engine at `origin`, whose successful answers go through the cache
    according to `mode`."""

    def __init__(self, cache: ResponseCache | None, mode: CacheMode | str = CacheMode.READWRITE,
                 policy: HttpPolicy | None = None, origin: str | None = None):
        self.cache, self.mode, self.policy = cache, CacheMode(mode), policy or HttpPolicy()
        if self.mode is CacheMode.REPLAY and cache is None:
            raise ValueError("replay needs a cache")
        self._pace, self._rng, self._rng_lock = _Pace(self.policy.min_interval_s), random.Random(self.policy.seed), \
            threading.Lock()
        self._client = None if self.mode is CacheMode.REPLAY else httpx.Client(
            timeout=self.policy.timeout, headers=BROWSER_HEADERS, follow_redirects=True,
            transport=(guarded_sync_transport(NetGuard([netloc_of(origin)] if origin else []))
                       if self.policy.ssrf_guard else None))

    def request_json(self, method: str, url: str, *, params: dict | None = None, json_body=None,
                     description: str, refusal: Refusal | None = None, hints: dict[int, str] | None = None):
        """The engine's parsed JSON answer; raises SearchError (naming cause and fix) for anything
        but a success, which alone is cached. `hints` adds a backend's advice per HTTP status."""
        key = ResponseCache.request_key(method, url, params, json_body)
        if self.mode is CacheMode.REPLAY:
            try:
                answer = self.cache.require(key, description)
            except CacheMiss as e:  # failures are never stored: the recorded search failed here
                raise UnrecordedAnswer(str(e)) from e
            return _payload(answer, description, refusal, hints)
        if self.mode is CacheMode.READWRITE and self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                try:
                    return _payload(hit, description, refusal, hints)
                except SearchError:  # a failure stored by an older version: ask the engine again
                    pass
        answer = self._with_retries(method, url, params, json_body, description)
        payload = _payload(answer, description, refusal, hints)  # raises: failures are never stored
        if self.cache is not None:
            self.cache.put(key, answer)
        return payload

    def _with_retries(self, method, url, params, json_body, description) -> CachedResponse:
        p = self.policy
        for attempt in range(p.retries + 1):
            self._pace.wait_turn()
            try:
                answer, error = self._get(method, url, params, json_body), None
            except BlockedDestination as e:
                raise SearchError(f"{description}: blocked: {e} (a search answer may come only from the "
                                  "engine's own host:port or a public address)") from e
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
                raise SearchError(f"{description}: {e}: the engine URL must be http(s)") from e
            except (httpx.HTTPError, OSError) as e:
                answer, error = None, e
            if answer is not None and answer.status != 429 and answer.status < 500:
                return answer
            if attempt == p.retries:
                break
            with self._rng_lock:
                delay = retry_delay(answer.headers if answer else {}, attempt, base=p.backoff_base,
                                    cap=p.backoff_max, retry_after_max=p.retry_after_max, rng=self._rng)
            self._pace.hold_off(delay)
        if answer is None:
            raise SearchError(f"{description}: engine unreachable after {p.retries + 1} attempts: "
                              f"{type(error).__name__}: {error}; is it running at this URL?") from error
        return answer

    def _get(self, method, url, params, json_body) -> CachedResponse:
        """One streamed request; the body is cut off at max_bytes (decoded)."""
        limit, chunks, n_bytes = self.policy.max_bytes, [], 0
        with self._client.stream(method, url, params=params, json=json_body) as r:
            for chunk in r.iter_bytes():
                n_bytes += len(chunk)
                if n_bytes > limit:
                    raise SearchError(f"{method} {r.url}: answer over {limit} bytes (HttpPolicy.max_bytes)")
                chunks.append(chunk)
        return CachedResponse(url=str(r.url), status=r.status_code, headers={k.lower(): v for k, v in r.headers.items()},
                              body=b"".join(chunks), fetched_at=time.time(),
                              request=canonical_request(method, url, params, json_body))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _payload(answer: CachedResponse, description: str, refusal: Refusal | None, hints: dict[int, str] | None):
    """The JSON of a successful answer, else a SearchError naming the cause (and the fix)."""
    status = answer.status
    if status != 200:
        hint = {**_STATUS_HINTS, **(hints or {})}.get(status)
        if hint is None and status >= 500:
            hint = "the engine failed; see its logs"
        retry = answer.headers.get("retry-after")
        raise SearchError(f"{description}: HTTP {status}"
                          + (f" (Retry-After {retry})" if retry else "")
                          + (f": {hint}" if hint else f": {answer.body[:200]!r}"))
    try:
        payload = json.loads(answer.body)
    except ValueError as e:
        raise SearchError(f"{description}: answer is not JSON ({e}): {answer.body[:200]!r}") from e
    reason = refusal(payload) if refusal is not None else None
    if reason is not None:
        raise SearchError(f"{description}: {reason}")
    return payload


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


def parse_clip_retrieval(payload, query: str, where: str) -> tuple[list[SearchResult], int]:
    """clip-retrieval JSON -> (results, how many were skipped). A result needs an http(s) `url`; a
    back end built from an image folder answers with `image_path` (a path on its own disk) instead."""
    if not isinstance(payload, list):
        raise SearchError(f"{where}: expected a JSON list of results, got {type(payload).__name__}")
    out, skipped = [], 0
    for i, r in enumerate(payload):
        if not isinstance(r, dict):
            raise SearchError(f"{where}: [{i}] should be an object, got {type(r).__name__}")
        if set(r) <= {"id", "similarity"}:  # ids past num_images: the back end sends no metadata for them
            continue
        url = r.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            skipped += 1
            continue
        sim = r.get("similarity")
        out.append(SearchResult(query=query, rank=len(out), image_url=url, page_url=url,
                                caption=str(r.get("caption") or ""),
                                score=float(sim) if isinstance(sim, (int, float)) else None,
                                result_id=None if r.get("id") is None else str(r["id"])))
    return out, skipped


def searxng_engine_failure(payload) -> str | None:
    """Why a SearXNG page is not an answer: no results because its engines failed (SearXNG then
    answers 200 with `unresponsive_engines` as [name, error] pairs)."""
    if not isinstance(payload, dict) or payload.get("results") or not payload.get("unresponsive_engines"):
        return None
    failed = "; ".join(": ".join(map(str, e)) if isinstance(e, (list, tuple)) else str(e)
                       for e in payload["unresponsive_engines"])
    return (f"no results because the instance's engines failed ({failed}); not cached. Try again later, or "
            "enable other engines for this category in the instance's settings.yml")


def _all_answered(payload, answered: int) -> bool:
    """Whether the engine said it has no more: its `number_of_results` (0 when it does not know) is
    reached."""
    total = payload.get("number_of_results") if isinstance(payload, dict) else None
    return isinstance(total, int) and not isinstance(total, bool) and 0 < total <= answered


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
    concurrency = 1  # queries at once (search_many's default): the limiter counts requests per IP
    http_defaults: dict[str, Any] = {"min_interval_s": 1.0}
    status_hints = {
        403: "SearXNG answers 403 when the JSON format is disabled (its default search.formats is "
             "[html]): add json to search.formats in the instance's settings.yml and restart it",
        429: "rate-limited by SearXNG's limiter or bot detection: on your own instance set "
             "server.limiter: false in settings.yml (or pass-list this client's IP in limiter.toml); "
             "a public instance allows only a few API requests per hour",
    }

    def __init__(self, url: str, *, http: CachedHttp, max_pages: int = 5, per_page: int = 20,
                 categories: str = "images"):
        self.url, self.http = url.rstrip("/"), http
        self.max_pages, self.per_page, self.categories = max_pages, per_page, categories

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "max_pages": self.max_pages, "per_page": self.per_page,
                "categories": self.categories}

    def search(self, query: str, n: int, known: Collection[str] = ()) -> SearchResults:
        """Up to `n` distinct results not in `known`, page by page (see the module docstring for when
        paging stops). A failing first page raises; a later one ends the paging with the results so
        far, partial."""
        results, seen = SearchResults(), set()
        answered, full_page = 0, self.per_page if self.per_page_param else None  # SearXNG: page 1's size
        for page in range(1, self.max_pages + 1):
            where = f"{self.name} search {query!r} page {page} at {self.url}"
            try:
                payload = self._page(query, page, where)
            except SearchError as e:
                if page == 1:
                    raise
                results.partial = str(e)
                break
            batch = self.parse(payload, query, answered, where)
            answered += len(batch)  # the engine's results so far, repeats included: the next page's first rank
            new = distinct_results(batch, seen)
            results.extend([r for r in new if r.image_url not in known][:n - len(results)])
            size = len(payload["results"])  # the page's entries (a parser checked the list)
            full_page = full_page or size
            if len(results) >= n or not new or size < full_page or _all_answered(payload, answered):
                break
        return results

    def _page(self, query: str, page: int, where: str):
        params = {"q": query, "format": "json", "pageno": page, "categories": self.categories}
        if self.per_page_param:
            params[self.per_page_param] = self.per_page
        return self.http.request_json("GET", f"{self.url}/search", params=params, description=where,
                                      refusal=searxng_engine_failure, hints=self.status_hints)


@register_backend("local")
class LocalBackend(SearxngBackend):
    """explorer's own engine (`explorer serve`): SearXNG's JSON plus a page size."""

    per_page_param = "per_page"
    concurrency = 8
    http_defaults: dict[str, Any] = {"min_interval_s": 0.0}

    def __init__(self, url: str, *, http: CachedHttp, max_pages: int = 5, per_page: int = 50,
                 categories: str = "images"):
        super().__init__(url, http=http, max_pages=max_pages, per_page=per_page, categories=categories)

    def search_image(self, query: ImageQuery, n: int) -> list[SearchResult]:
        """The image's neighbours in the engine's image index (its knn service, clip-retrieval's API)."""
        return knn_image_search(self.http, self.url, query, n, indice_name=IMAGE_INDEX)[0]


CLIP_MODALITIES = ("image", "text")  # which of the back end's indexes a query searches
KNN_ROUTE = "/knn-service"


@register_backend("clip-retrieval")
class ClipRetrievalBackend:
    """A clip-retrieval knn service (text -> image neighbours). `url` is the back end's base or its
    full `.../knn-service` URL (as its README gives it)."""

    concurrency = 2
    http_defaults: dict[str, Any] = {"min_interval_s": 0.0}

    def __init__(self, url: str, *, http: CachedHttp, indice_name: str = "laion5B-L-14", modality: str = "image",
                 deduplicate: bool = True, result_ids_factor: int = 3, image_model: str | None = None,
                 known_depth: int = 4):
        """`image_model`: the model the index was built with (a key of explorer.web.image_encoder's
        IMAGE_MODELS); image queries are then embedded here and sent as `embedding_input`, else sent
        as base64 `image` for the back end to embed. `known_depth`: a text query with results to skip
        (`known`) asks for that many times `n` neighbours, so that `n` others can remain."""
        if not isinstance(known_depth, int) or known_depth < 1:
            raise ValueError(f"clip-retrieval known_depth must be an integer >= 1, got {known_depth!r}")
        self.image_model, self.known_depth = image_model, known_depth
        if modality not in CLIP_MODALITIES:
            raise ValueError(f"unknown clip-retrieval modality {modality!r}; valid: {', '.join(CLIP_MODALITIES)}")
        if not isinstance(result_ids_factor, int) or result_ids_factor < 1:
            raise ValueError(f"clip-retrieval result_ids_factor must be an integer >= 1, got {result_ids_factor!r}")
        url = url.rstrip("/")
        self.url = url.removesuffix(KNN_ROUTE)
        self.http, self.indice_name, self.modality, self.deduplicate = http, indice_name, modality, deduplicate
        # With deduplicate the back end drops near-duplicates from the num_result_ids nearest ids before it
        # keeps num_images: asking for only num_images ids returns fewer (3 of 5 in a real run).
        self.result_ids_factor = result_ids_factor
        self.skipped = 0  # results without a usable url, over all queries
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "indice_name": self.indice_name, "modality": self.modality,
                "deduplicate": self.deduplicate, "result_ids_factor": self.result_ids_factor,
                "known_depth": self.known_depth, **({"image_model": self.image_model} if self.image_model else {})}

    def search(self, query: str, n: int, known: Collection[str] = ()) -> SearchResults:
        """The `n` nearest neighbours of the text not in `known` (among `known_depth` × `n` when
        there are URLs to skip)."""
        asked = n * self.known_depth if known else n
        ids = asked * self.result_ids_factor if self.deduplicate else asked
        body = {"text": query, "image": None, "image_url": None, "embedding_input": None,
                "modality": self.modality, "num_images": asked, "indice_name": self.indice_name,
                "num_result_ids": ids,
                "use_mclip": False, "deduplicate": self.deduplicate, "use_safety_model": False,
                "use_violence_detector": False, "aesthetic_score": "", "aesthetic_weight": 0.5}
        where = f"clip-retrieval search {query!r} at {self.url}"
        hints = {500: f"the back end failed; is indice_name {self.indice_name!r} listed by "
                      f"{self.url}/indices-list? See its logs"}
        payload = self.http.request_json("POST", f"{self.url}{KNN_ROUTE}", json_body=body, description=where,
                                         hints=hints)
        results, skipped = parse_clip_retrieval(payload, query, where)
        with self._lock:
            self.skipped += skipped
        return SearchResults([r for r in distinct_results(results) if r.image_url not in known][:n])

    def search_image(self, query: ImageQuery, n: int) -> list[SearchResult]:
        """The image's neighbours in `indice_name` (see `knn_image_search`)."""
        embedding = query_embedding(self.http, self.image_model, query) if self.image_model else None
        results, skipped = knn_image_search(self.http, self.url, query, n, indice_name=self.indice_name,
                                            modality=self.modality, deduplicate=self.deduplicate,
                                            embedding=embedding)
        with self._lock:
            self.skipped += skipped
        return results


def knn_image_search(http: CachedHttp, url: str, query: ImageQuery, n: int, *, indice_name: str,
                     modality: str = "image", deduplicate: bool = True,
                     embedding: list[float] | None = None) -> tuple[list[SearchResult], int]:
    """An image query to a clip-retrieval knn service at base `url`: the image base64-encoded (the
    back end embeds it with its index's model) or, given, its `embedding`; (results, skipped)."""
    body = {"text": None, "image": None if embedding else base64.b64encode(query.image).decode("ascii"),
            "image_url": None, "embedding_input": embedding, "modality": modality, "num_images": n,
            "indice_name": indice_name, "num_result_ids": n, "use_mclip": False, "deduplicate": deduplicate,
            "use_safety_model": False, "use_violence_detector": False, "aesthetic_score": "",
            "aesthetic_weight": 0.5}
    where = f"knn image search {query.label} ({query.sha256[:12]}) in {indice_name!r} at {url}"
    hints = {500: f"the back end failed; is indice_name {indice_name!r} listed by {url}/indices-list? See its logs"}
    payload = http.request_json("POST", f"{url}{KNN_ROUTE}", json_body=body, description=where, hints=hints)
    results, skipped = parse_clip_retrieval(payload, query.label, where)
    return results[:n], skipped


def query_embedding(http: CachedHttp, model: str, query: ImageQuery) -> list[float]:
    """`query`'s embedding under image model `model`, kept in the run's cache under the image's
    sha256 like a search answer, so a replay sends the very same vector without the model."""
    request = canonical_request("POST", f"image-model:{model}", None, {"sha256": query.sha256})
    key = ResponseCache.request_key(**{k: request[k] for k in ("method", "url", "params")},
                                    json_body=request["json"])
    where = f"the {model} embedding of image query {query.label} ({query.sha256[:12]})"
    if http.mode is CacheMode.REPLAY:
        return json.loads(http.cache.require(key, where).body)
    hit = http.cache.get(key) if http.cache is not None else None
    if hit is not None:
        return json.loads(hit.body)
    from explorer.web.image_encoder import ImageDecodeError, ImageEncoder

    try:
        vector = ImageEncoder(model).encode_bytes(query.image).tolist()
    except ImageDecodeError as e:
        raise SearchError(f"{where}: {e}") from e
    if http.cache is not None:
        http.cache.put(key, CachedResponse(url=request["url"], status=200, headers={}, body=json.dumps(vector).encode(),
                                           fetched_at=time.time(), request=request))
    return vector


def search_one(backend: SearchBackend, query: str | ImageQuery, n: int,
               known: Collection[str] = ()) -> list[SearchResult]:
    """A text query's results (none of `known`), or an image query's from a backend that can search
    by image (its nearest neighbours, `known` or not)."""
    if not isinstance(query, ImageQuery):
        return backend.search(query, n, known) if known else backend.search(query, n)
    search_image = getattr(backend, "search_image", None)
    if search_image is None:
        raise SearchError(f"the {backend.name} backend cannot search by image: use clip-retrieval (a back end "
                          "whose index holds images) or local (the engine's image index)")
    return search_image(query, n)


def build_registered(registry: dict[str, Callable[..., SearchBackend]], name: str, *, cache: ResponseCache | None,
                     mode: CacheMode | str = CacheMode.READWRITE, recorded: dict | None = None,
                     **kwargs) -> SearchBackend:
    """A backend of `registry`; options named like `HttpPolicy` fields go to its client. `replay`
    rebuilds the `recorded` backend (its `describe()`) on the cache alone."""
    if name == "replay":
        if not recorded:
            raise ValueError("the replay backend needs the recorded backend's description")
        recorded = dict(recorded)
        return build_registered(registry, recorded.pop("name"), cache=cache, mode=CacheMode.REPLAY, **recorded)
    if name not in registry:
        raise KeyError(f"unknown search backend {name!r}; valid: {', '.join(sorted([*registry, 'replay']))}")
    cls = registry[name]
    policy = HttpPolicy(**{**cls.http_defaults, **{k: kwargs.pop(k) for k in HTTP_POLICY_FIELDS if k in kwargs}})
    return cls(http=CachedHttp(cache, mode, policy, origin=kwargs.get("url")), **kwargs)


def build_backend(name: str, *, cache: ResponseCache | None, mode: CacheMode | str = CacheMode.READWRITE,
                  recorded: dict | None = None, **kwargs) -> SearchBackend:
    """A registered image backend (see `build_registered`)."""
    return build_registered(SEARCH_BACKENDS, name, cache=cache, mode=mode, recorded=recorded, **kwargs)


def search_many(backend: SearchBackend, queries: Sequence[str | ImageQuery], n: int, *,
                concurrency: int | None = None, known: Collection[str] = ()) -> list[SearchResults | SearchError]:
    """All queries (text, or images by example), `concurrency` at a time (None: the backend's own
    default), in input order: a query's SearchResults (distinct by image URL, whatever the backend;
    a text query's without the URLs in `known`), or its SearchError."""
    def one(q: str | ImageQuery):
        try:
            answer = search_one(backend, q, n, known)
        except SearchError as e:
            return e
        distinct = SearchResults(distinct_results(answer))
        distinct.partial = getattr(answer, "partial", None)
        return distinct

    workers = concurrency or getattr(backend, "concurrency", 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, queries))
