"""How any image becomes the pipeline's pixels: uint8 (3, S, S) RGB. The fetcher, the target and
the engine's image index all go through `to_pipeline_tensor`, so a web image, a target image and
an image query are seen alike (grey broadcast to three channels, alpha onto white, the longer side
scaled to S and padded with white: clip art is often wide or tall and a centre crop would cut its
subject off)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where tensors are made: importing the fetcher stays light
    import torch


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale to 8-bit 'L' (PIL's own convert clips instead of scaling)."""
    pixels = np.asarray(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and pixels.max(initial=0) > 255):
        pixels = np.clip(pixels, 0, 65535) / 257.0
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")


def to_pipeline_tensor(image: Image.Image, size: int = 32) -> torch.Tensor:
    """uint8 (3, size, size) RGB: alpha onto white, longer side scaled to `size`, padded with white."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    image = image.convert("RGBA" if has_alpha else "RGB")
    w, h = image.size
    scale = size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_w, new_h) != (w, h):  # PIL resizes RGBA premultiplied, so edges do not go dark
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    offset = ((size - new_w) // 2, (size - new_h) // 2)
    if has_alpha:
        canvas.alpha_composite(image, offset)
    else:
        canvas.paste(image, offset)
    rgb = np.asarray(canvas.convert("RGB"))  # (S, S, 3)
    import torch  # here, not at module load: the fetcher imports this module

    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()
