"""A loopback HTTP server for fetcher and search tests and benchmarks: real bodies plus injected faults.

Each path (or, failing that, the path without its query) maps to a `Route`; GET and POST are
answered alike (POST bodies are recorded). The server counts hits per path (so a test can prove a
404 was asked once and a 503 was retried), can play a sequence of statuses, omit Content-Length
(chunked body), drip the body slowly, hold the rest of a body back, or redirect. It also logs when
each request arrived (and its headers), counts accepted connections, and builds the real bodies
the tests serve.
"""

from __future__ import annotations

import gzip
import io
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
CLIPART_ANIMALS = Path("/usr/share/openclipart/png/animals")


@dataclass
class Route:
    body: bytes = b""
    content_type: str | None = "image/png"
    statuses: tuple[int, ...] = (200,)  # played in order per hit; the last one repeats
    send_length: bool = True  # False: chunked transfer, no Content-Length
    drip_seconds: float | None = None  # sleep between 1-byte writes (a slow server)
    pause_after: int | None = None  # send this many body bytes, then nothing more until shutdown
    headers: dict[str, str] = field(default_factory=dict)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real image hosts do
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms stalls

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        server: FaultServer = self.server.owner
        route, status = server._hit(self.path, self.headers)
        if route is None:
            route, status = Route(body=b"not found", content_type="text/plain"), 404
        self.send_response(status)
        if route.content_type is not None:
            self.send_header("Content-Type", route.content_type)
        for name, value in route.headers.items():
            self.send_header(name, value)
        if route.send_length:
            self.send_header("Content-Length", str(len(route.body)))
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self._write_body(route, server.stopping)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_POST(self):  # the body is recorded, then answered as a GET of the same path
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.server.owner._lock:
            self.server.owner.request_bodies.append(body)
        self.do_GET()

    def _write_body(self, route: Route, stopping: threading.Event):
        body = route.body
        if route.drip_seconds is not None:
            for i in range(len(body)):
                if stopping.wait(route.drip_seconds):
                    return
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
            return
        head = body if route.pause_after is None else body[:route.pause_after]
        for i in range(0, len(head), 65536):
            chunk = head[i:i + 65536]
            self.wfile.write(chunk if route.send_length else b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.flush()
        if route.pause_after is not None:  # only a client that stops reading early can finish
            stopping.wait()
            self.close_connection = True
        elif not route.send_length:
            self.wfile.write(b"0\r\n\r\n")


class _CountingHTTPServer(ThreadingHTTPServer):
    def verify_request(self, request, client_address) -> bool:  # once per accepted connection
        with self.owner._lock:
            self.owner.connections += 1
        return True


class FaultServer:
    """`with FaultServer(routes) as srv: srv.url('/a.png'); srv.hits('/a.png')` on 127.0.0.1:<free>."""

    def __init__(self, routes: dict[str, Route]):
        self.routes = dict(routes)
        self._hits: dict[str, int] = {}
        self.log: list[tuple[float, str, str]] = []  # (time.monotonic(), path, User-Agent) per request
        self.request_headers: list[dict[str, str]] = []  # every request's headers, in arrival order
        self.request_bodies: list[bytes] = []  # bodies of POST requests, in arrival order
        self.connections = 0  # TCP connections accepted
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self._httpd = _CountingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "FaultServer":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def url(self, path: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    @property
    def netloc(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"{host}:{port}"

    def hits(self, path: str) -> int:
        with self._lock:
            return self._hits.get(path, 0)

    def times(self, path: str | None = None) -> list[float]:
        """Arrival times (time.monotonic()) of the requests for `path`, or of all requests."""
        with self._lock:
            return [t for t, p, _ in self.log if path is None or p == path]

    def _hit(self, path: str, headers=None) -> tuple[Route | None, int]:
        """The route of `path`, or of its path without the query string (a search engine's /search)."""
        if path not in self.routes and urlsplit(path).path in self.routes:
            path = urlsplit(path).path
        with self._lock:
            n = self._hits.get(path, 0)
            self._hits[path] = n + 1
            agent = headers.get("User-Agent", "") if headers is not None else ""
            self.log.append((time.monotonic(), path, agent))
            self.request_headers.append(dict(headers.items()) if headers is not None else {})
        route = self.routes.get(path)
        if route is None:
            return None, 404
        return route, route.statuses[min(n, len(route.statuses) - 1)]


# ----- real and crafted bodies ---------------------------------------------------------------

def fashion_images(n: int) -> np.ndarray:
    """The first n Fashion-MNIST test images, uint8 (n, 28, 28)."""
    raw = gzip.decompress(FASHION_TEST.read_bytes())
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:n]


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def clipart_pngs(n: int) -> list[bytes]:
    """n real openclipart PNG files (RGBA clip art), as stored on disk, in a fixed order."""
    paths = sorted(CLIPART_ANIMALS.rglob("*.png"))[:n]
    return [p.read_bytes() for p in paths]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG whose IHDR claims width x height (8-bit grey) over a tiny IDAT: a few hundred
    bytes that would need width*height bytes to decode. Nothing that size is ever allocated."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))  # one filtered row of zeros
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def html_page() -> bytes:
    return b"<!doctype html><html><head><title>Not here</title></head><body>moved</body></html>"


def gzip_bomb(decoded_bytes: int = 64 * 2**20) -> bytes:
    """A gzip stream of `decoded_bytes` zeros: ~1000x smaller on the wire than decoded."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: gzip framing
    zeros = bytes(2**20)
    parts = [packer.compress(zeros[:min(2**20, decoded_bytes - i)])
             for i in range(0, decoded_bytes, 2**20)]
    return b"".join(parts) + packer.flush()
