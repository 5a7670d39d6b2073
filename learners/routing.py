"""Routed feed-forward layers for the LM: one expert per token, chosen by one of three routers.

A routed layer replaces a dense SwiGLU MLP with `num_experts` SwiGLU experts of the same shape
(`transformers`' `MixtralExperts`, 3-D weight tensors) and a router that sends every token to one
of them (K = 1), so compute per token stays that of the dense layer while parameters grow E-fold.
The three routers are those the routed scaling-law work compares (Clark et al. 2022, "Unified
Scaling Laws for Routed Language Models"):

- `switch` (Fedus et al. 2021): a linear router, softmax, top-1; the chosen expert's output is
  scaled by its softmax probability, so the router learns from the language-modelling loss, plus
  the Switch balancing loss E·Σ_e f_e·P_e (f_e: share of tokens sent to e, P_e: mean probability).
- `sbase` (S-BASE, the work's recommended default): during training the router scores are balanced
  by Sinkhorn (every expert gets an equal share of the probability mass) and tokens are assigned
  greedily by the balanced scores under a capacity of ⌈T/E⌉ tokens per expert, so the load is
  exactly even without any balancing loss (the argmax of the Sinkhorn scores alone left the busiest
  expert 1.7-2.4x its share on this project's LM: repeated tokens have identical rows); at
  evaluation the assignment is the top-1 router score. The output is scaled by the sigmoid
  of the chosen expert's score (as in BASE layers and Megatron-LM's sinkhorn router), which is what
  gives the router its gradient.
- `hash` (Roller et al. 2021): a fixed random map from token id to expert, drawn once from the seed
  and saved with the weights; no parameters, no gradient, weight 1.

Controls, for a fair comparison (bench/exp_routing.py):

- `switch-unit`: the switch router with a unit gate, p / sg(p): the output keeps the dense scale
  (the plain switch gate, the chosen softmax probability, shrinks every expert's output by ~1/p),
  while the router still gets the gradient of p.
- `random`: a uniformly random expert per token at every forward pass (weight 1): the same
  parameters as a routed model, routing that carries no information. Seeded per layer and per
  training step (a persistent counter), so runs repeat and resume exactly; an evaluation pass draws
  from the layer's own seed alone.
- `dense-wide` (`make_wide`, not a router): the dense model with every `route_every`-th MLP
  `num_experts` times wider: the same total parameters as the routed model, and that many times its
  compute per token.

`routing_stats` measures, over the evaluation passes inside it, what each router did: the mean
output gate, the busiest expert's load against an even share, and S-BASE's agreement between the
balanced assignment it trains with and the argmax it is evaluated with; inside it the hash routers
can be made to route by scrambled ids (a sanity check: the gain must vanish) and S-BASE can be
evaluated on its balanced assignment.

`route_every` routes every layer (1) or every other layer (2, the 2nd, 4th, ...), as in the
routed-law experiments; the other layers keep their dense MLP. Routing is dropless (no capacity
factor): on one device an overfull expert costs time, not tokens.

`active_params` counts the non-embedding parameters a token goes through (one expert per routed
layer, plus the routers): training costs 6·N_active·D.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MixtralConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

DENSE = "dense"
WIDE = "dense-wide"  # a control: the dense model with routed layers' MLPs num_experts times wider


def sinkhorn(logits: torch.Tensor, iterations: int = 50, tol: float = 1e-4) -> torch.Tensor:
    """(T, E) log-domain Sinkhorn: rescale exp(logits) so every row sums to 1/T and every column to
    1/E (each expert gets an equal share of the tokens); returns the balanced log-scores."""
    log_p = logits.detach().float()
    t, e = log_p.shape
    log_row, log_col = -math.log(t), -math.log(e)
    u = torch.zeros(t, device=log_p.device)
    v = torch.zeros(e, device=log_p.device)
    for _ in range(iterations):
        u = log_row - torch.logsumexp(log_p + v, dim=1)
        v_new = log_col - torch.logsumexp(log_p + u[:, None], dim=0)
        done = float((v_new - v).abs().max()) < tol
        v = v_new
        if done:
            break
    return log_p + u[:, None] + v


def balanced_assignment(scores: torch.Tensor) -> torch.Tensor:
    """(T,) expert per token maximising the (T, E) scores greedily under a capacity of ⌈T/E⌉ tokens
    per expert. In rounds: each unplaced token proposes its best expert with room; each expert keeps
    its best proposals up to its room; a rejected token never proposes to that expert again."""
    t, e = scores.shape
    capacity = -(-t // e)
    masked = scores.detach().float().clone()
    index = torch.full((t,), -1, dtype=torch.long, device=scores.device)
    load = torch.zeros(e, dtype=torch.long, device=scores.device)
    while True:
        free = (index < 0).nonzero().squeeze(1)
        if len(free) == 0:
            return index
        masked[:, load >= capacity] = -math.inf
        choice = masked[free].argmax(dim=1)
        order = torch.argsort(masked[free, choice], descending=True, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]  # grouped by expert, best first
        chosen = choice[order]
        counts = torch.bincount(chosen, minlength=e)
        rank = torch.arange(len(chosen), device=scores.device) - (torch.cumsum(counts, 0) - counts)[chosen]
        kept = rank < (capacity - load)[chosen]
        index[free[order[kept]]] = chosen[kept]
        load += torch.bincount(chosen[kept], minlength=e)
        masked[free[order[~kept]], chosen[~kept]] = -math.inf


class Router(nn.Module):
    """Chooses one expert per token: `forward` maps (T, H) hidden states to (expert index (T,),
    output weight (T,)) and leaves `aux_loss` (a scalar, 0 when the router needs none) for the
    learner to add."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.aux_loss = torch.zeros(())
        self.stats: dict | None = None  # set by `routing_stats`: evaluation passes add to it

    def record(self, index: torch.Tensor, weight: torch.Tensor, **counts: float) -> None:
        """Add one evaluation pass's routing to `stats` (when `routing_stats` is measuring)."""
        if self.stats is None:
            return
        load = torch.bincount(index.detach(), minlength=self.num_experts).cpu()
        self.stats["load"] = self.stats.get("load", torch.zeros_like(load)) + load
        self.stats["gate_sum"] = self.stats.get("gate_sum", 0.0) + float(weight.detach().float().sum())
        for key, value in counts.items():
            self.stats[key] = self.stats.get(key, 0.0) + value


class SwitchRouter(Router):
    def __init__(self, hidden_size: int, num_experts: int, unit_gate: bool = False):
        super().__init__(hidden_size, num_experts)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.unit_gate = unit_gate

    def forward(self, hidden):
        probs = F.linear(hidden, self.weight).float().softmax(dim=-1)  # (T, E)
        index = probs.argmax(dim=-1)
        share = torch.bincount(index, minlength=self.num_experts).float() / len(index)  # f_e, no gradient
        self.aux_loss = self.num_experts * (share * probs.mean(dim=0)).sum()
        gate = probs.gather(1, index[:, None]).squeeze(1)
        if self.unit_gate:
            gate = gate / gate.detach()  # 1 in value, the gradient of p / p
        self.record(index, gate)
        return index, gate


class SBaseRouter(Router):
    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__(hidden_size, num_experts)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.balanced_eval = False  # evaluate on the balanced assignment it trains with (routing_stats)

    def forward(self, hidden):
        scores = F.linear(hidden, self.weight).float()  # (T, E)
        agree = {}
        if self.training or self.balanced_eval or self.stats is not None:
            balanced = balanced_assignment(sinkhorn(scores))
            argmax = scores.argmax(dim=-1)
            agree = {"agree": float((balanced == argmax).sum())}
            index = balanced if self.training or self.balanced_eval else argmax
        else:
            index = scores.argmax(dim=-1)
        gate = torch.sigmoid(scores.gather(1, index[:, None]).squeeze(1))
        self.record(index, gate, **agree)
        return index, gate


class HashRouter(Router):
    """Routes by token id through a fixed random table; `token_ids` is set before each forward
    (a pre-hook on the decoder, see `make_routed`)."""

    def __init__(self, hidden_size: int, num_experts: int, vocab_size: int, seed: int):
        super().__init__(hidden_size, num_experts)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randint(num_experts, (vocab_size,), generator=generator))
        self.token_ids: torch.Tensor | None = None

        self.scramble: torch.Generator | None = None  # set by routing_stats: route by random ids instead

    def forward(self, hidden):
        if self.token_ids is None or self.token_ids.numel() != len(hidden):
            raise RuntimeError("hash routing needs the token ids of this forward pass (call the model "
                               "with input_ids, not inputs_embeds)")
        ids = self.token_ids.reshape(-1)
        if self.scramble is not None:  # the sanity check: the table's routing, but not by these tokens
            ids = torch.randint(len(self.table), ids.shape, generator=self.scramble).to(ids.device)
        index = self.table[ids]
        weight = torch.ones(len(hidden), device=hidden.device, dtype=torch.float32)
        self.record(index, weight)
        return index, weight


class RandomRouter(Router):
    """A uniformly random expert per token, weight 1: the control whose routing carries nothing."""

    def __init__(self, hidden_size: int, num_experts: int, seed: int):
        super().__init__(hidden_size, num_experts)
        self.seed = seed
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))  # training passes so far

    def forward(self, hidden):
        if self.training:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.calls) + 1)
            self.calls += 1
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003)
        index = torch.randint(self.num_experts, (len(hidden),), generator=generator).to(hidden.device)
        weight = torch.ones(len(hidden), device=hidden.device, dtype=torch.float32)
        self.record(index, weight)
        return index, weight


ROUTERS: dict[str, Callable[..., Router]] = {
    "switch": lambda hidden, experts, vocab, seed: SwitchRouter(hidden, experts),
    "switch-unit": lambda hidden, experts, vocab, seed: SwitchRouter(hidden, experts, unit_gate=True),
    "sbase": lambda hidden, experts, vocab, seed: SBaseRouter(hidden, experts),
    "hash": lambda hidden, experts, vocab, seed: HashRouter(hidden, experts, vocab, seed),
    "random": lambda hidden, experts, vocab, seed: RandomRouter(hidden, experts, seed),
}
ROUTER_NAMES = (DENSE, WIDE, *ROUTERS)


class RoutedMLP(nn.Module):
    """A routed SwiGLU layer: the router picks one expert per token; its output is weighted.

    The experts' weights are `MixtralExperts`' 3-D tensors; the forward pass groups the tokens by
    expert into one (E, C, H) buffer (C: the busiest expert's count) and runs two batched matmuls,
    so neither pass indexes the 3-D weights expert by expert (whose backward writes a full-size
    gradient per expert: 2.9 s a step instead of 0.32 s at E = 64, d = 128, 4 layers, one thread)."""

    def __init__(self, router: Router, experts: MixtralExperts):
        super().__init__()
        self.router = router
        self.experts = experts
        self.num_experts = experts.num_experts
        self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.long)  # of the last forward pass

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        index, weight = self.router(flat)
        counts = torch.bincount(index, minlength=self.num_experts)
        self.tokens_per_expert = counts.detach().cpu()
        order = torch.argsort(index, stable=True)
        slot = torch.arange(len(index), device=flat.device) - (torch.cumsum(counts, 0) - counts)[index[order]]
        grouped = flat.new_zeros(self.num_experts, int(counts.max()), shape[-1])
        grouped[index[order], slot] = flat[order]
        gate, up = torch.bmm(grouped, self.experts.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        expert_out = torch.bmm(self.experts.act_fn(gate) * up, self.experts.down_proj.transpose(1, 2))
        out = torch.empty_like(flat)
        out[order] = expert_out[index[order], slot]
        return (out * weight[:, None].to(out.dtype)).reshape(shape)


def routed_layers(model: nn.Module) -> list[RoutedMLP]:
    return [m for m in model.modules() if isinstance(m, RoutedMLP)]


def is_routed_layer(index: int, route_every: int) -> bool:
    """Layers 0-based: every layer (route_every 1), or the 2nd, 4th, ... (route_every 2)."""
    return (index + 1) % route_every == 0


def make_routed(model: PreTrainedModel, router: str, num_experts: int, route_every: int, seed: int,
                init_std: float = 0.02) -> PreTrainedModel:
    """Replace the dense MLP of every `route_every`-th decoder layer by a routed one, in place.

    Experts and routers are initialised N(0, init_std) from the global RNG (seed it before); the
    hash tables are drawn from `seed` + the layer index.
    """
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; valid: {', '.join(ROUTERS)}")
    cfg = model.config
    experts_config = MixtralConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                                   num_local_experts=num_experts, hidden_act=cfg.hidden_act)
    hash_routers = []
    for i, layer in enumerate(model.model.layers):
        if not is_routed_layer(i, route_every):
            continue
        experts = MixtralExperts(experts_config)
        chooser = ROUTERS[router](cfg.hidden_size, num_experts, cfg.vocab_size, seed + i)
        for p in (*experts.parameters(), *chooser.parameters()):
            nn.init.normal_(p, std=init_std)
        layer.mlp = RoutedMLP(chooser, experts).to(next(layer.parameters()).device)
        if isinstance(chooser, HashRouter):
            hash_routers.append(chooser)
    if hash_routers:
        def keep_token_ids(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            for r in hash_routers:
                r.token_ids = ids
        model.model.register_forward_pre_hook(keep_token_ids, with_kwargs=True)
    return model


def make_wide(model: PreTrainedModel, factor: int, route_every: int, init_std: float = 0.02) -> PreTrainedModel:
    """The `dense-wide` control, in place: every `route_every`-th decoder layer's MLP (the layers a
    routed model routes) becomes a SwiGLU MLP `factor` times wider, so the model has the routed
    model's total parameters, all of them active. Initialised N(0, init_std) from the global RNG."""
    cfg = model.config
    wide = type(cfg)(**{**cfg.to_dict(), "intermediate_size": cfg.intermediate_size * factor})
    for i, layer in enumerate(model.model.layers):
        if is_routed_layer(i, route_every):
            mlp = LlamaMLP(wide)
            for p in mlp.parameters():
                nn.init.normal_(p, std=init_std)
            layer.mlp = mlp.to(next(layer.parameters()).device)
    return model


@contextlib.contextmanager
def routing_stats(model: nn.Module, *, scramble_hash: bool = False, balanced_eval: bool = False, seed: int = 0):
    """Measure the routers over the (evaluation) passes run inside: yields a dict that is filled on
    exit with `mean_gate` (the output weight a token gets, averaged over tokens and routed layers),
    `eval_load` (max over layers of the busiest expert's tokens / an even share, over every pass)
    and, for S-BASE, `agreement` (share of tokens whose balanced assignment is their argmax expert).
    `scramble_hash`: hash routers route by random ids (seeded); `balanced_eval`: S-BASE routes by
    its balanced assignment, as in training. Without routed layers the dict stays empty."""
    layers = routed_layers(model)
    result: dict[str, float] = {}
    for i, layer in enumerate(layers):
        layer.router.stats = {}
        if isinstance(layer.router, HashRouter) and scramble_hash:
            layer.router.scramble = torch.Generator().manual_seed(seed + i)
        if isinstance(layer.router, SBaseRouter):
            layer.router.balanced_eval = balanced_eval
    try:
        yield result
        stats = [layer.router.stats for layer in layers if layer.router.stats]
        if stats:
            tokens = [float(s["load"].sum()) for s in stats]
            result["mean_gate"] = sum(s["gate_sum"] for s in stats) / sum(tokens)
            result["eval_load"] = max(float(s["load"].max()) * len(s["load"]) / t for s, t in zip(stats, tokens))
            if all("agree" in s for s in stats):
                result["agreement"] = sum(s["agree"] for s in stats) / sum(tokens)
    finally:
        for layer in layers:
            layer.router.stats = None
            if isinstance(layer.router, HashRouter):
                layer.router.scramble = None
            if isinstance(layer.router, SBaseRouter):
                layer.router.balanced_eval = False


def router_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean balancing loss of the routed layers of the last forward pass (None without routing)."""
    layers = routed_layers(model)
    if not layers:
        return None
    return torch.stack([layer.router.aux_loss.to(torch.float32) for layer in layers]).mean()


def active_params(model: nn.Module, total: int) -> int:
    """Non-embedding parameters one token goes through: `total` less all experts but one per layer."""
    return total - sum(p.numel() * (layer.num_experts - 1) // layer.num_experts
                       for layer in routed_layers(model) for p in layer.experts.parameters())


def load_imbalance(model: nn.Module) -> float:
    """Max over routed layers of (tokens of the busiest expert) / (tokens per expert if balanced),
    in the last forward pass: 1.0 is perfect balance, E means every token went to one expert."""
    ratios = [float(layer.tokens_per_expert.max()) * layer.num_experts / max(1, int(layer.tokens_per_expert.sum()))
              for layer in routed_layers(model)]
    return max(ratios, default=1.0)
