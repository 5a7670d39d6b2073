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
    with pytest.raises(ValueError):
        rollback_target([], 10, 5)


@pytest.mark.parametrize("bad", [dict(factor=1.0), dict(window=0), dict(patience=0), dict(snapshot_every=0)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        SpikeConfig(**bad)


def test_ring_always_holds_a_snapshot_old_enough():
    cfg = SpikeConfig(rollback_steps=100, snapshot_every=50)
    steps = list(range(0, 1000, 50))[-cfg.max_snapshots:]  # the ring after 1000 steps
    assert steps[rollback_target(steps, spike_step=999, rollback_steps=100)] <= 999 - 100
