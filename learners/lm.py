"""A small causal LM trained continually on packed text, with the LLaMA recipe and spike recovery.

The model is a `transformers` LLaMA (RMSNorm, SwiGLU, RoPE, optional grouped-query attention); with
`router` set, every (or every other) MLP is a routed layer of `num_experts` SwiGLU experts, one per
token, so compute per token matches the dense model of the same shape (learners/routing.py: the
`switch`, `sbase` and `hash` routers). `LMLearner` trains it
with AdamW (no decay on norm weights), linear warmup + cosine decay, gradient clipping, gradient
accumulation and bf16 autocast on CUDA. Under torchrun (WORLD_SIZE > 1) the model is wrapped in
DistributedDataParallel (learners/distributed.py): every rank reads the same global batch from its
own copy of the stream and trains on its rows, so `batch_size` is the global batch whatever the
number of ranks, and the cursor, weights and checkpoints are the same on every rank.

Fault handling, as Gopher and PaLM describe: a step whose loss or gradient norm is not finite never
touches the weights or the optimizer; a sustained loss spike (`learners.spikes`) restores the newest
in-memory snapshot taken at least `rollback_steps` earlier and keeps the data cursor where it is, so
the batches seen since that snapshot are skipped. Every such event lands in `LMLearner.events`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from learners.checkpoint import atomic_torch_save
from learners.distributed import default_device, distributed_setup, global_mean, rank_rows
from learners.losses import warmup_cosine_lr
from learners.routing import DENSE, ROUTER_NAMES, WIDE, active_params, make_routed, make_wide, router_aux_loss
from learners.spikes import SpikeConfig, SpikeDetector, rollback_target
from learners.text_data import PackedTextStream


@dataclass(kw_only=True, frozen=True)
class LMShape:
    """Transformer shape; `nominal_params` counts non-embedding parameters of the dense model."""

    hidden_size: int
    intermediate_size: int  # SwiGLU width, ~8/3 of hidden_size as in LLaMA
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads: grouped-query attention
    nominal_params: int = 0

    def __post_init__(self):
        if min(self.hidden_size, self.intermediate_size, self.num_layers, self.num_heads, self.num_kv_heads) < 1:
            raise ValueError(f"every LMShape dimension must be >= 1: {self}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")


LM_SIZES: dict[str, LMShape] = {
    "nano": LMShape(hidden_size=128, intermediate_size=352, num_layers=5, num_heads=4, num_kv_heads=4,
                    nominal_params=1_000_000),
    "micro": LMShape(hidden_size=192, intermediate_size=512, num_layers=7, num_heads=6, num_kv_heads=6,
                     nominal_params=3_000_000),
    "small": LMShape(hidden_size=320, intermediate_size=864, num_layers=8, num_heads=5, num_kv_heads=5,
                     nominal_params=10_000_000),
    "base": LMShape(hidden_size=512, intermediate_size=1376, num_layers=10, num_heads=8, num_kv_heads=8,
                    nominal_params=30_000_000),
    "large": LMShape(hidden_size=768, intermediate_size=2048, num_layers=16, num_heads=12, num_kv_heads=4,
                     nominal_params=100_000_000),
}


@dataclass(kw_only=True, frozen=True)
class LMConfig:
    size: str = "nano"  # a key of LM_SIZES; ignored when `shape` is given
    shape: LMShape | None = None
    vocab_size: int = 8192  # must match the tokenizer
    seq_len: int = 256
    router: str = DENSE  # dense, a routed MLP (switch, sbase, hash) or a control (learners/routing.py)
    num_experts: int = 4  # experts per routed layer (one per token)
    route_every: int = 1  # route every layer (1) or every other layer (2)
    router_aux_loss_coef: float = 0.01  # weight of the switch router's balancing loss
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True  # small vocabularies dominate small models otherwise
    lr: float = 1e-3  # peak, after warmup
    min_lr: float = 1e-4
    warmup: int = 100
    total_steps: int = 10_000  # schedule length; later steps stay at min_lr
    weight_decay: float = 0.1  # matrices only
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    bf16: bool = True  # bf16 autocast on CUDA
    cpu_bf16: bool = False  # bf16 autocast on CPU (bench/bench_lm.py measures it)
    compile: bool = False
    seed: int = 0
    spikes: SpikeConfig = field(default_factory=SpikeConfig)

    def __post_init__(self):
        if isinstance(self.shape, dict):  # from a YAML / checkpoint mapping
            object.__setattr__(self, "shape", LMShape(**self.shape))
        if isinstance(self.spikes, dict):
            object.__setattr__(self, "spikes", SpikeConfig(**self.spikes))
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.shape is None and self.size not in LM_SIZES:
            raise ValueError(f"unknown LM size {self.size!r}; valid: {', '.join(LM_SIZES)}")
        positive = {"vocab_size": self.vocab_size, "seq_len": self.seq_len, "lr": self.lr,
                    "total_steps": self.total_steps, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps}
        bad = [name for name, value in positive.items() if value <= 0]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be > 0")
        if self.router not in ROUTER_NAMES:
            raise ValueError(f"unknown router {self.router!r}; valid: {', '.join(ROUTER_NAMES)}")
        if self.router != DENSE and self.num_experts < 2:
            raise ValueError(f"a routed (or dense-wide) layer needs num_experts >= 2, got {self.num_experts}")
        if self.route_every not in (1, 2):
            raise ValueError(f"route_every must be 1 (every layer) or 2 (every other layer), got {self.route_every}")
        if self.weight_decay < 0 or not 0 <= self.min_lr <= self.lr or not 0 <= self.warmup <= self.total_steps:
            raise ValueError("weight_decay >= 0, 0 <= min_lr <= lr and 0 <= warmup <= total_steps required")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas) or self.router_aux_loss_coef < 0:
            raise ValueError("betas must be two values in [0, 1) and router_aux_loss_coef >= 0")

    @property
    def routed(self) -> bool:
        """Routed MLPs (dense and its dense-wide control are not)."""
        return self.router not in (DENSE, WIDE)

    @property
    def resolved_shape(self) -> LMShape:
        return self.shape if self.shape is not None else LM_SIZES[self.size]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LMConfig":
        if "moe" in values:
            raise ValueError("`moe` was replaced by `router` (switch, sbase or hash) and `num_experts`; "
                             "a checkpoint of the old Mixtral layout cannot be loaded")
        return cls(**values)


def build_model_config(cfg: LMConfig) -> LlamaConfig:
    """The dense model's config; `build_lm` routes its MLPs when `cfg.router` says so."""
    s = cfg.resolved_shape
    common = dict(vocab_size=cfg.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                  num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
                  rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.seq_len,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                  tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None, use_cache=False)
    return LlamaConfig(**common)


def build_lm(cfg: LMConfig) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_config(build_model_config(cfg), attn_implementation="sdpa")
    if cfg.router == WIDE:
        make_wide(model, cfg.num_experts, cfg.route_every, init_std=model.config.initializer_range)
    elif cfg.routed:
        make_routed(model, cfg.router, cfg.num_experts, cfg.route_every, seed=cfg.seed,
                    init_std=model.config.initializer_range)
    return model


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters outside the token embedding and output head (Kaplan et al.'s N); every expert counts."""
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def active_non_embedding_params(model: torch.nn.Module) -> int:
    """Non-embedding parameters one token goes through (one expert per routed layer): the N of 6·N·D."""
    return active_params(model, non_embedding_params(model))


@torch.no_grad()
def lm_embeddings(model, token_lists: Sequence[Sequence[int]], max_tokens: int, batch_size: int = 16) -> np.ndarray:
    """(N, H) unit rows: the LM's last hidden states, mean-pooled over each document's first
    `max_tokens` tokens. Right padding is safe under causal attention: real tokens never see it."""
    body = model.model  # the decoder stack without the LM head
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(token_lists), batch_size):
        chunk = [list(t[:max_tokens]) or [0] for t in token_lists[start:start + batch_size]]
        ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, tokens in enumerate(chunk):
            ids[j, :len(tokens)] = torch.tensor(tokens)
            mask[j, :len(tokens)] = 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (B, T, H)
        weights = mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        out.append(F.normalize(pooled, dim=-1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)


def build_optimizer(model: torch.nn.Module, cfg: LMConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]  # RMSNorm weights
    # fused: one kernel for all tensors, on CPU too (~30x the per-tensor loop on a 1M model here)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)


def _cpu_clone(obj: Any) -> Any:
    """Deep copy of a (nested) state dict with every tensor cloned to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_clone(v) for v in obj)
    return obj


class LMLearner:
    """Trains a causal LM on a `PackedTextStream`; see the module docstring for fault handling."""

    def __init__(self, config: LMConfig, device: torch.device | str | None = None):
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        self.rank, self.world_size = distributed_setup(self.device)
        if config.batch_size % self.world_size:
            raise ValueError(f"batch_size {config.batch_size} does not split over {self.world_size} ranks")
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(config.seed)
            self.model = build_lm(config).to(self.device)
        self.trainable: torch.nn.Module = self.model
        self.ddp = None
        if self.world_size > 1:  # gradients averaged over ranks, each with its rows of the global batch
            ids = [self.device.index] if self.device.type == "cuda" else None
            # top-1 routing may leave an expert without tokens (and gradient) in a batch
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                                 find_unused_parameters=config.routed)
            self.trainable = self.ddp
        if config.compile:
            self.trainable = torch.compile(self.trainable)
        self.optimizer = build_optimizer(self.model, config)
        self.step = 0  # optimizer updates applied
        self.detector = SpikeDetector(config.spikes)
        self.snapshots: deque[dict[str, Any]] = deque(maxlen=config.spikes.max_snapshots)
        self.events: list[dict[str, Any]] = []  # skipped steps and spike rollbacks
        self.data: PackedTextStream | None = None
        self.last_grad_norm = math.nan

    def _autocast(self):
        enabled = self.config.bf16 if self.device.type == "cuda" else self.config.cpu_bf16
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of a (B, T+1) batch, plus the routers' balancing loss."""
        out = self.trainable(input_ids=batch[:, :-1], use_cache=False)
        logits = out.logits.float()  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        if self.config.routed and self.config.router_aux_loss_coef > 0:
            loss = loss + self.config.router_aux_loss_coef * router_aux_loss(self.model)
        return loss

    def _snapshot(self, data: PackedTextStream) -> None:
        if self.snapshots and self.snapshots[-1]["step"] == self.step:
            return
        self.snapshots.append({"step": self.step, "batches_served": data.batches_served,
                               "model": _cpu_clone(self.model.state_dict()),
                               "optimizer": _cpu_clone(self.optimizer.state_dict()),
                               "detector": self.detector.state_dict()})

    def _rollback(self, loss: float, data: PackedTextStream) -> None:
        """Restore a snapshot ~rollback_steps back; the data cursor stays, skipping what came since."""
        spikes = self.config.spikes
        index = rollback_target([s["step"] for s in self.snapshots], self.step, spikes.rollback_steps)
        snap = self.snapshots[index]
        self.events.append({"kind": "spike_rollback", "step": self.step, "loss": loss,
                            "running_mean": self.detector.running_mean, "restored_step": snap["step"],
                            "skipped_batches": data.batches_served - snap["batches_served"]})
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(_cpu_clone(snap["optimizer"]))  # on CPU, loading would alias it
        self.step = snap["step"]
        self.detector.load_state_dict(snap["detector"])
        while self.snapshots[-1]["step"] > snap["step"]:  # a trajectory that no longer exists
            self.snapshots.pop()

    def _accumulate_gradients(self, data: PackedTextStream) -> float:
        """Gradients of grad_accum micro-batches of the global batch; returns the mean loss over all
        ranks, so that every rank takes the same skip / rollback decision."""
        cfg = self.config
        losses = []
        for i in range(cfg.grad_accum):
            batch = rank_rows(data.next_batch(cfg.batch_size), self.rank, self.world_size)
            if self.device.type == "cuda":  # pinned: the copy overlaps the previous micro-batch's kernels
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True)
            last = i == cfg.grad_accum - 1  # DDP averages gradients once, after the last micro-batch
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    loss = self._loss(batch)
                (loss / cfg.grad_accum).backward()
            losses.append(loss.detach().float())
        return global_mean(float(torch.stack(losses).mean()), self.world_size, self.device)

    def train_step(self, data: PackedTextStream) -> float:
        """One optimizer step (grad_accum micro-batches); returns its mean loss, possibly non-finite."""
        cfg = self.config
        self.data = data
        if cfg.spikes.enabled and self.step % cfg.spikes.snapshot_every == 0:
            self._snapshot(data)
        self.model.train()
        loss = self._accumulate_gradients(data)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        if not (math.isfinite(loss) and math.isfinite(self.last_grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)  # weights and optimizer state stay as they were
            self.events.append({"kind": "nonfinite_skip", "step": self.step, "loss": loss,
                                "grad_norm": self.last_grad_norm, "batches_served": data.batches_served})
            return loss
        lr = warmup_cosine_lr(self.step, cfg.total_steps, cfg.warmup, cfg.lr, cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.detector.observe(loss):
            self._rollback(loss, data)
        return loss

    def train_steps(self, data: PackedTextStream, steps: int, progress: bool = False) -> list[float]:
        from tqdm.auto import trange

        return [self.train_step(data) for _ in trange(steps, disable=not progress, desc="lm")]

    @torch.no_grad()
    def evaluate_perplexity(self, docs_tokens: Sequence[Sequence[int]], eos_id: int | None = None,
                            batch_size: int = 8) -> float:
        """exp(mean next-token NLL) over the documents packed with EOS (default: the training
        stream's), in windows of seq_len as in training."""
        eos_id = eos_id if eos_id is not None else (self.data.eos_id if self.data is not None else None)
        if eos_id is None or not docs_tokens:
            raise ValueError("evaluate_perplexity needs documents and an eos_id (or a stream trained on)")
        T = self.config.seq_len
        stream = np.concatenate([np.append(np.asarray(d, dtype=np.int64), eos_id) for d in docs_tokens])
        starts = list(range(0, max(len(stream) - 1, 1), T))
        windows = [torch.from_numpy(stream[s:s + T + 1]) for s in starts]
        full = [w for w in windows if len(w) == T + 1]
        groups = [torch.stack(full[i:i + batch_size]) for i in range(0, len(full), batch_size)]
        groups += [w[None] for w in windows if 1 < len(w) < T + 1]  # the short last window
        was_training = self.model.training
        self.model.eval()
        nll, count = 0.0, 0
        for batch in groups:
            batch = batch.to(self.device)
            with self._autocast():
                logits = self.model(input_ids=batch[:, :-1], use_cache=False).logits.float()
            nll += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
            count += batch[:, 1:].numel()
        self.model.train(was_training)
        return math.exp(nll / max(count, 1))

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, step, spike detector, events, RNG and the data cursor last trained on.
        The in-memory rollback snapshots are not saved: a resumed run starts a fresh ring."""
        return {
            "config": dataclasses.asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "detector": self.detector.state_dict(),
            "events": list(self.events),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "data": self.data.state_dict() if self.data is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.detector.load_state_dict(state["detector"])
        self.events = list(state["events"])
        self.snapshots.clear()
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if state["data"] is not None:
            if self.data is None:
                self.data = PackedTextStream.from_state_dict(state["data"])
            else:
                self.data.load_state_dict(state["data"])

    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint atomically: a temp file in the same folder, then os.replace."""
        atomic_torch_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> "LMLearner":
        """A learner rebuilt from a checkpoint's own config, with its state (and data cursor) restored."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        learner = cls(LMConfig.from_dict(state["config"]), device=device)
        learner.load_state_dict(state)
        return learner
