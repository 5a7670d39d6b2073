"""Where one MoCo-v3 step's time goes, for the world configs' learner and its variants.

Times, on `--threads` torch threads, one step's parts for a batch of 100 target + 64 acquired
images (random pixels: the cost does not depend on content): the two views' augmentation, the
frozen prefix on both views, the trainable stages + heads forward and backward (both views), the
momentum branch (both views), and a whole step (`MoCoLearner.train_step`, with cached views if
asked: the cache is filled first). The fastest of `--repeats` runs of each part.

    python bench/bench_moco_step.py                                   # 48 px, stages 4-6 train
    python bench/bench_moco_step.py --image-size 32 --cached-views 8  # the world configs' learner
    python bench/bench_moco_step.py --frozen-stages 6
"""

from __future__ import annotations

import argparse
import time

import torch

from learners.mixture import MixtureConfig, TrainingMixture
from learners.moco import MoCoConfig, MoCoLearner


def fastest(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--frozen-stages", type=int, default=4)
    parser.add_argument("--cached-views", type=int, default=0)
    parser.add_argument("--mlp-dim", type=int, default=1024)
    parser.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast for the trainable part on the CPU")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training module (learner.compile); it compiles in the warm-up")
    parser.add_argument("--small-input-convs", action="store_true",
                        help="convolutions on inputs of <= 4 pixels as gathers and matmuls (learners/small_convs.py)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = MoCoConfig(backbone="tf_efficientnet_lite0", backbone_kwargs={}, pretrained="pypi",
                        image_size=args.image_size, frozen_stages=args.frozen_stages, freeze_bn=True,
                        cached_views=args.cached_views, mlp_dim=args.mlp_dim, cpu_bf16=args.cpu_bf16,
                        compile=args.compile, small_input_convs=args.small_input_convs,
                        batch_size=128, total_steps=1000)
    learner = MoCoLearner(config, device="cpu")
    generator = torch.Generator().manual_seed(0)
    mixture = TrainingMixture(torch.randint(0, 256, (100, 3, 28, 28), dtype=torch.uint8, generator=generator),
                              MixtureConfig(acquired_cap=0.5))
    mixture.add_accepted(torch.randint(0, 256, (2400, 3, 28, 28), dtype=torch.uint8, generator=generator))
    if learner.view_cache is not None:
        learner.view_cache.warm(mixture)
    start = time.perf_counter()
    learner.train_steps(mixture, 3)  # warm-up (and, with --compile, the compilation)
    warm_up = time.perf_counter() - start
    model = learner.model
    x1, x2 = learner._views(mixture)
    h1, h2 = model.prefix(x1), model.prefix(x2)

    def trainable():
        for h in (h1, h2):
            model.predictor(model.base_projector(model.base_encoder(h))).sum().backward()

    def momentum():
        with torch.no_grad():
            for h in (h1, h2):
                model.momentum_projector(model.momentum_encoder(h))

    parts = {"augment both views": lambda: learner._views(mixture),
             "frozen prefix, both views": lambda: (model.prefix(x1), model.prefix(x2)),
             "trainable fwd + bwd, both views": trainable, "momentum branch, both views": momentum,
             "whole step": lambda: learner.train_step(mixture)}
    print(f"{args.image_size} px, frozen_stages {args.frozen_stages}, cached_views {args.cached_views}, "
          f"mlp_dim {args.mlp_dim}, cpu_bf16 {args.cpu_bf16}, compile {args.compile}, "
          f"small_input_convs {args.small_input_convs}, batch {len(x1)}, "
          f"{args.threads} thread(s)")
    for name, work in parts.items():
        print(f"  {name:32s} {fastest(work, args.repeats):7.0f} ms")
    print(f"  {'first 3 steps (warm-up, compile)':32s} {warm_up * 1000:7.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
