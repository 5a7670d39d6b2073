"""PPO against its prompt-only ablation over many rounds, on the simulated acquisition reward.

The grid (BENCHMARKS section 8) runs the LLM policies for 5 iterations, ~160 s each for ppo, most of
it the learner; there PPO did not improve on the prompt alone. This asks how many rounds PPO needs,
without the learner: the policies of the grid (`configs/science.yaml`'s policy options, the target's
description in the LLM's prompt) play `--rounds` rounds of 16 queries against the simulation of
`bench/exp_policy_simulation.py`: a query's top `search.results_per_query` results on the real
local web (searched in-process with the ranking the HTTP engine serves, so free-text LLM queries
are answered as the engine would). Each item of the web passes acceptance or not, drawn once per
seed with its hidden source's pass rate (0.9 for Fashion-MNIST, 0.4 for MNIST digits, the
look-alike, 0.03 for the rest), so every policy of a seed meets the same accepted items; as in the
loop, an item accepted before comes back `already_accepted` and counts nothing, so a policy that
repeats itself in other words finds nothing new. A query's reward is its newly accepted items per
result asked for (`reward.query: yield`). *Relevant* = newly accepted Fashion-MNIST items. A seed
sets the policy (the LLM's sampling, the GP's draws) and the acceptance draws; ppo and llm-prompt
of a seed issue the same first round.

    python bench/exp_llm_simulation.py                          # 4 seeds x 15 rounds: ~2 h on 2 cores
    python bench/exp_llm_simulation.py --seeds 0 --rounds 3 --policies random llm-prompt
Outputs bench/results/llm_simulation/: report.md, rounds.csv (one row per seed, policy and round,
with its queries), curves.png, machine.json. A run's rounds are kept in runs/llm-simulation/ as
they finish; a finished run is skipped, an unfinished one starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.exp_policy_simulation import OTHER, TARGETS
from bench.machine import write_machine, write_rows
from policies.ppo_llm import PPO_EARLIER_DEFAULTS

SHAPED = {"reward_shape": "log", "novelty_bonus": 0.2, "novelty_measure": "words", "found_in_prompt": 8,
          "kl_target": 1.0, "ppo_epochs": 2, "max_query_tokens": 12, "base_dtype": "bfloat16"}
MEANING = {**SHAPED, "novelty_bonus": 0.3, "novelty_measure": "meaning"}
# name -> (policy, options): the grid's conditions (bench/acquisition_grid.py), then the PPO issue's
POLICIES = {
    "random": ("random", {}),
    "gp-ucb": ("gp", {"acquisition": "ucb", "explore_first": 16}),
    "llm-prompt": ("llm-prompt", {}),
    "ppo": ("ppo", PPO_EARLIER_DEFAULTS),  # `ppo` as first measured (its defaults are now ppo-meaning-nofound's)
    # the options of issue "PPO that earns its cost" (policies/ppo_llm.py), at the <= 15 s round's settings
    "ppo-shaped": ("ppo", SHAPED),
    # development (seeds 98-99): novelty by meaning instead of words, then also a tighter KL target;
    # ppo-meaning against llm-prompt is the pre-registered comparison (seeds 40-47, BENCHMARKS 8)
    "ppo-meaning": ("ppo", MEANING),
    "ppo-meaning-kl": ("ppo", {**MEANING, "kl_target": 0.3}),
    # diagnostic, after the pre-registered run: the prompt alone with ppo-meaning's found-list
    "llm-prompt-found": ("llm-prompt", {"found_in_prompt": MEANING["found_in_prompt"]}),
    # ppo-meaning without the found-list: pre-registered against llm-prompt on seeds 48-55 (BENCHMARKS 8)
    "ppo-meaning-nofound": ("ppo", {**MEANING, "found_in_prompt": 0}),
}
TARGET = "fashion-mnist"
DEFAULT_RUNS = ROOT / "runs" / "llm-simulation"


class SimulatedWeb:
    """The items a query text returns (the vocabulary's searched once and cached beside the corpus in
    memory, the rest searched when first issued) and each item's hidden source."""

    def __init__(self, cfg, corpus, vocab):
        from explorer.web.engine import HybridIndex
        from explorer.web.text_encoder import default_encoder

        self.n = cfg.search.results_per_query
        hidden = np.asarray(corpus.hidden["source"])
        self.sources = sorted(set(hidden.tolist()))
        self.source_of = np.searchsorted(self.sources, hidden)  # item -> column of its source
        self.index = HybridIndex(corpus, default_encoder())
        self.cache: dict[str, np.ndarray] = {}

    def acceptance(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Per item: whether it passes acceptance in this seed, and whether it is relevant (the target's source)."""
        source, rates = TARGETS[TARGET]
        pass_rates = np.array([rates.get(s, OTHER) for s in self.sources])
        passes = np.random.default_rng(10_000 + seed).random(len(self.source_of)) < pass_rates[self.source_of]
        return passes, self.source_of == self.sources.index(source)

    def items(self, text: str) -> np.ndarray:
        if text not in self.cache:
            self.cache[text] = np.array([hit.item for hit in self.index.search(text, 0, self.n)[0]], np.int64)
        return self.cache[text]


def accept_round(texts: list[str], web: SimulatedWeb, passes: np.ndarray,
                 accepted_before: np.ndarray) -> tuple[list[np.ndarray], int, int]:
    """One round's queries in order, marking what they accept in `accepted_before`: per query the items
    accepted now that were not accepted before, then how many results passed acceptance and how many
    of those had been accepted before."""
    new, passing, repeated = [], 0, 0
    for text in texts:
        items = web.items(text)
        items = items[passes[items]]
        passing += len(items)
        repeated += int(accepted_before[items].sum())
        new.append(items[~accepted_before[items]])
        accepted_before[items] = True
    return new, passing, repeated


def play(name: str, cfg, vocab, corpus_root: Path, web: SimulatedWeb, seed: int, rounds: int, log: Path) -> list[dict]:
    """One policy, one seed: `rounds` rounds, each appended to `log` (JSON lines) as it ends."""
    from bench.acquisition_grid import seeded
    from explorer.run.assembly import make_policy
    from explorer.run.image import target_description

    policy_name, options = POLICIES[name]
    cfg = seeded(dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, name=policy_name, options=options)),
                 seed)
    t0 = time.perf_counter()
    policy = make_policy(cfg, vocab, corpus_root, None, target_description(cfg))
    load = time.perf_counter() - t0
    passes, relevant_item = web.acceptance(seed)
    accepted_before = np.zeros(len(passes), bool)
    per_round, results = cfg.policy.queries_per_iteration, cfg.search.results_per_query
    rows = []
    log.write_text("")
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        queries = policy.propose(per_round)
        propose = time.perf_counter() - t0
        new, _, _ = accept_round([q.text for q in queries], web, passes, accepted_before)
        rewards = np.array([len(items) for items in new]) / results
        t0 = time.perf_counter()
        policy.update(queries, [float(x) for x in rewards])
        update = time.perf_counter() - t0
        stats = getattr(policy, "stats", {}) or {}
        row = {"seed": seed, "policy": name, "round": r, "relevant": int(sum(relevant_item[i].sum() for i in new)),
               "accepted": int(sum(len(i) for i in new)), "mean_reward": round(float(rewards.mean()), 4),
               "propose_s": round(propose, 2), "update_s": round(update, 2),
               "generate_s": stats.get("generate_seconds"), "ppo_s": stats.get("ppo_seconds"),
               "kl": stats.get("kl_to_reference"), "load_s": round(load, 1) if r == 1 else None,
               "queries": " | ".join(q.text for q in queries)}
        rows.append(row)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"   [{name}, seed {seed}] round {r}: relevant {row['relevant']}, mean reward {row['mean_reward']:.3f}, "
              f"{propose + update:.0f} s", flush=True)
    return rows


def finished_rows(log: Path, rounds: int) -> list[dict] | None:
    if not log.exists():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return rows if len(rows) == rounds else None


def cumulative(rows: list[dict], name: str, seeds: list[int], rounds: int) -> np.ndarray:
    """(seeds, rounds) relevant results accepted so far."""
    by = {(r["seed"], r["round"]): r["relevant"] for r in rows if r["policy"] == name}
    return np.cumsum([[by[(s, r)] for r in range(1, rounds + 1)] for s in seeds], axis=1)


def novelty(rows: list[dict]) -> list[float]:
    """Per round (in order), the share of its queries the run had not issued before (in the round too)."""
    seen: set[str] = set()
    shares = []
    for row in sorted(rows, key=lambda r: r["round"]):
        fresh = 0
        texts = [t.strip().lower() for t in row["queries"].split(" | ")]
        for text in texts:  # a repeat within the round is no new query either
            fresh += text not in seen
            seen.add(text)
        shares.append(fresh / len(texts))
    return shares


def repeat_counts(rows: list[dict], web: SimulatedWeb) -> list[tuple[int, int]]:
    """Per round of one run (in order): of its results passing acceptance, how many the run had accepted
    before (what it lost to repeating itself), and how many passed. Replays the logged queries, and
    checks that the replay accepts what the run logged."""
    passes, _ = web.acceptance(rows[0]["seed"])
    accepted_before = np.zeros(len(passes), bool)
    counts = []
    for row in sorted(rows, key=lambda r: r["round"]):
        new, passing, repeated = accept_round(row["queries"].split(" | "), web, passes, accepted_before)
        if sum(map(len, new)) != row["accepted"]:
            raise RuntimeError(f"replay of {row['policy']} seed {row['seed']} round {row['round']} accepts "
                               f"{sum(map(len, new))}, the run logged {row['accepted']}")
        counts.append((repeated, passing))
    return counts


def repeat_shares(counts: list[tuple[int, int]]) -> list[float]:
    """Per round, of `repeat_counts`: the share of the results passing acceptance accepted before."""
    return [repeated / passing if passing else float("nan") for repeated, passing in counts]


def run_repeat_share(counts: list[tuple[int, int]]) -> float:
    """One run's repeat share over all its rounds (`repeat_counts`): accepted before / passing acceptance."""
    repeated, passing = np.sum(counts, axis=0)
    return float(repeated / passing) if passing else float("nan")


def report(rows: list[dict], policies: list[str], seeds: list[int], rounds: int, out: Path, command: str,
           web: SimulatedWeb) -> Path:
    from explorer.analysis.report import mean_ci

    marks = sorted({min(m, rounds) for m in (1, 5, 10, 15, 20, rounds)})
    lines = ["# PPO against its prompt-only ablation over many rounds (simulated reward)", "",
             (f"`{command}`; seeds {', '.join(map(str, seeds))}; {rounds} rounds of 16 queries; target {TARGET}. "
              "Mean ± 95% t-interval over seeds."), "",
             "Relevant results accepted so far:", "",
             "| policy | n | " + " | ".join(f"round {m}" for m in marks) + " |",
             "|---|---:|" + "---:|" * len(marks)]
    curves = {p: cumulative(rows, p, seeds, rounds) for p in policies}
    for p in policies:
        cells = []
        for m in marks:
            mean, half, _ = mean_ci(curves[p][:, m - 1])
            cells.append(f"{mean:.0f} ± {half:.0f}")
        lines.append(f"| {p} | {len(seeds)} | " + " | ".join(cells) + " |")
    ppos = [p for p in policies if p.startswith("ppo")]
    pairs = [(a, b) for a, b in ([(p, "llm-prompt") for p in ppos] + [(p, "ppo") for p in ppos if p != "ppo"]
                                 + [("llm-prompt-found", "llm-prompt"),
                                    ("ppo", "random"), ("llm-prompt", "random"), ("gp-ucb", "random"),
                                    ("ppo", "gp-ucb")]) if a in curves and b in curves]
    if pairs:
        lines += ["", "Paired differences in relevant results accepted so far (per seed at the last round):", "",
                  "| difference | " + " | ".join(f"round {m}" for m in marks) + " | per seed |",
                  "|---|" + "---:|" * len(marks) + "---|"]
        for a, b in pairs:
            d = curves[a] - curves[b]
            cells = []
            for m in marks:
                mean, half, _ = mean_ci(d[:, m - 1])
                cells.append(f"{mean:+.0f} ± {half:.0f}")
            lines.append(f"| {a} − {b} | " + " | ".join(cells) + " | " + " / ".join(f"{x:+d}" for x in d[:, -1]) + " |")
        d = curves["ppo"][:, -1] - curves["llm-prompt"][:, -1] if ("ppo", "llm-prompt") in pairs else None
        if d is not None and len(d) > 1 and d.mean() > 0:
            from scipy import stats

            needed = next((n for n in range(2, 1000)
                           if stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n) < d.mean()), None)
            lines += ["", f"Seeds for a 95% interval of ppo − llm-prompt above 0 at round {rounds}, if this mean "
                      f"({d.mean():+.0f}) and sd ({d.std(ddof=1):.0f}) hold: {needed}."]
    windows = [(lo, min(lo + 4, rounds)) for lo in range(1, rounds + 1, 5)]

    def run_rows(p, s):
        return sorted((r for r in rows if r["policy"] == p and r["seed"] == s), key=lambda r: r["round"])

    counts = {(p, s): repeat_counts(run_rows(p, s), web) for p in policies for s in seeds}  # one replay a run
    for title, per_round, digits in (
            ("Mean query reward (yield)", lambda p, s: [r["mean_reward"] for r in run_rows(p, s)], 3),
            ("Queries new to the run (not issued before by the same policy and seed), share",
             lambda p, s: novelty(run_rows(p, s)), 2),
            ("Of the results passing acceptance, the share the run had accepted before (so worth nothing)",
             lambda p, s: repeat_shares(counts[p, s]), 2),
            ("Queries containing a parenthesis (a copied reward, mostly), share",
             lambda p, s: [np.mean(["(" in t for t in r["queries"].split(" | ")]) for r in run_rows(p, s)], 2)):
        lines += ["", f"{title}, by blocks of rounds:", "",
                  "| policy | " + " | ".join(f"rounds {lo}-{hi}" for lo, hi in windows) + " |",
                  "|---|" + "---:|" * len(windows)]
        for p in policies:
            values = {s: np.array(per_round(p, s), float) for s in seeds}
            cells = []
            for lo, hi in windows:
                mean, half, _ = mean_ci([np.nanmean(values[s][lo - 1:hi]) for s in seeds])
                cells.append(f"{mean:.{digits}f} ± {half:.{digits}f}")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    shares = {p: np.array([run_repeat_share(counts[p, s]) for s in seeds]) for p in policies}
    lines += ["", f"Repeat share over all {rounds} rounds (results accepted before / results passing acceptance, "
              "per run), and paired differences:", "", "| policy or difference | mean | per seed |", "|---|---:|---|"]
    for p in policies:
        mean, half, _ = mean_ci(shares[p])
        lines.append(f"| {p} | {mean:.3f} ± {half:.3f} | " + " / ".join(f"{x:.3f}" for x in shares[p]) + " |")
    for a, b in pairs:
        d = shares[a] - shares[b]
        mean, half, _ = mean_ci(d)
        lines.append(f"| {a} − {b} | {mean:+.3f} ± {half:.3f} | " + " / ".join(f"{x:+.3f}" for x in d) + " |")
    lines += ["", "Seconds per round (mean over seeds and rounds 2 onwards; load: building the policy):", "",
              "| policy | load s | propose s | of which generation s | update s | of which PPO s | KL to reference |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for p in policies:
        mine = [r for r in rows if r["policy"] == p]
        later = [r for r in mine if r["round"] > 1] or mine

        def avg(key, rs=later):
            v = [r[key] for r in rs if r.get(key) is not None]
            return f"{np.mean(v):.2f}" if v else "-"
        lines.append(f"| {p} | {avg('load_s', mine)} | {avg('propose_s')} | {avg('generate_s')} | "
                     f"{avg('update_s')} | {avg('ppo_s')} | {avg('kl')} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_rows(out, "rounds", rows)
    write_machine(out, command)
    plot(curves, rows, policies, seeds, rounds, out / "curves.png")
    return out / "report.md"


def plot(curves: dict, rows: list[dict], policies: list[str], seeds: list[int], rounds: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(1, rounds + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for p in policies:
        c = curves[p]
        left.plot(x, c.mean(0), label=p)
        left.fill_between(x, c.min(0), c.max(0), alpha=0.2)
        reward = np.array([[next(r["mean_reward"] for r in rows if r["policy"] == p and r["seed"] == s
                                 and r["round"] == k) for k in x] for s in seeds])
        right.plot(x, reward.mean(0), label=p)
    left.set(xlabel="round", ylabel="relevant results accepted so far", title=f"mean of {len(seeds)} seeds (band: range)")
    right.set(xlabel="round", ylabel="mean query reward (yield)", title="reward per round, mean over seeds")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "science.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="per-run round logs (default %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "llm_simulation")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    import torch

    from explorer.run.config import load_config
    from explorer.run.image import image_vocabulary
    from explorer.web.presets import open_image_corpus

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    corpus = open_image_corpus(cfg.corpus, progress=True)  # a preset not built yet is built now
    vocab = image_vocabulary(cfg, corpus)
    web = SimulatedWeb(cfg, corpus, vocab)
    args.runs.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for name in args.policies:
            log = args.runs / f"{name}-s{seed}-r{args.rounds}.jsonl"
            done = finished_rows(log, args.rounds)
            if done is None:
                t0 = time.perf_counter()
                done = play(name, cfg, vocab, corpus.root, web, seed, args.rounds, log)
                print(f"== {name}, seed {seed}: done in {time.perf_counter() - t0:.0f} s ==", flush=True)
            rows += done
    command = "python bench/exp_llm_simulation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    path = report(rows, args.policies, args.seeds, args.rounds, args.out, command.strip(), web)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
