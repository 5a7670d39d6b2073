"""Local search engine throughput over loopback HTTP, and fetch + validate + decode from it.

Run: python bench/bench_search.py [--corpus DIR] [--queries 200] [--concurrency 1 4]
Prints queries/s of GET /search (SearXNG JSON, 50 results a page) for sequential and concurrent
clients, the in-process ranking time alone, and images/s of `fetch_images` over the
engine's /image endpoint (download + validation + decode to uint8 32x32).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from explorer.acquire.fetch import FetchConfig, allow_origin, fetch_images
from explorer.web.corpus import WebCorpus, fashion_web_dir
from explorer.web.engine import HybridIndex, SearchServer
from explorer.web.text_encoder import default_encoder


def _queries(corpus: WebCorpus, n: int) -> list[str]:
    """n two-word queries taken from captions spread over the corpus."""
    step = max(1, len(corpus.distinct_captions) // n)
    texts = (" ".join(c.split()[:2]) for c in corpus.distinct_captions[::step])
    return [t for t in texts if t.strip()][:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=fashion_web_dir())
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--images", type=int, default=2000)
    args = p.parse_args()

    corpus = WebCorpus(args.corpus)
    t = time.perf_counter()
    index = HybridIndex(corpus, default_encoder())
    print(f"corpus: {len(corpus)} items, {len(corpus.distinct_captions)} captions; index built in "
          f"{time.perf_counter() - t:.1f}s")
    queries = _queries(corpus, args.queries)
    index.search(queries[0])
    index._embed_query.cache_clear()
    t = time.perf_counter()
    for q in queries:
        index.search(q, 0, 50)
    print(f"in-process ranking (main thread, first use of each query): {len(queries) / (time.perf_counter() - t):.1f} queries/s")

    with SearchServer(index) as server, httpx.Client(timeout=30) as client:
        def one(q):
            r = client.get(f"{server.url}/search", params={"q": q, "format": "json", "per_page": 50})
            r.raise_for_status()
            return [x["img_src"] for x in r.json()["results"]]

        for c in args.concurrency:
            index._embed_query.cache_clear()  # cold: every query embedded anew
            t = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                answers = list(pool.map(one, queries))
            print(f"GET /search over HTTP, concurrency {c}: {len(queries) / (time.perf_counter() - t):.1f} queries/s")
        t = time.perf_counter()
        answers = [one(q) for q in queries]
        print(f"GET /search over HTTP, repeated queries (embedding cached): "
              f"{len(queries) / (time.perf_counter() - t):.1f} queries/s")
        urls = list(dict.fromkeys(u for a in answers for u in a))[: args.images]
        for c in (8, 32):
            t = time.perf_counter()
            cfg = allow_origin(FetchConfig(concurrency=c), server.url)  # the engine is on loopback
            results = fetch_images(urls, cfg, cache=None, progress=False)
            ok = sum(r.ok for r in results)
            print(f"fetch+validate+decode, concurrency {c}: {len(urls) / (time.perf_counter() - t):.0f} images/s "
                  f"({ok}/{len(urls)} ok)")


if __name__ == "__main__":
    main()
