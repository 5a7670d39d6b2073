"""Retrieval by example: the target's own images are the queries, each asking an image index for its
nearest web images — what people do when an image index is at hand (Neural Priming's retrieval,
DataComp's image-based filtering, clip-retrieval's image queries).

Every query is one target image (its PNG bytes ride on the `Query`; its text `image:<sha256 prefix>`
names it in logs), answered with `search.results_per_query` neighbours, so the policy spends the
same download budget as any other (queries_per_iteration x results_per_query per iteration). The
target images are taken in a seeded order, each once per cycle before any comes again; only the
cursor moves, so the state is the cursor (and the rewards heard, kept for the record).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from policies.base import Query, register_policy


def png_bytes(image) -> bytes:
    """A uint8 (3, H, W) image (tensor or array) as PNG file bytes (grey when its channels agree)."""
    pixels = np.asarray(image, np.uint8).transpose(1, 2, 0)  # (H, W, 3)
    grey = bool((pixels == pixels[..., :1]).all())
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if grey else pixels, "L" if grey else "RGB").save(buf, format="PNG")
    return buf.getvalue()


@register_policy("knn-retrieval")
class KnnRetrievalPolicy:
    """Queries by example with the target images (see the module docstring)."""

    searches_by_image = True  # the local engine must serve its image index for this policy

    def __init__(self, concepts: Sequence[str] = (), target_images=None, seed: int = 0):
        """`target_images`: uint8 (N, 3, S, S) (the target's acquire split), or image file bytes.
        `concepts` (the vocabulary every policy is given) is not used."""
        if target_images is None or len(target_images) == 0:
            raise ValueError("the knn-retrieval policy queries by image: it needs the target's images "
                             "(an image target)")
        self.images = [t if isinstance(t, bytes) else png_bytes(t) for t in target_images]
        self.labels = [f"image:{hashlib.sha256(b).hexdigest()[:16]}" for b in self.images]
        self._digest = hashlib.sha256("\n".join(self.labels).encode()).hexdigest()
        self.seed, self.cursor = int(seed), 0
        self.rewards: list[tuple[str, float]] = []

    def _order(self, cycle: int) -> np.ndarray:
        """The target images' order in cycle `cycle`: a fresh permutation per cycle, from the seed."""
        return np.random.default_rng([self.seed, cycle]).permutation(len(self.images))

    def propose(self, n: int) -> list[Query]:
        if n < 1:
            raise ValueError(f"propose needs n >= 1, got {n}")
        queries = []
        for position in range(self.cursor, self.cursor + n):
            cycle, offset = divmod(position, len(self.images))
            i = int(self._order(cycle)[offset])
            queries.append(Query(self.labels[i], image=self.images[i]))
        self.cursor += n
        return queries

    def update(self, queries: list[Query], rewards: list[float]) -> None:
        if len(queries) != len(rewards):
            raise ValueError(f"{len(queries)} queries but {len(rewards)} rewards")
        self.rewards.extend((q.text, float(r)) for q, r in zip(queries, rewards))

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.name, "targets": self._digest, "seed": self.seed, "cursor": self.cursor,
                "rewards": [list(r) for r in self.rewards]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["policy"] != self.name:
            raise ValueError(f"state of policy {state['policy']!r} loaded into {self.name!r}")
        if state["targets"] != self._digest:
            raise ValueError("state was saved with different target images")
        self.seed, self.cursor = int(state["seed"]), int(state["cursor"])
        self.rewards = [(str(t), float(r)) for t, r in state["rewards"]]
