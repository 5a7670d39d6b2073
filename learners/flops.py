"""FLOP accounting for the text side: model sizes, training and acquisition costs, a running ledger.

Training a dense decoder costs about 6·N·D FLOPs (forward 2·N·D, backward 4·N·D), where N counts
the non-embedding parameters and D the training tokens. Acquiring text costs FLOPs too: each query
is encoded and searched, each fetched byte is parsed and validated, and each candidate goes
through the scorer's forward pass (≈ 2·N_enc FLOPs per token). Putting both in one unit lets the
planner trade "train longer" against "fetch more text" within one compute budget.

Model sizes are pure arithmetic over LLaMA-style shapes, so the planner can pick a size without
instantiating a model. Nothing here does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Forward + backward FLOPs per parameter per token (Kaplan et al. 2020, Hoffmann et al. 2022).
TRAIN_FLOPS_PER_PARAM_TOKEN = 6.0
# Forward only: one multiply-add per parameter per token.
FORWARD_FLOPS_PER_PARAM_TOKEN = 2.0


@dataclass(kw_only=True, frozen=True)
class ModelShape:
    """A LLaMA-style decoder: RMSNorm, multi-head (or grouped-query) attention, SwiGLU MLP, no biases."""

    d_model: int
    n_layers: int
    n_heads: int
    ffn_dim: int  # SwiGLU hidden width (gate and up projections are d_model x ffn_dim each)
    n_kv_heads: int | None = None  # None: as many key/value heads as query heads (no GQA)

    def __post_init__(self):
        for name in ("d_model", "n_layers", "n_heads", "ffn_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def non_embedding_params(self) -> int:
        return non_embedding_params(self)

    def llama_config_kwargs(self, vocab_size: int) -> dict[str, Any]:
        """Keyword arguments for `transformers.LlamaConfig` that build exactly this shape."""
        return dict(vocab_size=vocab_size, hidden_size=self.d_model, intermediate_size=self.ffn_dim,
                    num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                    num_key_value_heads=self.kv_heads, attention_bias=False, mlp_bias=False)


def non_embedding_params(shape: ModelShape) -> int:
    """Parameters outside the token embedding and the output head.

    Per layer: q and o projections d·d each, k and v d·(kv_heads·head_dim) each (4·d² without GQA),
    SwiGLU gate/up/down 3·d·ffn, two RMSNorm weight vectors 2·d; plus the final norm d.
    """
    d = shape.d_model
    attention = 2 * d * d + 2 * d * shape.kv_heads * shape.head_dim
    mlp = 3 * d * shape.ffn_dim
    norms = 2 * d
    return shape.n_layers * (attention + mlp + norms) + d


def embedding_params(shape: ModelShape, vocab_size: int, tied: bool = False) -> int:
    """Token embedding plus output head (one matrix when tied)."""
    return vocab_size * shape.d_model * (1 if tied else 2)


def swiglu_ffn_dim(d_model: int, multiple_of: int = 64) -> int:
    """LLaMA's SwiGLU width: 8/3·d (same MLP FLOPs as a 4·d GELU MLP), rounded up to `multiple_of`."""
    return multiple_of * math.ceil(8 * d_model / 3 / multiple_of)


def _shape(d_model: int, n_layers: int, n_heads: int) -> ModelShape:
    return ModelShape(d_model=d_model, n_layers=n_layers, n_heads=n_heads, ffn_dim=swiglu_ffn_dim(d_model))


# Sizes from ~1M to ~100M non-embedding parameters, each step ~3x; depth and width grow together
# (aspect ratio d_model / n_layers ~ 30-55, head_dim 32-64), as in small LLaMA-family models.
SIZE_TABLE: dict[str, ModelShape] = {
    "1M": _shape(128, 5, 4),
    "3M": _shape(192, 7, 6),
    "10M": _shape(320, 8, 5),
    "30M": _shape(448, 12, 7),
    "100M": _shape(768, 14, 12),
}


def nearest_size(n_params: float, table: dict[str, ModelShape] | None = None) -> tuple[str, ModelShape]:
    """The table entry whose non-embedding size is nearest to `n_params` in log space."""
    table = SIZE_TABLE if table is None else table
    if not table:
        raise ValueError("the size table is empty")
    if n_params <= 0:
        raise ValueError(f"n_params must be > 0, got {n_params}")
    return min(table.items(), key=lambda kv: abs(math.log(kv[1].non_embedding_params / n_params)))


def training_flops(n_params: float, tokens: float) -> float:
    """≈ 6·N·D: forward and backward over `tokens` tokens through `n_params` non-embedding parameters."""
    return TRAIN_FLOPS_PER_PARAM_TOKEN * n_params * tokens


def forward_flops(n_params: float, tokens: float) -> float:
    """≈ 2·N·D: one forward pass (scoring, evaluation)."""
    return FORWARD_FLOPS_PER_PARAM_TOKEN * n_params * tokens


@dataclass(kw_only=True, frozen=True)
class AcquisitionCosts:
    """Per-unit FLOP costs of getting text; order-of-magnitude defaults for the local pipeline.

    Defaults assume the all-MiniLM-L6-v2 scorer (6 layers, d=384, ffn 1536: ≈ 1.06e7 non-embedding
    parameters) and a flat 384-d inner-product index over ~1e5 documents.
    """

    # Encode a ~16-token query (2·1.06e7·16 ≈ 3.4e8) + scan 1e5 x 384 index rows (≈ 7.7e7).
    flops_per_query: float = 4.2e8
    # Parse, normalise and tokenise fetched text: a few hundred simple operations per byte.
    flops_per_byte: float = 2e2
    # Validate, hash and check one item for near-duplicates against the accepted set.
    flops_per_item: float = 1e5
    scorer_params: float = 1.06e7  # non-embedding parameters of the scorer's encoder
    scorer_tokens_per_item: int = 128  # the scorer truncates each candidate to this many tokens

    def __post_init__(self):
        for name in ("flops_per_query", "flops_per_byte", "flops_per_item", "scorer_params"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.scorer_tokens_per_item <= 0:
            raise ValueError(f"scorer_tokens_per_item must be > 0, got {self.scorer_tokens_per_item}")

    def query_flops(self, n_queries: int) -> float:
        return n_queries * self.flops_per_query

    def fetch_flops(self, n_bytes: int, n_items: int) -> float:
        return n_bytes * self.flops_per_byte + n_items * self.flops_per_item

    def score_flops(self, n_items: int) -> float:
        """Scorer forward ≈ 2·N_enc per token, `scorer_tokens_per_item` tokens per item."""
        return forward_flops(self.scorer_params, n_items * self.scorer_tokens_per_item)


# Where compute goes; the ledger rejects any other name so a typo cannot hide spend.
CATEGORIES = ("train", "query", "fetch", "score", "eval")
# Logged but not charged to a budget: evaluation is the experimenter's measurement, so how often a
# run is evaluated does not change what the agent can buy.
UNCHARGED = ("eval",)


@dataclass
class FlopLedger:
    """FLOPs spent so far, per category; round-trips through `state_dict` with the run."""

    costs: AcquisitionCosts = field(default_factory=AcquisitionCosts)
    spent: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))

    def add(self, category: str, flops: float) -> None:
        if category not in CATEGORIES:
            raise KeyError(f"unknown FLOP category {category!r}; valid: {', '.join(CATEGORIES)}")
        if not math.isfinite(flops) or flops < 0:
            raise ValueError(f"flops must be finite and >= 0, got {flops}")
        self.spent[category] += float(flops)

    def add_training(self, n_params: float, tokens: float) -> None:
        self.add("train", training_flops(n_params, tokens))

    def add_queries(self, n_queries: int) -> None:
        self.add("query", self.costs.query_flops(n_queries))

    def add_fetch(self, n_bytes: int, n_items: int) -> None:
        self.add("fetch", self.costs.fetch_flops(n_bytes, n_items))

    def add_scoring(self, n_items: int) -> None:
        self.add("score", self.costs.score_flops(n_items))

    @property
    def total(self) -> float:
        return sum(self.spent.values())

    @property
    def charged(self) -> float:
        """FLOPs that count against a budget: everything but `UNCHARGED`."""
        return sum(v for k, v in self.spent.items() if k not in UNCHARGED)

    def remaining(self, budget_flops: float) -> float:
        return max(0.0, budget_flops - self.charged)

    def state_dict(self) -> dict[str, Any]:
        return {"spent": dict(self.spent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state["spent"]) - set(CATEGORIES)
        if unknown:
            raise KeyError(f"unknown FLOP categories {sorted(unknown)}; valid: {', '.join(CATEGORIES)}")
        self.spent = dict.fromkeys(CATEGORIES, 0.0) | {k: float(v) for k, v in state["spent"].items()}
