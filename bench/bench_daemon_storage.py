"""Disk and memory of a long-running daemon: per 1k accepted images, per iteration, and a week.

Part 1 (the shard store, learners/shards.py, at 32 px and at --large px): appends `--items`
random images in batches of `--batch` (as iterations accept them) and measures the bytes on disk
per item, write MB/s (fsynced commits), the time to read a training batch of 256 random items
(the page cache warm, as in a run), the memory an accepted item still costs (index, pool entry,
duplicate filters; counted from the structures), and the size of the mixture's checkpoint state
after each batch (a position: it should not grow).

Part 2 (a recorded run folder, `--run`, default the grid's seed-0 gp-ucb run): what one iteration
of a real run adds: accepted images, cache bytes (search answers and fetched bodies), seconds.

Part 3 (`--soak N`, default 40): resident memory per iteration of the loop itself, in process,
over N iterations of the tests' tiny config on a small corpus slice (each setting in a fresh
process): glibc's default allocator and MALLOC_ARENA_MAX=2.

Part 4: the projection to a week of running at the recorded pace, at both image sizes: shards,
cache (at the recorded body size and, as an assumption stated in the table, at 100 KB per body as
on the real web), checkpoints (K kept, flat), and what a disk budget (`disk.max_gb`) bounds.

    python bench/bench_daemon_storage.py                  # ~1 min
Outputs bench/results/daemon_storage/: report.md, results.json, machine.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.machine import machine_info  # noqa: E402
from explorer.run.disk import folder_usage  # noqa: E402
from explorer.run.loop import resident_bytes  # noqa: E402
from learners.mixture import MixtureConfig, TrainingMixture  # noqa: E402
from learners.shards import ShardStore  # noqa: E402

MIB = 2**20
WEEK = 7 * 24 * 3600
REAL_WEB_BODY = 100_000  # bytes per fetched image body on the real web (an assumption, stated as such)


def measure_store(side: int, items: int, batch: int, folder: Path) -> dict:
    """Shard store numbers at `side` px (see the module docstring)."""
    store = ShardStore(folder, side)
    mixture = TrainingMixture(torch.zeros(64, 3, side, side, dtype=torch.uint8), MixtureConfig(), store=store)
    generator = torch.Generator().manual_seed(0)
    state_sizes, write_seconds = [], 0.0
    for start in range(0, items, batch):
        n = min(batch, items - start)
        images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=generator)
        records = [{"sha256": f"{start + i:064x}", "url": f"https://example.org/{start + i}.jpg", "reward": 0.5,
                    "iteration": start // batch} for i in range(n)]
        t0 = time.perf_counter()
        mixture.add_accepted(images, records)
        write_seconds += time.perf_counter() - t0
        buffer = io.BytesIO()
        torch.save(mixture.state_dict(), buffer)
        state_sizes.append(len(buffer.getvalue()))
    disk = store.bytes_on_disk()
    reads = []
    for _ in range(20):
        ids = torch.randint(0, len(store), (256,), generator=generator)
        t0 = time.perf_counter()
        store.read(ids)
        reads.append(time.perf_counter() - t0)
    store.close()
    return {"side": side, "items": items, "bytes_per_item": disk / items, "image_bytes": 3 * side * side,
            "disk_mib_per_1k": disk / items * 1000 / MIB, "write_mb_per_s": disk / 1e6 / write_seconds,
            "read_256_ms": 1000 * float(np.median(reads)),
            **memory_per_item(store, mixture),
            "state_bytes_first": state_sizes[0], "state_bytes_last": state_sizes[-1]}


def memory_per_item(store: ShardStore, mixture: TrainingMixture) -> dict:
    """Bytes of memory an accepted item costs a run, by structure: the store's index (key string and
    list slot, offsets), the mixture's pool entry, and the loop's duplicate filters (the key in a set
    of keys, its 16x16 float32 near-duplicate signature: explorer/score/reward.py image_signature)."""
    n = len(store)
    index = (sys.getsizeof(store.keys) + sum(sys.getsizeof(k) for k in store.keys)
             + sum(a.nbytes for a in (store._shard, store._offset, store._size, store._end))) / n
    pool = mixture.pool.element_size() * len(mixture.pool) / n
    sha_set = sys.getsizeof(set(store.keys)) / n  # the table; the strings are the index's
    signature = 4 * 16 * 16
    return {"memory_bytes_per_item": {"index": round(index), "pool": round(pool), "sha_set": round(sha_set),
                                      "signature": signature},
            "memory_kib_per_1k": (index + pool + sha_set + signature) * 1000 / 1024}


def measure_run(run_dir: Path) -> dict:
    """Per-iteration growth of a recorded run folder."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    usage = folder_usage(run_dir)
    blobs = [p.stat().st_size for p in (run_dir / "cache" / "blobs").rglob("*") if p.is_file()]
    return {"run": str(run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir),
            "iterations": len(rows), "seconds_per_iteration": float(np.mean([r["seconds"] for r in rows])),
            "accepted_per_iteration": float(np.mean([r["accepted"] for r in rows])),
            "fetched_per_iteration": float(np.mean([r["fetched"] for r in rows])),
            "cache_bytes_per_iteration": usage.get("cache", 0) / len(rows),
            "mean_body_bytes": float(np.mean(blobs)) if blobs else 0.0}


def checkpoint_as_now(path: Path) -> int:
    """Bytes of a recorded checkpoint in today's layout: a run recorded before the shard store kept
    the target, every accepted image and their signatures in it; now its mixture state is a position."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    mixture = state["learner"]["mixture"]
    if "acquired" in mixture:
        n = int(mixture["seen"])
        state["learner"]["mixture"] = {"config": mixture["config"], "target_sha256": "0" * 64,
                                       "store": {"items": n, "batches": state["iteration"]}, "position": n}
        state.pop("accepted_sig", None)
        state.pop("accepted_sha", None)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return len(buffer.getvalue())


def project(store: dict, run: dict, checkpoint_bytes: float, keep: int) -> dict:
    iterations = WEEK / run["seconds_per_iteration"]
    accepted = iterations * run["accepted_per_iteration"]
    fetched = iterations * run["fetched_per_iteration"]
    return {"side": store["side"], "iterations": iterations, "accepted": accepted,
            "shards_gb": accepted * store["bytes_per_item"] / 1e9,
            "cache_gb_recorded": iterations * run["cache_bytes_per_iteration"] / 1e9,
            "cache_gb_real_web": fetched * REAL_WEB_BODY / 1e9,
            "checkpoints_gb": keep * checkpoint_bytes / 1e9,
            # the layout before the shard store: the pool's images (at most `capacity`) and every
            # accepted image's signature and key inside each checkpoint
            "old_checkpoint_gb": (checkpoint_bytes + min(accepted, MixtureConfig().capacity) * store["image_bytes"]
                                  + accepted * (4 * 16 * 16 + 64)) / 1e9,
            "memory_mib": accepted / 1000 * store["memory_kib_per_1k"] / 1024}


def report(stores: list[dict], run: dict, weeks: list[dict], checkpoint_bytes: float, keep: int,
           soaks: list[dict]) -> str:
    lines = ["# Daemon storage: disk and memory per accepted image, per iteration, per week", "",
             "## The shard store (learners/shards.py)", "",
             "| image px | items | bytes on disk / item (image bytes) | MiB / 1k accepted | write MB/s (fsynced) "
             "| read 256 random ms | memory KiB / 1k (index + pool + key set + signature, bytes each) "
             "| mixture checkpoint state, first → last batch (bytes) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in stores:
        lines.append(f"| {s['side']} | {s['items']} | {s['bytes_per_item']:.0f} ({s['image_bytes']}) | "
                     f"{s['disk_mib_per_1k']:.1f} | {s['write_mb_per_s']:.0f} | {s['read_256_ms']:.1f} | "
                     f"{s['memory_kib_per_1k']:.0f} ({' + '.join(str(v) for v in s['memory_bytes_per_item'].values())}) | "
                     f"{s['state_bytes_first']} → {s['state_bytes_last']} |")
    lines += ["", f"## One iteration of a recorded run (`{run['run']}`, {run['iterations']} iterations)", "",
              f"- {run['seconds_per_iteration']:.0f} s, {run['accepted_per_iteration']:.0f} images accepted, "
              f"{run['fetched_per_iteration']:.0f} fetched; the cache grows {run['cache_bytes_per_iteration'] / MIB:.2f} "
              f"MiB (mean body {run['mean_body_bytes'] / 1e3:.1f} KB: small PNGs of the installed corpus)",
              f"- the checkpoint: {checkpoint_bytes / 1e6:.1f} MB in today's layout (model + optimiser + policy + "
              f"background sample + a position in the shards), {keep} kept"
              + (f"; as recorded before the shard store it was {run['checkpoint_recorded_bytes'] / 1e6:.1f} MB "
                 "(the target and every accepted image inside)" if run.get("checkpoint_recorded_bytes") else ""), "",
              "## A week at that pace", "",
              "| image px | iterations | accepted | shards GB | cache GB (recorded bodies) | cache GB (100 KB bodies, "
              f"assumed) | {keep} checkpoints GB | one checkpoint GB in the layout before shards | "
              "memory for accepted items MiB |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w in weeks:
        lines.append(f"| {w['side']} | {w['iterations']:.0f} | {w['accepted']:.0f} | {w['shards_gb']:.1f} | "
                     f"{w['cache_gb_recorded']:.1f} | {w['cache_gb_real_web']:.0f} | {w['checkpoints_gb']:.2f} | "
                     f"{w['old_checkpoint_gb']:.1f} | "
                     f"{w['memory_mib']:.0f} |")
    if soaks:
        lines += ["", f"## Resident memory of the loop over {soaks[0]['iterations']} iterations (tiny config, in process)",
                  "", "| allocator | RSS after iteration 1, MiB | growth after it, MiB | growth by thirds, MiB | "
                  "images accepted |", "|---|---:|---:|---|---:|"]
        for k in soaks:
            name = "glibc default" if k["arena_max"] is None else f"MALLOC_ARENA_MAX={k['arena_max']}"
            lines.append(f"| {name} | {k['rss_mib'][0]:.0f} | {k['growth_mib']:+.0f} | "
                         f"{', '.join(f'{g:+.0f}' for g in k['growth_by_third_mib'])} | {k['acquired']} |")
    lines += ["", "The checkpoint does not grow with what was accepted (its mixture state is a position); the shards "
              "grow with accepted images only; the cache grows with every fetched body, and a disk budget "
              "(`disk.max_gb`) bounds the folder by evicting rejected bodies first (explorer/run/disk.py)."]
    return "\n".join(lines) + "\n"


def soak_child(iterations: int, threads: int) -> None:
    """(Child process) the tiny loop for `iterations` iterations; prints its RSS after each as JSON."""
    sys.path.insert(0, str(ROOT / "tests"))
    torch.set_num_threads(threads)
    from conftest import TINY_EXPERIMENT

    from explorer.run.config import ExperimentConfig, from_dict
    from explorer.run.image import ImageLoop
    from explorer.web.corpus import CorpusSpec, build_corpus
    from explorer.web.engine import HybridIndex, SearchServer
    from explorer.web.text_encoder import default_encoder

    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_corpus(Path(tmp) / "corpus", CorpusSpec(limit_per_source=150), progress=False)
        server = SearchServer(HybridIndex(corpus, default_encoder())).start()
        cfg = from_dict(ExperimentConfig, {**TINY_EXPERIMENT, "corpus": str(corpus.root), "iterations": iterations,
                                           "train": {**TINY_EXPERIMENT["train"], "eval_every": 10**6},
                                           "reward": {"background_size": 48}})
        loop = ImageLoop(cfg, Path(tmp) / "run", engine_url=server.url, progress=False)
        rss, accepted = [], []
        for k in range(1, iterations + 1):
            rows = loop.run(until=k, log=lambda s: None)
            rss.append(resident_bytes())
            accepted.append(rows[-1]["acquired_total"])
        loop.close()
        server.stop()
    print(json.dumps({"rss": rss, "acquired": accepted}))


def soak(iterations: int, threads: int, arena_max: int | None) -> dict:
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if arena_max is not None:
        env["MALLOC_ARENA_MAX"] = str(arena_max)
    out = subprocess.run([sys.executable, __file__, "--soak-child", str(iterations), "--threads", str(threads)],
                         env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    rss = np.array(result["rss"]) / MIB
    thirds = np.array_split(np.diff(rss[1:]), 3)  # growth after the first iteration, in thirds
    return {"arena_max": arena_max, "iterations": iterations, "rss_mib": rss.round(1).tolist(),
            "growth_mib": float(rss[-1] - rss[1]), "growth_by_third_mib": [float(t.sum()) for t in thirds],
            "acquired": result["acquired"][-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20_000, help="items written at 32 px")
    parser.add_argument("--large", type=int, default=224, help="the larger image side")
    parser.add_argument("--large-items", type=int, default=2_000, help="items written at the larger side")
    parser.add_argument("--batch", type=int, default=500, help="items per append (one iteration's accepted)")
    parser.add_argument("--run", type=Path, default=ROOT / "runs/bench-acquisition/seed-0/gp-ucb")
    parser.add_argument("--checkpoint-mb", type=float, default=None,
                        help="checkpoint size (default: the run's newest state.pt)")
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/daemon_storage")
    parser.add_argument("--soak", type=int, default=40, help="iterations of the in-process memory soak (0: skip)")
    parser.add_argument("--soak-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.soak_child is not None:
        soak_child(args.soak_child, args.threads)
        return
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        stores = [measure_store(32, args.items, args.batch, Path(tmp) / "32"),
                  measure_store(args.large, args.large_items, max(1, args.batch // 10), Path(tmp) / "large")]
    run = measure_run(args.run)
    if args.checkpoint_mb is not None:
        checkpoint_bytes, recorded_bytes = args.checkpoint_mb * 1e6, None
    else:
        states = sorted((args.run / "checkpoints").glob("iter-*/state.pt")) or [args.run / "checkpoint.pt"]
        checkpoint_bytes, recorded_bytes = checkpoint_as_now(states[-1]), states[-1].stat().st_size
    run["checkpoint_recorded_bytes"] = recorded_bytes
    weeks = [project(s, run, checkpoint_bytes, args.keep) for s in stores]
    soaks = [soak(args.soak, args.threads, arena) for arena in (None, 2)] if args.soak else []
    (args.out / "results.json").write_text(json.dumps({"stores": stores, "run": run, "week": weeks, "soak": soaks,
                                                       "checkpoint_bytes": checkpoint_bytes}, indent=2))
    (args.out / "machine.json").write_text(json.dumps(machine_info(), indent=2))
    text = report(stores, run, weeks, checkpoint_bytes, args.keep, soaks)
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
