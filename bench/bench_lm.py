"""Training throughput of the LM sizes: tokens/s of full `LMLearner` steps on this machine.

Run: python bench/bench_lm.py [--sizes nano micro] [--seq-len 256] [--batch 8] [--steps 8] [--threads N]
A step is forward, backward, grad clipping and a fused AdamW update on a (batch, seq_len) micro-batch
of real Wikipedia-lead tokens (vocab 8192). Each size runs in fp32 and with bf16 autocast, as the
transformers LLaMA in `learners/lm.py` and as a plain-PyTorch block of the same shape and recipe
(RMSNorm, RoPE, SDPA causal attention, SwiGLU, tied embeddings; nanoGPT-style), so the cost of the
library's generality shows. Rates are the fastest step (least disturbed by other processes).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from explorer.web.text_sources import load_wikipedia_leads
from learners.lm import LM_SIZES, LMConfig, LMLearner, LMShape, build_optimizer, non_embedding_params
from learners.text_data import PackedTextStream
from learners.tokenizer import TokenizerConfig, train_tokenizer


class Block(nn.Module):
    def __init__(self, s: LMShape, rope: torch.Tensor):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = s.num_heads, s.num_kv_heads, s.hidden_size // s.num_heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(s.hidden_size, eps=1e-5), nn.RMSNorm(s.hidden_size, eps=1e-5)
        self.qkv = nn.Linear(s.hidden_size, (s.num_heads + 2 * s.num_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(s.hidden_size, s.hidden_size, bias=False)
        self.gate_up = nn.Linear(s.hidden_size, 2 * s.intermediate_size, bias=False)
        self.down = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)
        self.register_buffer("rope", rope, persistent=False)  # (T, head_dim / 2) complex

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, T, D)
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * self.rope[: x.shape[2]]).flatten(-2).type_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, T, -1, self.head_dim).transpose(1, 2).split(
            [self.heads, self.kv_heads, self.kv_heads], dim=1)
        attn = F.scaled_dot_product_attention(self._rotate(q), self._rotate(k), v, is_causal=True,
                                              enable_gqa=self.heads != self.kv_heads)
        x = x + self.out(attn.transpose(1, 2).reshape(B, T, -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class PlainLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        s = cfg.resolved_shape
        head_dim = s.hidden_size // s.num_heads
        freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(cfg.seq_len).float(), freqs)  # (T, head_dim / 2)
        rope = torch.polar(torch.ones_like(angles), angles)
        self.embed = nn.Embedding(cfg.vocab_size, s.hidden_size)
        self.blocks = nn.ModuleList(Block(s, rope) for _ in range(s.num_layers))
        self.norm = nn.RMSNorm(s.hidden_size, eps=1e-5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T  # tied output head


def _fastest_step(step, steps: int) -> float:
    step()  # warm-up: kernels, allocator, autocast caches
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_learner(cfg: LMConfig, stream: PackedTextStream, steps: int) -> tuple[float, int]:
    learner = LMLearner(cfg, device="cpu")
    seconds = _fastest_step(lambda: learner.train_step(stream), steps)
    return cfg.batch_size * cfg.seq_len / seconds, non_embedding_params(learner.model)


def bench_plain(cfg: LMConfig, stream: PackedTextStream, steps: int) -> float:
    torch.manual_seed(cfg.seed)
    model = PlainLM(cfg)
    optimizer = build_optimizer(model, cfg)

    def step():
        batch = stream.next_batch(cfg.batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.cpu_bf16):
            logits = model(batch[:, :-1]).float()
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return cfg.batch_size * cfg.seq_len / _fastest_step(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["nano", "micro"], choices=list(LM_SIZES))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    leads = [d["extract"] for d in load_wikipedia_leads()[:3000]]
    tok = train_tokenizer(leads, TokenizerConfig(vocab_size=8192))
    stream = PackedTextStream(tok.encode_batch(leads), seq_len=args.seq_len, eos_id=tok.eos_id)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.seq_len} tokens")
    print(f"{'size':<7}{'params':>9}{'precision':>11}{'transformers tok/s':>20}{'plain tok/s':>13}")
    for size in args.sizes:
        for bf16 in (False, True):
            cfg = LMConfig(size=size, vocab_size=tok.vocab_size, seq_len=args.seq_len, batch_size=args.batch,
                           cpu_bf16=bf16, warmup=1)
            rate, params = bench_learner(cfg, stream, args.steps)
            plain = bench_plain(cfg, stream, args.steps)
            precision = "bf16" if bf16 else "fp32"
            print(f"{size:<7}{params / 1e6:>8.1f}M{precision:>11}{rate:>20,.0f}{plain:>13,.0f}", flush=True)


if __name__ == "__main__":
    main()
