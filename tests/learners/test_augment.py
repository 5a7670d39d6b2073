import dataclasses

import pytest
import torch

from learners.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, apply_view, sample_view_params, two_views

OFF = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                    grayscale_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0), mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _images(n=8, side=32, seed=0):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _normalise(images, cfg):
    mean = torch.tensor(cfg.mean or IMAGENET_MEAN).view(1, 3, 1, 1)  # unset: ImageNet's
    std = torch.tensor(cfg.std or IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def test_shapes_and_dtype():
    v1, v2 = two_views(_images(), AugmentConfig(), torch.Generator().manual_seed(0))
    assert v1.shape == v2.shape == (8, 3, 32, 32)
    assert v1.dtype == v2.dtype == torch.float32
    small, _ = two_views(_images(), AugmentConfig(out_size=24), torch.Generator().manual_seed(0))
    assert small.shape == (8, 3, 24, 24)


def test_same_generator_state_gives_same_views_and_views_differ():
    images = _images()
    a1, a2 = two_views(images, AugmentConfig(), torch.Generator().manual_seed(3))
    b1, b2 = two_views(images, AugmentConfig(), torch.Generator().manual_seed(3))
    c1, _ = two_views(images, AugmentConfig(), torch.Generator().manual_seed(4))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.allclose(a1, c1)
    assert not torch.allclose(a1, a2)


def test_everything_off_is_exactly_normalisation():
    images = _images()
    v1, v2 = two_views(images, OFF, torch.Generator().manual_seed(0))
    assert torch.allclose(v1, _normalise(images, OFF), atol=1e-5)
    assert torch.allclose(v2, _normalise(images, OFF), atol=1e-5)


def test_flip_and_grayscale_and_solarize():
    images = _images()
    flipped = apply_view(images, sample_view_params(8, dataclasses.replace(OFF, flip_p=1.0), 0, torch.Generator()), OFF)
    assert torch.allclose(flipped, _normalise(images.flip(-1), OFF), atol=1e-5)

    grey_cfg = dataclasses.replace(OFF, grayscale_p=1.0)
    grey = apply_view(images, sample_view_params(8, grey_cfg, 0, torch.Generator()), grey_cfg)
    pixels = grey * torch.tensor(OFF.std).view(1, 3, 1, 1) + torch.tensor(OFF.mean).view(1, 3, 1, 1)
    x = images.float() / 255
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # ITU-R 601, as torchvision
    for c in range(3):
        assert torch.allclose(pixels[:, c], luma, atol=1e-5), c
    assert (luma - x[:, 0]).abs().max() > 0.1  # random colours: one channel alone is not the luma

    sol_cfg = dataclasses.replace(OFF, solarize_p=(0.0, 1.0))
    solar = apply_view(images, sample_view_params(8, sol_cfg, 1, torch.Generator()), sol_cfg)
    assert torch.allclose(solar, _normalise(torch.where(x >= 128 / 255, 1 - x, x) * 255, OFF), atol=1e-4)


def test_blur_and_solarize_are_asymmetric_between_views():
    cfg = AugmentConfig()
    first = sample_view_params(2000, cfg, 0, torch.Generator().manual_seed(0))
    second = sample_view_params(2000, cfg, 1, torch.Generator().manual_seed(0))
    assert first.blur.all() and not first.solarize.any()
    assert 0.05 < second.blur.float().mean() < 0.15
    assert 0.15 < second.solarize.float().mean() < 0.25
    assert 0.75 < first.jitter.float().mean() < 0.85


def test_blur_smooths_a_checkerboard():
    board = ((torch.arange(32).view(1, -1) + torch.arange(32).view(-1, 1)) % 2 * 255).to(torch.uint8)
    images = board.expand(4, 3, 32, 32).contiguous()
    cfg = dataclasses.replace(OFF, blur_p=(1.0, 1.0), blur_sigma=(1.0, 1.0))
    blurred = apply_view(images, sample_view_params(4, cfg, 0, torch.Generator()), cfg)
    assert blurred.std() < 0.5 * _normalise(images, OFF).std()


def test_shard_of_params_matches_shard_of_batch():
    images = _images(8)
    params = sample_view_params(8, AugmentConfig(), 1, torch.Generator().manual_seed(5))
    full = apply_view(images, params, AugmentConfig())
    shard = apply_view(images[4:], params.take(slice(4, 8)), AugmentConfig())
    assert torch.allclose(full[4:], shard, atol=1e-5)


def test_rejects_float_images_and_bad_config():
    with pytest.raises(ValueError, match=r"expected uint8 \(N, 3, S, S\), got torch.float32"):
        two_views(torch.zeros(2, 3, 8, 8), AugmentConfig(), torch.Generator())
    with pytest.raises(ValueError, match=r"crop_scale must satisfy .*got \(0.5, 1.5\)"):
        AugmentConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="blur_kernel must be odd and positive, got 4"):
        AugmentConfig(blur_kernel=4)
