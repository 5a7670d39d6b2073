"""Download candidate images concurrently, validate them and normalise them for the pipeline.

    urls -> cache (per CacheMode) -> SSRF guard, pre-request hook, robots.txt -> per-host pacing ->
    bounded, streamed GET with redirects (each hop checked again), retries and a total deadline ->
    X-Robots-Tag -> validate_image -> to_pipeline_tensor -> FetchResult (input order)

Every URL ends as one `FetchResult` whose status is one of `explorer.acquire.validate.STATUSES`; nothing
raises except a replay-mode cache miss (`CacheMiss`) or corruption (`CacheCorruption`).

What the cache records, so that replay reproduces rejections as well as images: every HTTP answer
(2xx bodies; 3xx/4xx/5xx statuses) and every failure without a usable body (timeout, network error,
too_large_body, blocked), the latter as a body-less entry with status 0 or the HTTP status and the
`x-explorer-outcome` / `x-explorer-reason` headers. `readwrite` re-fetches transient answers (timeouts,
network errors, 429, 5xx, blocked) rather than trusting them; `replay` returns them as recorded.
robots.txt answers go through the same client and cache (keyed by the robots.txt URL).
Safety for a run of days against the real web:
- `ssrf_guard`: only public addresses, after DNS, on every hop and again at connect time with the
  socket pinned to the checked IP (explorer.acquire.netguard); `allowed_hosts` lists the exceptions.
- `respect_robots`: robots.txt rules and Crawl-delay, `X-Robots-Tag: noai|noimageai` (explorer.acquire.robots).
- per-host pacing: request starts to one host are at least max(1/per_host_rate, Crawl-delay) apart;
  a URL whose turn would come later than `total_deadline` from now is refused ('blocked') for this call.
- decodes in flight hold at most `decode_budget_bytes` of pixels, so memory does not grow with cores.
- the body cap counts decoded bytes while streaming, so a gzip bomb is cut at max_bytes (decoding one
  64 KiB network read can still expand to ~64 MiB before the cut: deflate's ratio is at most ~1032).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urljoin, urlsplit

import httpx
from tqdm import tqdm

from explorer.acquire.backoff import retry_delay
from explorer.acquire.cache import CachedResponse, CacheMode, ResponseCache, canonical_request
from explorer.acquire.netguard import (
    SCHEMES,
    BlockedDestination,
    NetGuard,
    guarded_transport,
    host_port,
    netloc_of,
)
from explorer.acquire.robots import (
    PACER,
    RobotsPolicy,
    RobotsRules,
    ai_directive,
    rules_from_answer,
    unreachable_rules,
)
from explorer.acquire.validate import decode_cost, to_pipeline_tensor, validate_image

if TYPE_CHECKING:  # tensors are made in explorer.acquire.validate; importing the fetcher does not load torch
    import torch

PreRequestHook = Callable[[str], "str | None"]
T = TypeVar("T")
"""Called with every URL before it is requested (the first and each redirect hop; not robots.txt),
after the SSRF guard and before robots.txt: None allows it, a string refuses it ('blocked')."""

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
    ssrf_guard: bool = True  # refuse loopback/private/link-local/... destinations (explorer.acquire.netguard)
    allowed_hosts: tuple[str, ...] = ()  # 'host:port' netlocs exempt from the guard (a local engine)
    respect_robots: bool = True  # robots.txt (+ Crawl-delay) and X-Robots-Tag noai (explorer.acquire.robots)
    per_host_rate: float | None = None  # request starts per second per host; None: Crawl-delay only
    # Decoded pixels held at once by concurrent decodes (explorer.acquire.validate.decode_cost); an image
    # that needs more decodes alone. Bounds the fetcher's memory whatever the machine's core count.
    decode_budget_bytes: int = 256 * 2**20

    def __post_init__(self):
        object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))  # YAML gives lists
        for netloc in self.allowed_hosts:
            try:
                host_port(netloc)
            except ValueError as e:
                raise ValueError(f"FetchConfig.allowed_hosts: {e}") from None
        if self.per_host_rate is not None and not self.per_host_rate > 0:
            raise ValueError(f"FetchConfig.per_host_rate must be > 0 or None, got {self.per_host_rate}")
        for name in ("concurrency", "per_host", "max_bytes", "image_size", "min_side", "max_side",
                     "max_pixels", "decode_budget_bytes"):
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
    status: str  # one of explorer.acquire.validate.STATUSES
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


class ByteBudget:
    """Holds of at most `capacity` bytes at once (asyncio); a hold larger than that waits until it
    is alone."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, n_bytes: int):
        n_bytes = min(n_bytes, self.capacity)
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + n_bytes <= self.capacity)
            self.used += n_bytes
        try:
            yield
        finally:
            async with self._changed:
                self.used -= n_bytes
                self._changed.notify_all()


def _decode_cost(answer: CachedResponse, cfg: FetchConfig) -> int:
    if answer.headers.get(OUTCOME_HEADER) is not None or answer.status >= 300 or not answer.body:
        return 0
    return decode_cost(answer.body, cfg.max_pixels)


class _Downloader:
    """One client, its concurrency slots, guard, robots policy and jitter RNG, shared by every URL
    of a call. `robots=False` marks the requests made to read a robots.txt itself."""

    def __init__(self, client: httpx.AsyncClient, cfg: FetchConfig, hook: PreRequestHook | None,
                 cache: ResponseCache | None, mode: CacheMode):
        self.client, self.cfg, self.hook, self.cache, self.mode = client, cfg, hook, cache, mode
        self.slots = asyncio.Semaphore(cfg.concurrency)
        self.host_slots: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(cfg.per_host))
        self.rng = random.Random(cfg.seed)
        self.guard = NetGuard(cfg.allowed_hosts) if cfg.ssrf_guard else None
        self.robots = RobotsPolicy(cfg.user_agent, self._load_robots) if cfg.respect_robots else None

    async def answer(self, url: str, robots: bool = True) -> CachedResponse:
        """The cached answer (readwrite, unless transient) or a fresh download, which is stored."""
        key, cache = request_key(url), self.cache
        cached = cache.get(key) if cache is not None and self.mode is CacheMode.READWRITE else None
        if cached is not None and not _is_transient(cached):
            return cached
        answer = await (self.download(url) if robots else self._bounded(url, False, paced=False))
        if self.cache is not None:
            self.cache.put(key, answer)
        return answer

    async def _load_robots(self, url: str) -> RobotsRules:
        """robots.txt for RobotsPolicy; outside the slots, so a redirect hop that needs another
        host's robots.txt can never wait on slots its own request holds."""
        answer = await self._refusal(url, robots=False) or await self.answer(url, robots=False)
        outcome = answer.headers.get(OUTCOME_HEADER)
        if outcome is None or outcome == "http_error":  # an HTTP status, maybe of a redirect chain
            return rules_from_answer(answer.status, answer.body)
        return unreachable_rules(outcome, answer.headers.get(REASON_HEADER, ""))

    async def _refusal(self, url: str, robots: bool = True) -> CachedResponse | None:
        """Scheme, SSRF guard, the caller's hook, then robots.txt (cheapest first); requests for a
        robots.txt itself (`robots=False`) pass the scheme and the guard only."""
        scheme = urlsplit(url).scheme
        reason = f"scheme {scheme!r} is not http(s)" if scheme not in SCHEMES else None
        if reason is None and self.guard is not None:
            reason = await self.guard.refusal(url)
        if reason is None and robots and self.hook is not None:
            reason = self.hook(url)
        if reason is None and robots and self.robots is not None:
            refused = await self.robots.refusal(url)
            if refused is not None:
                return _failure(url, *refused)
        return None if reason is None else _failure(url, "blocked", reason)

    def _turn(self, url: str) -> float | None:
        """Seconds until this host may get the request (reserved), or None past the deadline."""
        interval = 1.0 / self.cfg.per_host_rate if self.cfg.per_host_rate else 0.0
        if self.robots is not None:
            interval = max(interval, self.robots.crawl_delay(url))
        return PACER.reserve(urlsplit(url).netloc.lower(), interval, self.cfg.total_deadline)

    def _late(self, url: str) -> CachedResponse:
        return _failure(url, "blocked", f"{urlsplit(url).netloc}'s next free turn (Crawl-delay / "
                                        f"per_host_rate) is more than {self.cfg.total_deadline}s away")

    async def download(self, url: str) -> CachedResponse:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:  # file://, ftp://: refused as a redirect to them is
            return _failure(url, "blocked", f"scheme {parts.scheme or '(none)'!r} is not http(s)")
        if not parts.hostname:
            return _failure(url, "network_error", "not an http(s) URL with a host")  # no retries
        refused = await self._refusal(url)
        if refused is not None:
            return refused
        # Host slot first, so a queue for one busy host does not hold global slots; the wait for
        # the host's turn is not charged to the deadline.
        async with self.host_slots[parts.netloc.lower()]:
            wait = self._turn(url)
            if wait is None:
                return self._late(url)
            await asyncio.sleep(wait)
            async with self.slots:
                return await self._bounded(url, robots=True, paced=True)

    async def _bounded(self, url: str, robots: bool, paced: bool) -> CachedResponse:
        try:
            return await asyncio.wait_for(self._with_retries(url, robots, paced),
                                          self.cfg.total_deadline)
        except asyncio.TimeoutError:
            return _failure(url, "timeout", f"total deadline {self.cfg.total_deadline}s exceeded")

    async def _with_retries(self, url: str, robots: bool, paced: bool) -> CachedResponse:
        for attempt in range(self.cfg.retries + 1):
            try:
                answer = await self._follow_redirects(url, robots, paced and attempt == 0)
            except BlockedDestination as e:  # the guard's connect-time check (DNS changed?)
                answer = _failure(url, "blocked", str(e))
            except httpx.TimeoutException as e:
                answer = _failure(url, "timeout", f"{type(e).__name__}: {e}")
            except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as e:
                answer = _failure(url, "network_error", f"{type(e).__name__}: {e}")
            if not _is_retryable(answer) or attempt == self.cfg.retries:
                return answer
            await asyncio.sleep(self._delay(answer, attempt))
        raise AssertionError("unreachable")

    def _delay(self, answer: CachedResponse, attempt: int) -> float:
        return retry_delay(answer.headers, attempt, base=self.cfg.backoff_base, cap=self.cfg.backoff_max,
                           retry_after_max=self.cfg.retry_after_max, rng=self.rng)

    async def _follow_redirects(self, url: str, robots: bool, paced: bool) -> CachedResponse:
        current, seen = url, {url}
        for hop in range(self.cfg.max_redirects + 1):
            if hop > 0 and (refused := await self._refusal(current, robots)) is not None:
                return refused
            answer = await self._get(current, robots, paced and hop == 0)
            if answer.status not in _REDIRECTS or not self.cfg.follow_redirects:
                return answer
            location = answer.headers.get("location")
            if not location:
                return _failure(current, "http_error", f"HTTP {answer.status} without Location",
                                answer.status)
            current = urljoin(current, location)
            if current in seen:
                return _failure(current, "http_error",
                                f"redirect loop back to {current} after {hop + 1} redirects",
                                answer.status)
            seen.add(current)
        return _failure(current, "http_error", f"more than {self.cfg.max_redirects} redirects",
                        answer.status)

    async def _get(self, url: str, robots: bool, paced: bool) -> CachedResponse:
        """One streamed GET; the body is read only for 2xx and cut off at max_bytes."""
        if not paced:
            wait = self._turn(url)
            if wait is None:
                return self._late(url)
            await asyncio.sleep(wait)
        limit = self.cfg.max_bytes
        async with self.client.stream("GET", url) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
            if response.status_code >= 300:  # error pages and redirects: the status is the answer
                return CachedResponse(url=str(response.url), status=response.status_code,
                                      headers=headers, body=b"", fetched_at=time.time(),
                                      request=canonical_request("GET", url))
            if robots and self.robots is not None and (directive := ai_directive(
                    response.headers.get_list("x-robots-tag"), self.cfg.user_agent)):
                return _failure(url, "blocked", f"X-Robots-Tag {directive}",  # body never read
                                response.status_code, headers)
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


def request_key(url: str) -> str:
    """The cache key the fetcher records a URL's answer under."""
    return ResponseCache.request_key("GET", url)


Convert = Callable[[str, CachedResponse], T]  # (url, answer) -> the result a caller keeps
IMAGE_ACCEPT = "image/*;q=1.0, */*;q=0.1"


def _replay(urls: list[str], convert: Convert, cache: ResponseCache | None, progress: bool, unit: str) -> list:
    """Cache only, no event loop and no sockets; a missing answer raises CacheMiss naming the URL."""
    if cache is None:
        raise ValueError("replay mode needs a ResponseCache")
    answers = [cache.require(request_key(url), f"GET {url}") for url in urls]
    return [convert(url, answer) for url, answer in zip(tqdm(urls, disable=not progress, unit=unit), answers)]


async def fetch_async(
    urls: list[str],
    convert: Convert,
    cfg: FetchConfig | None = None,
    cache: ResponseCache | None = None,
    mode: CacheMode | str = CacheMode.READWRITE,
    *,
    accept: str = "*/*",
    cost: Callable[[CachedResponse], int] | None = None,
    progress: bool = True,
    unit: str = "url",
    pre_request: PreRequestHook | None = None,
) -> list[T]:
    """Download every URL under `cfg`'s rules (guard, hook, robots.txt, pacing, caps, retries, cache)
    and turn each answer into a result with `convert(url, answer)`; results in input order.

    `convert` runs in a worker thread, so CPU-bound decoding overlaps the downloads; `cost(answer)`
    is the bytes it will hold while it runs, bounded together by `cfg.decode_budget_bytes`. Any
    kind of candidate goes through here: `fetch_images` converts to pixels, the text side
    (`explorer.acquire.documents.fetch_documents`) to documents."""
    cfg, mode = cfg or FetchConfig(), CacheMode(mode)
    if mode is CacheMode.REPLAY:
        return _replay(list(urls), convert, cache, progress, unit)
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout),
        limits=limits,
        # The guarded transport checks and pins every connection; with it, httpx ignores proxy
        # environment variables (a proxy would make the guard check the proxy, not the target).
        transport=guarded_transport(NetGuard(cfg.allowed_hosts), limits) if cfg.ssrf_guard else None,
        headers={"User-Agent": cfg.user_agent, "Accept": accept},
        follow_redirects=False,  # followed by hand, so the guard and the hook see every hop
    )
    async with client:
        downloader = _Downloader(client, cfg, pre_request, cache, mode)
        with tqdm(total=len(urls), disable=not progress, unit=unit) as bar:
            budget = ByteBudget(cfg.decode_budget_bytes)

            async def one(url: str) -> T:
                answer = await downloader.answer(url)
                # PIL and trafilatura release the GIL, so a thread overlaps conversion with downloads.
                # The budget, not the thread pool (sized by core count), bounds decodes in flight.
                async with budget.hold(cost(answer) if cost is not None else 0):
                    result = await asyncio.to_thread(convert, url, answer)
                bar.update(1)
                return result

            return list(await asyncio.gather(*(one(url) for url in urls)))


def fetch(urls: list[str], convert: Convert, cfg: FetchConfig | None = None, cache: ResponseCache | None = None,
          mode: CacheMode | str = CacheMode.READWRITE, **options) -> list[T]:
    """Synchronous `fetch_async` (from code that is not already inside an event loop); replay opens
    no event loop at all, so nothing could open a socket."""
    if CacheMode(mode) is CacheMode.REPLAY:
        return _replay(list(urls), convert, cache, options.get("progress", True), options.get("unit", "url"))
    if not urls:
        return []
    return asyncio.run(fetch_async(urls, convert, cfg, cache, mode, **options))


def _image_options(cfg: FetchConfig, progress: bool, pre_request: PreRequestHook | None) -> dict:
    return dict(accept=IMAGE_ACCEPT, cost=lambda answer: _decode_cost(answer, cfg), progress=progress,
                unit="img", pre_request=pre_request)


async def fetch_images_async(
    urls: list[str],
    cfg: FetchConfig | None = None,
    cache: ResponseCache | None = None,
    mode: CacheMode | str = CacheMode.READWRITE,
    progress: bool = True,
    pre_request: PreRequestHook | None = None,
) -> list[FetchResult]:
    """Fetch, validate and normalise every URL; one FetchResult per URL, in input order."""
    cfg = cfg or FetchConfig()
    return await fetch_async(urls, functools.partial(answer_to_result, cfg=cfg), cfg, cache, mode,
                             **_image_options(cfg, progress, pre_request))


def fetch_images(
    urls: list[str],
    cfg: FetchConfig | None = None,
    cache: ResponseCache | None = None,
    mode: CacheMode | str = CacheMode.READWRITE,
    progress: bool = True,
    pre_request: PreRequestHook | None = None,
) -> list[FetchResult]:
    """Synchronous `fetch_images_async` (from code that is not already inside an event loop)."""
    cfg = cfg or FetchConfig()
    return fetch(urls, functools.partial(answer_to_result, cfg=cfg), cfg, cache, mode,
                 **_image_options(cfg, progress, pre_request))


def allow_origin(cfg: FetchConfig, url: str | None) -> FetchConfig:
    """`cfg` with the host:port of `url` (e.g. a local search engine serving images) added to
    `allowed_hosts`; unchanged when `url` is None."""
    if url is None:
        return cfg
    return replace(cfg, allowed_hosts=cfg.allowed_hosts + (netloc_of(url),))
