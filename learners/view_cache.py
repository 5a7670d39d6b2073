"""The frozen prefix's output for a fixed set of augmented views of every training image.

A learner whose leading stages are frozen (`MoCoConfig.frozen_stages`) computes the same function of
an augmented image at every step; with `MoCoConfig.cached_views = V` it computes it once, for V views
of each image, and a step pairs two of them instead of augmenting, resizing and running the prefix
again. Half of an image's views follow the recipe of the first view (always blurred), half the
second's (sometimes solarized), and a pair takes one of each, as two fresh views would be.

An image's views are a function of the learner's seed, its kind (target or acquired) and its number
alone: each image draws its parameters from its own generator. So the cache is never saved: a
resumed run, or another rank, computes the same views again. Entries are filled when an image is
first drawn into a batch, and dropped when the mixture's item numbers may change meaning
(`TrainingMixture.epoch`).

What it trades: each image is seen under V views instead of a fresh one every step; what it saves
is the augmentation and the prefix at every step (bench/bench_moco_step.py times each part).
"""

from __future__ import annotations

from typing import Callable

import torch

from learners.augment import AugmentConfig, ViewParams, sample_view_params

_KINDS = {"target": 0, "acquired": 1}


def view_params(seed: int, kind: str, item: int, views: int, cfg: AugmentConfig) -> ViewParams:
    """The `views` parameter sets of one image: first half of the first view's recipe, second half
    of the second's; a pure function of (seed, kind, item)."""
    generator = torch.Generator().manual_seed((seed * 2 + _KINDS[kind]) * 1_000_000_007 + item)
    half = views // 2
    return ViewParams.cat([sample_view_params(half, cfg, 0, generator),
                           sample_view_params(half, cfg, 1, generator)])


class ViewCache:
    """Per kind, a growing (capacity, V, C, H, W) bf16 tensor of prefix outputs and a filled mask."""

    def __init__(self, views: int, seed: int, augment: AugmentConfig,
                 encode: Callable[[torch.Tensor, ViewParams], torch.Tensor], chunk: int = 64):
        if views < 2 or views % 2:
            raise ValueError(f"cached_views must be an even number >= 2, got {views}")
        self.views, self.seed, self.augment, self.encode, self.chunk = views, seed, augment, encode, chunk
        self.owner: tuple[int, int] | None = None
        self.store: dict[str, torch.Tensor] = {}
        self.filled: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        """Images whose views are cached."""
        return sum(int(f.sum()) for f in self.filled.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    def check_owner(self, mixture) -> None:
        """Drop everything when the mixture is another one or its item numbers changed meaning."""
        owner = (id(mixture), mixture.epoch)
        if owner != self.owner:
            self.owner, self.store, self.filled = owner, {}, {}

    def _fill(self, kind: str, items: torch.Tensor, read: Callable[[torch.Tensor], torch.Tensor]) -> None:
        filled = self.filled.get(kind, torch.zeros(0, dtype=torch.bool))
        known = items < len(filled)
        missing = torch.cat([items[~known], items[known][~filled[items[known]]]]).unique()
        for start in range(0, len(missing), self.chunk):
            ids = missing[start:start + self.chunk]
            images = read(ids).repeat_interleave(self.views, dim=0)
            params = ViewParams.cat([view_params(self.seed, kind, int(i), self.views, self.augment) for i in ids])
            out = self.encode(images, params).to(torch.bfloat16)
            out = out.reshape(len(ids), self.views, *out.shape[1:])
            self._grow(kind, int(ids.max()) + 1, out.shape[2:], out.device)
            self.store[kind][ids] = out
            self.filled[kind][ids] = True

    def _grow(self, kind: str, size: int, shape: torch.Size, device: torch.device) -> None:
        have = len(self.filled.get(kind, ()))
        if size <= have:
            return
        capacity = max(size, 2 * have)
        store = torch.empty((capacity, self.views, *shape), dtype=torch.bfloat16, device=device)
        filled = torch.zeros(capacity, dtype=torch.bool)
        if have:
            store[:have], filled[:have] = self.store[kind], self.filled[kind]
        self.store[kind], self.filled[kind] = store, filled

    def warm(self, mixture) -> None:
        """Compute the views of every image the mixture holds now (the target and the acquired pool),
        as a run has after its first passes over them: for timing the steady state."""
        self.check_owner(mixture)
        self._fill("target", torch.arange(len(mixture.target)), lambda ids: mixture.target[ids])
        if len(mixture.pool):
            self._fill("acquired", mixture.pool, mixture.store.read)

    def pairs(self, mixture, acquired: torch.Tensor, index: torch.Tensor, generator: torch.Generator,
              rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views (float32 prefix outputs) of the images of a `TrainingMixture.draw`: one of
        each recipe per image, chosen with `generator` for the whole draw; only `rows` of it (a DDP
        rank's share) are returned, so that every rank, and one process, make the same choices."""
        self.check_owner(mixture)
        half = self.views // 2
        first = torch.randint(half, (len(index),), generator=generator)[rows]
        second = half + torch.randint(half, (len(index),), generator=generator)[rows]
        acquired, index = acquired[rows], index[rows]
        out1 = out2 = None
        for kind, mask, read in (("target", ~acquired, lambda ids: mixture.target[ids]),
                                 ("acquired", acquired, mixture.store.read)):
            if not mask.any():
                continue
            items = index[mask]
            self._fill(kind, items, read)
            store = self.store[kind]
            items = items.to(store.device)
            h1 = store[items, first[mask].to(store.device)]
            h2 = store[items, second[mask].to(store.device)]
            if out1 is None:
                out1 = h1.new_empty((len(index), *h1.shape[1:]))
                out2 = torch.empty_like(out1)
            out1[mask.to(out1.device)], out2[mask.to(out2.device)] = h1, h2
        return out1.float(), out2.float()
