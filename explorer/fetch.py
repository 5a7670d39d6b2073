"""Download candidate images concurrently, validate them and normalise them for the pipeline.

    urls -> pre-request hook -> cache (per CacheMode) -> bounded, streamed GET with redirects,
    retries and a total deadline -> validate_image -> to_pipeline_tensor -> FetchResult (input order)

Every URL ends as one `FetchResult` whose status is one of `explorer.validate.STATUSES`; nothing
raises except a replay-mode cache miss (`CacheMiss`) or corruption (`CacheCorruption`).

What the cache records, so that replay reproduces rejections as well as images: every HTTP answer
(2xx bodies; 3xx/4xx/5xx statuses) and every failure without a usable body (timeout, network error,
too_large_body, blocked), the latter as a body-less entry with status 0 or the HTTP status and the
`x-explorer-outcome` / `x-explorer-reason` headers. `readwrite` re-fetches transient answers (timeouts,
network errors, 429, 5xx, blocked) rather than trusting them; `replay` returns them as recorded.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urljoin, urlsplit

import httpx
import torch
from tqdm import tqdm

from explorer.cache import CachedResponse, CacheMode, ResponseCache, canonical_request
from explorer.validate import to_pipeline_tensor, validate_image

PreRequestHook = Callable[[str], "str | None"]
"""Called with every URL before it is requested (the first and each redirect hop): None allows it,
a string refuses it with that reason (status 'blocked'). The SSRF guard and robots.txt go here."""

OUTCOME_HEADER = "x-explorer-outcome"
REASON_HEADER = "x-explorer-reason"
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(kw_only=True, frozen=True)
class FetchConfig:
    concurrency: int = 32  # requests in flight in total
    per_host: int = 16  # requests in flight per host (by the URL's host:port before redirects)
    connect_timeout: float = 5.0  # seconds to open a connection
    read_timeout: float = 10.0  # longest silence between two received chunks
    total_deadline: float = 30.0  # whole request (redirects, retries, backoff) once its slots are held
    retries: int = 2  # extra attempts after network errors, timeouts, 429 and 5xx; never other 4xx
    backoff_base: float = 0.25  # seconds; attempt k waits base * 2**k, jittered to [50%, 100%]
    backoff_max: float = 4.0
    retry_after_max: float = 10.0  # a longer Retry-After is cut to this
    seed: int = 0  # jitter RNG
    max_bytes: int = 4 * 2**20  # decoded body size limit
    user_agent: str = "explorer/0.1 (image data-acquisition research agent)"
    image_size: int = 32  # S of the uint8 (3, S, S) result
    follow_redirects: bool = True
    max_redirects: int = 5
    min_side: int = 8
    max_side: int = 4096
    max_pixels: int = 4096 * 4096

    def __post_init__(self):
        for name in ("concurrency", "per_host", "max_bytes", "image_size", "min_side", "max_side",
                     "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"FetchConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("connect_timeout", "read_timeout", "total_deadline"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FetchConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("retries", "max_redirects", "backoff_base", "backoff_max", "retry_after_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"FetchConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} > max_side {self.max_side}")


@dataclass(frozen=True)
class FetchResult:
    url: str  # as requested
    status: str  # one of explorer.validate.STATUSES
    reason: str = ""
    http_status: int | None = None  # of the final answer; None when none came
    n_bytes: int = 0
    width: int | None = None  # from the image header, when it could be read
    height: int | None = None
    sha256: str | None = None  # of the body, when there was one
    image: torch.Tensor | None = field(default=None, compare=False, repr=False)  # uint8 (3, S, S)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _failure(url: str, outcome: str, reason: str, status: int = 0, headers=None) -> CachedResponse:
    """A body-less answer that records why there is no usable body."""
    marked = {**(headers or {}), OUTCOME_HEADER: outcome, REASON_HEADER: reason}
    return CachedResponse(url=url, status=status, headers=marked, body=b"",
                          fetched_at=time.time(), request=canonical_request("GET", url))


def _is_transient(answer: CachedResponse) -> bool:
    outcome = answer.headers.get(OUTCOME_HEADER)
    if outcome is not None:
        return outcome in ("timeout", "network_error", "blocked")
    return answer.status == 429 or answer.status >= 500


def _is_retryable(answer: CachedResponse) -> bool:
    return _is_transient(answer) and answer.headers.get(OUTCOME_HEADER) != "blocked"


def _retry_after(answer: CachedResponse) -> float | None:
    """Seconds asked for by a Retry-After header (delta or HTTP date), or None."""
    value = answer.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def answer_to_result(url: str, answer: CachedResponse, cfg: FetchConfig) -> FetchResult:
    """Validate and normalise one answer (live or cached) into its FetchResult. CPU-bound."""
    outcome = answer.headers.get(OUTCOME_HEADER)
    http_status = answer.status or None
    if outcome is not None:
        return FetchResult(url=url, status=outcome, reason=answer.headers.get(REASON_HEADER, ""),
                           http_status=http_status)
    if answer.status >= 300:
        return FetchResult(url=url, status="http_error", reason=f"HTTP {answer.status}",
                           http_status=http_status)
    body = answer.body
    sha = hashlib.sha256(body).hexdigest() if body else None
    checked = validate_image(
        body, answer.headers.get("content-type"), min_side=cfg.min_side, max_side=cfg.max_side,
        max_pixels=cfg.max_pixels, max_bytes=cfg.max_bytes,
    )
    image = to_pipeline_tensor(checked.image, cfg.image_size) if checked.ok else None
    return FetchResult(url=url, status=checked.status, reason=checked.reason,
                       http_status=http_status, n_bytes=len(body), width=checked.width,
                       height=checked.height, sha256=sha, image=image)


class _Downloader:
    """One client, its concurrency slots and its jitter RNG, shared by every URL of a call."""

    def __init__(self, client: httpx.AsyncClient, cfg: FetchConfig, hook: PreRequestHook | None):
        self.client, self.cfg, self.hook = client, cfg, hook
        self.slots = asyncio.Semaphore(cfg.concurrency)
        self.host_slots: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(cfg.per_host))
        self.rng = random.Random(cfg.seed)

    def _refusal(self, url: str) -> CachedResponse | None:
        reason = self.hook(url) if self.hook is not None else None
        return None if reason is None else _failure(url, "blocked", reason)

    async def download(self, url: str) -> CachedResponse:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return _failure(url, "network_error", "not an http(s) URL with a host")  # no retries
        refused = self._refusal(url)
        if refused is not None:
            return refused
        # Host slot first, so a queue for one busy host does not hold global slots.
        async with self.host_slots[parts.netloc.lower()], self.slots:
            try:
                return await asyncio.wait_for(self._with_retries(url), self.cfg.total_deadline)
            except asyncio.TimeoutError:
                return _failure(url, "timeout", f"total deadline {self.cfg.total_deadline}s exceeded")

    async def _with_retries(self, url: str) -> CachedResponse:
        for attempt in range(self.cfg.retries + 1):
            try:
                answer = await self._follow_redirects(url)
            except httpx.TimeoutException as e:
                answer = _failure(url, "timeout", f"{type(e).__name__}: {e}")
            except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as e:
                answer = _failure(url, "network_error", f"{type(e).__name__}: {e}")
            if not _is_retryable(answer) or attempt == self.cfg.retries:
                return answer
            await asyncio.sleep(self._delay(answer, attempt))
        raise AssertionError("unreachable")

    def _delay(self, answer: CachedResponse, attempt: int) -> float:
        asked = _retry_after(answer)
        if asked is not None:
            return min(asked, self.cfg.retry_after_max)
        base = min(self.cfg.backoff_max, self.cfg.backoff_base * 2**attempt)
        return base * (0.5 + 0.5 * self.rng.random())

    async def _follow_redirects(self, url: str) -> CachedResponse:
        current = url
        for hop in range(self.cfg.max_redirects + 1):
            if hop > 0 and (refused := self._refusal(current)) is not None:
                return refused
            answer = await self._get(current)
            if answer.status not in _REDIRECTS or not self.cfg.follow_redirects:
                return answer
            location = answer.headers.get("location")
            if not location:
                return _failure(current, "http_error", f"HTTP {answer.status} without Location",
                                answer.status)
            current = urljoin(current, location)
        return _failure(current, "http_error", f"more than {self.cfg.max_redirects} redirects",
                        answer.status)

    async def _get(self, url: str) -> CachedResponse:
        """One streamed GET; the body is read only for 2xx and cut off at max_bytes."""
        limit = self.cfg.max_bytes
        async with self.client.stream("GET", url) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
            if response.status_code >= 300:  # error pages and redirects: the status is the answer
                return CachedResponse(url=str(response.url), status=response.status_code,
                                      headers=headers, body=b"", fetched_at=time.time(),
                                      request=canonical_request("GET", url))
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                return _failure(url, "too_large_body", f"Content-Length {declared} > {limit}",
                                response.status_code, headers)
            chunks, n_bytes = [], 0
            async for chunk in response.aiter_bytes():  # decoded: a gzip bomb also hits the limit
                n_bytes += len(chunk)
                if n_bytes > limit:
                    return _failure(url, "too_large_body", f"body over {limit} bytes",
                                    response.status_code, headers)
                chunks.append(chunk)
        return CachedResponse(url=str(response.url), status=response.status_code, headers=headers,
                              body=b"".join(chunks), fetched_at=time.time(),
                              request=canonical_request("GET", url))


def _request_key(url: str) -> str:
    return ResponseCache.request_key("GET", url)


def _replay(urls: list[str], cfg: FetchConfig, cache: ResponseCache | None,
            progress: bool) -> list[FetchResult]:
    """Cache only, no event loop and no sockets; a missing answer raises CacheMiss naming the URL."""
    if cache is None:
        raise ValueError("replay mode needs a ResponseCache")
    answers = [cache.require(_request_key(url), f"GET {url}") for url in urls]
    return [answer_to_result(url, answer, cfg)
            for url, answer in zip(tqdm(urls, disable=not progress, unit="img"), answers)]


async def fetch_images_async(
    urls: list[str],
    cfg: FetchConfig | None = None,
    cache: ResponseCache | None = None,
    mode: CacheMode | str = CacheMode.READWRITE,
    progress: bool = True,
    pre_request: PreRequestHook | None = None,
) -> list[FetchResult]:
    """Fetch, validate and normalise every URL; one FetchResult per URL, in input order."""
    cfg, mode = cfg or FetchConfig(), CacheMode(mode)
    if mode is CacheMode.REPLAY:
        return _replay(list(urls), cfg, cache, progress)
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout),
        limits=httpx.Limits(max_connections=cfg.concurrency,
                            max_keepalive_connections=cfg.concurrency),
        headers={"User-Agent": cfg.user_agent, "Accept": "image/*;q=1.0, */*;q=0.1"},
        follow_redirects=False,  # followed by hand, so the pre-request hook sees every hop
    )
    async with client:
        downloader = _Downloader(client, cfg, pre_request)
        with tqdm(total=len(urls), disable=not progress, unit="img") as bar:
            async def one(url: str) -> FetchResult:
                result = await _fetch_one(url, downloader, cache, mode)
                bar.update(1)
                return result

            return list(await asyncio.gather(*(one(url) for url in urls)))


async def _fetch_one(url: str, downloader: _Downloader, cache: ResponseCache | None,
                     mode: CacheMode) -> FetchResult:
    key = _request_key(url)
    answer = cache.get(key) if cache is not None and mode is CacheMode.READWRITE else None
    if answer is None or _is_transient(answer):
        answer = await downloader.download(url)
        if cache is not None:
            cache.put(key, answer)
    # Decoding is CPU-bound; PIL releases the GIL, so a worker thread overlaps it with downloads.
    return await asyncio.to_thread(answer_to_result, url, answer, downloader.cfg)


def fetch_images(
    urls: list[str],
    cfg: FetchConfig | None = None,
    cache: ResponseCache | None = None,
    mode: CacheMode | str = CacheMode.READWRITE,
    progress: bool = True,
    pre_request: PreRequestHook | None = None,
) -> list[FetchResult]:
    """Synchronous `fetch_images_async` (from code that is not already inside an event loop)."""
    cfg, mode = cfg or FetchConfig(), CacheMode(mode)
    if mode is CacheMode.REPLAY:  # no event loop at all: nothing that could open a socket
        return _replay(list(urls), cfg, cache, progress)
    return asyncio.run(fetch_images_async(urls, cfg, cache, mode, progress, pre_request))
