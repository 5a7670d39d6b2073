"""Experiment 6 - text: do on-topic documents lower the target's perplexity more than random ones?

The text science config (`configs/text-science.yaml`): a nano LM on ~200 Wikipedia leads of one
topic (the target), ten passes over them in 256 training steps, perplexity on ~200 held-out leads
of the topic that no run trains on (copies and MiniLM near-copies on the web are dropped). Every
condition of a seed trains the same steps of the same model from the same initialisation on the
same target, so training FLOPs are equal; what differs is the acquired documents in the stream:

    target only  never queries (`text.strategy: train`)
    random       uniform vocabulary queries
    gp           the config's GP (UCB, a quarter of every batch uniform)
    oracle       queries ranked by the hidden share of on-topic documents among their results
    gp-dsir, gp-classifier, random-dsir, random-classifier
                 the policy with a peer data-selection method scoring the same fetched documents in
                 the reward's place (`text.scorer`: DSIR, or the n-gram classifier; not run by default)
    NAME-ranked  any of random, gp and the peers accepting the best tenth of each round's documents by
                 its own score (`reward.accept: top_fraction`) instead of those above the target's
                 own 10th percentile: every arm then keeps the same number of what it downloads

A seed sets the target split, the LM's initialisation and batch order, and the policy's draws.
Reported per condition: final held-out perplexity, its paired difference from the same seed's
target-only run (and gp - random) in log-perplexity with a 95% t-interval, documents and tokens
accepted, the precision of accepted documents against the topic's share of the web (its base
rate), and curves of perplexity against tokens acquired.

    python bench/exp_text_acquisition.py                     # 5 seeds x 4 conditions: 20 runs of ~1.5 min
    python bench/exp_text_acquisition.py --seeds 0 --conditions target-only gp
Outputs bench/results/text_acquisition/: report.md, runs.csv, summary.json, curves.png, machine.json.
Runs (resumable; a finished run is skipped) in runs/bench-text-acquisition/seed-S/CONDITION/.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import write_machine  # noqa: E402

# name -> config overrides
CONDITIONS = {
    "target-only": {"text.strategy": "train"},
    "random": {"policy.name": "random", "policy.options": {}},
    "gp": {},
    "oracle": {"policy.name": "oracle", "policy.options": {}},
    # the peers in the reward's place (explorer/score/selectors.py): policy x acceptance
    "gp-dsir": {"text.scorer": "dsir"},
    "gp-classifier": {"text.scorer": "classifier"},
    "random-dsir": {"policy.name": "random", "policy.options": {}, "text.scorer": "dsir"},
    "random-classifier": {"policy.name": "random", "policy.options": {}, "text.scorer": "classifier"},
}
# "-ranked": the same with every arm accepting the same share of each round's documents, best first by
# its own score (equal downloads and equal accepted counts: DSIR resamples a fixed number from a pool)
RANKED = {"reward.accept": "top_fraction", "reward.accept_threshold": None, "reward.accept_top_fraction": 0.1}
CONDITIONS.update({f"{name}-ranked": {**CONDITIONS[name], **RANKED}
                   for name in ("random", "gp", "gp-dsir", "gp-classifier", "random-dsir", "random-classifier")})
DEFAULT_CONDITIONS = ["target-only", "random", "gp", "oracle"]
# (better?, than) pairs the report compares, paired by seed, whenever both ran (gp - random is in the main
# table): the policy within each scorer, gp against the peers as a curator would run them (a uniform pool,
# the peer selecting), the peers against each other, and the two acceptance rules
PAIRS = [("gp-ranked", "random-ranked"), ("gp-dsir-ranked", "random-dsir-ranked"),
         ("gp-classifier-ranked", "random-classifier-ranked"),
         ("gp", "random-dsir-ranked"), ("gp", "random-classifier-ranked"),
         ("gp-ranked", "random-dsir-ranked"), ("gp-ranked", "random-classifier-ranked"),
         ("random-classifier-ranked", "random-dsir-ranked"), ("random-ranked", "random-dsir-ranked"),
         ("random-ranked", "random-classifier-ranked"), ("gp", "gp-ranked")]
DEFAULT_RUNS = ROOT / "runs" / "bench-text-acquisition"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def finished(run_dir: Path, iterations: int) -> bool:
    rows = read_metrics(run_dir)
    return len(rows) == iterations + 1


def run_grid(config: Path, runs: Path, seeds: list[int], conditions: list[str], overrides: dict,
             jobs: int = 1, threads: int = 2) -> None:
    """Every (seed, condition) run that is missing, `jobs` at a time; one local engine serves them all."""
    from explorer.run.config import load_config

    todo = []
    for seed in seeds:
        for name in conditions:
            cfg = load_config(config, {**overrides, **CONDITIONS[name], "seed": seed})
            run_dir = runs / f"seed-{seed}" / name
            if not finished(run_dir, cfg.iterations):
                todo.append((f"seed {seed}: {name}", cfg, run_dir))
    run_all(todo, runs / "engine.log", jobs, threads)


def run_all(todo: list[tuple], engine_log: Path, jobs: int, threads: int, done=None, cost=None) -> None:
    """Run each (label, cfg, run_dir) of `todo` with `run_text` against one local engine over their
    (shared) web: in this process one after another (`jobs` 1), or `jobs` at a time in worker
    processes. Every run uses `threads` torch threads wherever it runs, so its numbers do not depend
    on `jobs`. `done(run_dir, cfg, rows, t0)` is called here as each run finishes; the runs it
    returns, if any, are queued too (runs that need another's result). With `cost(cfg)`, the queued
    run of highest cost starts first (a long run last would leave the other workers idle)."""
    from explorer.run.experiment import local_engine_for

    if not todo:
        return
    queue = list(todo)

    def next_run():
        i = max(range(len(queue)), key=lambda j: (cost(queue[j][1]), -j)) if cost else 0
        return queue.pop(i)

    with local_engine_for(queue[0][1], progress=True, error_log=engine_log) as url:
        if jobs == 1:
            while queue:
                label, cfg, run_dir = next_run()
                print(f"== {label} ==", flush=True)
                t0 = time.time()
                rows = run_text(cfg, run_dir, url, log=lambda message: print("  ", message, flush=True))
                print(f"   {time.time() - t0:.0f} s", flush=True)
                queue.extend((done and done(run_dir, cfg, rows, t0)) or [])
            return
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        print(f"{len(queue)} runs, {jobs} at a time ({threads} torch thread{'s' * (threads > 1)} each)", flush=True)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_threads, initargs=(threads,)) as pool:
            running = {}
            while queue or running:
                while queue and len(running) < jobs:  # the pool gets one run per free worker, no more
                    label, cfg, run_dir = next_run()
                    running[pool.submit(_run_job, label, cfg, run_dir, url)] = (label, cfg, run_dir)
                finished_now, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished_now:
                    label, cfg, run_dir = running.pop(future)
                    rows, t0, t1 = future.result()
                    print(f"== {label}: done in {t1 - t0:.0f} s ==", flush=True)
                    queue.extend((done and done(run_dir, cfg, rows, t0)) or [])


def _worker_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_job(label: str, cfg, run_dir: Path, engine_url: str) -> tuple[list[dict], float, float]:
    """One run in a worker: its rows, and when it started and ended."""
    t0 = time.time()
    rows = run_text(cfg, run_dir, engine_url, log=lambda message: print(f"   [{label}] {message}", flush=True))
    return rows, t0, time.time()


def run_text(cfg, run_dir: Path, engine_url: str, log=print) -> list[dict]:
    """One text run into `run_dir`: resumed from its checkpoint, or started over if it was cut before one."""
    from explorer.run.checkpoints import has_checkpoint
    from explorer.run.experiment import run_experiment

    resume = has_checkpoint(run_dir)
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    return run_experiment(cfg, run_dir, engine_url=engine_url, progress=False, resume=resume, log=log)


def web_base_rate(config: Path, seed: int, overrides: dict) -> tuple[float, int, int]:
    """(share of the target topic among web documents a run can acquire, on-topic count, web size):
    the web minus the target and held-out documents of this seed's split."""
    from explorer.run.config import load_config
    from explorer.run.text import open_text_corpus
    from explorer.web.text_corpus import split_text_target

    cfg = load_config(config, {**overrides, "seed": seed})
    corpus = open_text_corpus(cfg)
    tc = cfg.text
    target = split_text_target(corpus.documents(), tc.topic, holdout_fraction=tc.holdout_fraction,
                               target_fraction=tc.target_fraction, seed=seed)
    web = len(corpus.documents()) - len(target.train) - len(target.holdout)
    return len(target.on_web) / web, len(target.on_web), web


def summarise(run_dir: Path) -> dict:
    """Final perplexity, what was accepted, and the curve of perplexity against tokens acquired."""
    rows = read_metrics(run_dir)
    accepted = [json.loads(line) for line in (run_dir / "accepted.jsonl").read_text().splitlines()
                if line.strip()] if (run_dir / "accepted.jsonl").exists() else []
    relevant = sum(1 for a in accepted if a["relevant"])
    start = rows[0]["tokens_available"]
    fetched = [(r["valid"], r["precision_fetched"]) for r in rows[1:] if r.get("valid")]
    valid = sum(v for v, _ in fetched)
    return {"perplexity": rows[-1]["eval_perplexity"], "log_ppl": math.log(rows[-1]["eval_perplexity"]),
            "documents": len(accepted), "relevant": relevant,
            "precision": relevant / len(accepted) if accepted else math.nan,
            # before acceptance: the topic's share of the new documents the queries found (the policy's part)
            "precision_fetched": sum(v * p for v, p in fetched) / valid if valid else math.nan,
            "tokens_acquired": rows[-1]["tokens_available"] - start,
            "tokens_trained": rows[-1]["tokens_trained"], "train_flops": rows[-1]["flops"]["train"],
            "acquisition_flops": sum(rows[-1]["flops"][k] for k in ("query", "fetch", "score")),
            "seconds": sum(r.get("seconds", 0.0) for r in rows),
            # the count floor of the target's own tokens (runs since the count baselines; nan before)
            **{f"count_{n}_ppl": math.exp(rows[0][f"count_{n}_loss"]) if f"count_{n}_loss" in rows[0] else math.nan
               for n in ("unigram", "bigram", "bigram_base")},
            "curve": [(r["tokens_available"] - start, r["eval_perplexity"]) for r in rows]}


def paired(per_seed: dict[int, dict], name: str, reference: str, key: str = "log_ppl") -> tuple[np.ndarray, tuple]:
    """Per seed `reference` - `name` (positive: `name` is better), and its mean, 95% half-width, n."""
    from explorer.analysis.report import mean_ci

    diffs = np.array([s[reference][key] - s[name][key] for s in per_seed.values() if name in s and reference in s])
    return diffs, mean_ci(diffs)


def write_report(per_seed: dict[int, dict], rates: dict[int, tuple], out: Path) -> Path:
    from explorer.analysis.report import fmt, mean_ci

    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in CONDITIONS if any(n in s for s in per_seed.values())]
    with (out / "runs.csv").open("w", newline="") as f:
        fields = ["seed", "condition", "perplexity", "documents", "relevant", "precision", "precision_fetched",
                  "tokens_acquired",
                  "tokens_trained", "train_flops", "acquisition_flops", "seconds", "count_unigram_ppl",
                  "count_bigram_ppl", "count_bigram_base_ppl"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for seed, conds in per_seed.items():
            for name, s in conds.items():
                writer.writerow({"seed": seed, "condition": name, **s})
    base = np.array([rates[s][0] for s in per_seed])
    lines = ["# Experiment 6: text acquisition at equal training FLOPs", "",
             f"Seeds {', '.join(map(str, per_seed))}; mean ± 95% t-interval over seeds. Δ log ppl = the same seed's "
             "target-only (or random) log-perplexity minus the condition's: positive is better. Base rate: the "
             f"target topic's share of the web a run can acquire from, {fmt(*mean_ci(base)[:2])} "
             f"({', '.join(f'{rates[s][1]} of {rates[s][2]}' for s in per_seed)} documents).", "",
             "| condition | n | held-out ppl | Δ log ppl vs target only | per seed | Δ log ppl vs random "
             "| Δ log ppl vs gp | documents accepted | on topic | precision | precision / base rate "
             "| precision fetched | tokens acquired |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary = {"base_rate": mean_ci(base)[:2]}
    # the floor: counts on the target's own tokens (each seed's, once), and on the base LM's corpus with them
    for n, what in (("unigram", "the target's tokens"), ("bigram", "the target's tokens"),
                    ("bigram_base", "the base's corpus and the target's tokens")):
        floor = mean_ci(x for conds in per_seed.values()
                        for x in [next(iter(conds.values()))[f"count_{n}_ppl"]] if math.isfinite(x))
        if floor[2]:
            lines.append(f"| count {n.replace('_base', '')} ({what}) | {floor[2]} | {fmt(*floor[:2], 1)} "
                         "| | | | | | | | | | |")
            summary[f"count_{n}"] = {"n": floor[2], "perplexity": floor[:2]}
    for name in names:
        mine = [s[name] for s in per_seed.values() if name in s]
        ppl = mean_ci(m["perplexity"] for m in mine)
        row = {"n": len(mine), "perplexity": ppl[:2]}
        cells = [f"| {name} | {len(mine)} | {fmt(*ppl[:2], 1)}"]
        if name == "target-only":
            cells.append("| | | | | | | | | | |")
        else:
            diffs, d = paired(per_seed, name, "target-only")
            vs_random = paired(per_seed, name, "random")[1] if name != "random" else None
            vs_gp = paired(per_seed, name, "gp")[1] if name not in ("gp", "target-only") and "gp" in names else None
            precision = mean_ci(m["precision"] for m in mine)
            ratio = mean_ci(m["precision"] / rates[seed][0] for seed, s in per_seed.items()
                            for m in [s.get(name)] if m is not None)
            cells += [f"| {fmt(d[0], d[1], 4)} | {' / '.join(f'{x:+.4f}' for x in diffs)}",
                      f"| {fmt(vs_random[0], vs_random[1], 4) if vs_random else ''}",
                      f"| {fmt(vs_gp[0], vs_gp[1], 4) if vs_gp and vs_gp[2] else ''}",
                      f"| {fmt(*mean_ci(m['documents'] for m in mine)[:2], 0)}",
                      f"| {fmt(*mean_ci(m['relevant'] for m in mine)[:2], 0)}",
                      f"| {fmt(*precision[:2])} | {fmt(*ratio[:2], 1)}",
                      f"| {fmt(*mean_ci(m['precision_fetched'] for m in mine)[:2])}",
                      f"| {fmt(*mean_ci(m['tokens_acquired'] for m in mine)[:2], 0)} |"]
            row.update({"delta_log_ppl": d[:2], "per_seed": diffs.tolist(), "precision": precision[:2],
                        "precision_over_base": ratio[:2],
                        "delta_log_ppl_vs_random": vs_random[:2] if vs_random else None,
                        "delta_log_ppl_vs_gp": vs_gp[:2] if vs_gp and vs_gp[2] else None})
        lines.append(" ".join(cells))
        summary[name] = row
    ratio = "random" in names and "gp" in names
    lines += ["", "Per seed: documents accepted (on topic) = precision / base rate"
              + ("; gp's on-topic documents over random's, and gp's precision over random's before acceptance "
                 "(of every new document its queries found: the policy's part, value acceptance aside):"
                 if ratio else ":"), "",
              "| seed | base rate | " + " | ".join(n for n in names if n != "target-only")
              + (" | gp / random on topic | gp / random precision fetched |" if ratio else " |"),
              "|---:|---:|" + "---:|" * (len(names) - 1) + ("---:|---:|" if ratio else "")]
    for seed, conds in per_seed.items():
        cells = [f"{conds[n]['documents']} ({conds[n]['relevant']}) = {conds[n]['precision'] / rates[seed][0]:.1f}x"
                 if n in conds and conds[n]["documents"] else "0" for n in names if n != "target-only"]
        if ratio and "gp" in conds and "random" in conds:
            cells.append(f"{conds['gp']['relevant'] / max(1, conds['random']['relevant']):.1f}x")
            cells.append(f"{conds['gp']['precision_fetched']:.3f} / {conds['random']['precision_fetched']:.3f} = "
                         f"{conds['gp']['precision_fetched'] / conds['random']['precision_fetched']:.1f}x")
        lines.append(f"| {seed} | {rates[seed][0]:.3f} | " + " | ".join(cells) + " |")
    pairs = [(a, b) for a, b in PAIRS if a in names and b in names]
    if pairs:
        lines += ["", "Pairs (paired by seed; Δ log ppl = the second's log-perplexity minus the first's: positive, "
                  "the first is better; 95% t-interval, no correction for the number of pairs):", "",
                  "| first | second | n | Δ log ppl | per seed | tokens acquired, first / second |",
                  "|---|---|---:|---:|---|---|"]
        for a, b in pairs:
            diffs, d = paired(per_seed, a, b)
            toks = [mean_ci(s[x]["tokens_acquired"] for s in per_seed.values() if x in s)[0] for x in (a, b)]
            lines.append(f"| {a} | {b} | {d[2]} | {fmt(d[0], d[1], 4)} | {' / '.join(f'{x:+.4f}' for x in diffs)} "
                         f"| {toks[0]:,.0f} / {toks[1]:,.0f} |")
            summary[f"{a} - {b}"] = {"delta_log_ppl": d[:2], "n": d[2], "per_seed": diffs.tolist()}
    first = next(iter(per_seed.values()))
    lines += ["", f"Every run trained {first[names[0]]['tokens_trained']:,} tokens "
              f"({first[names[0]]['train_flops']:.3g} training FLOPs); acquisition FLOPs (queries, fetch, MiniLM "
              "scoring) are in runs.csv."]
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_curves(per_seed, names, out / "curves.png")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def plot_curves(per_seed: dict[int, dict], names: list[str], path: Path) -> None:
    """Left: perplexity against tokens acquired, every run. Right: the gain over the same seed's
    target-only run at each evaluation (mean over seeds), which separates acquisition from training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(names):
        gains = []
        for j, conds in enumerate(per_seed.values()):
            if name not in conds:
                continue
            x, y = zip(*conds[name]["curve"])
            left.plot(x, y, marker=".", color=f"C{i}", alpha=0.8, label=name if j == 0 else None)
            if "target-only" in conds:
                control = [p for _, p in conds["target-only"]["curve"]]
                gains.append([math.log(c) - math.log(p) for c, p in zip(control, y)])
        if gains and name != "target-only":
            n = min(map(len, gains))
            right.plot(range(n), np.mean([g[:n] for g in gains], axis=0), marker="o", color=f"C{i}", label=name)
    left.set_xlabel("tokens acquired")
    left.set_ylabel("held-out target perplexity")
    left.set_title("every run (equal training steps)")
    left.legend()
    right.axhline(0.0, color="grey", lw=0.8)
    right.set_xlabel("iteration (0 = after pretraining on the target)")
    right.set_ylabel("log ppl of target-only minus the run's")
    right.set_title(f"gain over target-only, mean of {len(per_seed)} seeds")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def text_bench_parser(doc: str, runs: Path, out: Path, seeds: list[int]) -> argparse.ArgumentParser:
    """The options both text benchmarks take: config, run folders, outputs, seeds, threads, --set."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "text-science.yaml")
    parser.add_argument("--runs", type=Path, default=runs, help=f"run folders (default {runs.relative_to(ROOT)})")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs at a time, each in a worker process of its own (default 2: one per core on "
                             "2 cores; 1: in this process, one after another)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of every run (default 1; a run's numbers do not depend on it)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field for every run (use another --runs)")
    return parser


def text_bench_setup(args: argparse.Namespace) -> dict:
    """Sets torch's threads; returns the --set overrides."""
    import torch

    from explorer.run.config import parse_overrides

    if args.jobs < 1 or args.threads < 1:
        raise SystemExit("--jobs and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    return parse_overrides(args.set)


def main(argv: list[str] | None = None) -> int:
    parser = text_bench_parser(__doc__, DEFAULT_RUNS, ROOT / "bench" / "results" / "text_acquisition", [0, 1, 2, 3, 4])
    parser.add_argument("--conditions", nargs="+", default=DEFAULT_CONDITIONS, choices=list(CONDITIONS))
    args = parser.parse_args(argv)

    from explorer.run.config import load_config

    overrides = text_bench_setup(args)
    run_grid(args.config, args.runs, args.seeds, args.conditions, overrides, args.jobs, args.threads)
    iterations = load_config(args.config, overrides).iterations
    per_seed = {}
    for seed in args.seeds:
        conds = {name: summarise(args.runs / f"seed-{seed}" / name) for name in CONDITIONS
                 if finished(args.runs / f"seed-{seed}" / name, iterations)}
        if conds:
            per_seed[seed] = conds
    rates = {seed: web_base_rate(args.config, seed, overrides) for seed in per_seed}
    report = write_report(per_seed, rates, args.out)
    write_machine(args.out, "python bench/exp_text_acquisition.py " + " ".join(argv or sys.argv[1:]))
    print(report.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
