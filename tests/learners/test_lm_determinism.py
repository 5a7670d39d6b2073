"""Two runs of the LM with the same seed and config give the same losses bit for bit: in one process,
in fresh processes, and with another torch thread count, for a dense and for each routed MLP. (The
same tokens go in: a tokenizer is trained once per run folder and then read, `explorer sweep`.)"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from explorer.analysis.sweep import SweepConfig, SweepText, train_one
    from explorer.run.config import LMRoutingConfig
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 256, size=int(n)).tolist() for n in rng.integers(20, 200, size=200)]
    text = SweepText(train=docs, heldout=docs[:10], eos_id=1, vocab_size=300)
    out = []
    for router in json.loads(sys.argv[2]):
        cfg = SweepConfig(name="det", budgets=(1e8,), sizes=(6000,), seq_len=32, batch_size=4, vocab_size=300,
                          lr=3e-3, warmup_fraction=0.05, seed=0, eval_tokens=500,
                          lm=LMRoutingConfig(router=router, num_experts=4))
        row = train_one(cfg, 1e8, 6000, text)
        out.append([row["loss"], row["train_loss"], row["steps"]])
    print(json.dumps(out))
""")

ROUTERS = ["dense", "switch", "sbase", "hash"]


def _losses(tmp_path, threads: int, routers: list[str]) -> list:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(script), str(REPO), json.dumps(routers)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_same_seed_same_losses_in_fresh_processes_and_thread_counts(tmp_path):
    first = _losses(tmp_path, 1, ROUTERS + ROUTERS)  # each router twice in one process
    assert first[:len(ROUTERS)] == first[len(ROUTERS):]
    assert _losses(tmp_path, 2, ROUTERS) == first[:len(ROUTERS)]  # another process, two threads
    assert len({tuple(x) for x in first[:len(ROUTERS)]}) == len(ROUTERS)  # the routers differ
    assert all(steps >= 15 for _, _, steps in first), first
