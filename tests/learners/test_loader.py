"""learners/loader.py: a learner reading its batches through DataLoader workers trains exactly as one
that reads them itself (the plans are drawn in the same order), across train_steps calls between
which the mixture grows, with the accepted images read from shards in the workers."""

import pickle

import pytest
import torch

from learners.loader import plan_views
from learners.mixture import TrainingMixture
from learners.moco import MoCoConfig, MoCoLearner
from learners.shards import ShardStore


def _train(tmp_path, workers: int):
    config = MoCoConfig(backbone="resnet10t", backbone_kwargs={"channels": (8, 16, 32, 64), "stem_width": 8},
                        dim=16, mlp_dim=32, batch_size=16, warmup_steps=1, total_steps=10, loader_workers=workers)
    generator = torch.Generator().manual_seed(0)
    images = lambda n: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)  # noqa: E731
    store = ShardStore(tmp_path / f"shards-{workers}", 32)
    mixture = TrainingMixture(images(40), store=store)
    mixture.add_accepted(images(30))
    learner = MoCoLearner(config, device="cpu")
    losses = learner.train_steps(mixture, 4)
    mixture.add_accepted(images(10))  # the next call's plans see them
    losses += learner.train_steps(mixture, 3)
    store.close()
    return torch.cat([p.detach().flatten() for p in learner.model.parameters()]), losses, learner.generator.get_state()


def test_workers_read_the_batches_the_learner_would_draw_itself(tmp_path):
    params, losses, state = _train(tmp_path, 0)
    with_workers = _train(tmp_path, 2)
    assert torch.equal(params, with_workers[0]) and losses == with_workers[1]
    assert torch.equal(state, with_workers[2])  # the generator ends where it would: no plan drawn past the call


def test_a_plan_draws_the_batch_then_both_views():
    """The order a learner without a loader has always drawn in (so older runs replay the same)."""
    from learners.augment import sample_view_params

    mixture = TrainingMixture(torch.zeros(20, 3, 8, 8, dtype=torch.uint8))
    augment = MoCoConfig(total_steps=100).augment
    plan = plan_views(mixture, 8, torch.Generator().manual_seed(3), 1, augment)
    generator = torch.Generator().manual_seed(3)
    acquired, index = mixture.draw(8, generator, multiple_of=1)
    first = sample_view_params(len(index), augment, 0, generator)
    second = sample_view_params(len(index), augment, 1, generator)
    assert torch.equal(plan.index, index) and torch.equal(plan.acquired, acquired)
    assert torch.equal(plan.first.theta, first.theta) and torch.equal(plan.second.theta, second.theta)


def test_a_store_sent_to_a_worker_only_reads(tmp_path):
    store = ShardStore(tmp_path / "shards", 8)
    store.append(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    store.read(torch.arange(2))  # opens its shard file
    copy = pickle.loads(pickle.dumps(store))
    assert torch.equal(copy.read(torch.arange(2)), store.read(torch.arange(2)))
    with pytest.raises(PermissionError):
        copy.append(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    store.close()
