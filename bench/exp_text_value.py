"""Experiment 6c - the value of text: how much can acquired text give the LM at this budget?

The text side's value-of-data ceiling (the image side's is experiment 0). Every condition of a
seed is the config's text run with `text.strategy: train` (it never queries): the same target
split, LM initialisation, steps and batch order, so training FLOPs are equal; what differs is the
documents added to the token stream before the first step, drawn once from the web the agent
could acquire from (the corpus minus the seed's target and held-out documents, and minus MiniLM
near-copies of held-out ones, as the loop drops them), until they hold the given tokens:

    target only    nothing added (the control every difference is taken against)
    oracle T       documents of the target's topic (the hidden truth: the topic label)
    uniform T      documents drawn uniformly from that web (the topic's share: its base rate)
    off-topic T    documents of the other topics
    accepted T     documents drawn uniformly that the run's own reward accepts (what the agent would
                   keep of a uniform sample; no hidden label; not run by default)

A seed sets the split, the LM's initialisation and batch order, and the draw. Reported: final
held-out perplexity, each condition's paired difference from the same seed's target-only run in
log-perplexity (positive: better), oracle - uniform and uniform - off-topic, mean ± 95% t-interval
over seeds, and the documents and tokens added.

    python bench/exp_text_value.py --config configs/text-regime.yaml --seeds 0 1 2 3 4
    python bench/exp_text_value.py --tokens 30000 120000 --sources oracle uniform off-topic
Outputs bench/results/text_value/: report.md, runs.csv, summary.json, machine.json. Runs in
runs/bench-text-value/seed-S/CONDITION/ (a finished run is skipped; an unfinished one restarts).
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

from bench.machine import finish_report  # noqa: E402

SOURCES = ("oracle", "uniform", "off-topic", "accepted")
DEFAULT_SOURCES = SOURCES[:3]
DEFAULT_RUNS = ROOT / "runs" / "bench-text-value"


def condition_name(source: str | None, tokens: int) -> str:
    return "target-only" if source is None else f"{source} {tokens}"


def web_documents(loop) -> tuple[list[str], np.ndarray]:
    """The texts a run could acquire (the corpus minus its target and held-out documents and
    near-copies of held-out ones) and whether each is of the target's topic (the hidden truth)."""
    from explorer.score.reward import near_duplicates
    from explorer.web.text_corpus import document_key, document_text

    docs = loop.corpus.documents()
    taken = {document_key(d["title"]) for d in loop.target.train + loop.target.holdout}
    rows = [i for i, d in enumerate(docs) if document_key(d["title"]) not in taken]
    copies = near_duplicates(loop.corpus.caption_embeddings()[rows], loop.holdout_sig,
                             loop.cfg.reward.decontaminate_threshold)
    rows = [i for i, copy in zip(rows, copies) if not copy]
    return [document_text(docs[i]) for i in rows], np.array([docs[i]["topic"] == loop.target.topic for i in rows])


def draw_documents(loop, source: str, tokens: int, seed: int) -> tuple[list[list[int]], int]:
    """Token lists of documents of `source`, in a seeded order, until they hold `tokens` tokens."""
    texts, on_topic = web_documents(loop)
    pool = {"oracle": np.flatnonzero(on_topic), "off-topic": np.flatnonzero(~on_topic),
            "uniform": np.arange(len(texts)), "accepted": np.arange(len(texts))}[source]
    order = np.random.default_rng([seed, 7, SOURCES.index(source)]).permutation(pool)
    if source == "accepted":
        order = order[accepted_by_reward(loop, [texts[i] for i in order])]
    drawn, total = [], 0
    for i in order:
        if total >= tokens:
            break
        ids = loop.tokenizer.encode_batch([texts[i]])[0]
        drawn.append(ids)
        total += len(ids)
    if total < tokens:
        raise ValueError(f"the web holds only {total} tokens of {source} documents, fewer than {tokens}")
    return drawn, int(on_topic[order[:len(drawn)]].sum())


def accepted_by_reward(loop, texts: list[str], chunk: int = 256) -> np.ndarray:
    """Which of `texts` the run's reward would accept (its MiniLM kNN reward against the target and
    its accept rule, as a round of `chunk` results) -> bool mask."""
    loop.refresh_reference()
    masks = []
    for start in range(0, len(texts), chunk):
        rewards = loop.space.rewards(loop.encoder.encode(texts[start:start + chunk]))
        masks.append(loop.cfg.reward.accept_mask(rewards, loop.space.calibration))
    return np.concatenate(masks) if masks else np.zeros(0, bool)


def value_run(cfg, run_dir: Path, source: str | None, tokens: int, engine_url: str) -> dict:
    """One condition: the run, with the drawn documents in its stream from the start; its row."""
    from explorer.run.text import TextLoop

    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.time()
    loop = TextLoop(cfg, run_dir, engine_url=engine_url, progress=False)
    added, on_topic = draw_documents(loop, source, tokens, cfg.seed) if source else ([], 0)
    if added:
        loop.training.add_documents(added)
    rows = loop.run(log=lambda line: None)
    loop.close()
    row = {"seed": cfg.seed, "condition": condition_name(source, tokens), "source": source or "target-only",
           "tokens_asked": tokens if source else 0, "documents": len(added), "on_topic": on_topic,
           "tokens_added": sum(map(len, added)), "perplexity": rows[-1]["eval_perplexity"],
           "log_ppl": math.log(rows[-1]["eval_perplexity"]), "tokens_trained": rows[-1]["tokens_trained"],
           "train_flops": rows[-1]["flops"]["train"], "seconds": round(time.time() - t0, 1),
           "count_bigram_ppl": math.exp(rows[0]["count_bigram_loss"]),
           "count_bigram_base_ppl": math.exp(rows[0].get("count_bigram_base_loss", math.nan))}
    (run_dir / "value.json").write_text(json.dumps(row, indent=1) + "\n")
    return row


def _job(config: Path, overrides: dict, seed: int, source: str | None, tokens: int, run_dir: Path, url: str,
         threads: int) -> dict:
    import torch

    from explorer.run.config import load_config

    torch.set_num_threads(threads)
    return value_run(load_config(config, {**overrides, "seed": seed}), run_dir, source, tokens, url)


def run_grid(args, overrides: dict) -> list[dict]:
    """Every (seed, condition) without a finished value.json, `--jobs` at a time; one local engine."""
    from explorer.run.config import load_config
    from explorer.run.experiment import local_engine_for

    todo, rows = [], []
    for seed in args.seeds:
        for source, tokens in [(None, 0)] + [(s, t) for s in args.sources for t in args.tokens]:
            run_dir = args.runs / f"seed-{seed}" / condition_name(source, tokens).replace(" ", "-")
            done = run_dir / "value.json"
            if done.exists():
                rows.append(json.loads(done.read_text()))
            else:
                todo.append((seed, source, tokens, run_dir))
    if not todo:
        return rows
    cfg = load_config(args.config, {**overrides, "seed": args.seeds[0]})
    args.runs.mkdir(parents=True, exist_ok=True)
    with local_engine_for(cfg, progress=True, error_log=args.runs / "engine.log") as url:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        print(f"{len(todo)} runs, {args.jobs} at a time, {args.threads} torch thread(s) each", flush=True)
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_job, args.config, overrides, seed, source, tokens, run_dir, url, args.threads):
                       (seed, source, tokens) for seed, source, tokens, run_dir in todo}
            for future in as_completed(futures):
                row = future.result()
                print(f"== seed {row['seed']}: {row['condition']}: ppl {row['perplexity']:.2f}, "
                      f"{row['tokens_added']:,} tokens added, {row['seconds']:.0f} s ==", flush=True)
                rows.append(row)
    return rows


def paired(rows: list[dict], name: str, reference: str) -> tuple[np.ndarray, tuple]:
    """Per seed reference - name in log-perplexity (positive: `name` is better), and mean ± 95% half-width, n."""
    from explorer.analysis.report import mean_ci

    by = {(r["seed"], r["condition"]): r["log_ppl"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    diffs = np.array([by[s, reference] - by[s, name] for s in seeds if (s, reference) in by and (s, name) in by])
    return diffs, mean_ci(diffs)


def write_report(rows: list[dict], out: Path, command: str) -> list[str]:
    """runs.csv and summary.json in `out`; returns the report's lines."""
    from explorer.analysis.report import fmt, mean_ci

    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["seed"], r["condition"]))
    fields = ["seed", "condition", "source", "tokens_asked", "documents", "on_topic", "tokens_added", "perplexity",
              "tokens_trained", "train_flops", "seconds", "count_bigram_ppl", "count_bigram_base_ppl"]
    with (out / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    names = list(dict.fromkeys(r["condition"] for r in sorted(rows, key=lambda r: (r["tokens_asked"], r["source"]))))
    seeds = sorted({r["seed"] for r in rows})
    lines = ["# Experiment 6c: the value of text at equal training FLOPs", "",
             f"`{command}`. Seeds {', '.join(map(str, seeds))}; mean ± 95% t-interval over seeds. Δ log ppl = the "
             "same seed's reference log-perplexity minus the condition's: positive is better.", "",
             "| condition | n | held-out ppl | Δ log ppl vs target only | per seed | documents added (on topic) "
             "| tokens added |", "|---|---:|---:|---:|---|---:|---:|"]
    summary = {}
    for key, what in (("count_bigram_ppl", "the target's tokens"),
                      ("count_bigram_base_ppl", "the base LM's corpus and the target's tokens")):
        per_seed = {r["seed"]: r[key] for r in rows if math.isfinite(r.get(key, math.nan))}
        if per_seed:
            floor = mean_ci(per_seed.values())
            lines.append(f"| count bigram ({what}) | {floor[2]} | {fmt(*floor[:2], 1)} | | | | |")
            summary[key.removesuffix("_ppl")] = {"n": floor[2], "perplexity": floor[:2]}
    for name in names:
        mine = [r for r in rows if r["condition"] == name]
        ppl = mean_ci(r["perplexity"] for r in mine)
        cells = [f"| {name} | {len(mine)} | {fmt(*ppl[:2], 1)}"]
        summary[name] = {"n": len(mine), "perplexity": ppl[:2]}
        if name == "target-only":
            cells.append("| | | | |")
        else:
            diffs, d = paired(rows, name, "target-only")
            cells += [f"| {fmt(d[0], d[1], 4)} | {' / '.join(f'{x:+.4f}' for x in diffs)}",
                      f"| {fmt(*mean_ci(r['documents'] for r in mine)[:2], 0)} "
                      f"({fmt(*mean_ci(r['on_topic'] for r in mine)[:2], 0)})",
                      f"| {fmt(*mean_ci(r['tokens_added'] for r in mine)[:2], 0)} |"]
            summary[name].update(delta_log_ppl=d[:2], per_seed=diffs.tolist())
        lines.append(" ".join(cells))
    lines += ["", "Between sources at equal tokens (paired by seed, Δ log ppl):", ""]
    for tokens in sorted({r["tokens_asked"] for r in rows if r["tokens_asked"]}):
        for better, worse in (("oracle", "uniform"), ("uniform", "off-topic"), ("oracle", "off-topic")):
            a, b = f"{better} {tokens}", f"{worse} {tokens}"
            if a in names and b in names:
                diffs, d = paired(rows, a, b)
                per_seed = " / ".join(f"{x:+.4f}" for x in diffs)
                lines.append(f"- {a} − {b}: {fmt(d[0], d[1], 4)} (n = {d[2]}; {per_seed})")
                summary[f"{a} - {b}"] = {"delta_log_ppl": d[:2], "per_seed": diffs.tolist()}
    trained = {r["tokens_trained"] for r in rows}
    lines += ["", f"Every run trained {', '.join(f'{t:,}' for t in sorted(trained))} tokens."]
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "text-regime.yaml")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "text_value")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(DEFAULT_SOURCES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[30_000],
                        help="tokens of added documents per condition (the text grid's gp acquired 14k-45k)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)

    from explorer.run.config import parse_overrides

    overrides = {**parse_overrides(args.set), "text.strategy": "train"}
    rows = run_grid(args, overrides)
    command = "python bench/exp_text_value.py " + " ".join(argv if argv is not None else sys.argv[1:])
    finish_report(args.out, write_report(rows, args.out, command), command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
