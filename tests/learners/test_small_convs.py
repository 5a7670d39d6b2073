import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

from learners.mixture import TrainingMixture
from learners.moco import MoCoConfig, MoCoLearner
from learners.small_convs import SmallInputConv2d, SmallInputConv2dSame, small_input_convs

# (module, input side): the shapes an EfficientNet's last stages meet at 32 px, and their neighbours
CASES = [
    (lambda: nn.Conv2d(6, 6, 5, padding=2, groups=6, bias=False), (1, 1)),   # depthwise 5x5 at 1x1
    (lambda: nn.Conv2d(6, 6, 5, padding=2, groups=6, bias=False), (2, 2)),   # ... at 2x2
    (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=True), (2, 1)),    # depthwise 3x3, a bias
    (lambda: Conv2dSame(6, 6, 5, stride=2, groups=6, bias=False), (2, 2)),   # TF "same", stride 2
    (lambda: Conv2dSame(6, 6, 3, stride=2, groups=6, bias=False), (1, 1)),
    (lambda: nn.Conv2d(6, 10, 1, bias=False), (2, 2)),                        # pointwise
    (lambda: nn.Conv2d(6, 10, 1, bias=True), (1, 1)),
    (lambda: nn.Conv2d(6, 6, 1, groups=6, bias=True), (2, 2)),               # depthwise 1x1
    (lambda: nn.Conv2d(6, 10, 3, padding=1, bias=True), (2, 2)),             # dense 3x3
    (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=False), (2, 2)),
    (lambda: nn.Conv2d(6, 10, (3, 1), bias=False), (3, 1)),                  # no padding, a 3x1 kernel
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_small_input_conv_is_the_convolution_with_its_gradients(case, channels_last):
    make, (height, width) = CASES[case]
    torch.manual_seed(case)
    reference = make().double()
    fast = copy.deepcopy(reference)
    assert small_input_convs(fast) == 1
    x = torch.randn(5, 6, height, width, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ref, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_fast = reference(x_ref), fast(x_fast)
    assert out_fast.shape == out_ref.shape
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(out_ref)
    (out_ref * upstream).sum().backward()
    (out_fast * upstream).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for p_fast, p_ref in zip(fast.parameters(), reference.parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-10, atol=1e-12)


def test_only_small_inputs_take_the_other_route(monkeypatch):
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    small_input_convs(conv, max_pixels=4)
    calls = []
    monkeypatch.setattr("learners.small_convs.small_input_conv", lambda c, x: calls.append(x.shape) or F.conv2d(
        x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups))
    conv(torch.randn(2, 4, 2, 2))
    conv(torch.randn(2, 4, 3, 2))
    assert calls == [torch.Size([2, 4, 2, 2])]


def test_the_swap_keeps_parameters_and_state_dict_and_skips_what_it_cannot_do():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, dilation=2, padding=2),
                          nn.Conv2d(8, 8, 3, padding=1, groups=2), Conv2dSame(8, 8, 3, stride=2))
    params, keys = [id(p) for p in model.parameters()], list(model.state_dict())
    assert small_input_convs(model) == 2  # not the dilated one, not the grouped (neither dense nor depthwise)
    assert [type(m) for m in model] == [SmallInputConv2d, nn.Conv2d, nn.Conv2d, SmallInputConv2dSame]
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys


def test_a_moco_step_with_small_input_convs_matches_the_convolutions():
    """The world configs' learner (32 px, stages 4-6 of an EfficientNet train on 2x2 and 1x1 maps)."""
    values = dict(backbone="tf_efficientnet_lite0", backbone_kwargs={}, pretrained="pypi", image_size=32,
                  frozen_stages=4, freeze_bn=True, mlp_dim=64, dim=32, batch_size=16, total_steps=10,
                  warmup_steps=0, seed=3)
    mixture = TrainingMixture(torch.randint(0, 256, (16, 3, 28, 28), dtype=torch.uint8,
                                            generator=torch.Generator().manual_seed(0)))
    losses = {}
    for fast in (False, True):
        torch.manual_seed(0)
        learner = MoCoLearner(MoCoConfig(**values, small_input_convs=fast), device="cpu")
        swapped = [m for m in learner.model.modules() if isinstance(m, (SmallInputConv2d, SmallInputConv2dSame))]
        assert bool(swapped) == fast
        losses[fast] = [learner.train_step(mixture) for _ in range(3)]
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-6)  # the same function
    # then the runs drift apart: Adam's first steps move each weight about +-lr whatever its gradient's size,
    # so float32 rounding of a near-zero gradient (which depends on the threads) moves it a full step either way
    assert losses[True][1:] == pytest.approx(losses[False][1:], rel=5e-2)
