"""Loss and schedule math for MoCo-v3, as pure functions (no state, no I/O).

`mocov3_infonce` follows moco-v3's `contrastive_loss`: queries and keys are L2-normalised, the
positive for query i is key i (offset by `label_offset` when keys were gathered from all ranks),
and the cross-entropy is scaled by 2T so that the gradient magnitude does not depend on T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mocov3_infonce(q: torch.Tensor, k: torch.Tensor, temperature: float, label_offset: int = 0) -> torch.Tensor:
    """InfoNCE of queries `q` (B, D) against keys `k` (M, D), M >= B; positives on the diagonal.

    `label_offset` is where this rank's keys start in `k` when `k` holds the keys of every rank.
    """
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"expected q (B, D) and k (M, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    logits = q @ k.T / temperature  # (B, M)
    labels = torch.arange(q.shape[0], device=q.device) + label_offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


def cosine_momentum(step: int, total: int, base: float) -> float:
    """Momentum of the key encoder: `base` at step 0, rising on a half cosine to 1 at `total`."""
    progress = min(max(step, 0), total) / total
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base)


def warmup_cosine_lr(step: int, total: int, warmup: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warmup to `base_lr` over `warmup` steps, then half-cosine decay to `min_lr` at `total`.

    Warmup counts from step 1 (`base_lr / warmup` at step 0) so that no step is spent at lr 0.
    Steps past `total` stay at `min_lr`: a continual learner may keep training after the schedule.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    decay_steps = max(total - warmup, 1)
    progress = min(step - warmup, decay_steps) / decay_steps
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
