"""Searching and fetching documents: the text side of the search backends and of the fetcher.

    local-text     explorer's own engine over a text corpus (SearXNG general results + a page size)
    searxng-text   any SearXNG instance, categories=general: results are pages (url, title, content)

Both are `SearxngBackend`s over the same `CachedHttp` and `ResponseCache` as the image backends;
`build_text_backend` builds them as `explorer.acquire.search.build_backend` builds those, replay included.
They live in their own registry (`TEXT_SEARCH_BACKENDS`), because `SEARCH_BACKENDS` lists the
backends that answer with images. A `SearchResult`'s `image_url` field holds the URL to fetch, here
the document's.

`fetch_documents` downloads with the fetcher's `explorer.acquire.fetch.fetch`, as images do: the same SSRF
guard (checked after DNS, on every hop and at connect), robots.txt, per-host pacing, byte cap, retries
and cache records; only the conversion differs (`answer_to_document`: a text/plain or text/markdown
body that decodes as UTF-8, or an HTML page whose main text trafilatura extracts; a page that is all
boilerplate ends as `boilerplate`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from explorer.acquire.cache import CachedResponse, CacheMode, ResponseCache
from explorer.acquire.fetch import OUTCOME_HEADER, REASON_HEADER, FetchConfig, fetch
from explorer.acquire.search import (
    LocalBackend,
    SearchBackend,
    SearchError,
    SearchResult,
    SearxngBackend,
    build_registered,
)
from explorer.web.text_corpus import text_sha256

TEXT_TYPES = ("text/plain", "text/markdown")
HTML_TYPES = ("text/html", "application/xhtml+xml")  # pages: their main text is extracted (trafilatura)
DOCUMENT_STATUSES = ("ok", "empty", "bad_content_type", "decode_error", "too_small", "boilerplate", "http_error",
                     "timeout", "network_error", "too_large_body", "blocked")
# boilerplate: an HTML page whose main text (navigation, footers and ads removed) is under min_chars
# Which text backend answers for each configured search backend of a text run.
TEXT_BACKEND_FOR = {"local": "local-text", "searxng": "searxng-text"}


TEXT_SEARCH_BACKENDS: dict[str, Callable[..., SearchBackend]] = {}


def register_text_backend(name: str):
    def deco(cls):
        cls.name = name
        TEXT_SEARCH_BACKENDS[name] = cls
        return cls
    return deco


def parse_searxng_documents(payload, query: str, start_rank: int, where: str) -> list[SearchResult]:
    """SearXNG general results -> SearchResults whose fetch URL is the result's `url`."""
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, list):
        raise SearchError(f"{where}: field 'results' is missing or not a list")
    out = []
    for r in results:
        url = r.get("url") if isinstance(r, dict) else None
        if not isinstance(url, str) or not url:
            continue
        score = r.get("score")
        out.append(SearchResult(query=query, rank=start_rank + len(out), image_url=url, page_url=url,
                                caption=str(r.get("title") or ""),
                                score=float(score) if isinstance(score, (int, float)) else None))
    return out


@register_text_backend("searxng-text")
class SearxngTextBackend(SearxngBackend):
    """Any SearXNG instance, general category; pages until `n` document results."""

    parse = staticmethod(parse_searxng_documents)

    def __init__(self, url: str, *, http, max_pages: int = 5, per_page: int = 20, categories: str = "general"):
        super().__init__(url, http=http, max_pages=max_pages, per_page=per_page, categories=categories)


@register_text_backend("local-text")
class LocalTextBackend(SearxngTextBackend):
    """explorer's engine over a text corpus: SearXNG's JSON plus a page size, paced as `local`."""

    per_page_param = "per_page"
    concurrency, http_defaults = LocalBackend.concurrency, LocalBackend.http_defaults

    def __init__(self, url: str, *, http, max_pages: int = 5, per_page: int = 50, categories: str = "general"):
        super().__init__(url, http=http, max_pages=max_pages, per_page=per_page, categories=categories)


def build_text_backend(name: str, *, cache: ResponseCache | None, mode: CacheMode | str = CacheMode.READWRITE,
                       recorded: dict | None = None, **kwargs) -> SearchBackend:
    """A registered text backend (see `explorer.acquire.search.build_registered`), replay included."""
    return build_registered(TEXT_SEARCH_BACKENDS, name, cache=cache, mode=mode, recorded=recorded, **kwargs)


@dataclass(frozen=True)
class DocumentResult:
    url: str
    status: str  # one of DOCUMENT_STATUSES
    reason: str = ""
    http_status: int | None = None
    n_bytes: int = 0
    sha256: str | None = None  # of the decoded text (as `text_corpus.text_sha256`)
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def answer_to_document(url: str, answer: CachedResponse, min_chars: int) -> DocumentResult:
    """Validate one answer (live or cached): a text/* body, valid UTF-8, at least `min_chars` long."""
    http_status = answer.status or None
    outcome = answer.headers.get(OUTCOME_HEADER)
    if outcome is not None:
        return DocumentResult(url, outcome, answer.headers.get(REASON_HEADER, ""), http_status)
    if answer.status >= 300:
        return DocumentResult(url, "http_error", f"HTTP {answer.status}", http_status)
    body, n = answer.body, len(answer.body)
    if not body:
        return DocumentResult(url, "empty", "zero-byte body", http_status)
    ctype = answer.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in HTML_TYPES:
        text = main_text(body)
        if len(text.strip()) < min_chars:
            return DocumentResult(url, "boilerplate", f"{len(text.strip())} < {min_chars} characters of main text "
                                  "in the page", http_status, n)
        return DocumentResult(url, "ok", "", http_status, n, text_sha256(text), text)
    if ctype not in TEXT_TYPES:
        return DocumentResult(url, "bad_content_type", f"content-type {ctype or 'missing'!r}", http_status, n)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return DocumentResult(url, "decode_error", f"not UTF-8: {e}", http_status, n)
    if len(text.strip()) < min_chars:
        return DocumentResult(url, "too_small", f"{len(text.strip())} < {min_chars} characters", http_status, n)
    return DocumentResult(url, "ok", "", http_status, n, text_sha256(text), text)


def main_text(html: bytes) -> str:
    """The main text of an HTML page (trafilatura: navigation, footers, ads and comments dropped;
    it detects the page's encoding), or "" when the page has none. The body is already under the
    fetcher's byte cap."""
    import trafilatura  # only text runs that meet HTML pay for importing it

    # favor_precision: on the local engine's pages of 400 documents the extracted text equals the
    # document in all 400 (whitespace aside); without it a one-sentence page kept its navigation
    return trafilatura.extract(html, include_comments=False, include_tables=True, favor_precision=True) or ""


TEXT_ACCEPT = "text/plain, text/markdown, text/html;q=0.9, text/*;q=0.8, */*;q=0.1"


def fetch_documents(urls: list[str], cfg: FetchConfig | None = None, cache: ResponseCache | None = None,
                    mode: CacheMode | str = CacheMode.READWRITE, *, min_chars: int = 50,
                    progress: bool = False) -> list[DocumentResult]:
    """One DocumentResult per URL, in input order; replay reads the cache only (a miss raises)."""
    return fetch(urls, functools.partial(answer_to_document, min_chars=min_chars), cfg, cache, mode,
                 accept=TEXT_ACCEPT, progress=progress, unit="doc")
