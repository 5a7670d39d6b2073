"""Search clients: each backend's JSON over real loopback HTTP, caching, and replay with no network."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from explorer.acquire.cache import CacheMiss, ResponseCache
from explorer.acquire.search import SearchError, build_backend, search_many

# What a SearXNG instance answers for an image search (fields as SearXNG 2024+ emits them),
# including a general result without an image, which the client must skip.
SEARXNG_PAGES = {
    1: {"query": "boot", "number_of_results": 0, "results": [
        {"url": "https://shop.example/boot-1", "title": "Leather ankle boot", "content": "", "engine": "bing images",
         "img_src": "https://img.example/boot1.jpg", "thumbnail_src": "https://img.example/t/boot1.jpg",
         "template": "images.html", "score": 1.5, "category": "images", "positions": [1]},
        {"url": "https://wiki.example/Boot", "title": "Boot - Wikipedia", "content": "A boot is...",
         "engine": "wikipedia", "score": 1.0, "category": "general"},
        {"url": "https://blog.example/x", "title": "", "thumbnail_src": "https://img.example/t/x.png",
         "template": "images.html", "category": "images"}],
        "answers": [], "suggestions": ["boots"], "unresponsive_engines": []},
    2: {"query": "boot", "results": [
        {"url": "https://shop.example/boot-2", "title": "Chelsea boot", "img_src": "https://img.example/boot2.jpg",
         "score": 0.9}]},
}
CLIP_ANSWER = [{"url": "https://laion.example/a.jpg", "caption": "red sneaker", "similarity": 0.31, "id": 77},
               {"url": "https://laion.example/b.jpg", "caption": "shoe", "similarity": 0.29, "id": 78}]


class FixtureEngine:
    """Serves canned real-engine JSON on 127.0.0.1 and counts requests."""

    def __init__(self, broken: bool = False):
        fixture = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, obj):
                body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                fixture.requests += 1
                if broken:
                    return self._send({"query": "boot", "results": {"oops": 1}})
                page = int(self.path.split("pageno=")[1].split("&")[0])
                self._send(SEARXNG_PAGES.get(page, {"results": []}))

            def do_POST(self):
                fixture.requests += 1
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert req["modality"] == "image"
                self._send(b"<html>oops</html>" if broken else CLIP_ANSWER[: req["num_images"]])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fixture_engine():
    f = FixtureEngine()
    yield f
    f.close()


def test_searxng_parsing_pages_and_skips_non_images(fixture_engine, tmp_path):
    backend = build_backend("searxng", cache=ResponseCache(tmp_path), url=fixture_engine.url)
    results = backend.search("boot", 10)
    assert [r.image_url for r in results] == ["https://img.example/boot1.jpg", "https://img.example/t/x.png",
                                              "https://img.example/boot2.jpg"]
    assert [r.rank for r in results] == [0, 1, 2]
    assert results[0].caption == "Leather ankle boot" and results[0].page_url == "https://shop.example/boot-1"
    assert fixture_engine.requests == 2  # page 2 is shorter than page 1: the last; no empty page 3 is asked for


def test_clip_retrieval_parsing(fixture_engine, tmp_path):
    backend = build_backend("clip-retrieval", cache=ResponseCache(tmp_path), url=fixture_engine.url)
    results = backend.search("sneaker", 2)
    assert [(r.image_url, r.caption, r.score, r.result_id) for r in results] == [
        ("https://laion.example/a.jpg", "red sneaker", 0.31, "77"), ("https://laion.example/b.jpg", "shoe", 0.29, "78")]


def test_malformed_answers_name_the_field(tmp_path):
    broken = FixtureEngine(broken=True)
    try:
        with pytest.raises(SearchError, match="field 'results' should be list"):
            build_backend("searxng", cache=None, url=broken.url).search("boot", 5)
        with pytest.raises(SearchError, match="not JSON"):
            build_backend("clip-retrieval", cache=None, url=broken.url).search("boot", 5)
    finally:
        broken.close()


def test_unreachable_engine_is_a_search_error():
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = build_backend("local", cache=None, url=f"http://127.0.0.1:{port}", retries=1, backoff_base=0.01)
    [outcome] = search_many(backend, ["boot"], 5)
    assert isinstance(outcome, SearchError) and "ConnectError" in str(outcome)
    assert "unreachable after 2 attempts" in str(outcome)


def test_unknown_backend_lists_valid_names():
    with pytest.raises(KeyError, match="clip-retrieval, local, replay, searxng"):
        build_backend("bing", cache=None)


def test_cache_hit_skips_network_and_replay_needs_no_socket(engine, tmp_path, monkeypatch):
    cache = ResponseCache(tmp_path)
    live = build_backend("local", cache=cache, url=engine.url, per_page=20)
    recorded = live.search("handwritten digit", 45)
    assert len(recorded) == 45
    before = cache.stats()["hits"]
    assert live.search("handwritten digit", 45) == recorded and cache.stats()["hits"] == before + 3

    def no_network(*args, **kwargs):
        raise AssertionError("replay opened a socket")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    replay = build_backend("replay", cache=ResponseCache(tmp_path), recorded=live.describe())
    assert replay.search("handwritten digit", 45) == recorded  # bit-identical, from the cache alone
    with pytest.raises(CacheMiss, match="'never searched'"):
        replay.search("never searched", 5)
