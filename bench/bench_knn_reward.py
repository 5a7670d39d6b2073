"""Time the k-NN image reward: faiss (explorer.score.reward.knn_reward) vs a naive torch version.

Random unit candidates are rewarded against random unit targets (default 60k x 512, the size
of a Fashion-MNIST-scale target set). For each candidate count the script prints wall time and
microseconds per candidate for both implementations, checks that they agree on a subset, and
fits the log-log slope of time vs count (1.0 = linear).

The naive version builds the full (chunk, N_t) similarity matrix and takes topk; it is skipped
above --naive-max candidates (default 100k) because on 2 cores it ran 1.0-3x slower than
faiss in runs here, which would add 10+ minutes at 1M; its agreement is still checked on the subset for
every size. Peak memory of the default run is ~3.3 GB (the 1M x 512 candidates are 2 GB).
The 1M faiss case dominates the run time (a few minutes on 2 idle cores, about
60 GFLOP per 1k candidates); pass --sizes 10000 100000 for a quick run.

    python3 bench/bench_knn_reward.py                      # 10k, 100k, 1M
    python3 bench/bench_knn_reward.py --sizes 10000 30000 --targets 10000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import loglog_plot, write_machine, write_rows  # noqa: E402
from explorer.score.reward import TargetIndex, knn_reward  # noqa: E402


def naive_knn_reward(candidates: torch.Tensor, targets: torch.Tensor, k: int,
                     chunk_size: int = 4096) -> np.ndarray:
    """Candidates (M, D) and unit targets (N_t, D) -> (M,) mean of the top-k cosines."""
    rewards = []
    for start in range(0, len(candidates), chunk_size):
        chunk = torch.nn.functional.normalize(candidates[start:start + chunk_size], dim=1)
        sims = chunk @ targets.T  # (chunk, N_t): 4096 x 60k float32 is ~1 GB
        rewards.append(sims.topk(k, dim=1).values.mean(dim=1))
    return torch.cat(rewards).numpy()


def random_candidates(n: int, dim: int, seed: int) -> torch.Tensor:
    # torch.randn fills 1M x 512 in a few seconds; float32 keeps it at 2 GB.
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--targets", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--naive-max", type=int, default=100_000,
                        help="largest candidate count timed with the naive torch version")
    parser.add_argument("--check", type=int, default=2000, help="candidates compared per size")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "knn_reward_scaling",
                        help="where results.csv/json, scaling.png and machine.json go")
    args = parser.parse_args()

    targets = torch.nn.functional.normalize(random_candidates(args.targets, args.dim, seed=0), dim=1)
    index = TargetIndex(targets.numpy())
    print(f"targets {args.targets} x {args.dim}, k={args.k}, torch threads {torch.get_num_threads()}")
    print(f"{'candidates':>10} {'faiss s':>9} {'us/cand':>8} {'naive s':>9} {'us/cand':>8} "
          f"{'max |diff|':>10}")
    faiss_times, rows = [], []
    for i, n in enumerate(args.sizes):
        candidates = random_candidates(n, args.dim, seed=1 + i)
        rewards, faiss_s = timed(knn_reward, candidates.numpy(), index, k=args.k)
        faiss_times.append(faiss_s)
        naive_s = float("nan")
        if n <= args.naive_max:
            naive, naive_s = timed(naive_knn_reward, candidates, targets, args.k)
            diff = np.abs(naive[:args.check] - rewards[:args.check]).max()
        else:
            diff = np.abs(naive_knn_reward(candidates[:args.check], targets, args.k)
                          - rewards[:args.check]).max()
        naive_cell = f"{naive_s:9.2f} {1e6 * naive_s / n:8.1f}" if n <= args.naive_max else \
            f"{'skipped':>9} {'':>8}"
        print(f"{n:>10} {faiss_s:9.2f} {1e6 * faiss_s / n:8.1f} {naive_cell} {diff:10.2e}")
        assert diff < 1e-4, f"faiss and naive rewards disagree by {diff}"
        rows.append({"candidates": n, "targets": args.targets, "dim": args.dim, "k": args.k,
                     "faiss_s": round(faiss_s, 4), "naive_torch_s": None if np.isnan(naive_s) else round(naive_s, 4),
                     "max_abs_diff": float(diff)})
        del candidates, rewards
    if len(args.sizes) >= 2:
        slope = np.polyfit(np.log(args.sizes), np.log(faiss_times), 1)[0]
        print(f"faiss time ~ candidates^{slope:.2f} (1.00 = linear)")
        rows[-1]["faiss_loglog_slope"] = round(float(slope), 3)
    write_rows(args.out, "results", rows)
    naive = [r for r in rows if r["naive_torch_s"] is not None]
    loglog_plot(args.out / "scaling.png", {"faiss (explorer.score.reward.knn_reward)": ([r["candidates"] for r in rows],
                                                                                [r["faiss_s"] for r in rows]),
                                           "naive torch": ([r["candidates"] for r in naive],
                                                           [r["naive_torch_s"] for r in naive])},
                "candidates", "seconds", f"k-NN reward vs {args.targets} targets (dim {args.dim})")
    write_machine(args.out, "bench_knn_reward.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
