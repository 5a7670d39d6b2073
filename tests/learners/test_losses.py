import math

import pytest
import torch

from learners.losses import cosine_momentum, mocov3_infonce, warmup_cosine_lr


def test_infonce_matches_hand_computed_value():
    # Orthonormal q = k, T = 0.5: logits [[2, 0], [0, 2]], CE per row log(1 + e^-2), times 2T = 1.
    q = torch.eye(2)
    assert mocov3_infonce(q, q, 0.5).item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    # Swapped keys put the positive on the small logit: log(1 + e^2).
    swapped = torch.eye(2).flip(0)
    assert mocov3_infonce(q, swapped, 0.5).item() == pytest.approx(math.log(1 + math.exp(2)), rel=1e-6)


def test_infonce_normalises_and_scales_by_two_t():
    q = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    k = torch.tensor([[2.0, 0.0], [0.0, 7.0]])
    t = 0.2
    expected = 2 * t * math.log(1 + math.exp(-1 / t))
    assert mocov3_infonce(q, k, t).item() == pytest.approx(expected, rel=1e-5)


def test_infonce_label_offset_picks_this_ranks_keys():
    q = torch.tensor([[0.0, 1.0]])
    keys = torch.eye(2)  # rank 0's key is e0, rank 1's key is e1
    assert mocov3_infonce(q, keys, 1.0, label_offset=1) < mocov3_infonce(q, keys, 1.0, label_offset=0)
    assert mocov3_infonce(q, keys, 1.0, label_offset=1).item() == pytest.approx(2 * math.log(1 + math.exp(-1)), rel=1e-6)


def test_infonce_rejects_bad_input():
    with pytest.raises(ValueError, match=r"q \(B, D\) and k \(M, D\); got \(2, 3\) and \(2, 4\)"):
        mocov3_infonce(torch.ones(2, 3), torch.ones(2, 4), 0.2)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
        mocov3_infonce(torch.ones(2, 3), torch.ones(2, 3), 0.0)


def test_cosine_momentum_rises_from_base_to_one():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(500, 100, 0.99) == pytest.approx(1.0)


def test_warmup_cosine_lr():
    assert warmup_cosine_lr(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert warmup_cosine_lr(4, 100, 10, 1.0) == pytest.approx(0.5)
    assert warmup_cosine_lr(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine_lr(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert warmup_cosine_lr(55, 100, 10, 1.0, min_lr=0.2) == pytest.approx(0.6)
    assert warmup_cosine_lr(100, 100, 10, 1.0, min_lr=0.1) == pytest.approx(0.1)
    assert warmup_cosine_lr(1000, 100, 10, 1.0) == pytest.approx(0.0)
    assert warmup_cosine_lr(0, 100, 0, 1.0) == pytest.approx(1.0)
