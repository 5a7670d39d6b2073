"""Scaling-law fitter on synthetic Chinchilla runs: accuracy, bootstrap coverage and time.

    python3 bench/bench_budget.py [--seeds 10] [--resamples 30] [--noise 0.01]

Prints, per noise seed, the fit's largest relative parameter error, whether the bootstrap interval
holds all five true parameters jointly, and the time of each; then the coverage rate.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from learners.budget import FitConfig, ScalingLaw, bootstrap_intervals, fit_scaling_law

CHINCHILLA = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--resamples", type=int, default=30)
    parser.add_argument("--noise", type=float, default=0.01, help="sd of the multiplicative log-normal noise")
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--n-starts", type=int, default=24, help="L-BFGS starts (best grid points); -1: all 4,500")
    args = parser.parse_args()

    n, d = (x.ravel() for x in np.meshgrid(np.logspace(6, 9, 6), np.logspace(7, 11, 6)))
    config = FitConfig(n_starts=None if args.n_starts < 0 else args.n_starts)
    covered, fit_times, boot_times = 0, [], []
    for seed in range(args.seeds):
        loss = CHINCHILLA.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0, args.noise, n.shape))
        t0 = time.perf_counter()
        fit = fit_scaling_law(n, d, loss, config)
        t1 = time.perf_counter()
        intervals = bootstrap_intervals(n, d, loss, fit.law, n_resamples=args.resamples, level=args.level, seed=seed)
        t2 = time.perf_counter()
        error = max(abs(fit.law.as_dict()[k] / v - 1) for k, v in CHINCHILLA.as_dict().items())
        inside = all(intervals.contains(k, v) for k, v in CHINCHILLA.as_dict().items())
        covered += inside
        fit_times.append(t1 - t0)
        boot_times.append(t2 - t1)
        print(f"seed {seed}: max rel. error {error:.3f}, a = {fit.law.n_exponent:.3f} "
              f"(true {CHINCHILLA.n_exponent:.3f}), all five inside the CI: {inside}, "
              f"fit {t1 - t0:.2f} s, bootstrap x{args.resamples} {t2 - t1:.2f} s")
    print(f"{len(n)} runs, noise {args.noise}: joint {args.level:.0%} coverage {covered}/{args.seeds}; "
          f"median fit {np.median(fit_times):.2f} s, median bootstrap {np.median(boot_times):.2f} s")


if __name__ == "__main__":
    main()
