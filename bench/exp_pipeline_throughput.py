"""Experiment 3 - throughput of the acquisition pipeline against its bound, with the time per stage.

The pipeline is what one loop iteration does to search results: loopback HTTP fetch from the
local engine's /image endpoint + validate + decode to uint8 (3, 32, 32) (explorer.acquire.fetch), embed
with the MoCo-v3 encoder (MoCoLearner.embed) and the k-NN reward against the target embeddings
(explorer.score.reward, faiss). The bound is the encoder forward pass alone on the same images and
batch size: no pipeline that embeds every candidate can beat it.

Measurements over the same N corpus images (a seeded sample of the default corpus, so
Fashion-MNIST and openclipart PNGs in their corpus proportions):
  bound       embed only (images already decoded in memory)
  sequential  per batch: fetch -> embed -> reward, one after the other (what the loop did first)
  overlapped  the next batch is fetched in a thread while this one is embedded and rewarded
              (how much overlapping the network with the encoder could win)
  fetcher     fetch + validate + decode alone at several concurrencies (--sweep)
  parts       plain HTTP over one keep-alive connection, and validate + decode alone from
              bodies in memory, with the decode time per image source
The engine runs in its own process (as a web server would), on the same cores.

    python bench/exp_pipeline_throughput.py [--images 4096] [--batch 512] [--concurrency 16]

Writes bench/results/pipeline_throughput/: results.json, stages.csv, stages.png, machine.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import write_machine  # noqa: E402


def _start_engine(port: int) -> subprocess.Popen:
    import httpx

    code = f"from explorer.cli import main; main(['serve', '--port', '{port}'])"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the engine did not come up")


def _urls(port: int, n: int, seed: int) -> tuple[list[str], list[str]]:
    """n image URLs sampled from the default corpus, and each image's source dataset."""
    from explorer.web.corpus import WebCorpus, fashion_web_dir

    corpus = WebCorpus(fashion_web_dir())
    keys = np.random.default_rng(seed).choice(len(corpus), size=n, replace=False)
    return ([f"http://127.0.0.1:{port}/image/{corpus.keys[i]}" for i in keys],
            [str(corpus.hidden["source"][i]) for i in keys])


def _learner_and_index():
    from explorer.run.config import load_config
    from explorer.run.image import build_learner
    from explorer.score.reward import TargetIndex
    from explorer.score.target import load_target

    cfg = load_config(ROOT / "configs" / "demo-fashion-web.yaml")
    target = load_target(cfg.target)
    learner = build_learner(cfg, target)
    return cfg, learner, TargetIndex(learner.embed(target.part("acquire")[0]))


def _stages(urls, batch, fetch_cfg, learner, index, cfg) -> dict[str, float]:
    """Sequential: seconds spent in each stage over all batches."""
    import torch

    from explorer.acquire.fetch import fetch_images

    spent = {"fetch+validate+decode": 0.0, "embed": 0.0, "knn reward": 0.0}
    for start in range(0, len(urls), batch):
        t = time.perf_counter()
        results = fetch_images(urls[start:start + batch], fetch_cfg, cache=None, progress=False)
        images = torch.stack([r.image for r in results if r.ok])
        spent["fetch+validate+decode"] += time.perf_counter() - t
        t = time.perf_counter()
        emb = learner.embed(images, batch_size=batch)
        spent["embed"] += time.perf_counter() - t
        t = time.perf_counter()
        cfg.reward.image_rewards(emb, index)
        spent["knn reward"] += time.perf_counter() - t
    return spent


def _transfer_and_decode(urls: list[str], sources: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds of plain HTTP (one keep-alive connection, no validation) and of validate + decode
    alone from bodies in memory (one thread), and the decode seconds per image source."""
    import httpx

    from explorer.acquire.validate import to_pipeline_tensor, validate_image

    t = time.perf_counter()
    with httpx.Client() as client:
        bodies = [client.get(url).content for url in urls]
    transfer = time.perf_counter() - t
    per_source: dict[str, list[float]] = {}
    for body, source in zip(bodies, sources):
        t = time.perf_counter()
        to_pipeline_tensor(validate_image(body, "image/png").image)
        per_source.setdefault(source, []).append(time.perf_counter() - t)
    decode = sum(sum(v) for v in per_source.values())
    return ({"http only (1 connection)": transfer, "validate+decode only (1 thread)": decode},
            {k: 1e3 * float(np.mean(v)) for k, v in per_source.items()})


def _fetcher_by_concurrency(urls: list[str], levels: list[int]) -> dict[str, float]:
    """images/s of fetch + validate + decode (explorer.acquire.fetch) at each concurrency."""
    from explorer.acquire.fetch import FetchConfig, allow_origin, fetch_images

    rates = {}
    for level in levels:
        cfg = allow_origin(FetchConfig(concurrency=level, per_host=level), urls[0])
        t = time.perf_counter()
        fetch_images(urls, cfg, cache=None, progress=False)
        rates[str(level)] = round(len(urls) / (time.perf_counter() - t), 1)
    return rates


def _overlapped_batches(urls: list[str], batch: int, fetch_cfg):
    """Decoded images of consecutive batches, with the next batch's fetch always in flight in a thread."""
    import torch

    from explorer.acquire.fetch import fetch_images

    starts = list(range(0, len(urls), batch))
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(fetch_images, urls[:batch], fetch_cfg, None, "readwrite", False)
        for nxt in [*starts[1:], None]:
            results = pending.result()
            if nxt is not None:
                pending = pool.submit(fetch_images, urls[nxt:nxt + batch], fetch_cfg, None, "readwrite", False)
            yield torch.stack([r.image for r in results if r.ok])


def _overlapped(urls, batch, fetch_cfg, learner, index, cfg) -> float:
    t = time.perf_counter()
    for images in _overlapped_batches(urls, batch, fetch_cfg):
        cfg.reward.image_rewards(learner.embed(images, batch_size=batch), index)
    return time.perf_counter() - t


def _bound(images, batch, learner, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        learner.embed(images, batch_size=batch)
        best = min(best, time.perf_counter() - t)
    return best


def _plot(rates: dict[str, float], spent: dict[str, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.barh(list(rates), list(rates.values()), color=["gray", "tab:red", "tab:blue"])
    left.set_xlabel("images/s")
    left.set_title("pipeline vs bound (encoder forward alone)")
    right.barh(list(spent), list(spent.values()), color="tab:orange")
    right.set_xlabel("seconds (sequential pipeline)")
    right.set_title("time by stage")
    fig.tight_layout()
    fig.savefig(out / "stages.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=16, help="parallel HTTP requests of the fetcher")
    parser.add_argument("--sweep", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32],
                        help="also time the fetcher alone at these concurrencies")
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline_throughput")
    args = parser.parse_args(argv)
    import torch

    from explorer.acquire.fetch import FetchConfig, allow_origin, fetch_images

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = _start_engine(args.port)
    try:
        urls, sources = _urls(args.port, args.images, seed=0)
        cfg, learner, index = _learner_and_index()
        fetch_cfg = allow_origin(FetchConfig(concurrency=args.concurrency), urls[0])
        fetch_images(urls[: args.batch], fetch_cfg, cache=None, progress=False)  # warm: connections, page cache
        images = torch.stack([r.image for r in fetch_images(urls, fetch_cfg, cache=None, progress=False) if r.ok])
        bound = _bound(images, args.batch, learner)
        spent = _stages(urls, args.batch, fetch_cfg, learner, index, cfg)
        overlapped = _overlapped(urls, args.batch, fetch_cfg, learner, index, cfg)
        parts, decode_ms = _transfer_and_decode(urls, sources)
        by_concurrency = _fetcher_by_concurrency(urls, args.sweep)
    finally:
        engine.terminate()
        engine.wait(10)
    n = len(urls)
    rates = {"bound: embed only": n / bound, "sequential pipeline": n / sum(spent.values()),
             "overlapped pipeline": n / overlapped}
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"images": n, "decoded": len(images), "batch": args.batch, "concurrency": args.concurrency,
              "images_per_s": {k: round(v, 1) for k, v in rates.items()},
              "ratio_to_bound": {k: round(v / rates["bound: embed only"], 3) for k, v in rates.items()},
              "sequential_seconds_by_stage": {k: round(v, 3) for k, v in spent.items()},
              "fetch_parts_seconds": {k: round(v, 3) for k, v in parts.items()},
              "fetcher_images_per_s_by_concurrency": by_concurrency,
              "decode_ms_per_image_by_source": {k: round(v, 3) for k, v in decode_ms.items()},
              "images_by_source": {k: sources.count(k) for k in sorted(set(sources))}}
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "stages.csv").write_text("stage,seconds\n" + "".join(f"{k},{v:.4f}\n" for k, v in spent.items()))
    _plot(rates, spent, args.out)
    write_machine(args.out, " ".join(["exp_pipeline_throughput.py", *(argv if argv is not None else sys.argv[1:])]))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
