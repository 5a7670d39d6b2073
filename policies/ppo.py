"""PPO math for token-level policies, as pure functions over (B, T) tensors with a response mask.

Shapes: B sampled queries, T response tokens; `mask` (B, T) is 1.0 on tokens that belong to the
response (up to and including its end token) and 0.0 on padding. Nothing here touches a model,
an optimiser or a file, so each piece is unit-tested on hand-made numbers.

The episode of one query is its token sequence: each token gets the per-token KL penalty
-kl_coef * (log pi - log pi_ref) as reward, and the last token also gets the query's (normalised)
score. GAE then spreads the score back over the tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise the masked entries to mean 0 (unless shift_mean=False) and std 1; padding -> 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL sample log pi(a) - log pi_ref(a) (k1): unbiased, can be negative per token."""
    return logprobs - ref_logprobs


def approx_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from samples of pi: r - 1 - log r >= 0, r = pi_ref/pi."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                  mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """(B, T) rewards: -kl_coef * KL sample on every response token, plus the (B,) score on the last."""
    rewards = -kl_coef * token_kl(logprobs, ref_logprobs) * mask
    last = (mask.sum(dim=1).long() - 1).clamp_min(0)  # (B,) index of each response's last token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (both (B, T)); the episode ends at the mask's end."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t] * mask[:, t]  # 0 beyond the end: the terminal state has no value
    return advantages, (advantages + values) * mask


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, negated to a loss; also the fraction of tokens where clipping bit."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float) -> torch.Tensor:
    """0.5 * max of squared errors of the new values and of the values kept within clip of the old."""
    kept = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (kept - returns) ** 2), mask)


@dataclass
class RunningMoments:
    """Running mean and std of every reward seen (Chan's parallel merge), for reward normalisation."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean

    def update(self, values: list[float]) -> None:
        if not values:
            return
        n = len(values)
        batch_mean = sum(values) / n
        batch_m2 = sum((v - batch_mean) ** 2 for v in values)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def normalise(self, values: list[float]) -> list[float]:
        scale = self.std if self.std > 1e-8 else 1.0
        return [(v - self.mean) / scale for v in values]


@dataclass
class AdaptiveKL:
    """The per-token KL coefficient, steered towards a target KL per query (Ziegler et al. 2019's
    adaptive controller, as TRL's AdaptiveKLController): after each update,
    coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon, with kl the batch's mean KL to the
    reference per query (nats) and n its queries. With target None the coefficient stays fixed.
    `horizon` is in queries: at 16 queries a round and horizon 32 it moves at most 10% a round."""

    coef: float
    target: float | None = None
    horizon: int = 32

    def update(self, kl: float, n: int) -> None:
        if self.target is None or not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n / self.horizon


REWARD_SHAPES = ("raw", "log")


def shape_reward(reward: float, how: str, scale: float) -> float:
    """A query's reward as PPO sees it. `raw`: as it came. `log`: log(1 + scale * reward) /
    log(1 + scale), which keeps 0 at 0 and 1 at 1 but pays most for the first finds: with the yield
    reward (new finds per result asked for) and scale = results per query, 1 new find of 40 earns
    0.19, 4 earn 0.43, 40 earn 1. Negative rewards (aggregate rewards below the background) keep
    their sign through the same curve."""
    if how == "raw":
        return reward
    if how == "log":
        return math.copysign(math.log1p(scale * abs(reward)) / math.log1p(scale), reward)
    raise ValueError(f"unknown reward shape {how!r}; valid: {', '.join(REWARD_SHAPES)}")
