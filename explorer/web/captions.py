"""Alt-text-like captions for the offline web.

Real image search indexes noisy alt text, not labels. Fashion-MNIST items get shop-style captions
built from class words and their synonyms, templates and filler; a documented fraction is wrong
(another class's words) or says nothing useful (a camera file name). MNIST digits get scanner-style
captions. Openclipart keeps its real, noisy, often Italian file titles plus its folder words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Per Fashion-MNIST class: words a shop or a blog would use for it.
FASHION_WORDS: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "tee", "top", "tank top", "crew neck tee", "polo"),          # T-shirt/top
    ("trousers", "pants", "jeans", "slacks", "chinos", "leggings"),           # Trouser
    ("pullover", "sweater", "jumper", "knitwear", "sweatshirt", "hoodie"),    # Pullover
    ("dress", "gown", "frock", "sundress", "maxi dress", "evening dress"),    # Dress
    ("coat", "jacket", "parka", "overcoat", "raincoat", "trench coat"),       # Coat
    ("sandal", "sandals", "flip-flops", "slide", "espadrille", "slipper"),    # Sandal
    ("shirt", "blouse", "button-down", "flannel shirt", "dress shirt", "tunic"),  # Shirt
    ("sneaker", "sneakers", "trainers", "running shoe", "tennis shoes", "gym shoe"),  # Sneaker
    ("bag", "handbag", "purse", "tote", "satchel", "backpack"),               # Bag
    ("ankle boot", "boots", "bootie", "chelsea boot", "combat boot", "boot"),  # Ankle boot
)
ADJECTIVES = ("black", "white", "grey", "navy", "red", "beige", "brown", "striped", "classic",
              "vintage", "slim", "oversized", "leather", "cotton", "wool", "denim", "casual",
              "summer", "winter", "new", "cheap", "designer")
WHO = ("men", "women", "kids", "girls", "boys", "her", "him")
WHOSE = ("men's", "women's", "kids'", "girls'", "boys'", "unisex")
FILLER = ("free shipping", "sale", "best price", "in stock", "size M", "size 42", "limited offer",
          "lookbook", "outfit of the day", "shop now", "", "", "")
TEMPLATES = ("{adj} {noun}", "{adj} {noun} for {who}", "{noun} {filler}", "buy {adj} {noun} online",
             "product photo: {adj} {noun}", "{adj} {adj2} {noun} - {filler}", "{whose} {noun}",
             "new arrival {noun}", "{noun}", "my favourite {adj} {noun}")
UNINFORMATIVE = ("IMG_{n:04d}.jpg", "DSC{n:05d}", "image", "untitled", "photo {n}", "thumbnail",
                 "product-{n}", "click to enlarge")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("handwritten digit {w}", "number {d}", "scan of a handwritten {d}",
                   "handwriting sample {d}", "digit {w} written by hand", "postal code digit {d}",
                   "{w}", "numeral {d} on paper")


@dataclass(frozen=True, kw_only=True)
class CaptionNoise:
    """How often a Fashion-MNIST caption misleads: `wrong` uses another class's words,
    `uninformative` is a file name or filler that names no class."""

    wrong: float = 0.10
    uninformative: float = 0.05

    def __post_init__(self):
        if not (0 <= self.wrong and 0 <= self.uninformative and self.wrong + self.uninformative <= 1):
            raise ValueError(f"caption noise fractions must be in [0, 1] and sum to <= 1, got {self}")


def fashion_captions(labels: np.ndarray, seed: int, noise: CaptionNoise = CaptionNoise()
                     ) -> tuple[list[str], np.ndarray]:
    """Captions for Fashion-MNIST items; also returns which captions were made wrong on purpose."""
    rng = np.random.default_rng(seed)
    u = rng.random(len(labels))
    wrong = u < noise.wrong
    blank = (u >= noise.wrong) & (u < noise.wrong + noise.uninformative)
    captions = []
    for i, label in enumerate(labels):
        if blank[i]:
            captions.append(str(rng.choice(UNINFORMATIVE)).format(n=int(rng.integers(10000))))
            continue
        cls = int(label)
        if wrong[i]:  # another class, uniformly
            cls = (cls + int(rng.integers(1, len(FASHION_WORDS)))) % len(FASHION_WORDS)
        adj, adj2 = rng.choice(ADJECTIVES, size=2, replace=False)
        text = str(rng.choice(TEMPLATES)).format(
            adj=adj, adj2=adj2, noun=rng.choice(FASHION_WORDS[cls]), who=rng.choice(WHO), whose=rng.choice(WHOSE),
            filler=rng.choice(FILLER))
        captions.append(" ".join(text.split()).strip(" -"))
    return captions, wrong


def digit_captions(labels: np.ndarray, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [str(rng.choice(DIGIT_TEMPLATES)).format(d=int(d), w=DIGIT_WORDS[int(d)]) for d in labels]


_TRAILING_NOISE = re.compile(r"(_\d+|_)$")


def openclipart_caption(path: Path, root: Path) -> tuple[str, str]:
    """(caption, category) from an openclipart file: its real title words plus its folder words.

    'animals/bugs/farfalla_butterfly_fra1.png' -> ('farfalla butterfly fra1 - animals bugs clip art',
    'animals'). Titles keep their author fragments and Italian words: that is what alt text is like.
    """
    rel = path.relative_to(root)
    title = _TRAILING_NOISE.sub("", path.stem)
    title = " ".join(re.split(r"[_\-\s]+", title)).strip() or "clipart"
    folders = " ".join(p.replace("_", " ") for p in rel.parts[:-1])
    return f"{title} - {folders} clip art", rel.parts[0]
