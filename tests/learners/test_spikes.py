import math

import pytest

from learners.spikes import SpikeConfig, SpikeDetector, rollback_target


def _detector(**kw) -> SpikeDetector:
    return SpikeDetector(SpikeConfig(**{"factor": 2.0, "window": 4, "patience": 2, **kw}))


def test_spike_needs_a_full_window():
    det = _detector(patience=1)
    assert not any(det.observe(x) for x in [1.0, 1.0, 1.0])
    assert not det.observe(100.0)  # only 3 losses of history: no judgement yet, 100 joins it
    assert det.running_mean == pytest.approx(103 / 4)
    assert det.observe(60.0)  # full window: 60 >= 2 * 25.75


def test_spike_confirmed_only_after_patience_consecutive_steps():
    det = _detector()
    for x in [2.0, 2.0, 2.0, 2.0]:
        assert not det.observe(x)
    assert not det.observe(4.0)  # first spike step (4 >= 2 * 2)
    assert det.observe(4.5)  # second consecutive: confirmed
    assert det.running_mean == 2.0  # spike candidates never enter the running mean


def test_streak_resets_on_a_normal_loss():
    det = _detector()
    for x in [2.0] * 4 + [5.0, 2.1, 5.0, 2.0]:
        assert not det.observe(x)
    assert det.streak == 0


def test_decreasing_loss_never_spikes():
    det = _detector(patience=1)
    assert not any(det.observe(10.0 * 0.97 ** i) for i in range(200))


def test_disabled_detector_never_fires():
    det = _detector(enabled=False, patience=1)
    assert not any(det.observe(x) for x in [1.0] * 4 + [1e6] * 5)


def test_non_finite_loss_is_rejected():
    with pytest.raises(ValueError, match="non-finite"):
        _detector().observe(math.nan)


def test_state_round_trip_gives_same_decisions():
    a = _detector()
    for x in [2.0, 2.0, 2.0, 2.0, 9.0]:
        a.observe(x)
    b = _detector()
    b.load_state_dict(a.state_dict())
    assert a.observe(9.0) == b.observe(9.0) is True


def test_rollback_target_picks_newest_old_enough_snapshot():
    steps = [100, 150, 200, 250]
    assert steps[rollback_target(steps, spike_step=260, rollback_steps=100)] == 150
    assert steps[rollback_target(steps, spike_step=350, rollback_steps=100)] == 250
    assert steps[rollback_target(steps, spike_step=120, rollback_steps=100)] == 100  # none that old: oldest
    with pytest.raises(ValueError, match="no snapshot to roll back to"):
        rollback_target([], 10, 5)


@pytest.mark.parametrize("bad", [dict(factor=1.0), dict(window=0), dict(patience=0), dict(snapshot_every=0)])
def test_config_validation(bad):
    (field,) = bad  # the message names the field that is wrong
    with pytest.raises(ValueError, match=rf"\b{field}\b.* must be"):
        SpikeConfig(**bad)


def test_ring_always_holds_a_snapshot_old_enough():
    """The LM learner's own snapshot ring, read after every step of a run longer than the ring."""
    import torch

    from learners.lm import LMConfig, LMLearner, LMShape
    from learners.text_data import PackedTextStream

    spikes = SpikeConfig(rollback_steps=5, snapshot_every=2)  # 5 is not a multiple of 2
    assert spikes.max_snapshots == 4
    shape = LMShape(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    learner = LMLearner(LMConfig(shape=shape, vocab_size=64, seq_len=8, batch_size=2, warmup=1, total_steps=30,
                                 spikes=spikes), device="cpu")
    docs = torch.randint(1, 64, (40, 12), generator=torch.Generator().manual_seed(0)).tolist()
    stream = PackedTextStream(docs, seq_len=8, eos_id=0)
    for _ in range(21):
        learner.train_step(stream)
        steps = [s["step"] for s in learner.snapshots]
        # every snapshot_every-th step before this one, the newest max_snapshots of them
        taken = list(range(0, learner.step, 2))
        assert steps == taken[-spikes.max_snapshots:], (learner.step, steps)
        if learner.step >= spikes.rollback_steps:  # a spike now could roll back far enough
            assert steps[rollback_target(steps, learner.step, spikes.rollback_steps)] <= learner.step - 5
    assert learner.step == 21 and steps == [14, 16, 18, 20] and not learner.events
    # the snapshot holds the weights of its own step, not a reference to the live model
    newest = learner.snapshots[-1]["model"]
    assert any(not torch.equal(newest[k], v) for k, v in learner.model.state_dict().items())
