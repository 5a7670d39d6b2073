"""Search requests per query against a SearXNG-style engine, at the demo config's sizes.

Run: python bench/bench_search_requests.py [--config configs/demo-fashion-web.yaml] [--page-size 20] [--overlap 2]
                                          [--totals 0,7,14,...]
Serves SearXNG's JSON on 127.0.0.1 (the result dicts and top-level keys of the real answer in
tests/fixtures/searxng/sx_images_p1.json, URLs varied), one query per result total in `--totals`
(default TOTALS: a rare concept's few results up to a common one's many), `--page-size` results a page, each page after
the first repeating the previous page's last `--overlap` results (engines repeat results across
pages). Searches `policy.queries_per_iteration` of them for `search.results_per_query` results each
through the `searxng` backend (max_pages 5, no pacing), and prints per query: the engine's total,
requests made, results handed on and distinct images among them.
"""

from __future__ import annotations

import argparse
import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml

import explorer
from explorer.acquire.search import build_backend, search_many

ROOT = Path(__file__).resolve().parents[1]
ANSWER = ROOT / "tests" / "fixtures" / "searxng" / "sx_images_p1.json"
# results the engine holds per query: a few rare concepts, most with more than a query asks for
TOTALS = (0, 7, 14, 25, 33, 40, 52, 60, 75, 100, 100, 150, 200, 300, 500, 1000)


class SearxngStyleEngine:
    """/search?q=..&pageno=N in SearXNG's JSON; counts requests per query."""

    def __init__(self, totals: dict[str, int], page_size: int, overlap: int):
        real = json.loads(ANSWER.read_text())
        template, head = real["results"][0], {k: v for k, v in real.items() if k != "results"}
        self.requests: dict[str, int] = {q: 0 for q in totals}
        engine, lock = self, threading.Lock()

        def page(q: str, pageno: int) -> dict:
            start = (pageno - 1) * (page_size - overlap)
            results = []
            for i in range(start, min(start + page_size, totals[q])):
                r = copy.deepcopy(template)
                r.update(img_src=f"https://cdn.example.com/{q}/{i}.jpg", url=f"https://shop.example.com/{q}/{i}.html",
                         title=f"{q} {i}", positions=[i - start + 1])
                results.append(r)
            return {**head, "query": q, "results": results}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                qs = parse_qs(urlsplit(self.path).query)
                q = qs["q"][0]
                with lock:
                    engine.requests[q] += 1
                body = json.dumps(page(q, int(qs["pageno"][0]))).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo-fashion-web.yaml")
    p.add_argument("--page-size", type=int, default=20)
    p.add_argument("--overlap", type=int, default=2)
    p.add_argument("--totals", type=lambda v: tuple(int(x) for x in v.split(",")), default=TOTALS,
                   help="results the engine holds per query, cycled over the queries (comma-separated)")
    args = p.parse_args()
    cfg = yaml.safe_load(args.config.read_text())
    n_queries, n = cfg["policy"]["queries_per_iteration"], cfg["search"]["results_per_query"]
    totals = {f"concept-{k}": args.totals[k % len(args.totals)] for k in range(n_queries)}
    engine = SearxngStyleEngine(totals, args.page_size, args.overlap)
    try:
        backend = build_backend("searxng", cache=None, url=engine.url, min_interval_s=0.0, retries=0)
        answers = search_many(backend, list(totals), n)
    finally:
        engine.close()
    print(f"explorer from {Path(explorer.__file__).parent}")
    print(f"{n_queries} queries x {n} results ({args.config.name}), pages of {args.page_size}, "
          f"{args.overlap} repeated from the previous page")
    print(f"{'engine total':>12} {'requests':>8} {'results':>7} {'distinct':>8}")
    for (q, total), answer in zip(totals.items(), answers):
        urls = [r.image_url for r in answer]
        print(f"{total:>12} {engine.requests[q]:>8} {len(urls):>7} {len(set(urls)):>8}")
    requests = sum(engine.requests.values())
    distinct = sum(len({r.image_url for r in a}) for a in answers)
    handed = sum(len(a) for a in answers)
    print(f"total: {requests} requests ({requests / n_queries:.2f} per query), {handed} results handed on, "
          f"{distinct} distinct images")


if __name__ == "__main__":
    main()
