"""Paging a real engine sparingly and counting what it answers once: SearXNG's real answers over
overlapping pages, a 429 after page 4, an engine that says it has no more, and clip-retrieval's back
end, which drops near-duplicates from `num_result_ids` before it keeps `num_images`. Every engine is
a FaultServer on 127.0.0.1 playing what the real one sends (tests/fixtures/searxng/README.md)."""

import json
from pathlib import Path

import httpx
import pytest

from explorer.acquire.cache import ResponseCache
from explorer.acquire.search import (
    SearchError,
    SearchResult,
    build_backend,
    search_many,
)
from tests.explorer.acquire.fault_server import FaultServer, Route

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "searxng"
PAGES = ["sx_images_p1.json", "sx_images_p2.json", "sx_images_p3_overlap.json", "sx_images_p4_overlap.json"]
FAST = {"backoff_base": 0.01, "backoff_max": 0.05, "min_interval_s": 0.0, "retries": 0}


def _page(query: str, page: int) -> str:
    return str(httpx.URL("/search", params={"q": query, "format": "json", "pageno": page, "categories": "images"}))


def _json(body, **kw) -> Route:
    return Route(body=json.dumps(body).encode(), content_type="application/json", **kw)


def _answers() -> list[dict]:
    return [json.loads((FIXTURES / name).read_text()) for name in PAGES]


def _first_ranks(pages: list[dict]) -> dict[str, int]:
    """Each image URL's rank at its first occurrence over the pages, in order."""
    ranks: dict[str, int] = {}
    for rank, r in enumerate(r for p in pages for r in p["results"]):
        ranks.setdefault(r["img_src"], rank)
    return ranks


def test_overlapping_pages_count_each_image_once_at_its_first_rank(tmp_path):
    pages = _answers()
    routes = {_page("sneaker", i + 1): _json(p) for i, p in enumerate(pages)}
    routes[_page("sneaker", 5)] = _json({**pages[0], "results": []})
    with FaultServer(routes) as srv:
        backend = build_backend("searxng", cache=ResponseCache(tmp_path), url=srv.url(""), **FAST)
        got = backend.search("sneaker", 40)
    first = _first_ranks(pages)
    assert sum(len(p["results"]) for p in pages) == 28 and len(first) == 24  # the fixtures' overlap
    assert [(r.rank, r.image_url) for r in got] == sorted((rank, url) for url, rank in first.items())
    assert got.partial is None


def test_a_429_after_page_4_keeps_pages_1_to_4_marked_partial(tmp_path):
    pages = _answers()
    routes = {_page("sneaker", i + 1): _json(p) for i, p in enumerate(pages)}
    routes[_page("sneaker", 5)] = _json({"error": "too many requests"}, statuses=(429,), headers={"Retry-After": "60"})
    with FaultServer(routes) as srv:
        backend = build_backend("searxng", cache=ResponseCache(tmp_path), url=srv.url(""), **FAST)
        [answer] = search_many(backend, ["sneaker"], 40)
        assert srv.hits(_page("sneaker", 5)) == 1
    assert not isinstance(answer, SearchError)
    assert [r.image_url for r in answer] == list(_first_ranks(pages))  # 24 distinct, first-seen order
    assert "page 5" in answer.partial and "HTTP 429" in answer.partial


def test_a_failing_first_page_fails_the_query(tmp_path):
    routes = {_page("sneaker", 1): _json({"error": "limited"}, statuses=(429,))}
    with FaultServer(routes) as srv:
        backend = build_backend("searxng", cache=ResponseCache(tmp_path), url=srv.url(""), **FAST)
        [answer] = search_many(backend, ["sneaker"], 40)
    assert isinstance(answer, SearchError) and "HTTP 429" in str(answer)


def test_paging_stops_when_the_engine_has_no_more(tmp_path):
    """The local engine's `number_of_results` (SearXNG sends it when an engine knows) ends the paging
    at page 2 of 7-result pages: no page 3 is asked for."""
    p1, p2 = _answers()[:2]
    routes = {_page("sneaker", 1): _json({**p1, "number_of_results": 14}),
              _page("sneaker", 2): _json({**p2, "number_of_results": 14}),
              _page("sneaker", 3): _json({**p2, "results": []})}
    with FaultServer(routes) as srv:
        backend = build_backend("searxng", cache=ResponseCache(tmp_path), url=srv.url(""), **FAST)
        assert len(backend.search("sneaker", 40)) == 14
        assert srv.hits(_page("sneaker", 3)) == 0


def test_paging_stops_at_a_short_page(tmp_path):
    """Page 2 holds fewer results than page 1: the engine has run out; no empty page 3 is asked for."""
    p1, p2 = _answers()[:2]
    routes = {_page("sneaker", 1): _json(p1), _page("sneaker", 2): _json({**p2, "results": p2["results"][:3]}),
              _page("sneaker", 3): _json({**p2, "results": []})}
    with FaultServer(routes) as srv:
        backend = build_backend("searxng", cache=ResponseCache(tmp_path), url=srv.url(""), **FAST)
        assert len(backend.search("sneaker", 40)) == 10
        assert srv.hits(_page("sneaker", 3)) == 0


def _clip_answer(n_images: int, n_ids: int) -> list[dict]:
    """What clip-retrieval's back end answers when deduplication left `n_ids` of the ids asked for:
    metadata for the first `num_images`, bare ids for the rest (clip_back.map_to_metadata). Ids 2
    and 3 are two embeddings of one URL (LAION holds such copies)."""
    out = []
    for i in range(n_ids):
        row = {"id": 1000 + i, "similarity": round(0.4 - i / 100, 4)}
        if i < n_images:
            row.update(url=f"https://laion.example/{2 if i == 3 else i}.jpg", caption=f"sneaker {i}")
        out.append(row)
    return out


def test_clip_retrieval_asks_for_ids_enough_to_fill_num_images_after_deduplication(tmp_path):
    with FaultServer({"/knn-service": _json(_clip_answer(5, 13))}) as srv:
        backend = build_backend("clip-retrieval", cache=ResponseCache(tmp_path), url=srv.url("/knn-service"),
                                indice_name="laion5B-L-14", **FAST)
        got = backend.search("sneaker", 5)
        body = json.loads(srv.request_bodies[0])
    assert body["deduplicate"] is True and body["num_images"] == 5 and body["num_result_ids"] == 15
    assert [r.image_url for r in got] == [f"https://laion.example/{i}.jpg" for i in (0, 1, 2, 4)]
    assert [r.rank for r in got] == [0, 1, 2, 4]  # the copy of 2 at rank 3 is dropped
    assert backend.skipped == 0  # bare ids past num_images are not results without a URL


def test_clip_retrieval_result_ids_factor_is_checked():
    with pytest.raises(ValueError, match="result_ids_factor must be an integer >= 1"):
        build_backend("clip-retrieval", cache=None, url="http://127.0.0.1:9/knn-service", result_ids_factor=0)


class RepeatingEngine:
    """A backend whose answer repeats an image (an engine's fault the loop must not count twice)."""

    name, concurrency = "repeating", 1

    def search(self, query: str, n: int) -> list[SearchResult]:
        urls = ["https://a.example/1.jpg", "https://a.example/2.jpg", "https://a.example/1.jpg"]
        return [SearchResult(query, rank, url, url, "") for rank, url in enumerate(urls)]


def test_search_many_hands_on_each_image_once_whatever_the_backend():
    [answer] = search_many(RepeatingEngine(), ["sneaker"], 3)
    assert [(r.rank, r.image_url) for r in answer] == [(0, "https://a.example/1.jpg"), (1, "https://a.example/2.jpg")]


def test_known_results_are_skipped_and_the_paging_goes_deeper(tmp_path):
    """`known` (a run's earlier results, `search.skip_seen`): page 1's images are known, so the query
    pages on for 7 others; a page of known images alone does not end the paging, and none comes back."""
    pages = _answers()
    routes = {_page("sneaker", i + 1): _json(p) for i, p in enumerate(pages)}
    routes[_page("sneaker", 5)] = _json({**pages[0], "results": []})
    first = list(_first_ranks(pages))
    known = {r["img_src"] for r in pages[0]["results"]}
    with FaultServer(routes) as srv:
        backend = build_backend("searxng", cache=ResponseCache(tmp_path), url=srv.url(""), **FAST)
        top = backend.search("sneaker", 7)
        assert srv.hits(_page("sneaker", 2)) == 0 and {r.image_url for r in top} == known
        deeper = backend.search("sneaker", 7, known)
        everything = backend.search("sneaker", 40, set(first))
    assert [r.image_url for r in deeper] == [u for u in first if u not in known][:7]
    assert min(r.rank for r in deeper) >= len(pages[0]["results"])
    assert everything == []  # the engine holds nothing the run has not had: no result, no endless paging
    assert srv.hits(_page("sneaker", 5)) == 1


def test_clip_retrieval_asks_deeper_for_known_results(tmp_path):
    with FaultServer({"/knn-service": _json(_clip_answer(13, 13))}) as srv:
        backend = build_backend("clip-retrieval", cache=ResponseCache(tmp_path), url=srv.url("/knn-service"),
                                indice_name="laion5B-L-14", known_depth=3, **FAST)
        got = backend.search("sneaker", 4, {"https://laion.example/0.jpg", "https://laion.example/1.jpg"})
        body = json.loads(srv.request_bodies[0])
    assert body["num_images"] == 12 and body["num_result_ids"] == 36
    assert [r.image_url for r in got] == [f"https://laion.example/{i}.jpg" for i in (2, 4, 5, 6)]
    with pytest.raises(ValueError, match="known_depth must be an integer >= 1"):
        build_backend("clip-retrieval", cache=None, url="http://127.0.0.1:9/knn-service", known_depth=0)
