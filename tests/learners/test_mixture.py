import pytest
import torch

from learners.mixture import MixtureConfig, TrainingMixture, acquired_count


def _ids(n, start=0, side=4):
    """n images whose id (start..start+n-1) is written in two pixels, so every image is distinct."""
    images = torch.zeros(n, 3, side, side, dtype=torch.uint8)
    ids = torch.arange(start, start + n)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = ids // 256, ids % 256
    return images


def _read_ids(batch):
    return (batch[:, 0, 0, 0].long() * 256 + batch[:, 0, 0, 1].long()).tolist()


def test_acquired_count_is_proportional_then_capped():
    assert acquired_count(100, 500, 0, 1.0) == 0
    assert acquired_count(100, 500, 250, 1.0) == 50  # half as many acquired as target images
    assert acquired_count(100, 500, 5000, 1.0) == 100  # capped at one acquired per target image
    assert acquired_count(100, 500, 5000, 0.25) == 25
    assert acquired_count(100, 500, 3, 1.0) == 1  # never more than exist: round(100 * 3 / 500) = 1


def test_a_batch_holds_no_image_twice():
    mixture = TrainingMixture(_ids(200))
    mixture.add_accepted(_ids(150, start=1000))
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = _read_ids(mixture.sample(128, generator))
        assert len(ids) == len(set(ids))


def test_target_exposure_is_not_lowered_by_acquired_data():
    """Each batch keeps all `target_batch` target images of a target-only run; acquired ones come on top."""
    only_target = TrainingMixture(_ids(500))
    with_data = TrainingMixture(_ids(500))
    with_data.add_accepted(_ids(2000, start=10_000))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    exposure_alone = exposure_mixed = acquired = 0
    for _ in range(10):
        exposure_alone += sum(i < 10_000 for i in _read_ids(only_target.sample(64, g1)))
        ids = _read_ids(with_data.sample(64, g2))
        exposure_mixed += sum(i < 10_000 for i in ids)
        acquired += sum(i >= 10_000 for i in ids)
    assert exposure_mixed == exposure_alone == 640
    assert acquired == 640  # 2000 acquired vs 500 target: capped at one per target image


def test_batches_are_shuffled_so_every_shard_holds_both_kinds():
    """Under DDP each rank trains on a contiguous shard: target and acquired must not be in blocks."""
    mixture = TrainingMixture(_ids(500))
    mixture.add_accepted(_ids(500, start=10_000))
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = _read_ids(mixture.sample(64, generator, multiple_of=2))
        first, second = ids[:64], ids[64:]
        for shard in (first, second):
            share = sum(i >= 10_000 for i in shard) / len(shard)
            assert 0.25 < share < 0.75


def test_batch_size_splits_over_ranks():
    mixture = TrainingMixture(_ids(500))
    mixture.add_accepted(_ids(7, start=10_000))  # round(64 * 7 / 500) = 1 acquired image
    assert len(mixture.sample(64, torch.Generator(), multiple_of=1)) == 65
    assert len(mixture.sample(64, torch.Generator(), multiple_of=2)) == 64
    small = TrainingMixture(_ids(5))  # fewer target images than a batch: all of them, once
    assert sorted(_read_ids(small.sample(64, torch.Generator()))) == [0, 1, 2, 3, 4]
    assert len(small.sample(64, torch.Generator(), multiple_of=2)) == 4


def test_fifo_pool_keeps_the_most_recent():
    mixture = TrainingMixture(_ids(4), MixtureConfig(capacity=6, pool_policy="fifo"))
    for start in range(0, 20, 4):
        mixture.add_accepted(_ids(4, start=100 + start))
    assert _read_ids(mixture.acquired) == list(range(114, 120))


def test_reservoir_pool_is_bounded_and_spans_the_stream():
    mixture = TrainingMixture(_ids(4, side=2), MixtureConfig(capacity=100))
    for chunk in _ids(2000, side=2).split(200):
        mixture.add_accepted(chunk)
    kept = torch.tensor(_read_ids(mixture.acquired))
    assert len(kept) == 100 and mixture.seen == 2000
    assert 700 < kept.float().mean() < 1300  # uniform over 0..1999 has mean ~1000 (std of mean ~58)
    assert (kept < 500).any() and (kept >= 1500).any()


def test_an_iteration_that_accepts_nothing_changes_nothing():
    mixture = TrainingMixture(_ids(50))
    mixture.add_accepted(_ids(10, start=100))
    before = mixture.acquired.clone()
    mixture.add_accepted(_ids(0))
    assert torch.equal(mixture.acquired, before)


def test_state_round_trip_continues_identically():
    target = torch.randint(0, 255, (30, 3, 4, 4), dtype=torch.uint8)
    mixture = TrainingMixture(target, MixtureConfig(capacity=8, seed=3))
    for _ in range(4):
        mixture.add_accepted(torch.randint(0, 255, (6, 3, 4, 4), dtype=torch.uint8))
    restored = TrainingMixture(target, MixtureConfig(capacity=8, seed=3))
    restored.load_state_dict(mixture.state_dict())
    assert torch.equal(mixture.acquired, restored.acquired)  # the reservoir rebuilt with the same draws
    extra = torch.randint(0, 255, (20, 3, 4, 4), dtype=torch.uint8)
    mixture.add_accepted(extra)
    restored.add_accepted(extra)
    assert torch.equal(mixture.acquired, restored.acquired)
    a = mixture.sample(16, torch.Generator().manual_seed(1))
    b = restored.sample(16, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_rejects_bad_images_and_config():
    with pytest.raises(ValueError, match="uint8"):
        TrainingMixture(torch.zeros(4, 3, 4, 4))
    with pytest.raises(ValueError, match="empty"):
        TrainingMixture(torch.zeros(0, 3, 4, 4, dtype=torch.uint8))
    mixture = TrainingMixture(_ids(4))
    with pytest.raises(ValueError, match=r"expected 4x4 images, got \(8, 8\)"):
        mixture.add_accepted(_ids(4, side=8))
    with pytest.raises(ValueError, match="pool_policy"):
        MixtureConfig(pool_policy="lifo")
    with pytest.raises(ValueError, match="acquired_cap"):
        MixtureConfig(acquired_cap=-1)
    with pytest.raises(ValueError, match="capacity"):
        MixtureConfig(capacity=-1)
