"""Query policies on the real vocabulary and the real local engine, without the learner.

A run of the grid costs ~4 minutes, so three seeds are all it can say about a policy's design. This
simulation says more in seconds: for every concept of the config's vocabulary, the local engine's
top `search.results_per_query` results (searched in-process with the ranking the HTTP engine
serves) are counted by the web's hidden source, once (cached beside the corpus). A simulated run
then plays a policy for the config's iterations x queries; each result is accepted with its
source's pass rate and a query's reward is its accepted results per result asked for, as
`reward.query: yield` counts it. The pass rates model acceptance by value: 0.9 for the target's
kind, 0.4 for a look-alike source, 0.03 for the rest, chosen to match yields the grid's runs logged
(seed 2: 'shoe' 40 Fashion-MNIST results, yield 0.83; 'digital computer' 39 digits, 0.50; 'two' 40
digits, 0.23; 'computer' 40 clip-arts, 0.11). *Relevant* = accepted results of the target's kind.
A seed sets the policy's seed and the acceptance draws; random and every GP variant of a seed
issue the same first round (`explore_first` = one round).

Targets: fashion-mnist (MNIST digits the look-alike, as under the science config's encoder) and
mnist without a look-alike (its kind is rare: the concepts whose results hold digits are few).
Variants: how the GP embeds a concept (`name`: the query text, what the engine sees; `gloss`: the
text with its WordNet gloss) x acquisition (softmax / ucb) x `explore_share` (0 / 0.25).

    python bench/exp_policy_simulation.py                 # 60 seeds, ~6 minutes on 2 cores
    python bench/exp_policy_simulation.py --seeds 10
Outputs bench/results/policy_simulation/ (or --out): runs.csv (one row per target, variant, seed),
summary.csv, summary.md, machine.json.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import write_machine, write_rows

# target -> (its source, {source: pass rate}); sources not named pass at OTHER
TARGETS = {
    "fashion-mnist": ("fashion-mnist", {"fashion-mnist": 0.9, "mnist": 0.4}),
    "mnist": ("mnist", {"mnist": 0.9}),
}
OTHER = 0.03
VARIANTS = [dict(embedding=e, acquisition=a, explore_share=s)
            for e, a, s in itertools.product(("gloss", "name"), ("softmax", "ucb"), (0.0, 0.25))]


def source_counts(cfg, corpus, vocab) -> tuple[np.ndarray, list[str]]:
    """(concepts, sources) counts of each concept's top-n local results by hidden source (cached)."""
    from tqdm import tqdm

    from explorer.web.engine import HybridIndex
    from explorer.web.text_encoder import default_encoder

    n = cfg.search.results_per_query
    sources = sorted(set(np.asarray(corpus.hidden["source"]).tolist()))
    digest = hashlib.sha256("\n".join(vocab.concepts).encode()).hexdigest()[:16]
    path = corpus.root / f"source-counts-{digest}-{n}.npy"
    if path.exists():
        return np.load(path), sources
    index = HybridIndex(corpus, default_encoder())
    column = {s: j for j, s in enumerate(sources)}
    hidden = np.asarray(corpus.hidden["source"])
    counts = np.zeros((len(vocab), len(sources)), np.int32)
    for i, text in enumerate(tqdm(vocab.concepts, desc="results by source", unit="concept")):
        hits, _ = index.search(text, 0, n)
        for hit in hits:
            counts[i, column[hidden[hit.item]]] += 1
    np.save(path, counts)
    return counts, sources


def simulate(policy, counts: np.ndarray, pass_rates: np.ndarray, column: int, rounds: int,
             per_round: int, results: int, seed: int) -> list[int]:
    """Relevant results accepted per round, the policy hearing each query's simulated yield."""
    rng = np.random.default_rng(10_000 + seed)
    found = []
    for _ in range(rounds):
        queries = policy.propose(per_round)
        accepted = rng.binomial(counts[[q.concept for q in queries]], pass_rates)  # (queries, sources)
        policy.update(queries, list(accepted.sum(axis=1) / results))
        found.append(int(accepted[:, column].sum()))
    return found


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for (target, variant), group in itertools.groupby(rows, key=lambda r: (r["target"], r["variant"])):
        group = list(group)
        ratio = np.array([r["relevant"] / max(r["random_relevant"], 1) for r in group])
        relevant = np.array([r["relevant"] for r in group])
        empty = [r for r in group if r["first_round_relevant"] == 0]
        out.append({"target": target, "variant": variant, "seeds": len(group),
                    "relevant_mean": round(float(relevant.mean()), 1),
                    "random_mean": round(float(np.mean([r["random_relevant"] for r in group])), 1),
                    "median_ratio": round(float(np.median(ratio)), 2), "min_ratio": round(float(ratio.min()), 2),
                    "seeds_2x": int((ratio >= 2).sum()),
                    "empty_first_round": len(empty),
                    "empty_first_round_2x": sum(r["relevant"] >= 2 * max(r["random_relevant"], 1) for r in empty)})
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| target | variant | seeds | relevant (mean) | random (mean) | median ratio | min ratio | "
             "seeds ≥ 2× random | of those with an empty first round |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['target']} | {s['variant']} | {s['seeds']} | {s['relevant_mean']:.0f} | "
                     f"{s['random_mean']:.0f} | {s['median_ratio']:.2f} | {s['min_ratio']:.2f} | "
                     f"{s['seeds_2x']}/{s['seeds']} | {s['empty_first_round_2x']}/{s['empty_first_round']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "science.yaml")
    parser.add_argument("--seeds", type=int, default=60, help="seeds 0..N-1 (default 60)")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "policy_simulation")
    args = parser.parse_args(argv)

    from explorer.run.assembly import concept_embeddings
    from explorer.run.config import load_config
    from explorer.run.image import image_vocabulary
    from explorer.web.presets import open_image_corpus
    from policies import build_policy

    cfg = load_config(args.config)
    corpus = open_image_corpus(cfg.corpus, progress=True)  # a preset not built yet is built now
    vocab = image_vocabulary(cfg, corpus)
    counts, sources = source_counts(cfg, corpus, vocab)
    embeddings = {"name": concept_embeddings(vocab, corpus.root, glosses=False),
                  "gloss": concept_embeddings(vocab, corpus.root, glosses=True)}
    concepts = list(vocab.concepts)
    play = dict(counts=counts, rounds=cfg.iterations, per_round=cfg.policy.queries_per_iteration,
                results=cfg.search.results_per_query)
    rows = []
    for target in args.targets:
        source, rates = TARGETS[target]
        pass_rates = np.array([rates.get(s, OTHER) for s in sources])
        column = sources.index(source)
        print(f"== {target}: {int((counts[:, column] > 0).sum())} of {len(vocab)} concepts return "
              f"its kind ==", flush=True)
        random_found = {seed: simulate(build_policy("random", concepts=concepts, seed=seed), pass_rates=pass_rates,
                                       column=column, seed=seed, **play) for seed in range(args.seeds)}
        for variant in VARIANTS:
            start = time.perf_counter()
            name = f"{variant['embedding']}-{variant['acquisition']}-share{variant['explore_share']:g}"
            for seed in range(args.seeds):
                policy = build_policy("gp", concepts=concepts, seed=seed, embeddings=embeddings[variant["embedding"]],
                                      acquisition=variant["acquisition"], explore_share=variant["explore_share"],
                                      explore_first=cfg.policy.queries_per_iteration)
                found = simulate(policy, pass_rates=pass_rates, column=column, seed=seed, **play)
                rows.append({"target": target, "variant": name, "seed": seed, "relevant": sum(found),
                             "random_relevant": sum(random_found[seed]), "first_round_relevant": found[0],
                             "per_round": " ".join(map(str, found)),
                             "random_per_round": " ".join(map(str, random_found[seed]))})
            last = summarise([r for r in rows if r["target"] == target and r["variant"] == name])[0]
            print(f"{name:24s} relevant {last['relevant_mean']:7.1f} (random {last['random_mean']:.1f})  "
                  f"seeds >= 2x random {last['seeds_2x']}/{last['seeds']}  min ratio {last['min_ratio']:.2f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_rows(args.out, "runs", rows)
    summary = summarise(rows)
    write_rows(args.out, "summary", summary)
    (args.out / "summary.md").write_text(markdown(summary))
    write_machine(args.out, "python bench/exp_policy_simulation.py " + " ".join(argv or sys.argv[1:]))
    print(markdown(summary))


if __name__ == "__main__":
    main()
