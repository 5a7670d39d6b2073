"""Convolutions on inputs of a few pixels, computed as the linear maps they are.

At 32 px an EfficientNet's last stages see 2x2 and 1x1 feature maps. There a 5x5 depthwise
convolution is a per-channel product with the few taps that meet a pixel, and a pointwise one a
matrix product; the CPU's convolution kernels do not know it: on one core the depthwise
backward at 1x1 took 10 ms a call and a pointwise convolution ran at a third of a matmul's speed
(`bench/bench_moco_step.py`). `small_input_convs(module)` gives every `Conv2d` in `module` (and
timm's TF-"same" `Conv2dSame`) a forward that, on CPU inputs of at most `max_pixels` pixels, gathers
the taps that meet the input and multiplies: the same function of the same parameters (state dict,
optimizer and momentum copy unchanged), equal to the convolution up to float rounding
(`tests/learners/test_small_convs.py`). Larger inputs take the ordinary convolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn


def _taps(size: int, out_size: int, kernel: int, stride: int, pad_before: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out_size, size) kernel index that output position o takes from input position i, and whether it exists."""
    tap = torch.arange(size)[None, :] + pad_before - stride * torch.arange(out_size)[:, None]
    valid = (tap >= 0) & (tap < kernel)
    return tap.clamp(0, kernel - 1), valid


def _geometry(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int, int, int]:
    """(out_h, out_w, pad_top, pad_left) of `conv` on an input of height x width."""
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    if isinstance(conv, Conv2dSame):  # TF "same": out = ceil(in / stride), the odd pad pixel after
        out_h, out_w = math.ceil(height / sh), math.ceil(width / sw)
        pad_h = max((out_h - 1) * sh + kh - height, 0)
        pad_w = max((out_w - 1) * sw + kw - width, 0)
        return out_h, out_w, pad_h // 2, pad_w // 2
    ph, pw = conv.padding
    return (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1, ph, pw


def small_input_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a dense or depthwise convolution, as a gather of the taps that meet x and a product."""
    batch, channels, height, width = x.shape
    out_h, out_w, pad_top, pad_left = _geometry(conv, height, width)
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    weight = conv.weight
    pointwise = (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and (pad_top, pad_left) == (0, 0)
    if pointwise and conv.groups == 1:  # a matmul per pixel
        rows = x.permute(0, 2, 3, 1).reshape(-1, channels)  # (B*H*W, C_in); free for channels_last x
        out = F.linear(rows, weight.flatten(1), conv.bias)
        return out.view(batch, height, width, -1).permute(0, 3, 1, 2)
    tap_h, valid_h = _taps(height, out_h, kh, sh, pad_top)
    tap_w, valid_w = _taps(width, out_w, kw, sw, pad_left)
    device = weight.device
    # (C_out, C_in/groups, out_h, out_w, H, W): the weight each output pixel gives each input pixel
    taps = weight[:, :, tap_h.to(device)[:, None, :, None], tap_w.to(device)[None, :, None, :]]
    mask = (valid_h[:, None, :, None] & valid_w[None, :, None, :]).to(device=device, dtype=weight.dtype)
    taps = taps * mask
    pixels, out_pixels = height * width, out_h * out_w
    if conv.groups == 1:
        matrix = taps.permute(0, 2, 3, 1, 4, 5).reshape(conv.out_channels * out_pixels, channels * pixels)
        out = F.linear(x.reshape(batch, channels * pixels), matrix).view(batch, conv.out_channels, out_h, out_w)
    else:  # depthwise: out[b, o, c] = sum_p x[b, p, c] * taps[c, o, p], channels last (NHWC) throughout
        per_channel = taps.reshape(channels, out_pixels, pixels).permute(1, 2, 0)  # (O, P, C)
        rows = x.permute(0, 2, 3, 1).reshape(batch, pixels, channels)  # (B, P, C); free for channels_last x
        out = rows[:, 0, None, :] * per_channel[:, 0]
        for p in range(1, pixels):  # a few broadcast products: faster on the CPU than C tiny matmuls
            out = out + rows[:, p, None, :] * per_channel[:, p]
        out = out.view(batch, out_h, out_w, channels).permute(0, 3, 1, 2)
    if conv.bias is not None:
        out = out + conv.bias.view(1, -1, 1, 1)
    return out


def _supported(conv: nn.Conv2d) -> bool:
    depthwise = conv.groups == conv.in_channels == conv.out_channels
    return (conv.dilation == (1, 1) and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and (conv.groups == 1 or depthwise))


class _SmallInputRoute:
    """The forward of a convolution class that takes the gather-and-multiply route on CPU inputs of at
    most `max_pixels` pixels (measured on the CPU only; a GPU keeps its convolution kernels)."""

    max_pixels: int = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cpu and x.shape[-2] * x.shape[-1] <= self.max_pixels:
            return small_input_conv(self, x)
        return super().forward(x)


class SmallInputConv2d(_SmallInputRoute, nn.Conv2d):
    """An `nn.Conv2d` with the small-input route."""


class SmallInputConv2dSame(_SmallInputRoute, Conv2dSame):
    """timm's TF-"same" convolution with the small-input route."""


def small_input_convs(module: nn.Module, max_pixels: int = 4) -> int:
    """Give every supported convolution in `module` the small-input route, in place; returns how many.

    The modules keep their parameters, buffers and state-dict keys: only their class changes (to a
    subclass whose forward differs on small inputs), so a checkpoint loads either way.
    """
    count = 0
    for conv in module.modules():
        if type(conv) not in (nn.Conv2d, Conv2dSame) or not _supported(conv):
            continue
        conv.__class__ = SmallInputConv2dSame if isinstance(conv, Conv2dSame) else SmallInputConv2d
        conv.max_pixels = max_pixels
        count += 1
    return count
