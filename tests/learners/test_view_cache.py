"""The frozen prefix's cached views (learners/view_cache.py) and the mixture's draws they key on."""

import numpy as np
import pytest
import torch

from learners.augment import apply_view
from learners.mixture import TrainingMixture
from learners.moco import MoCoLearner
from learners.view_cache import view_params
from tests.learners.test_moco import TINY_RESNET, fashion_images, tiny_config

CACHED = dict(TINY_RESNET, frozen_stages=2, cached_views=4)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    try:
        return fashion_images(200)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


def test_draw_names_the_images_that_sample_returns(images):
    mixture = TrainingMixture(images[:100])
    mixture.add_accepted(images[100:].flip(-1))
    acquired, index = mixture.draw(64, torch.Generator().manual_seed(3))
    batch = mixture.sample(64, torch.Generator().manual_seed(3))
    assert acquired.any() and (~acquired).any()
    assert torch.equal(batch[~acquired], images[:100][index[~acquired]])
    assert torch.equal(batch[acquired], images[100:].flip(-1)[index[acquired]])


def test_cached_views_are_the_prefix_of_each_images_own_views(images):
    learner = MoCoLearner(tiny_config(**CACHED), device="cpu")
    mixture = TrainingMixture(images[:100])
    mixture.add_accepted(images[100:])
    cache = learner.view_cache
    acquired = torch.tensor([False, True, False])
    index = torch.tensor([7, 5, 3])
    h1, h2 = cache.pairs(mixture, acquired, index, torch.Generator().manual_seed(0))
    # every view of acquired item 5 is the prefix of that image under its own parameters
    params = view_params(learner.config.seed, "acquired", 5, 4, learner.config.augment)
    x = apply_view(images[105:106].repeat(4, 1, 1, 1), params, learner.config.augment)
    expected = learner.model.prefix(learner._layout(x)).to(torch.bfloat16).float()
    assert torch.equal(cache.store["acquired"][5].float(), expected)
    # a pair takes one view of each recipe: h1 from the first half, h2 from the second
    assert any(torch.equal(h1[1], expected[v]) for v in (0, 1))
    assert any(torch.equal(h2[1], expected[v]) for v in (2, 3))
    assert len(cache) == 3  # two target images, one acquired: only what was drawn is computed


def test_views_do_not_depend_on_the_order_images_were_first_drawn(images):
    first, second = (MoCoLearner(tiny_config(**CACHED), device="cpu") for _ in range(2))
    mixture = TrainingMixture(images[:100])
    first.view_cache.pairs(mixture, torch.zeros(3, dtype=torch.bool), torch.tensor([9, 2, 40]), torch.Generator())
    second.view_cache.pairs(mixture, torch.zeros(3, dtype=torch.bool), torch.tensor([40, 9, 1]), torch.Generator())
    for item in (9, 40):
        assert torch.equal(first.view_cache.store["target"][item], second.view_cache.store["target"][item])
    assert not torch.equal(first.view_cache.store["target"][9], first.view_cache.store["target"][40])


def test_a_truncated_store_drops_the_cached_views(images):
    learner = MoCoLearner(tiny_config(**CACHED), device="cpu")
    mixture = TrainingMixture(images[:100])
    mixture.add_accepted(images[100:150])
    cache = learner.view_cache
    cache.pairs(mixture, torch.ones(2, dtype=torch.bool), torch.tensor([0, 1]), torch.Generator())
    old = cache.store["acquired"][0].clone()
    mixture.position = 0  # an abandoned attempt: the next add truncates, item 0 becomes another image
    mixture.add_accepted(images[150:200])
    cache.pairs(mixture, torch.ones(1, dtype=torch.bool), torch.tensor([0]), torch.Generator())
    assert len(cache) == 1 and not torch.equal(cache.store["acquired"][0], old)


def test_cached_learner_trains_and_resumes_exactly(images, tmp_path):
    learner = MoCoLearner(tiny_config(**CACHED), device="cpu")
    model = learner.model
    prefix = {k: v.clone() for k, v in model.frozen_prefix.state_dict().items()}
    trunk = [p.detach().clone() for p in model.base_encoder.parameters()]
    mixture = TrainingMixture(images[:100])
    losses = learner.train_steps(mixture, 3)
    assert all(np.isfinite(losses))
    assert any(not torch.equal(a, b) for a, b in zip(trunk, model.base_encoder.parameters()))
    assert all(torch.equal(v, model.frozen_prefix.state_dict()[k]) for k, v in prefix.items())
    mixture.add_accepted(images[100:].flip(-1))
    learner.save(tmp_path / "moco.pt")
    expected = learner.train_steps(mixture, 2)
    resumed = MoCoLearner.load(tmp_path / "moco.pt", device="cpu")  # its cache starts empty
    assert resumed.train_steps(resumed.mixture, 2) == expected


def test_cached_views_need_a_frozen_prefix_and_an_even_count():
    with pytest.raises(ValueError, match="cached_views"):
        tiny_config(**TINY_RESNET, cached_views=4)
    with pytest.raises(ValueError, match="cached_views"):
        tiny_config(**dict(CACHED, cached_views=3))


def test_warm_computes_every_image_the_mixture_holds(images):
    learner = MoCoLearner(tiny_config(**CACHED), device="cpu")
    mixture = TrainingMixture(images[:100])
    mixture.add_accepted(images[100:130])
    learner.view_cache.warm(mixture)
    assert len(learner.view_cache) == 130
    before = learner.view_cache.store["acquired"][:30].clone()
    learner.view_cache.pairs(mixture, torch.ones(30, dtype=torch.bool), torch.arange(30), torch.Generator())
    assert torch.equal(learner.view_cache.store["acquired"][:30], before)  # nothing computed again
