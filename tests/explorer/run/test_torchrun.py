"""`explorer daemon` under torchrun (explorer/run/ranks.py), images and text: 2 CPU ranks (gloo)
make the decisions and reach the weights of one process on the same global batches; SIGTERM to the
launcher stops every rank at one safe point and a resume ends where the unbroken run ends; a rank
that dies ends the run with a message and a folder that resumes to the same end."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from explorer.run.checkpoints import checkpoint_dir, load_latest_checkpoint
from explorer.run.config import save_config
from explorer.run.ledger import read_metrics
from explorer.run.ranks import Ranks, split_rows
from tests.conftest import TINY_EXPERIMENT
from tests.explorer.run.processes import daemon_env, events, hostless
from tests.explorer.run.test_text_loop import text_corpus, tiny_text  # noqa: F401  (text_corpus: a fixture)

ITERATIONS = 4
# LARS (a step linear in the gradient) and the trunk's BatchNorm frozen, as the product's configs have
# it: see tests/learners/test_moco.py for why one process is no float reference otherwise.
# batch_multiple 2: one process cuts its global batches to the same sizes as two ranks do.
LEARNER = {"optimizer": "lars", "lr": 0.05, "freeze_bn": True, "batch_multiple": 2}
DECISIONS = {"image": ("queries", "accepted_urls", "query_status"),
             "text": ("queries", "accepted_urls", "query_status", "planner_action")}
LOSS = {"image": "ssl_loss", "text": "train_loss"}


@pytest.fixture(scope="module", params=["image", "text"])
def case(request, tmp_path_factory) -> tuple[str, Path]:
    """(modality, the path of its config): the tiny image run, or the tiny text run with the LM's
    own embeddings as the reward's (so that they are split over the ranks too)."""
    path = tmp_path_factory.mktemp(f"torchrun-{request.param}") / "config.yaml"
    if request.param == "image":
        tiny = request.getfixturevalue("tiny_experiment")
        cfg = tiny(iterations=ITERATIONS, learner={**TINY_EXPERIMENT["learner"], **LEARNER})
    else:
        cfg = tiny_text(request.getfixturevalue("text_corpus"), iterations=ITERATIONS,
                        text={"reward_encoder": "lm"})
    save_config(cfg, path)
    return request.param, path


def daemon_command(ranks: int, *args: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    return [*launcher, "-m", "explorer", "daemon", *args, "--quiet"]


# The CPU kernels pinned to AVX2: with AVX-512/AMX, oneDNN picks convolution algorithms by batch size,
# so a rank's half batch rounds differently from the whole one and the runs drift apart (on an
# AVX-512/AMX Xeon: the weights 2.2% of their last move apart unpinned; under the 1% bar pinned).
PORTABLE_ENV = {**daemon_env(1), "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}

def start(ranks: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(daemon_command(ranks, *args), env=PORTABLE_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the daemon did not finish in {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def run(ranks: int, *args: str) -> str:
    code, out = finish(start(ranks, *args))
    assert code == 0, out[-3000:]
    return out


def wait_for_iteration(proc: subprocess.Popen, run_dir: Path, timeout: float = 240) -> None:
    """Until the daemon logs an iteration it finished (one more than when this was called)."""
    seen = events(run_dir).count("iteration")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and events(run_dir).count("iteration") == seen:
        time.sleep(0.05)
    assert events(run_dir).count("iteration") > seen, \
        proc.communicate()[0][-3000:] if proc.poll() is not None else "timed out"


def checkpoint_state(run_dir: Path, iteration: int) -> dict:
    return torch.load(checkpoint_dir(run_dir, iteration) / "state.pt", map_location="cpu", weights_only=False)


def final_state(run_dir: Path) -> tuple[list[dict], dict]:
    checkpoint = load_latest_checkpoint(run_dir)
    assert checkpoint.state["iteration"] == ITERATIONS
    return hostless(read_metrics(run_dir / "metrics.jsonl")), checkpoint.state["learner"]["model"]


def assert_same_run(modality: str, a: Path, b: Path, exact: bool) -> None:
    rows_a, model_a = final_state(a)
    rows_b, model_b = final_state(b)
    assert len(rows_a) == len(rows_b) == ITERATIONS + 1
    for ra, rb in zip(rows_a[1:], rows_b[1:]):
        assert all(ra[k] == rb[k] for k in DECISIONS[modality]), (ra, rb)
        # a query's reward counts its images above a calibrated threshold: one within float noise of it
        # may fall either side (one image of a query's results: < 1e-3)
        np.testing.assert_allclose(ra["query_rewards"], rb["query_rewards"], atol=0 if exact else 1e-3)
        np.testing.assert_allclose(ra[LOSS[modality]], rb[LOSS[modality]], rtol=0 if exact else 1e-4)
    assert model_a.keys() == model_b.keys()
    if exact:
        assert all(torch.equal(model_a[key], model_b[key]) for key in model_a)
        return
    # the weights apart by under 1% of how far the last two iterations moved them (0.15% measured)
    before = checkpoint_state(a, ITERATIONS - 2)["learner"]["model"]
    floats = [k for k in model_a if model_a[k].is_floating_point()]
    apart = torch.cat([(model_a[k] - model_b[k]).flatten().double() for k in floats]).norm()
    moved = torch.cat([(model_a[k] - before[k]).flatten().double() for k in floats]).norm()
    assert apart < 0.01 * moved, f"{apart:.3g} apart, moved {moved:.3g}"


@pytest.fixture(scope="module")
def unbroken(case, tmp_path_factory):
    """The case's config on one process and on two ranks, neither stopped."""
    _, config = case
    root = tmp_path_factory.mktemp("unbroken")
    run(1, str(config), "--out", str(root / "one"))
    run(2, str(config), "--out", str(root / "two"))
    return root


def test_two_ranks_decide_and_train_as_one_process(case, unbroken):
    """Tolerance: the ranks sum the global batch's BatchNorm statistics, gradients and embeddings in
    another order than one process does (float32 rounding, ~1e-7 relative per step), and a small
    network amplifies that over steps: after the image run's 10 steps the weights are 0.15% of the
    last two iterations' movement apart. The test allows 1%; ranks that trained on other rows or
    without the global statistics are as far apart as the movement itself. The per-step equality is
    tested tightly in tests/learners/test_moco.py. The decisions are equal."""
    assert_same_run(case[0], unbroken / "one", unbroken / "two", exact=False)
    log = [json.loads(x) for x in (unbroken / "two" / "daemon.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[0]["ranks"] == 2 and log[-1]["event"] == "done"


def _worker_of_rank(launcher: int, rank: int) -> int:
    """The pid of the torchrun worker process of `rank` under launcher pid `launcher`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise LookupError(f"no worker of rank {rank} under pid {launcher}")


def test_sigterm_and_a_killed_rank_each_leave_a_folder_that_resumes_to_the_same_end(case, unbroken, tmp_path):
    """SIGTERM to the launcher: every rank stops at rank 0's safe point (exit 0 there). Then, in the
    resumed run, rank 1 is killed: rank 0 says which operation lost it, torchrun which rank died.
    Resumed again, the run ends exactly where the unbroken 2-rank run ends. (The text case skips the
    SIGTERM stop, which the daemon and the ranks handle alike for both modalities: its rank 1 is
    killed in the first launch, so that its resume still restores the text training side.)"""
    modality, config = case
    run_dir = tmp_path / "run"
    first = [str(config), "--out", str(run_dir)]
    if modality == "image":
        proc = start(2, *first)
        wait_for_iteration(proc, run_dir)
        os.kill(proc.pid, signal.SIGTERM)  # torchrun passes it on to both ranks
        _, out = finish(proc)
        assert events(run_dir)[-1] == "stop", out[-3000:]
        assert "rank 1: received SIGTERM" in out
        stopped_at = load_latest_checkpoint(run_dir).state["iteration"]
        assert stopped_at < ITERATIONS - 1
        first = ["--out", str(run_dir)]  # resume: no config, the run folder's own

    proc = start(2, *first)
    wait_for_iteration(proc, run_dir)
    os.kill(_worker_of_rank(proc.pid, 1), signal.SIGKILL)
    code, out = finish(proc)
    assert code != 0
    assert "stopped answering" in out or "exitcode  : -9" in out, out[-3000:]
    assert load_latest_checkpoint(run_dir).state["iteration"] < ITERATIONS

    run(2, "--out", str(run_dir))
    assert events(run_dir).count("resume") == (2 if modality == "image" else 1) and events(run_dir)[-1] == "done"
    assert_same_run(modality, unbroken / "two", run_dir, exact=True)


def test_split_rows_cover_every_row_once():
    for n in (0, 1, 5, 16):
        for world in (1, 2, 3):
            rows = [list(range(n))[split_rows(n, r, world)] for r in range(world)]
            assert sum(rows, []) == list(range(n))
            assert max(map(len, rows)) - min(map(len, rows)) <= 1


def test_a_process_alone_runs_operations_without_a_group():
    ranks = Ranks.alone()
    assert ranks.leader and not ranks.distributed
    ranks.announce("anything", ())  # no group: nothing to tell
    with pytest.raises(RuntimeError, match="leads"):
        ranks.follow()
