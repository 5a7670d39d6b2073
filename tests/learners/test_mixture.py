import pytest
import torch

from learners.mixture import MixtureConfig, TrainingMixture, allocate


def _filled(n, value, side=4):
    return torch.full((n, 3, side, side), value, dtype=torch.uint8)


def _counts(batch):
    values = batch[:, 0, 0, 0]
    return {int(v): int((values == v).sum()) for v in values.unique()}


def test_allocate_is_proportional_and_exact():
    assert allocate(100, [0.5, 0.3, 0.2]) == [50, 30, 20]
    assert sum(allocate(7, [0.5, 0.3, 0.2])) == 7
    assert allocate(10, [1.0, 0.0, 0.0]) == [10, 0, 0]


def test_sample_follows_ratios():
    mixture = TrainingMixture(_filled(20, 0))
    mixture.add_accepted(_filled(5, 1))
    mixture.add_accepted(_filled(5, 2))  # 1s move to replay, 2s are the newest
    batch = mixture.sample(100, torch.Generator().manual_seed(0))
    assert batch.shape == (100, 3, 4, 4) and batch.dtype == torch.uint8
    assert _counts(batch) == {0: 50, 2: 30, 1: 20}


def test_empty_parts_are_renormalised_away():
    mixture = TrainingMixture(_filled(20, 0))
    assert _counts(mixture.sample(64, torch.Generator())) == {0: 64}
    mixture.add_accepted(_filled(5, 1))
    counts = _counts(mixture.sample(80, torch.Generator()))
    assert counts == {0: 50, 1: 30}  # 0.5 : 0.3 of 80
    only_new = TrainingMixture(_filled(20, 0), MixtureConfig(target_ratio=0.0))
    assert _counts(only_new.sample(10, torch.Generator())) == {0: 10}  # nothing else to draw from


def test_fifo_replay_keeps_the_most_recent():
    mixture = TrainingMixture(_filled(4, 0), MixtureConfig(replay_capacity=6, replay_policy="fifo"))
    for value in range(1, 6):
        mixture.add_accepted(_filled(4, value))
    assert len(mixture.replay) == 6
    assert mixture.replay[:, 0, 0, 0].tolist() == [3, 3, 4, 4, 4, 4]


def test_reservoir_replay_is_bounded_and_spans_the_stream():
    mixture = TrainingMixture(_filled(4, 0, side=2), MixtureConfig(replay_capacity=100))
    ids = torch.arange(2000)
    stream = torch.zeros(2000, 3, 2, 2, dtype=torch.uint8)
    stream[:, 0, 0, 0], stream[:, 0, 0, 1] = ids // 256, ids % 256  # image id in two pixels
    for chunk in stream.split(200):
        mixture.add_accepted(chunk)
    mixture.add_accepted(_filled(1, 0, side=2))
    kept = mixture.replay[:, 0, 0, 0].long() * 256 + mixture.replay[:, 0, 0, 1].long()
    assert len(kept) == 100 and mixture.seen == 2000
    assert 700 < kept.float().mean() < 1300  # uniform over 0..1999 has mean ~1000 (std of mean ~58)
    assert (kept < 500).any() and (kept >= 1500).any()


def test_state_round_trip_continues_identically():
    mixture = TrainingMixture(torch.randint(0, 255, (30, 3, 4, 4), dtype=torch.uint8),
                              MixtureConfig(replay_capacity=8, seed=3))
    for value in range(1, 5):
        mixture.add_accepted(torch.randint(0, 255, (6, 3, 4, 4), dtype=torch.uint8))
    restored = TrainingMixture.from_state_dict(mixture.state_dict())
    extra = torch.randint(0, 255, (20, 3, 4, 4), dtype=torch.uint8)
    mixture.add_accepted(extra)
    restored.add_accepted(extra)
    assert torch.equal(mixture.replay, restored.replay) and torch.equal(mixture.newest, restored.newest)
    a = mixture.sample(32, torch.Generator().manual_seed(1))
    b = restored.sample(32, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_rejects_bad_images_and_config():
    with pytest.raises(ValueError):
        TrainingMixture(torch.zeros(4, 3, 4, 4))
    mixture = TrainingMixture(_filled(4, 0))
    with pytest.raises(ValueError):
        mixture.add_accepted(_filled(4, 0, side=8))
    with pytest.raises(ValueError, match="fifo"):
        MixtureConfig(replay_policy="lifo")
    with pytest.raises(ValueError):
        MixtureConfig(target_ratio=0, newest_ratio=0, replay_ratio=0)
