"""The fetcher against a hostile web: SSRF, robots.txt, pacing, oversized bodies, slow servers,
throttling and a corrupted cache. Every server is on 127.0.0.1; addresses that must never be
reached are checked by the guard's decision and by counting connections, never by connecting."""

import asyncio
import ipaddress
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from explorer.acquire import fetch, netguard, robots
from explorer.acquire.cache import CacheCorruption, ResponseCache
from explorer.acquire.fetch import FetchConfig, allow_origin, fetch_images
from explorer.acquire.netguard import NetGuard, blocked_category
from explorer.acquire.validate import decode_cost
from tests.explorer.acquire.fault_server import (
    FaultServer,
    Route,
    fashion_images,
    gzip_bomb,
    png_bytes,
)

CAP = 64 * 1024
FAST = FetchConfig(backoff_base=0.01, backoff_max=0.05, total_deadline=10.0, max_bytes=CAP)
IMAGES = [png_bytes(img) for img in fashion_images(4)]
PUBLIC = "93.184.215.14"  # a global unicast address; nothing ever connects to it here


@pytest.fixture(autouse=True)
def fresh_robots():
    robots.forget()  # robots.txt rules live for the process; a test starts without any
    yield
    robots.forget()


def _fetch(server, paths, cfg=FAST, **kw):
    return fetch_images([server.url(p) for p in paths], allow_origin(cfg, server.url("/")),
                        progress=False, **kw)


def _fake_dns(monkeypatch, table: dict[str, list]):
    """Resolve names from `table` (a list of answers is played in order, the last repeats)."""
    calls = []

    async def resolve(host, port):
        calls.append(host)
        answers = table[host]
        return answers[min(calls.count(host), len(answers)) - 1]

    monkeypatch.setattr(netguard, "resolve", resolve)
    return calls


# ----- netguard classification -------------------------------------------------------------

@pytest.mark.parametrize("address, category", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("fd12:3456::1", "private"), ("fc00::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("fe80::1%eth0", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"), ("100.127.255.254", "carrier-grade NAT"),
    ("224.0.0.251", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("240.0.0.1", "reserved"),
    ("::ffff:10.0.0.1", "private"), ("::ffff:169.254.169.254", "link-local"),  # IPv4-mapped
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("8.8.8.8", None), ("1.1.1.1", None), (PUBLIC, None), ("2606:4700:4700::1111", None),
])
def test_address_categories(address, category):
    assert blocked_category(ipaddress.ip_address(address)) == category


def test_guard_refuses_schemes_literals_and_honours_the_allow_list():
    guard = NetGuard(["127.0.0.1:8080", "[::1]:9000"])
    refusal = lambda url: asyncio.run(guard.refusal(url))
    for url in ("file:///etc/passwd", "ftp://example.org/x", "gopher://example.org/",
                "data:image/png;base64,AAAA"):
        assert "is not http(s)" in refusal(url)
    assert refusal("http://169.254.169.254/latest/meta-data/") == \
        "169.254.169.254 is a link-local address"
    assert refusal("http://[::1]:8080/") == "::1 is a loopback address"
    assert refusal("http://127.0.0.1:8080/a.png") is None  # allowed: exactly this host:port
    assert refusal("http://[::1]:9000/a.png") is None
    assert "loopback" in refusal("http://127.0.0.1:8081/a.png")  # same host, other port
    assert "loopback" in refusal("http://127.0.0.1/a.png")  # port 80 is not 8080
    assert refusal(f"https://{PUBLIC}/a.png") is None


def test_guard_checks_every_resolved_address(monkeypatch):
    calls = _fake_dns(monkeypatch, {
        "intranet.example": [["10.1.2.3"]],
        "mixed.example": [[PUBLIC, "192.168.0.7"]],  # one private answer is enough to refuse
        "cgnat.example": [["100.64.3.2"]],
        "public.example": [[PUBLIC, "2606:4700:4700::1111"]],
    })
    guard = NetGuard(["intranet.example:8000"])
    refusal = lambda url: asyncio.run(guard.refusal(url))
    assert refusal("http://intranet.example/") == \
        "intranet.example resolves to 10.1.2.3, a private address"
    assert refusal("http://intranet.example:8000/") is None  # allow-listed by name and port
    assert refusal("https://mixed.example/x") == \
        "mixed.example resolves to 192.168.0.7, a private address"
    assert "carrier-grade NAT" in refusal("http://cgnat.example/x")
    assert refusal("http://public.example/x") is None
    assert calls.count("intranet.example") == 1  # the allow-listed host:port was not resolved


def test_fetch_config_checks_the_new_fields():
    assert FetchConfig(allowed_hosts=["127.0.0.1:80"]).allowed_hosts == ("127.0.0.1:80",)
    with pytest.raises(ValueError, match="allowed_hosts"):
        FetchConfig(allowed_hosts=("127.0.0.1",))  # no port: ambiguous, refused
    with pytest.raises(ValueError, match="per_host_rate"):
        FetchConfig(per_host_rate=0)
    assert allow_origin(FAST, "http://127.0.0.1:5000").allowed_hosts == ("127.0.0.1:5000",)
    assert allow_origin(FAST, None) is FAST


# ----- SSRF through redirects: refused with zero connections ---------------------------------

@pytest.fixture()
def intranet():
    """A loopback server that is NOT allowed: every test below must leave it untouched."""
    with FaultServer({"/secret.png": Route(body=IMAGES[0])}) as srv:
        yield srv


@pytest.fixture()
def web(intranet):
    secret = f"127.0.0.1:{intranet.netloc.split(':')[1]}"
    chain = {f"/chain{i}": Route(statuses=(302,), headers={"Location": f"/chain{i + 1}"})
             for i in range(7)}
    routes = {
        "/image.png": Route(body=IMAGES[1]),
        "/to-intranet": Route(statuses=(302,), headers={"Location": f"http://{secret}/secret.png"}),
        "/to-localhost": Route(statuses=(301,), headers={
            "Location": f"http://localhost:{intranet.netloc.split(':')[1]}/secret.png"}),
        "/to-metadata": Route(statuses=(307,), headers={
            "Location": "http://169.254.169.254/latest/meta-data/iam/security-credentials/"}),
        "/to-file": Route(statuses=(302,), headers={"Location": "file:///etc/passwd"}),
        "/loop-a": Route(statuses=(302,), headers={"Location": "/loop-b"}),
        "/loop-b": Route(statuses=(302,), headers={"Location": "/loop-a"}),
        **chain,
    }
    with FaultServer(routes) as srv:
        yield srv


@pytest.fixture()
def no_metadata_connections(monkeypatch):
    """Fails the test if anything tries to open a socket to the cloud metadata address."""
    attempts, real_connect = [], socket.socket.connect

    def connect(self, address, *args):
        if isinstance(address, tuple) and address[0] == "169.254.169.254":
            attempts.append(address)
            raise AssertionError(f"connection to {address}")
        return real_connect(self, address, *args)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def test_redirects_to_internal_addresses_are_refused_without_connecting(
        web, intranet, no_metadata_connections):
    paths = ["/to-intranet", "/to-localhost", "/to-metadata", "/to-file", "/image.png"]
    results = _fetch(web, paths)
    by_path = dict(zip(paths, results))
    assert [r.status for r in results] == ["blocked"] * 4 + ["ok"]
    assert by_path["/to-intranet"].reason == "127.0.0.1 is a loopback address"
    assert by_path["/to-localhost"].reason.startswith("localhost resolves to ")  # real resolver
    assert by_path["/to-metadata"].reason == "169.254.169.254 is a link-local address"
    assert by_path["/to-file"].reason == "scheme 'file' is not http(s)"
    assert intranet.connections == 0 and intranet.hits("/secret.png") == 0
    assert no_metadata_connections == []
    (direct,) = fetch_images([intranet.url("/secret.png")], FAST, progress=False)  # not allowed
    assert direct.status == "blocked" and intranet.connections == 0


def test_redirect_loops_and_long_chains_end_with_a_reason(web):
    results = _fetch(web, ["/loop-a", "/chain0"])
    assert [r.status for r in results] == ["http_error", "http_error"]
    assert "redirect loop back to" in results[0].reason and web.hits("/loop-a") == 1
    assert results[1].reason == "more than 5 redirects"
    assert web.hits("/chain5") == 1 and web.hits("/chain6") == 0  # 5 hops followed, no more


def test_dns_rebinding_is_caught_at_connect_time(intranet, monkeypatch):
    # The name is public when the URL is checked and loopback when the socket is opened.
    port = intranet.netloc.split(":")[1]
    calls = _fake_dns(monkeypatch, {"rebind.example": [[PUBLIC], ["127.0.0.1"]]})
    cfg = FetchConfig(respect_robots=False, retries=0)
    (result,) = fetch_images([f"http://rebind.example:{port}/secret.png"], cfg, progress=False)
    assert result.status == "blocked"
    assert result.reason == "rebind.example resolves to 127.0.0.1, a loopback address"
    assert calls == ["rebind.example", "rebind.example"] and intranet.connections == 0


def test_the_socket_goes_to_the_checked_address(web, monkeypatch):
    # 'pinned.example' exists only in the guard's resolver: the fetch can only succeed if the
    # connection is opened to the address the guard resolved, not by name.
    port = web.netloc.split(":")[1]
    _fake_dns(monkeypatch, {"pinned.example": [["127.0.0.1"]]})
    cfg = FetchConfig(allowed_hosts=(f"pinned.example:{port}",))
    (result,) = fetch_images([f"http://pinned.example:{port}/image.png"], cfg, progress=False)
    assert result.ok, result.reason
    assert web.hits("/image.png") == 1


# ----- size caps, deadline, throttling -------------------------------------------------------

def test_oversized_bodies_are_cut_at_the_cap():
    # Each body holds its rest back until the server stops: a fetcher that read whole bodies
    # before checking their size would hang there and end 'timeout', not 'too_large_body'.
    big = bytes(4 * CAP)
    routes = {
        "/declared.png": Route(body=big, pause_after=0),
        "/chunked.png": Route(body=big, send_length=False, pause_after=2 * CAP),
        "/gzip-bomb.png": Route(body=gzip_bomb(), headers={"Content-Encoding": "gzip"},
                                pause_after=16 * 1024),  # 16 KiB on the wire, ~16 MiB decoded
    }
    assert len(routes["/gzip-bomb.png"].body) < CAP  # small on the wire: only decoding is large
    with FaultServer(routes) as srv:
        results = _fetch(srv, list(routes), FetchConfig(max_bytes=CAP, total_deadline=5.0))
    assert [r.status for r in results] == ["too_large_body"] * 3, [r.reason for r in results]
    assert results[0].reason == f"Content-Length {4 * CAP} > {CAP}"
    assert results[1].reason == results[2].reason == f"body over {CAP} bytes"


def test_the_total_deadline_covers_retries():
    with FaultServer({"/drip.png": Route(body=IMAGES[0], drip_seconds=0.05)}) as srv:
        cfg = FetchConfig(total_deadline=0.5, read_timeout=5.0, retries=3, backoff_base=0.01)
        (result,) = _fetch(srv, ["/drip.png"], cfg)
        assert result.status == "timeout" and "deadline 0.5s" in result.reason
        assert srv.hits("/drip.png") == 1  # the deadline ended the request, no retry began


def test_retry_after_is_honoured_capped_and_bounded():
    routes = {
        "/wait-1s.png": Route(body=IMAGES[0], statuses=(429, 200), headers={"Retry-After": "1"}),
        "/wait-1h.png": Route(body=IMAGES[1], statuses=(503, 200), headers={"Retry-After": "3600"}),
        "/always-429.png": Route(statuses=(429,), headers={"Retry-After": "0"}),
    }
    with FaultServer(routes) as srv:
        cfg = FetchConfig(retries=2, retry_after_max=0.2, backoff_base=0.01)
        results = _fetch(srv, ["/wait-1h.png", "/always-429.png"], cfg)
        assert results[0].ok and srv.hits("/wait-1h.png") == 2  # an hour asked, 0.2 s waited
        assert results[1].status == "http_error" and results[1].http_status == 429
        assert srv.hits("/always-429.png") == 3  # 1 + retries, then it gives up
        (waited,) = _fetch(srv, ["/wait-1s.png"], FetchConfig(retry_after_max=5.0))
        first, second = srv.times("/wait-1s.png")
        assert waited.ok and second - first >= 0.95  # the retry came after the second it asked


def test_client_errors_are_never_retried():
    codes = (400, 401, 403, 404, 410, 451)
    with FaultServer({f"/{c}.png": Route(statuses=(c,)) for c in codes}) as srv:
        results = _fetch(srv, [f"/{c}.png" for c in codes], FetchConfig(retries=3))
        assert [r.http_status for r in results] == list(codes)
        assert all(r.status == "http_error" for r in results)
        assert [srv.hits(f"/{c}.png") for c in codes] == [1] * len(codes)


# ----- robots.txt and X-Robots-Tag ------------------------------------------------------------

def test_robots_answers_and_crawl_delay_per_user_agent():
    text = b"User-agent: explorer\nCrawl-delay: 2\nDisallow: /x\n\nUser-agent: *\nCrawl-delay: 0.5\n"
    rules = robots.rules_from_answer(200, text)
    assert rules.crawl_delay("explorer/0.1 (research)") == 2.0
    assert rules.crawl_delay("otherbot/1.0") == 0.5  # fractional: robotparser alone drops it
    assert not rules.allows("http://h/x/1.png", "explorer/0.1") and rules.allows("http://h/x", "b/1")
    for status, allowed in ((404, True), (403, True), (410, True), (429, False), (503, False)):
        assert robots.rules_from_answer(status, b"").allows("http://h/a.png", "explorer") is allowed
    unreachable = robots.unreachable_rules("timeout", "deadline")
    assert unreachable.outcome == "timeout" and not unreachable.allows("http://h/", "explorer")


def _robots_server(text: str | None, **extra: Route) -> FaultServer:
    routes = {"/public/a.png": Route(body=IMAGES[0]), "/private/a.png": Route(body=IMAGES[1]),
              "/private/b.png": Route(body=IMAGES[2]), **extra}
    if text is not None:
        routes["/robots.txt"] = Route(body=text.encode(), content_type="text/plain")
    return FaultServer(routes)


def test_robots_disallowed_paths_are_never_requested():
    paths = ["/private/a.png", "/public/a.png", "/private/b.png", "/private/a.png"]
    with _robots_server("User-agent: *\nDisallow: /private/\n") as srv:
        results = _fetch(srv, paths)
        assert [r.status for r in results] == ["blocked", "ok", "blocked", "blocked"]
        assert results[0].reason == "robots.txt: /private/a.png disallowed for explorer"
        _fetch(srv, paths)  # a second call: robots.txt is remembered, not asked again
        assert srv.hits("/private/a.png") == srv.hits("/private/b.png") == 0
        assert srv.hits("/robots.txt") == 1 and srv.hits("/public/a.png") == 2


def test_robots_rules_match_the_configured_user_agent():
    text = "User-agent: explorer\nDisallow: /\n\nUser-agent: *\nDisallow:\n"
    with _robots_server(text) as srv:
        (ours,) = _fetch(srv, ["/public/a.png"])
        (other,) = _fetch(srv, ["/public/a.png"], FetchConfig(user_agent="otherbot/2.0"))
        assert ours.status == "blocked" and other.ok
        assert {agent for _, path, agent in srv.log if path == "/public/a.png"} == {"otherbot/2.0"}
        assert {agent for _, path, agent in srv.log if path == "/robots.txt"} == {FAST.user_agent}


def test_missing_robots_allows_and_failing_robots_disallows():
    with _robots_server(None) as missing:  # 404, as the local engine answers
        assert _fetch(missing, ["/private/a.png"])[0].ok
        assert missing.hits("/robots.txt") == 1
    with _robots_server(None, **{"/robots.txt": Route(statuses=(503,))}) as failing:
        (result,) = _fetch(failing, ["/private/a.png"], FetchConfig(retries=1, backoff_base=0.01))
        assert result.status == "blocked" and "HTTP 503" in result.reason
        assert failing.hits("/private/a.png") == 0 and failing.hits("/robots.txt") == 2


def test_x_robots_tag_noai_blocks_the_image():
    tagged = {"/noai.png": "noai", "/noimageai.png": "noindex, noimageai",
              "/ours.png": "explorer: noai", "/theirs.png": "otherbot: noai",
              "/indexing-only.png": "noindex, nofollow"}
    extra = {p: Route(body=IMAGES[3], headers={"X-Robots-Tag": v}) for p, v in tagged.items()}
    with _robots_server(None, **extra) as srv:
        results = _fetch(srv, list(tagged))
        assert [r.status for r in results] == ["blocked"] * 3 + ["ok"] * 2
        assert [r.reason for r in results[:3]] == ["X-Robots-Tag noai", "X-Robots-Tag noimageai",
                                                   "X-Robots-Tag noai"]
        assert all(r.n_bytes == 0 and r.image is None for r in results[:3])
        (ignored,) = _fetch(srv, ["/noai.png"], FetchConfig(respect_robots=False))
        assert ignored.ok


@pytest.mark.parametrize("robots_txt, cfg, gap", [
    ("User-agent: *\nCrawl-delay: 0.3\n", FAST, 0.3),
    (None, FetchConfig(per_host_rate=4.0), 0.25),
])
def test_requests_to_one_host_are_spaced(robots_txt, cfg, gap):
    with _robots_server(robots_txt) as srv:
        results = _fetch(srv, ["/public/a.png", "/private/a.png", "/private/b.png"], cfg)
        assert all(r.ok for r in results)
        times = srv.times()  # robots.txt, then the three images
        assert len(times) == 4
        # request starts are spaced by the pacer; arrival adds a few ms of jitter either way
        assert min(b - a for a, b in zip(times, times[1:])) >= gap - 0.05


def test_a_crawl_delay_beyond_the_deadline_refuses_instead_of_waiting():
    with _robots_server("User-agent: *\nCrawl-delay: 30\n") as srv:
        results = _fetch(srv, ["/public/a.png", "/private/a.png"], FetchConfig(total_deadline=2.0))
        assert [r.status for r in results] == ["blocked", "blocked"]
        assert "next free turn" in results[0].reason
        assert srv.hits("/public/a.png") == srv.hits("/private/a.png") == 0


# ----- a corrupted cache ------------------------------------------------------------------------

def _corrupt_blob(root: Path, sha: str) -> None:
    blob = root / "blobs" / sha[:2] / sha
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped: only the hash can tell
    blob.write_bytes(bytes(data))


def test_a_corrupted_cache_entry_is_refetched_or_reported(tmp_path):
    with FaultServer({"/kept.png": Route(body=IMAGES[0])}) as srv:
        (recorded,) = _fetch(srv, ["/kept.png"], cache=ResponseCache(tmp_path))
        assert recorded.ok and srv.hits("/kept.png") == 1
        _corrupt_blob(tmp_path, recorded.sha256)
        cache = ResponseCache(tmp_path)
        (again,) = _fetch(srv, ["/kept.png"], cache=cache, mode="readwrite")
        assert again == recorded and srv.hits("/kept.png") == 2  # detected, fetched again
        assert cache.stats()["corrupt"] == 1
        _corrupt_blob(tmp_path, recorded.sha256)
        with pytest.raises(CacheCorruption, match="/kept.png"):
            _fetch(srv, ["/kept.png"], cache=ResponseCache(tmp_path), mode="replay")
        assert srv.hits("/kept.png") == 2  # replay never goes to the network


# ----- non-http URLs, import weight, decode memory ---------------------------------------------

def test_a_direct_file_url_is_blocked_like_a_redirect_to_it(web):
    (direct,) = fetch_images(["file:///etc/passwd"], FAST, progress=False)
    (redirected,) = _fetch(web, ["/to-file"])
    assert direct.status == redirected.status == "blocked"  # final, not a transient network_error
    assert direct.reason == redirected.reason == "scheme 'file' is not http(s)"


def test_importing_the_fetcher_does_not_load_torch():
    code = ("import sys, explorer.acquire.fetch, explorer.acquire.search, explorer.acquire.documents; "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.stdout.strip() == "[]"


def test_concurrent_decodes_are_bounded_by_the_pixel_budget(monkeypatch):
    """32 valid 4096x4096 images (the max_side limit) at once: the decodes in flight never hold
    more than decode_budget_bytes of pixels, however many threads the machine offers."""
    side = 4096
    pattern = np.indices((side, side)).sum(axis=0) % 251  # compresses to ~0.25 MB, decodes to 48 MiB
    body = png_bytes(np.stack([pattern, pattern[::-1], pattern.T], axis=-1).astype(np.uint8))
    cost = decode_cost(body, side * side)
    in_flight, peak, lock = [0], [0], threading.Lock()
    real = fetch.answer_to_result

    def counted(*args, **kwargs):  # observes the decodes; does not change them
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(fetch, "answer_to_result", counted)
    budget = 2 * cost + 1
    with FaultServer({f"/{i}.png": Route(body=body) for i in range(32)}) as srv:
        cfg = allow_origin(FetchConfig(max_bytes=len(body), respect_robots=False, decode_budget_bytes=budget),
                           srv.url("/"))
        results = fetch_images([srv.url(f"/{i}.png") for i in range(32)], cfg, progress=False)
    assert all(r.ok for r in results) and cost == 12 * side * side
    assert peak[0] == 2  # budget // cost, not the thread pool's size
