import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from explorer.web.text_sources import load_wikipedia_leads, split_target_text
from learners.lm import LM_SIZES, LMConfig, LMLearner, LMShape, build_lm, non_embedding_params
from learners.spikes import SpikeConfig
from learners.text_data import PackedTextStream
from learners.tokenizer import TokenizerConfig, train_tokenizer

REPO = Path(__file__).resolve().parents[2]

SEQ_LEN = 32
TINY = LMShape(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def corpus():
    """(tokenizer, train token lists, held-out token lists) from the Biology/health Wikipedia leads."""
    train, holdout, _ = split_target_text(load_wikipedia_leads(), holdout_fraction=0.1, seed=0)
    tok = train_tokenizer([d["extract"] for d in train], TokenizerConfig(vocab_size=1024))
    return tok, tok.encode_batch(d["extract"] for d in train), tok.encode_batch(d["extract"] for d in holdout)


def _stream(corpus, **kw) -> PackedTextStream:
    tok, train, _ = corpus
    return PackedTextStream(train, seq_len=SEQ_LEN, eos_id=tok.eos_id, **kw)


def _learner(corpus, **kw) -> LMLearner:
    base = dict(vocab_size=corpus[0].vocab_size, seq_len=SEQ_LEN, batch_size=8, lr=3e-3, warmup=3,
                total_steps=200, shape=TINY)
    return LMLearner(LMConfig(**{**base, **kw}), device="cpu")


@pytest.mark.parametrize("size", list(LM_SIZES))
def test_size_table_matches_nominal_param_counts(size):
    with torch.device("meta"):  # shapes only, no memory
        model = build_lm(LMConfig(size=size, vocab_size=8192))
    nominal = LM_SIZES[size].nominal_params
    assert abs(non_embedding_params(model) - nominal) <= 0.2 * nominal


def test_nano_loss_goes_down_on_wikipedia(corpus):
    learner = _learner(corpus, size="nano", shape=None, batch_size=4)
    stream = _stream(corpus)
    held_out = corpus[2][:10]
    before = learner.evaluate_perplexity(held_out, corpus[0].eos_id)
    losses = learner.train_steps(stream, 20)
    assert all(math.isfinite(x) for x in losses) and learner.step == 20
    assert np.mean(losses[-5:]) < losses[0] - 0.5
    assert learner.evaluate_perplexity(held_out) < 0.5 * before  # EOS id from the stream trained on


def _poison_loss(learner, poison_id):
    """Fault injection: a batch holding a full row of `poison_id` reports a 1000x loss."""
    seen = []
    real_loss = learner._loss

    def loss(batch):
        poisoned = bool((batch == poison_id).all(dim=1).any())
        seen.append(poisoned)
        return real_loss(batch) * (1000.0 if poisoned else 1.0)

    learner._loss = loss
    return seen


def test_spike_rolls_back_skips_batches_and_does_not_recur(corpus):
    tok, train, _ = corpus
    poison_id = tok.vocab_size - 1
    docs = train[:6] + [[poison_id] * (2 * SEQ_LEN)] + train[6:100]  # exactly one all-poison window
    stream = PackedTextStream(docs, seq_len=SEQ_LEN, eos_id=tok.eos_id, shuffle=False)
    spikes = SpikeConfig(factor=3.0, window=5, patience=1, rollback_steps=4, snapshot_every=2)
    learner = _learner(corpus, spikes=spikes, batch_size=4)
    seen = _poison_loss(learner, poison_id)
    for _ in range(30):
        learner.train_step(stream)
        if learner.events and "checked" not in learner.events[0]:
            event = learner.events[0]
            event["checked"] = True
            snap = next(s for s in learner.snapshots if s["step"] == event["restored_step"])
            assert learner.step == event["restored_step"] <= event["step"] - spikes.rollback_steps
            assert all(torch.equal(p, snap["model"][n]) for n, p in learner.model.state_dict().items())
    assert sum(seen) == 1  # the poisoned batch was met once and skipped for good
    assert [e["kind"] for e in learner.events] == ["spike_rollback"]
    event = learner.events[0]
    assert event["loss"] > 100 * event["running_mean"]
    assert event["skipped_batches"] >= spikes.rollback_steps
    assert learner.step == 30 - (event["step"] - event["restored_step"])


def _inject(learner, fault):
    """Fault injection: a NaN loss, or a NaN gradient on one weight under a finite loss.
    Returns the function that removes the fault."""
    if fault == "nan_loss":
        real_loss = learner._loss
        learner._loss = lambda batch: real_loss(batch) * math.nan
        return lambda: delattr(learner, "_loss")
    weight = learner.model.model.layers[0].self_attn.q_proj.weight
    return weight.register_hook(lambda grad: grad * math.nan).remove


@pytest.mark.parametrize("fault", ["nan_loss", "nan_grad"])
@pytest.mark.parametrize("router", ["dense", "switch"])
def test_nonfinite_step_leaves_weights_and_optimizer_bitwise_unchanged(corpus, fault, router):
    learner = _learner(corpus, router=router)
    stream = _stream(corpus)
    learner.train_steps(stream, 3)
    params = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    opt_state = {k: {s: v.clone() for s, v in st.items()} for k, st in learner.optimizer.state_dict()["state"].items()}
    remove_fault = _inject(learner, fault)
    loss = learner.train_step(stream)
    assert all(torch.equal(p, params[n]) for n, p in learner.model.named_parameters())
    after = learner.optimizer.state_dict()["state"]
    assert all(torch.equal(after[k][s], v) for k, st in opt_state.items() for s, v in st.items())
    assert learner.step == 3 and all(p.grad is None for p in learner.model.parameters())
    assert learner.events[-1]["kind"] == "nonfinite_skip"
    assert math.isnan(loss) or math.isnan(learner.events[-1]["grad_norm"])
    remove_fault()
    assert math.isfinite(learner.train_step(stream)) and learner.step == 4


def test_data_cursor_resume_gives_identical_next_batches(corpus):
    stream = _stream(corpus, seed=3)
    for _ in range(5):
        stream.next_batch(16)
    state = stream.state_dict()
    expected = [stream.next_batch(16) for _ in range(8)]
    resumed = PackedTextStream.from_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [resumed.next_batch(16) for _ in range(8)]))


def test_stream_packs_every_token_once_per_epoch_and_takes_new_documents():
    docs = [list(range(10, 10 + n)) for n in (5, 9, 3, 12)]  # 33 tokens with the 4 EOS
    stream = PackedTextStream(docs, seq_len=4, eos_id=0, seed=1)
    first = torch.cat([stream.next_batch(2) for _ in range(4)])  # 8 windows x 4 targets: one epoch
    assert first.shape == (8, 5) and torch.equal(first[1:, 0], first[:-1, -1])  # one-token overlap
    epoch_tokens = [t for d in docs for t in d] + [0] * len(docs)
    epoch_tokens.remove(int(first[0, 0]))  # every token but the very first is a target exactly once
    assert sorted(first[:, 1:].flatten().tolist()) == sorted(epoch_tokens)
    stream.add_documents([[99] * 7])
    later = torch.cat([stream.next_batch(2) for _ in range(8)])
    assert (later == 99).sum() >= 7 and stream.epoch >= 1


def test_state_dict_round_trip_resumes_identically(corpus, tmp_path):
    learner = _learner(corpus)
    learner.train_steps(_stream(corpus), 3)
    path = tmp_path / "lm.pt"
    learner.save(path)
    resumed = LMLearner.load(path, device="cpu")
    assert resumed.step == 3 and resumed.data.batches_served == 3
    assert resumed.train_steps(resumed.data, 2) == learner.train_steps(learner.data, 2)
    assert all(torch.equal(p, q) for p, q in zip(learner.model.parameters(), resumed.model.parameters()))


@pytest.mark.parametrize("bad, message", [
    (dict(size="huge"), "unknown LM size 'huge'"), (dict(router="sbase", num_experts=1), "num_experts >= 2"),
    (dict(lr=0.0), "^lr must be > 0"), (dict(batch_size=0, grad_accum=0), "^batch_size, grad_accum must be > 0"),
    (dict(min_lr=1.0, lr=0.1), "min_lr <= lr"), (dict(warmup=10, total_steps=5), "warmup <= total_steps"),
    (dict(betas=(0.9, 1.0)), "betas"), (dict(shape=dict(hidden_size=30, intermediate_size=64, num_layers=1,
                                                         num_heads=4, num_kv_heads=2)), "hidden_size must divide")])
def test_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        LMConfig(**bad)


LM_DDP_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from learners.distributed import leave_process_group
    from tests.learners.test_lm import ddp_case
    params, losses = ddp_case()
    torch.save({"params": params, "losses": losses}, f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
    leave_process_group()
""")


def ddp_case(steps: int = 3) -> tuple[torch.Tensor, list[float]]:
    """`steps` steps of a tiny LM (global batch 4, two micro-batches per step) on seeded token documents."""
    shape = LMShape(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2)
    config = LMConfig(shape=shape, vocab_size=64, seq_len=16, batch_size=4, grad_accum=2, warmup=1,
                      total_steps=10, seed=0)
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 64, size=int(n)).tolist() for n in rng.integers(10, 40, size=30)]
    stream = PackedTextStream(docs, seq_len=16, eos_id=0, seed=0)
    learner = LMLearner(config, device="cpu")
    losses = learner.train_steps(stream, steps)
    return torch.cat([p.detach().flatten() for p in learner.model.parameters()]), losses


def test_lm_under_torchrun_matches_one_process(tmp_path):
    """Two gloo ranks end with identical weights, and with the weights one process reaches on the same
    global batches: `batch_size` means the global batch whatever the number of ranks."""
    script = tmp_path / "worker.py"
    script.write_text(LM_DDP_WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path), str(REPO)], env=env, cwd=REPO, timeout=180,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["losses"] == rank1["losses"]  # the mean over ranks: the same skip / rollback decisions
    params, losses = ddp_case()
    assert not torch.equal(params, ddp_case(steps=0)[0])  # it trained
    torch.testing.assert_close(rank0["params"], params, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rank0["losses"], losses, rtol=1e-5)

