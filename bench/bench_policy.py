"""Time the GP query policy's update + propose on large vocabularies.

Random 384-d unit vectors stand in for concept embeddings (the cost does not depend on what the
vectors mean). For each vocabulary size the policy first hears `--observations` rewards, then
plays `--rounds` rounds of update(batch) + propose(batch) as the agent loop would; every round
refits the GP and predicts all N concepts. With `--sklearn-reference` it also times sklearn's own
`GaussianProcessRegressor.predict` over the vocabulary, the path the policy avoids.

    python3 bench/bench_policy.py                      # N = 1k, 10k, 80k; softmax and ucb
    python3 bench/bench_policy.py --sizes 80000 --sklearn-reference
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import loglog_plot, write_machine, write_rows  # noqa: E402
from policies import Query, build_policy  # noqa: E402
from policies.gp import fit_gp, gp_posterior, latest_distinct  # noqa: E402


def unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rewards_for(embeddings: np.ndarray, queries: list[Query], direction: np.ndarray,
                rng: np.random.Generator) -> list[float]:
    """A smooth reward field over the embedding space, plus noise."""
    ids = [q.concept for q in queries]
    return list(embeddings[ids] @ direction + 0.05 * rng.standard_normal(len(ids)))


def time_policy(embeddings: np.ndarray, acquisition: str, args) -> dict[str, float]:
    rng = np.random.default_rng(0)
    direction = unit_vectors(1, embeddings.shape[1], rng)[0]
    concepts = [f"concept {i}" for i in range(len(embeddings))]
    policy = build_policy("gp", concepts=concepts, embeddings=embeddings, seed=0,
                          acquisition=acquisition, max_observations=args.max_observations)
    warmup = policy.propose(args.observations)  # uniform: the GP has no data yet
    start = time.perf_counter()
    policy.update(warmup, rewards_for(embeddings, warmup, direction, rng))
    batch = policy.propose(args.batch)
    first = time.perf_counter() - start
    rounds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        policy.update(batch, rewards_for(embeddings, batch, direction, rng))
        batch = policy.propose(args.batch)
        rounds.append(time.perf_counter() - start)
    start = time.perf_counter()
    policy.propose(args.batch)  # no update since: prediction is cached
    cached = time.perf_counter() - start
    keys, targets = latest_distinct(policy.log, args.max_observations)
    start = time.perf_counter()
    fitted = fit_gp(embeddings[keys], targets, policy.config, random_state=0)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    gp_posterior(fitted, embeddings, with_std=acquisition == "ucb")
    posterior = time.perf_counter() - start
    return {"first": first, "round": float(np.median(rounds)), "cached": cached,
            "fit_points": len(keys), "fit": fit, "posterior": posterior}


def sklearn_predict_seconds(embeddings: np.ndarray, observations: int) -> float:
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    rng = np.random.default_rng(0)
    points = embeddings[:observations]
    gp = GaussianProcessRegressor(ConstantKernel() * RBF(0.7) + WhiteKernel(0.1), optimizer=None)
    gp.fit(points, rng.standard_normal(observations))
    start = time.perf_counter()
    gp.predict(embeddings)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 80_000])
    parser.add_argument("--acquisitions", nargs="+", default=["softmax", "ucb"])
    parser.add_argument("--observations", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-observations", type=int, default=256)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--sklearn-reference", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "policy_cost",
                        help="where results.csv/json, policy_cost.png and machine.json go")
    args = parser.parse_args()
    rows = []

    print(f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} dim={args.dim} "
          f"observations={args.observations} batch={args.batch}")
    print(f"{'N':>7} {'acq':>8} {'fit pts':>7} {'first s':>8} {'round s':>8} {'cached s':>9} "
          f"{'fit s':>6} {'posterior s':>11}")
    for n in args.sizes:
        embeddings = unit_vectors(n, args.dim, np.random.default_rng(n))
        for acquisition in args.acquisitions:
            t = time_policy(embeddings, acquisition, args)
            print(f"{n:>7} {acquisition:>8} {t['fit_points']:>7} {t['first']:>8.3f} "
                  f"{t['round']:>8.3f} {t['cached']:>9.4f} {t['fit']:>6.3f} {t['posterior']:>11.3f}",
                  flush=True)
            rows.append({"concepts": n, "acquisition": acquisition, **{k: round(float(v), 5) for k, v in t.items()}})
        if args.sklearn_reference:
            seconds = sklearn_predict_seconds(embeddings, args.observations)
            print(f"{n:>7} sklearn GaussianProcessRegressor.predict (mean only): {seconds:.3f} s")
    print("first: update(observations) + propose; round: median update(batch) + propose; "
          "cached: propose again without an update; fit / posterior: the two parts of a round "
          "(posterior with std for ucb, mean only for softmax)")
    write_rows(args.out, "results", rows)
    loglog_plot(args.out / "policy_cost.png",
                {f"{acq}: update + propose": ([r["concepts"] for r in rows if r["acquisition"] == acq],
                                              [r["round"] for r in rows if r["acquisition"] == acq])
                 for acq in args.acquisitions},
                "vocabulary size (concepts)", "seconds per round", "GP policy cost per round")
    write_machine(args.out, "bench_policy.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
