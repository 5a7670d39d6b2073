"""Two-view MoCo-v3 augmentations, batched on tensors so they run wherever the images live.

Every random choice is drawn per sample from a CPU `torch.Generator` first (`sample_view_params`)
and applied afterwards (`apply_view`), so a batch is reproducible from the generator state alone,
whatever the device, and a distributed learner can draw the parameters of the global batch and
apply only its own shard (`ViewParams.take`).

The recipe is moco-v3's (BYOL's asymmetric one): random resized crop, horizontal flip, colour
jitter (p=0.8), grayscale (p=0.2), gaussian blur (view 1 always, view 2 p=0.1), solarize (view 2
p=0.2), normalise. Differences from the PIL pipeline, for batching: the jitter ops run in a fixed
order (brightness, contrast, saturation, hue) instead of a random one, and the hue shift is a
rotation of the chroma plane in YIQ space (linear, per-sample) instead of an HSV round trip.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as torchvision's rgb_to_grayscale
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


@dataclass(kw_only=True, frozen=True)
class AugmentConfig:
    """Parameters of the two views; pairs are (view 1, view 2)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # crop area / image area; 0.2 suits 32 px images
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range, sampled log-uniformly
    out_size: int | None = None  # output side in pixels; None keeps the input side
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1  # hue shift drawn from [-h, h] turns
    grayscale_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 3  # about 10% of a 32 px side, as moco-v3's 23 px at 224
    solarize_p: tuple[float, float] = (0.0, 0.2)
    # Input normalisation; None: the backbone's own (the learner fills it in, ImageNet's by default).
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        probs = [self.flip_p, self.jitter_p, self.grayscale_p, *self.blur_p, *self.solarize_p]
        if any(not 0 <= p <= 1 for p in probs):
            raise ValueError(f"probabilities must lie in [0, 1], got {probs}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd and positive, got {self.blur_kernel}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0 <= self.hue <= 0.5:
            raise ValueError("jitter strengths must be >= 0 and hue in [0, 0.5]")
        if (self.std is not None and min(self.std) <= 0) or (self.out_size is not None and self.out_size < 1):
            raise ValueError("std must be > 0 and out_size >= 1")


@dataclass(frozen=True)
class ViewParams:
    """Per-sample random parameters of one view; every field has length N on dim 0."""

    theta: torch.Tensor  # (N, 2, 3) affine map from output to input coordinates (crop + flip)
    jitter: torch.Tensor  # (N,) bool
    factors: torch.Tensor  # (N, 4) brightness, contrast, saturation, hue
    grayscale: torch.Tensor  # (N,) bool
    blur: torch.Tensor  # (N,) bool
    sigma: torch.Tensor  # (N,)
    solarize: torch.Tensor  # (N,) bool

    def take(self, index: torch.Tensor | slice) -> "ViewParams":
        """The parameters of a subset of the samples (e.g. one rank's shard of the batch)."""
        return ViewParams(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    @staticmethod
    def cat(parts: list["ViewParams"]) -> "ViewParams":
        """The parameters of several batches, one after another."""
        return ViewParams(**{f.name: torch.cat([getattr(p, f.name) for p in parts])
                             for f in dataclasses.fields(ViewParams)})

    def to(self, device: torch.device | str) -> "ViewParams":
        return ViewParams(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _bernoulli(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def _crop_theta(n: int, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop + flip as affine maps in normalised [-1, 1] coordinates."""
    area = _uniform(n, *cfg.crop_scale, generator)
    log_ratio = _uniform(n, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), generator)
    ratio = log_ratio.exp()
    # Crop sides as fractions of the image side; clamping replaces torchvision's rejection loop.
    width = (area * ratio).sqrt().clamp(max=1.0)
    height = (area / ratio).sqrt().clamp(max=1.0)
    cx = (2 * torch.rand(n, generator=generator) - 1) * (1 - width)
    cy = (2 * torch.rand(n, generator=generator) - 1) * (1 - height)
    flip = torch.where(_bernoulli(n, cfg.flip_p, generator), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    return theta


def sample_view_params(n: int, cfg: AugmentConfig, view: int, generator: torch.Generator) -> ViewParams:
    """Draw the random parameters of view `view` (0 or 1) for `n` images from a CPU generator."""
    if view not in (0, 1):
        raise ValueError(f"view must be 0 or 1, got {view}")
    theta = _crop_theta(n, cfg, generator)
    jitter = _bernoulli(n, cfg.jitter_p, generator)
    factors = torch.stack([
        _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, generator),
        _uniform(n, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, generator),
        _uniform(n, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, generator),
        _uniform(n, -cfg.hue, cfg.hue, generator),
    ], dim=1)
    grayscale = _bernoulli(n, cfg.grayscale_p, generator)
    blur = _bernoulli(n, cfg.blur_p[view], generator)
    sigma = _uniform(n, *cfg.blur_sigma, generator)
    solarize = _bernoulli(n, cfg.solarize_p[view], generator)
    return ViewParams(theta=theta, jitter=jitter, factors=factors, grayscale=grayscale,
                      blur=blur, sigma=sigma, solarize=solarize)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) grayscale."""
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) plane of YIQ by `turns` * 360 degrees per sample."""
    to_yiq = torch.tensor(_RGB_TO_YIQ, device=x.device, dtype=x.dtype)
    angle = 2 * math.pi * turns
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.zeros(x.shape[0], 3, 3, device=x.device, dtype=x.dtype)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    mix = torch.linalg.inv(to_yiq) @ rotation @ to_yiq  # (N, 3, 3) in RGB space
    return torch.einsum("nij,njhw->nihw", mix, x)


def _colour_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    brightness, contrast, saturation, hue = factors.unbind(dim=1)
    x = (x * _per_sample(brightness)).clamp(0, 1)
    mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * _per_sample(contrast) + mean).clamp(0, 1)
    gray = _luma(x)
    x = ((x - gray) * _per_sample(saturation) + gray).clamp(0, 1)
    return _rotate_hue(x, hue).clamp(0, 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable blur with a per-sample sigma, as one grouped convolution per axis."""
    n, c, h, w = x.shape
    offsets = torch.arange(kernel, device=x.device, dtype=x.dtype) - kernel // 2
    weights = torch.exp(-offsets.square() / (2 * sigma.view(-1, 1).square()))  # (N, k)
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, k)
    pad = kernel // 2
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), weights.view(n * c, 1, 1, kernel), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), weights.view(n * c, 1, kernel, 1), groups=n * c)
    return flat.view(n, c, h, w)


def apply_view(images: torch.Tensor, params: ViewParams, cfg: AugmentConfig) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> normalised float32 (N, 3, out, out) on the images' device."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 (N, 3, S, S), got {images.dtype} {tuple(images.shape)}")
    p = params.to(images.device)
    n, _, side, _ = images.shape
    out = cfg.out_size or side
    x = images.float() / 255
    grid = F.affine_grid(p.theta, [n, 3, out, out], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = torch.where(_per_sample(p.jitter), _colour_jitter(x, p.factors), x)
    x = torch.where(_per_sample(p.grayscale), _luma(x).expand_as(x), x)
    if p.blur.any():
        x = torch.where(_per_sample(p.blur), _gaussian_blur(x, p.sigma, cfg.blur_kernel), x)
    x = torch.where(_per_sample(p.solarize) & (x >= 128 / 255), 1 - x, x)
    mean = torch.tensor(cfg.mean or IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std or IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def two_views(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Both MoCo-v3 views of a uint8 batch; reproducible from `generator` (a CPU generator)."""
    n = images.shape[0]
    first = sample_view_params(n, cfg, 0, generator)
    second = sample_view_params(n, cfg, 1, generator)
    return apply_view(images, first, cfg), apply_view(images, second, cfg)
