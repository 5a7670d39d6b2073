"""Where the PPO query policy's memory goes: resident set size (VmRSS) and its peak after importing
torch, after building the policy (Gemma 3 270M + LoRA) and after each propose and update.

    python bench/diag_llm_memory.py --dtype float32 bfloat16 --out bench/results/llm_policy_speed/memory.txt
Each dtype is measured in a fresh process (a peak never comes down); 2 torch threads, 16 queries a
round, `ppo_epochs` 2, `max_query_tokens` 12 (the settings of the ≤ 15 s round, BENCHMARKS.md 8).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench.machine import status_kib  # noqa: E402


def rss() -> str:
    return f"RSS {status_kib('VmRSS') // 1024:5d} MiB, peak {status_kib('VmHWM') // 1024:5d} MiB"


def measure(dtype: str, rounds: int) -> list[str]:
    lines = [f"import: {rss()}"]
    import torch

    torch.set_num_threads(2)
    lines.append(f"torch imported: {rss()}")
    from policies import build_policy

    concepts = ["shoe", "boot", "sandal", "dress", "shirt", "coat", "dog", "cat", "car", "lamp"]
    from policies.ppo_llm import PPO_EARLIER_DEFAULTS  # as measured (BENCHMARKS 8), before ppo's defaults changed

    policy = build_policy("ppo", concepts=concepts, seed=0, target_description="product photos of clothes and shoes",
                          **{**PPO_EARLIER_DEFAULTS, "ppo_epochs": 2, "max_query_tokens": 12, "base_dtype": dtype})
    lines.append(f"policy built: {rss()}")
    for r in range(1, rounds + 1):
        batch = policy.propose(16)
        lines.append(f"round {r} proposed: {rss()}")
        policy.update(batch, [0.1 * (i % 3) for i in range(16)])
        lines.append(f"round {r} updated: {rss()}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child: one dtype
    args = parser.parse_args(argv)
    if args.one:
        print("\n".join(measure(args.one, args.rounds)))
        return 0
    report = []
    for dtype in args.dtype:
        out = subprocess.run([sys.executable, __file__, "--one", dtype, "--rounds", str(args.rounds)], check=True,
                             capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        report += [f"## base_dtype {dtype}", *out.stdout.strip().splitlines(), ""]
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"$ python bench/diag_llm_memory.py {' '.join(argv or sys.argv[1:])}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
