"""Fetcher throughput over loopback: fetch + validate + decode to uint8 (3, 32, 32), images/s.

A loopback server (tests/explorer/acquire/fault_server.py) serves N real Fashion-MNIST test images as
28x28 PNGs and M real openclipart PNGs (RGBA, ~200-1000 px). For each concurrency setting the
script fetches every URL without a cache, then prints images/s and MB/s. It also prints the
decode-only rate (validate + to_pipeline_tensor, no HTTP) and the rate of a cached replay, which
bound what the network part costs. The server runs in its own process (in-process it would share
the client's GIL), but it still shares this machine's cores with the client.

    python3 bench/bench_fetch.py                                  # 2000 fashion + 200 clipart
    python3 bench/bench_fetch.py --fashion 500 --clipart 50 --concurrency 8 32
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test server lives in tests/

from explorer.acquire.cache import ResponseCache  # noqa: E402
from explorer.acquire.fetch import FetchConfig, allow_origin, fetch_images  # noqa: E402
from explorer.acquire.validate import decode_batch  # noqa: E402
from tests.explorer.acquire.fault_server import (  # noqa: E402
    FaultServer,
    Route,
    clipart_pngs,
    fashion_images,
    png_bytes,
)


def _routes(n_fashion: int, n_clipart: int) -> dict[str, Route]:
    routes = {f"/fashion/{i}.png": Route(body=png_bytes(img))
              for i, img in enumerate(fashion_images(n_fashion))}
    routes |= {f"/clipart/{i}.png": Route(body=body)
               for i, body in enumerate(clipart_pngs(n_clipart))}
    return routes


def _serve(n_fashion: int, n_clipart: int, base_url, stop) -> None:
    with FaultServer(_routes(n_fashion, n_clipart)) as server:
        base_url.put(server.url(""))
        stop.wait()


def _rate(label: str, n: int, n_bytes: int, seconds: float) -> None:
    print(f"{label:<34} {n / seconds:9.0f} img/s  {n_bytes / seconds / 1e6:7.1f} MB/s  "
          f"({n} in {seconds:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion", type=int, default=2000)
    parser.add_argument("--clipart", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16, 64])
    args = parser.parse_args()

    routes = _routes(args.fashion, args.clipart)
    total_bytes = sum(len(r.body) for r in routes.values())
    print(f"{len(routes)} images, {total_bytes / 1e6:.1f} MB "
          f"({args.fashion} fashion 28x28 PNG + {args.clipart} openclipart PNG)")

    for source in ("fashion", "clipart"):
        bodies = [r.body for path, r in routes.items() if path.startswith(f"/{source}/")]
        start = time.perf_counter()
        images, results = decode_batch(bodies, size=32)
        _rate(f"decode only, {source} (no HTTP)", len(bodies), sum(map(len, bodies)),
              time.perf_counter() - start)
        assert images.shape[0] == len(bodies), [r.status for r in results if not r.ok][:5]

    context = multiprocessing.get_context("fork")
    base_url, stop = context.Queue(), context.Event()
    server = context.Process(target=_serve, args=(args.fashion, args.clipart, base_url, stop))
    server.start()
    try:
        root = base_url.get(timeout=60)
        urls = [root + path for path in routes]
        _measure(urls, total_bytes, args.concurrency)
    finally:
        stop.set()
        server.join()


def _measure(urls: list[str], total_bytes: int, concurrencies: list[int]) -> None:
    with tempfile.TemporaryDirectory() as cache_dir:
        for concurrency in concurrencies:
            cfg = allow_origin(FetchConfig(concurrency=concurrency, per_host=concurrency), urls[0])
            start = time.perf_counter()
            results = fetch_images(urls, cfg, progress=False)
            _rate(f"fetch, concurrency {concurrency}", len(urls), total_bytes,
                  time.perf_counter() - start)
            assert all(r.ok for r in results), {r.status for r in results}

        cache = ResponseCache(cache_dir)
        cfg = allow_origin(FetchConfig(concurrency=16, per_host=16), urls[0])
        start = time.perf_counter()
        fetch_images(urls, cfg, cache, mode="readwrite", progress=False)
        _rate("fetch + record to cache, conc 16", len(urls), total_bytes, time.perf_counter() - start)
        start = time.perf_counter()
        replayed = fetch_images(urls, cfg, ResponseCache(cache_dir), mode="replay", progress=False)
        _rate("replay from cache", len(urls), total_bytes, time.perf_counter() - start)
        assert all(r.ok for r in replayed)


if __name__ == "__main__":
    main()
