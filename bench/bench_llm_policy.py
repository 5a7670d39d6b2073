"""Cost of the pretrained-LLM query policies: load, generation per query, PPO update, peak memory.

Builds `ppo` (Gemma 3 270M + LoRA, policies/ppo_llm.py) over a sample of WordNet nouns and plays
`--rounds` rounds of propose(`--batch`) + update as the acquisition loop does, with a toy reward
(the share of a query's words naming clothes or shoes) standing in for the search: the cost of a
round does not depend on where its rewards come from. Then `llm-prompt` (the same LM, no updates)
and `hybrid` (GP seeds, `candidates_per_query` LM expansions each) for comparison. Measured in one
fresh process per policy, so each peak RSS is that policy's alone; torch threads set by --threads.

    python bench/bench_llm_policy.py                     # ppo, llm-prompt, hybrid; 16 queries, 3 rounds
    python bench/bench_llm_policy.py --policies ppo --rounds 5
    python bench/bench_llm_policy.py --policies ppo --option ppo_epochs=2 --option ppo_minibatch=16
    python bench/bench_llm_policy.py --earlier-defaults  # ppo as measured before its defaults changed

`ppo` runs at its defaults (policies.ppo_llm.PPO_DEFAULTS: 2 epochs, 12-token queries, bf16 base,
novelty by meaning); the rows of BENCHMARKS.md 8 whose options read "-" and predate them were
measured at the earlier ones (PPO_EARLIER_DEFAULTS: 4 epochs, 24 tokens, float32), which
`--earlier-defaults` restores.
Outputs bench/results/llm_policy/: report.md, results.csv/json, machine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = {"shoe", "shoes", "boot", "boots", "sandal", "sandals", "sneaker", "sneakers", "dress", "shirt", "coat",
         "jacket", "trousers", "pants", "bag", "handbag", "sweater", "pullover", "heel", "heels", "skirt", "t-shirt"}


def toy_reward(text: str) -> float:
    words = text.lower().replace(",", " ").split()
    return sum(w in WORDS for w in words) / max(1, len(words))


def measure(name: str, batch: int, rounds: int, threads: int, vocabulary: int, extra: dict | None = None,
            earlier: bool = False) -> dict:
    """One policy in this process: load, then `rounds` rounds; seconds and peak RSS."""
    import torch

    torch.set_num_threads(threads)
    import numpy as np

    from explorer.web.vocabulary import cached_wordnet, query_nouns
    from policies import build_policy

    nouns = query_nouns(cached_wordnet(), max_words=2, exclude_proper=True)
    concepts = sorted(np.random.default_rng(0).choice(nouns, size=min(vocabulary, len(nouns)), replace=False).tolist())
    pinned = {}
    if earlier and name == "ppo":
        from policies.ppo_llm import PPO_EARLIER_DEFAULTS as pinned
    options = {"target_description": "product photos of clothes, shoes and bags on a plain background", **pinned,
               **(extra or {})}
    if name == "hybrid":
        from explorer.web.text_encoder import default_encoder
        options["embeddings"] = default_encoder().encode(concepts)
    t0 = time.perf_counter()
    policy = build_policy(name, concepts=concepts, seed=0, **options)
    load = time.perf_counter() - t0
    per_round = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        queries = policy.propose(batch)
        propose = time.perf_counter() - t0
        rewards = [toy_reward(q.text) for q in queries]
        t0 = time.perf_counter()
        policy.update(queries, rewards)
        update = time.perf_counter() - t0
        per_round.append({"propose_s": propose, "update_s": update, "generate_s": policy.stats.get("generate_seconds", 0.0),
                          "ppo_s": policy.stats.get("ppo_seconds", 0.0), "mean_reward": sum(rewards) / len(rewards),
                          "kl": policy.stats.get("kl_to_reference"), "queries": [q.text for q in queries]})
    later = per_round[1:] or per_round
    mean = lambda key: sum(r[key] for r in later) / len(later)  # noqa: E731
    shown = " ".join(f"{k}={v}" for k, v in (extra or {}).items()) or "-"
    return {"policy": name, "options": f"earlier defaults, {shown}" if pinned else shown,
            "batch": batch, "rounds": rounds, "threads": threads, "load_s": round(load, 2),
            "propose_s": round(mean("propose_s"), 2), "generate_s": round(mean("generate_s"), 2),
            "generate_per_query_s": round(mean("generate_s") / batch, 3), "update_s": round(mean("update_s"), 2),
            "ppo_s": round(mean("ppo_s"), 2), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "cleanup": dict(getattr(policy, "cleanup", {})), "mean_reward_per_round": [round(r["mean_reward"], 3) for r in per_round],
            "kl_per_round": [r["kl"] for r in per_round], "last_queries": per_round[-1]["queries"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=["ppo", "llm-prompt", "hybrid"],
                        choices=["ppo", "llm-prompt", "hybrid"])
    parser.add_argument("--batch", type=int, default=16, help="queries per round (the science config's)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the first is reported apart (warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocabulary", type=int, default=2000, help="concepts: WordNet nouns, a seeded sample")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "llm_policy")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a policy option (LLMPolicyConfig field) for every policy measured, e.g. --option "
                             "ppo_epochs=2 --option ppo_minibatch=16 (repeatable)")
    parser.add_argument("--earlier-defaults", action="store_true",
                        help="ppo at its defaults before BENCHMARKS 8's configuration became them (--option wins)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: measure one policy
    args = parser.parse_args(argv)
    from explorer.run.config import parse_overrides

    extra = parse_overrides(args.option)  # KEY=VALUE, values read as YAML scalars
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.rounds, args.threads, args.vocabulary, extra,
                                 args.earlier_defaults)))
        return 0
    from bench.machine import finish_report, write_rows

    rows = []
    for name in args.policies:
        print(f"== {name} ==", flush=True)
        out = subprocess.run([sys.executable, __file__, "--one", name, "--batch", str(args.batch), "--rounds",
                              str(args.rounds), "--threads", str(args.threads), "--vocabulary", str(args.vocabulary),
                              *[f"--option={pair}" for pair in args.option],
                              *(["--earlier-defaults"] if args.earlier_defaults else [])],
                             capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1], indent=1), flush=True)
    write_rows(args.out, "results", rows)
    lines = ["# Cost of the LLM query policies (Gemma 3 270M, LoRA rank 8, CPU)", "",
             f"{args.batch} queries per round, {args.rounds} rounds (the first left out of the means), "
             f"{args.threads} torch threads, one fresh process per policy.", "",
             "| policy | options | load s | propose s | of which generation s | generation s / query | update s "
             "| of which PPO s | peak RSS MiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['options']} | {r['load_s']} | {r['propose_s']} | {r['generate_s']} | {r['generate_per_query_s']} "
                     f"| {r['update_s']} | {r['ppo_s']} | {r['peak_rss_mib']} |")
    finish_report(args.out, lines, "python bench/bench_llm_policy.py " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
