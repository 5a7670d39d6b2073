"""The search clients against the behaviour of real engines: verbatim SearXNG answers, its 403 /
429 / engine failures, pacing, and clip-retrieval's URL and result shapes. Every engine is a
FaultServer on 127.0.0.1 playing what the real one sends."""

import json
from pathlib import Path

import httpx
import pytest

from explorer.acquire.cache import ResponseCache
from explorer.acquire.documents import build_text_backend
from explorer.acquire.search import SearchError, build_backend, search_many
from tests.explorer.acquire.fault_server import FaultServer, Route

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "searxng"  # real SearXNG answers, see its README
FAST = {"backoff_base": 0.01, "backoff_max": 0.05, "min_interval_s": 0.0}  # HttpPolicy options for tests


def _fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def _page(query: str, page: int, categories: str = "images") -> str:
    """The exact path SearxngBackend requests for one page."""
    params = {"q": query, "format": "json", "pageno": page, "categories": categories}
    return str(httpx.URL("/search", params=params))


def _json_route(body, **kw) -> Route:
    return Route(body=body if isinstance(body, bytes) else json.dumps(body).encode(),
                 content_type="application/json", **kw)


def _stored(cache_dir: Path) -> list[Path]:
    return list((cache_dir / "requests").rglob("*.json")) if (cache_dir / "requests").exists() else []


# ----- verbatim SearXNG answers ---------------------------------------------------------------

def test_real_searxng_answers_parse(tmp_path):
    p1, p2 = json.loads(_fixture("sx_images_p1.json")), json.loads(_fixture("sx_images_p2.json"))
    routes = {_page("sneaker", 1): _json_route(_fixture("sx_images_p1.json")),
              _page("sneaker", 2): _json_route(_fixture("sx_images_p2.json")),
              _page("sneaker", 1, "general"): _json_route(_fixture("sx_general_p1.json"))}
    with FaultServer(routes) as srv:
        images = build_backend("searxng", cache=ResponseCache(tmp_path), url=srv.url(""), **FAST)
        got = images.search("sneaker", len(p1["results"]) + len(p2["results"]))
        assert [r.image_url for r in got] == [r["img_src"] for r in p1["results"] + p2["results"]]
        assert [r.page_url for r in got[:2]] == [r["url"] for r in p1["results"][:2]]
        assert got[0].caption == p1["results"][0]["title"] and got[-1].rank == len(got) - 1
        general = json.loads(_fixture("sx_general_p1.json"))["results"]
        text = build_text_backend("searxng-text", cache=None, url=srv.url(""), **FAST).search("sneaker", len(general))
        assert [r.image_url for r in text] == [r["url"] for r in general]


# ----- failures are never cached; each names its cause and fix ----------------------------------

def test_403_json_disabled_is_not_cached_and_names_the_fix(tmp_path):
    """A SearXNG without json in search.formats answers 403; once fixed, the next search succeeds."""
    routes = {"/search": _json_route(_fixture("sx_images_p1.json"), statuses=(403, 200))}
    with FaultServer(routes) as srv:
        backend = build_backend("searxng", cache=ResponseCache(tmp_path), url=srv.url(""), max_pages=1, **FAST)
        with pytest.raises(SearchError, match="add json to search.formats in the instance's settings.yml"):
            backend.search("sneaker", 7)
        assert srv.hits("/search") == 1 and not _stored(tmp_path)  # a 403 is final: not retried, not stored
        assert len(backend.search("sneaker", 7)) == 7  # the instance was fixed: asked again, not replayed
        assert srv.hits("/search") == 2 and len(_stored(tmp_path)) == 1


def test_429_retry_after_is_honoured(tmp_path):
    routes = {"/search": _json_route(_fixture("sx_images_p1.json"), statuses=(429, 200),
                                     headers={"Retry-After": "1"})}
    with FaultServer(routes) as srv:
        backend = build_backend("searxng", cache=ResponseCache(tmp_path), url=srv.url(""), max_pages=1, **FAST)
        assert len(backend.search("sneaker", 7)) == 7
        first, second = srv.times("/search")
        assert second - first >= 0.95  # waited as asked, not the 10 ms backoff


@pytest.mark.parametrize("status, message", [(429, "server.limiter: false"), (503, "the engine failed")])
def test_persistent_429_and_5xx_are_retried_then_explained_and_not_cached(tmp_path, status, message):
    with FaultServer({"/search": _json_route(b"{}", statuses=(status,))}) as srv:
        backend = build_backend("searxng", cache=ResponseCache(tmp_path), url=srv.url(""), retries=2, **FAST)
        with pytest.raises(SearchError, match=message):
            backend.search("sneaker", 7)
        assert srv.hits("/search") == 3 and not _stored(tmp_path)


def test_unresponsive_engines_are_an_error_not_an_empty_page(tmp_path):
    failed = {"query": "sneaker", "results": [], "answers": [], "corrections": [], "infoboxes": [],
              "suggestions": [], "unresponsive_engines": [["bing images", "timeout"], ["qwant", "Suspended: access denied"]]}
    with FaultServer({"/search": _json_route(failed)}) as srv:
        backend = build_backend("searxng", cache=ResponseCache(tmp_path), url=srv.url(""), **FAST)
        with pytest.raises(SearchError, match="engines failed .bing images: timeout; qwant: Suspended"):
            backend.search("sneaker", 7)
        assert not _stored(tmp_path)


def test_requests_carry_browser_headers(tmp_path):
    """SearXNG's bot detection answers 429 to a request without Accept-Language or text/html."""
    with FaultServer({"/search": _json_route(_fixture("sx_images_p1.json"))}) as srv:
        build_backend("searxng", cache=None, url=srv.url(""), max_pages=1, **FAST).search("sneaker", 7)
        [headers] = srv.request_headers
    assert headers["Accept-Language"].strip() and "text/html" in headers["Accept"]
    assert {"gzip", "deflate"} <= {e.strip() for e in headers["Accept-Encoding"].split(",")}


def test_searxng_queries_go_one_at_a_time_and_paced():
    with FaultServer({"/search": _json_route(_fixture("sx_images_p1.json"))}) as srv:
        backend = build_backend("searxng", cache=None, url=srv.url(""), max_pages=1,
                                **{**FAST, "min_interval_s": 0.2})
        answers = search_many(backend, ["a", "b", "c", "d"], 7)  # no concurrency given: the backend's (1)
        times = srv.times("/search")
    assert all(len(a) == 7 for a in answers) and len(times) == 4
    # request starts are >= 0.2 s apart on the client; arrivals jitter by the scheduling of a busy
    # machine, so the bound is on the span: 3 intervals, less 0.1 s for a late first arrival
    assert times[-1] - times[0] >= 0.5


def test_search_answer_is_read_under_a_byte_cap():
    huge = json.dumps({"results": [{"img_src": "https://img.example/" + "x" * 1000}] * 300}).encode()
    with FaultServer({"/search": _json_route(huge)}) as srv:
        backend = build_backend("searxng", cache=None, url=srv.url(""), max_bytes=100_000, **FAST)
        with pytest.raises(SearchError, match="answer over 100000 bytes"):
            backend.search("sneaker", 7)


def test_search_redirect_to_another_local_address_is_blocked():
    with FaultServer({"/secret": _json_route(_fixture("sx_images_p1.json"))}) as intranet:
        target = f"http://localhost:{intranet.netloc.split(':')[1]}/secret"
        with FaultServer({"/search": Route(statuses=(302,), headers={"Location": target})}) as srv:
            backend = build_backend("searxng", cache=None, url=srv.url(""), **FAST)
            with pytest.raises(SearchError, match="blocked: localhost resolves to .*loopback"):
                backend.search("sneaker", 7)
        assert intranet.connections == 0


# ----- clip-retrieval -------------------------------------------------------------------------

CLIP_RESULTS = [{"image_path": "/data/images/000001.jpg", "caption": "a sneaker", "similarity": 0.33, "id": 1},
                {"url": "https://laion.example/b.jpg", "caption": "shoe", "similarity": 0.29, "id": 2},
                {"url": None, "caption": "no url", "similarity": 0.2, "id": 3},
                {"url": "https://laion.example/c.jpg", "caption": "boot", "similarity": 0.25, "id": 4}]


def test_clip_retrieval_full_url_options_and_results_without_url():
    with FaultServer({"/knn-service": _json_route(CLIP_RESULTS)}) as srv:
        backend = build_backend("clip-retrieval", cache=None, url=srv.url("/knn-service/"), indice_name="my_folder",
                                modality="text", deduplicate=False, **FAST)
        results = backend.search("sneaker", 10)
        [sent] = srv.request_bodies
    assert srv.hits("/knn-service") == 1 and backend.url == srv.url("")  # not .../knn-service/knn-service
    assert [(r.image_url, r.rank, r.result_id) for r in results] == [
        ("https://laion.example/b.jpg", 0, "2"), ("https://laion.example/c.jpg", 1, "4")]
    assert backend.skipped == 2  # the image_path result and the null url
    body = json.loads(sent)
    assert (body["indice_name"], body["modality"], body["deduplicate"]) == ("my_folder", "text", False)
    with pytest.raises(ValueError, match="valid: image, text"):
        build_backend("clip-retrieval", cache=None, url=srv.url(""), modality="video")
