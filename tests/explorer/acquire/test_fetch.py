import hashlib
import socket

import numpy as np
import pytest
import torch

from explorer.acquire.cache import CacheMiss, ResponseCache
from explorer.acquire.fetch import FetchConfig, allow_origin, fetch_images
from explorer.acquire.validate import to_pipeline_tensor, validate_image
from tests.explorer.acquire.fault_server import (
    FaultServer,
    Route,
    clipart_pngs,
    fashion_images,
    header_bomb_png,
    html_page,
    jpeg_bytes,
    png_bytes,
)

FAST = FetchConfig(backoff_base=0.01, backoff_max=0.05, total_deadline=10.0, max_bytes=64 * 1024)
BIG = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)  # ~120 KB PNG


def _routes() -> dict[str, Route]:
    fashion = [png_bytes(img) for img in fashion_images(4)]
    clipart = clipart_pngs(2)
    routes = {f"/fashion/{i}.png": Route(body=b) for i, b in enumerate(fashion)}
    routes |= {f"/clipart/{i}.png": Route(body=b) for i, b in enumerate(clipart)}
    routes |= {
        "/truncated.png": Route(body=fashion[0][: len(fashion[0]) // 2]),
        "/empty.png": Route(body=b""),
        "/html-as-png": Route(body=html_page()),
        "/page.html": Route(body=html_page(), content_type="text/html"),
        "/jpeg-as-png": Route(body=jpeg_bytes(fashion_images(1)[0])),
        "/big.png": Route(body=png_bytes(BIG)),
        "/big-chunked.png": Route(body=png_bytes(BIG), send_length=False),
        "/small-chunked.png": Route(body=fashion[1], send_length=False),
        "/bomb.png": Route(body=header_bomb_png(30000, 30000)),
        "/flaky.png": Route(body=fashion[2], statuses=(503, 200)),
        "/throttled.png": Route(body=fashion[3], statuses=(429, 200), headers={"Retry-After": "0"}),
        "/down.png": Route(statuses=(503,)),
        "/slow.png": Route(body=fashion[0], drip_seconds=0.05),
        "/hop1": Route(statuses=(302,), headers={"Location": "/hop2"}),
        "/hop2": Route(statuses=(301,), headers={"Location": "/fashion/0.png"}),
        "/loop": Route(statuses=(302,), headers={"Location": "/loop"}),
    }
    return routes


@pytest.fixture(scope="module")
def server():
    with FaultServer(_routes()) as srv:
        yield srv


def _fetch(server, paths, cfg=FAST, **kw):
    # The fault server is on loopback, which the SSRF guard refuses unless allowed explicitly.
    cfg = allow_origin(cfg, server.url("/"))
    return fetch_images([server.url(p) for p in paths], cfg, progress=False, **kw)


def test_real_images_arrive_decoded_and_in_input_order(server):
    paths = ["/clipart/1.png", "/fashion/2.png", "/fashion/0.png", "/clipart/0.png",
             "/fashion/2.png", "/small-chunked.png"]
    results = _fetch(server, paths)
    assert [r.url for r in results] == [server.url(p) for p in paths]
    for path, result in zip(paths, results):
        body = server.routes[path].body
        assert result.status == "ok", result.reason
        assert result.sha256 == hashlib.sha256(body).hexdigest() and result.n_bytes == len(body)
        expected = to_pipeline_tensor(validate_image(body, "image/png").image, 32)
        assert result.image.dtype == torch.uint8 and torch.equal(result.image, expected)
    assert (results[1].width, results[1].height) == (28, 28)


FAULTS = {
    "/truncated.png": "decode_error",
    "/empty.png": "empty",
    "/html-as-png": "not_an_image",
    "/page.html": "bad_content_type",
    "/jpeg-as-png": "wrong_magic",
    "/big.png": "too_large_body",  # announced by Content-Length
    "/big-chunked.png": "too_large_body",  # no length: cut off while streaming
    "/bomb.png": "decompression_bomb",
    "/missing.png": "http_error",
    "/loop": "http_error",
}


def test_each_fault_gets_its_status(server):
    results = _fetch(server, list(FAULTS))
    assert {p: r.status for p, r in zip(FAULTS, results)} == FAULTS
    assert all(r.image is None for r in results)
    by_path = dict(zip(FAULTS, results))
    assert "Content-Length" in by_path["/big.png"].reason
    assert by_path["/missing.png"].http_status == 404
    assert "redirects" in by_path["/loop"].reason


def test_404_is_not_retried(server):
    before = server.hits("/missing-once.png")
    (result,) = _fetch(server, ["/missing-once.png"])
    assert result.status == "http_error" and server.hits("/missing-once.png") == before + 1


def test_503_then_200_is_retried(server):
    (result,) = _fetch(server, ["/flaky.png"])
    assert result.ok and server.hits("/flaky.png") == 2


def test_429_honours_retry_after(server):
    (result,) = _fetch(server, ["/throttled.png"])
    assert result.ok and server.hits("/throttled.png") == 2


def test_persistent_503_gives_up_after_the_retries(server):
    (result,) = _fetch(server, ["/down.png"], FetchConfig(retries=3, backoff_base=0.01))
    assert result.status == "http_error" and result.http_status == 503
    assert server.hits("/down.png") == 4


def test_slow_drip_hits_the_total_deadline(server):
    # The server sends a byte every 50 ms, so the read timeout never fires; only the deadline can.
    cfg = FetchConfig(total_deadline=1.0, read_timeout=5.0, backoff_base=0.01)
    (result,) = _fetch(server, ["/slow.png"], cfg)
    assert result.status == "timeout" and "deadline" in result.reason


def test_redirects_are_followed_and_checked_by_the_hook(server):
    (result,) = _fetch(server, ["/hop1"])
    assert result.ok and result.sha256 == hashlib.sha256(server.routes["/fashion/0.png"].body).hexdigest()
    seen = []

    def refuse_hop2(url):
        seen.append(url)
        return "hop2 is off limits" if url.endswith("/hop2") else None

    before = server.hits("/hop2")
    (result,) = _fetch(server, ["/hop1"], pre_request=refuse_hop2)
    assert result.status == "blocked" and result.reason == "hop2 is off limits"
    assert seen == [server.url("/hop1"), server.url("/hop2")] and server.hits("/hop2") == before
    (result,) = _fetch(server, ["/hop1"], FetchConfig(follow_redirects=False))
    assert result.status == "http_error" and result.http_status == 302


def test_hook_refusal_and_bad_urls_never_reach_the_network(server):
    before = server.hits("/fashion/1.png")
    results = fetch_images([server.url("/fashion/1.png"), "ftp://127.0.0.1/x.png", "no url"],
                           allow_origin(FAST, server.url("/")), progress=False,
                           pre_request=lambda url: "not on the list")
    assert [r.status for r in results] == ["blocked", "blocked", "blocked"]  # not http(s): refused
    assert results[0].reason == "not on the list" and server.hits("/fashion/1.png") == before


def test_refused_connection_is_a_network_error():
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.png"
    (result,) = fetch_images([url], allow_origin(FAST, url), progress=False)
    assert result.status == "network_error" and "Connect" in result.reason


class SocketUsed(RuntimeError):
    pass


def _forbid_sockets(monkeypatch):
    def refuse(self, *args):
        raise SocketUsed(f"socket connect to {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def _raised_within(error: BaseException, kind: type) -> bool:
    """Whether `kind` was raised anywhere inside `error` (anyio wraps it in an ExceptionGroup)."""
    if isinstance(error, kind):
        return True
    inner = list(getattr(error, "exceptions", ())) + [error.__cause__, error.__context__]
    return any(e is not None and _raised_within(e, kind) for e in inner)


def test_the_socket_guard_catches_a_real_fetch(server, monkeypatch):
    _forbid_sockets(monkeypatch)  # proves the replay tests below would notice a connection
    with pytest.raises(BaseException) as err:
        _fetch(server, ["/fashion/0.png"])
    assert _raised_within(err.value, SocketUsed)


REPLAYED = ["/fashion/0.png", "/clipart/1.png", "/missing.png", "/truncated.png", "/big.png",
            "/html-as-png", "/fashion/3.png"]


def test_replay_reproduces_a_recorded_run_without_sockets(server, tmp_path, monkeypatch):
    cache = ResponseCache(tmp_path)
    recorded = _fetch(server, REPLAYED, cache=cache, mode="readwrite")
    assert [r.status for r in recorded] == ["ok", "ok", "http_error", "decode_error",
                                            "too_large_body", "not_an_image", "ok"]
    _forbid_sockets(monkeypatch)
    replayed = _fetch(server, REPLAYED, cache=ResponseCache(tmp_path), mode="replay")
    assert replayed == recorded  # every field but the image ...
    for a, b in zip(recorded, replayed):  # ... which is compared here
        assert (a.image is None and b.image is None) or torch.equal(a.image, b.image)


def test_replay_miss_names_the_url(server, tmp_path, monkeypatch):
    cache = ResponseCache(tmp_path)
    _fetch(server, ["/fashion/0.png"], cache=cache)
    _forbid_sockets(monkeypatch)
    with pytest.raises(CacheMiss, match="/fashion/1.png"):
        _fetch(server, ["/fashion/0.png", "/fashion/1.png"], cache=cache, mode="replay")


def test_readwrite_serves_from_cache_and_refresh_goes_back(server, tmp_path):
    cache = ResponseCache(tmp_path)
    first = _fetch(server, ["/clipart/0.png", "/missing-cached.png"], cache=cache)
    hits = server.hits("/clipart/0.png"), server.hits("/missing-cached.png")
    again = _fetch(server, ["/clipart/0.png", "/missing-cached.png"], cache=cache)
    assert again == first and torch.equal(again[0].image, first[0].image)
    assert (server.hits("/clipart/0.png"), server.hits("/missing-cached.png")) == hits
    assert cache.stats()["hits"] == 2
    _fetch(server, ["/clipart/0.png"], cache=cache, mode="refresh")
    assert server.hits("/clipart/0.png") == hits[0] + 1


def test_transient_failures_are_refetched_in_readwrite(server, tmp_path):
    cache = ResponseCache(tmp_path)
    cfg = FetchConfig(retries=0)
    _fetch(server, ["/down.png"], cfg, cache=cache)
    before = server.hits("/down.png")
    (result,) = _fetch(server, ["/down.png"], cfg, cache=cache)
    assert result.http_status == 503 and server.hits("/down.png") == before + 1


def test_config_is_validated():
    with pytest.raises(ValueError, match="per_host"):
        FetchConfig(per_host=0)
    with pytest.raises(ValueError, match="total_deadline"):
        FetchConfig(total_deadline=0)
