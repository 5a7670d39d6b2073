"""PPO on a query LM's samples: the batch waiting for its rewards (`Rollout`) and the update.

`PPOUpdate` is the half of `policies.ppo_llm.LLMQueryPolicy` that trains: it scores a sampled batch
(log-probabilities, values, reference log-probabilities) when it is proposed and, once the rewards
arrive, runs `ppo_epochs` epochs of the clipped objective on it (policies/ppo.py has the math). It
reads the policy's `config` (an LLMPolicyConfig), `model` (a QueryLM), `reference` (a frozen LM, or
None: the model with its LoRA adapters disabled), `optimizer`, `moments`, `kl` (a ppo.AdaptiveKL),
`tokenizer`, `banned` and writes `stats`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from policies import ppo
from policies.base import Query
from policies.llm_models import response_mask, response_outputs, token_logprobs, torch_threads

INVALID_QUERY_PENALTY = -2.0  # empty text, not UTF-8, control characters, no letter; malformed (clean_query)
DUPLICATE_QUERY_PENALTY = -1.0  # exact repeat of a query already issued


@dataclass
class Rollout:
    """A sampled batch waiting for its rewards. Rows are LM samples grouped by prompt; `query_index`
    says which issued query each row produced (-1: never issued), `invalid` rows score the penalty."""

    queries: list[Query]
    prompts: list[torch.Tensor]  # per group (1, P_g)
    group_sizes: list[int]
    responses: torch.Tensor  # (B, T)
    query_index: list[int]
    invalid: list[bool]
    duplicate: list[bool]
    logprobs: torch.Tensor | None = None  # (B, T) under the sampling policy
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    novelty: list[float] | None = None  # per row, LLMQueryPolicy._novelty (None: no bonus)

    def state_dict(self) -> dict:
        state = asdict(self)
        state["queries"] = [[q.text, q.concept] for q in self.queries]
        return state

    @classmethod
    def from_state(cls, state: dict) -> Rollout:
        return cls(**{**state, "queries": [Query(t, c) for t, c in state["queries"]]})

    def select(self, rows: list[int]) -> Rollout:
        """The rollout restricted to `rows` (kept in order); groups that lose all rows are dropped."""
        keep = set(rows)
        bounds = np.cumsum([0, *self.group_sizes]).tolist()
        prompts, sizes = [], []
        for g, prompt in enumerate(self.prompts):
            size = sum(bounds[g] <= r < bounds[g + 1] for r in keep)
            if size:
                prompts.append(prompt)
                sizes.append(size)
        rows = sorted(keep)
        return Rollout(self.queries, prompts, sizes, self.responses[rows], [self.query_index[r] for r in rows],
                       [self.invalid[r] for r in rows], [self.duplicate[r] for r in rows],
                       novelty=None if self.novelty is None else [self.novelty[r] for r in rows])

    def observed(self, queries: list[Query]) -> Rollout | None:
        """The rollout for the rewards of `queries`, the issued queries whose search answered (in
        issue order; a failed search is no observation): rows of other queries are dropped, invalid
        rows (scored by their penalty alone) kept, `query_index` points into `queries`, and the
        scores PPO needs come along. None when no valid row is left: every row would score the same
        penalty, and the whitened advantages would keep nothing of it to learn from."""
        position, j = {}, 0
        for i, q in enumerate(self.queries):  # `queries` is a subsequence of the batch (then any retries)
            if j < len(queries) and queries[j] == q:
                position[i], j = j, j + 1
        rows = [r for r, (qi, bad) in enumerate(zip(self.query_index, self.invalid)) if bad or qi in position]
        if all(self.invalid[r] for r in rows):
            return None
        out = self.select(rows)
        out.queries, out.query_index = list(queries), [position.get(self.query_index[r], -1) for r in rows]
        for name in ("logprobs", "ref_logprobs", "values"):
            if getattr(self, name) is not None:
                setattr(out, name, getattr(self, name)[rows])
        return out


class PPOUpdate:
    """Scores a proposed batch and runs the PPO update on it (see the module docstring)."""

    def _evaluate(self, rollout: Rollout, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probabilities (B, T) of the rollout's responses (and values when `model` is a QueryLM).
        Each group's prompt runs once for all its responses (`response_outputs`), and only up to the
        group's longest response: the padding after every row's stop token is never computed (its
        log-probabilities and values are 0, as the mask ignores them)."""
        logprobs, values, start = [], [], 0
        width = rollout.responses.shape[1]
        for prompt, size in zip(rollout.prompts, rollout.group_sizes):
            responses = rollout.responses[start:start + size]
            mask = response_mask(responses, self.tokenizer.stops)
            used = max(1, int(mask.sum(dim=1).max()))
            logits, value = response_outputs(model, prompt, responses[:, :used])
            lp = token_logprobs(logits, responses[:, :used], self.config.temperature, self.banned)
            logprobs.append(nn.functional.pad(lp.masked_fill(mask[:, :used] == 0, 0.0), (0, width - used)))
            if value is not None:
                values.append(nn.functional.pad(value, (0, width - used)))
            start += size
        return torch.cat(logprobs), (torch.cat(values) if values else None)

    def _minibatches(self, rollout: Rollout) -> list[list[int]]:
        rows, size = list(range(len(rollout.responses))), self.config.ppo_minibatch
        return [rows[i:i + size] for i in range(0, len(rows), size)]

    @torch.no_grad()
    def _evaluate_all(self, rollout: Rollout, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_evaluate` over the whole rollout, a minibatch at a time (a pretrained LM's logits are large)."""
        parts = [self._evaluate(rollout.select(rows), model) for rows in self._minibatches(rollout)]
        values = [v for _, v in parts if v is not None]
        return torch.cat([lp for lp, _ in parts]), (torch.cat(values) if values else None)

    def _score_samples(self, rollout: Rollout) -> Rollout:
        """The rollout's log-probabilities, values and reference log-probabilities, which PPO needs
        (skipped without PPO updates: `llm-prompt` only samples)."""
        if not self.config.ppo_updates:
            return rollout
        with torch_threads(self.config.compute_threads):
            rollout.logprobs, rollout.values = self._evaluate_all(rollout, self.model)
            rollout.ref_logprobs = self._reference_logprobs(rollout)
        return rollout

    def _reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        if self.reference is not None:
            return self._evaluate_all(rollout, self.reference)[0]
        with self.model.lm.disable_adapter():  # the pretrained LM itself
            return self._evaluate_all(rollout, self.model.lm)[0]

    def _scores(self, rollout: Rollout, rewards: list[float]) -> torch.Tensor:
        """(B,) scores: the issued query's shaped reward plus its novelty bonus, normalised, or a penalty."""
        cfg = self.config
        novelty = rollout.novelty or [0.0] * len(rollout.invalid)
        earned = [ppo.shape_reward(rewards[i], cfg.reward_shape, cfg.reward_scale) + cfg.novelty_bonus * new
                  for i, bad, new in zip(rollout.query_index, rollout.invalid, novelty) if not bad]
        self.moments.update(earned)
        normalised = iter(self.moments.normalise(earned))
        scores = [INVALID_QUERY_PENALTY if bad else next(normalised) + DUPLICATE_QUERY_PENALTY * dup
                  for bad, dup in zip(rollout.invalid, rollout.duplicate)]
        return torch.tensor(scores)

    def _ppo_step(self, rollout: Rollout, rewards: list[float]) -> None:
        cfg = self.config
        mask = response_mask(rollout.responses, self.tokenizer.stops)
        scores = self._scores(rollout, rewards)
        per_token = ppo.token_rewards(scores, rollout.logprobs, rollout.ref_logprobs, mask, self.kl.coef)
        advantages, returns = ppo.gae(per_token, rollout.values, mask, cfg.gamma, cfg.lam)
        advantages = ppo.whiten(advantages, mask)
        self.model.train()
        total = mask.sum().clamp_min(1.0)
        for _ in range(cfg.ppo_epochs):  # one step per epoch on the whole batch, minibatch gradients summed
            self.optimizer.zero_grad()
            policy_loss = value_loss = clipped = torch.zeros(())
            for rows in self._minibatches(rollout):
                logprobs, values = self._evaluate(rollout.select(rows), self.model)
                part, weight = mask[rows], mask[rows].sum() / total  # masked means weighted back to the batch's
                pl, cf = ppo.clipped_policy_loss(logprobs, rollout.logprobs[rows], advantages[rows], part, cfg.clip)
                vl = ppo.clipped_value_loss(values, rollout.values[rows], returns[rows], part, cfg.value_clip)
                (weight * (pl + cfg.value_coef * vl)).backward()
                policy_loss, value_loss = policy_loss + weight * pl.detach(), value_loss + weight * vl.detach()
                clipped = clipped + weight * cf
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
        logprobs, _ = self._evaluate_all(rollout, self.model)
        kl = (ppo.approx_kl(logprobs, rollout.ref_logprobs) * mask).sum(dim=1).mean()
        used = self.kl.coef  # the coefficient this update used; the controller sets the next one's
        self.kl.update(float(kl), len(rollout.responses))
        self.stats.update({"kl_to_reference": float(kl), "kl_coef": used, "clip_fraction": float(clipped),
                           "policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
                           "mean_score": float(scores.mean())})
