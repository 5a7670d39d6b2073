"""Experiment configs: frozen dataclasses, loaded from YAML that may hold only known keys.

A YAML file is one experiment instance; every field has a default documented where it is defined
(`FetchConfig` in acquire/fetch.py, `RewardConfig` in score/reward.py, `MoCoConfig` in learners/moco.py, ...).
Unknown keys and wrong types raise `ConfigError` naming the dotted field, e.g. `policy.temprature`.
Each run folder gets the fully resolved config (`config.yaml`), so the folder alone reproduces it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from explorer.acquire.fetch import FetchConfig
from explorer.run.disk import DiskConfig
from explorer.score.reward import RewardConfig
from explorer.score.target import TargetConfig
from explorer.web.text_sources import DEFAULT_TARGET_TOPIC
from learners.budget import REPEAT_DECAY
from learners.mixture import MixtureConfig
from learners.moco import MoCoConfig


class ConfigError(ValueError):
    """A config file or value is malformed; the message names the field."""


@dataclass(kw_only=True, frozen=True)
class VocabularyConfig:
    n_random: int = 1000
    """Uniformly sampled WordNet nouns added to the nouns found in the web's captions."""
    seed: int = 0
    path: str | None = None
    """A saved ConceptVocabulary JSON to use instead of building one."""
    glosses: bool = False
    """Embed each concept with its WordNet gloss ('sandal: a shoe consisting of ...') for the policies
    that compare concepts (gp, hybrid), rather than the query text itself (see
    ConceptVocabulary.descriptions). Off by default: a search engine sees only the query text, so
    the text's own embedding is what predicts its results (bench/exp_policy_simulation.py)."""


@dataclass(kw_only=True, frozen=True)
class PolicyConfig:
    name: str = "gp"
    """A registered policy: random, gp, ppo (LLM tuned with PPO), hybrid (LLM expands concepts, GP
    ranks them), oracle (evaluation only)."""
    queries_per_iteration: int = 16
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the policy's constructor (e.g. acquisition, temperature for gp)."""
    class_name_queries: bool = False
    """Search the target's class names (a folder's class subfolders, an installed target's classes)
    as free-text queries at the start of the first round, before the policy's own batch, at most
    `queries_per_iteration` a round; the policy hears their rewards as its own. For the vocabulary
    policies (random, gp, oracle); the LLM policies read the class names in their prompt instead
    (`target_description`). Without class names it does nothing (and says so)."""

    def __post_init__(self):
        if self.queries_per_iteration < 1:
            raise ValueError("queries_per_iteration must be >= 1")


@dataclass(kw_only=True, frozen=True)
class SearchConfig:
    backend: str = "local"
    """local (the engine over `corpus`, started by the run), searxng or clip-retrieval."""
    url: str | None = None
    """Engine URL; for `local`, None starts the engine on 127.0.0.1 for the run."""
    results_per_query: int = 40
    concurrency: int | None = None
    """Queries searched at once; None: the backend's default (local 8, searxng 1, clip-retrieval 2)."""
    failed_query_retries: int = 1
    """How many later iterations a query whose search failed (transport error, 403, 429, 5xx, engines
    down) is searched again in, on top of the policy's batch; 0: never. A failed search is never a
    reward: the policy hears of the query only once a search of it answers."""
    skip_seen: bool = False
    """Each query's results_per_query are results the run's searches have not returned before: the
    backend pages on past them (up to its max_pages; clip-retrieval asks for deeper neighbours), so
    a concept whose top results an earlier query already brought reaches further down the engine's
    list instead of fetching them again. Off: the engine's top results, had before or not. Image
    queries (knn-retrieval) and the background's searches are not affected."""
    serve_html: bool = False
    """Text runs on the local engine: serve the documents as web pages (text/html with navigation and
    footer, whose main text the fetcher extracts) instead of text/plain, as the real web does."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the backend (e.g. indice_name for clip-retrieval), and of its HTTP client:
    min_interval_s, retries, backoff_base, backoff_max, retry_after_max, timeout, max_bytes
    (explorer.acquire.search.HttpPolicy)."""

    def __post_init__(self):
        if self.results_per_query < 1 or (self.concurrency is not None and self.concurrency < 1):
            raise ValueError("results_per_query and concurrency must be >= 1")
        if not isinstance(self.failed_query_retries, int) or self.failed_query_retries < 0:
            raise ValueError(f"search.failed_query_retries must be an integer >= 0, got {self.failed_query_retries!r}")
        if self.backend != "local" and not self.url:
            raise ValueError(f"the {self.backend} backend needs search.url")


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    pretrain_steps: int = 200
    """SSL steps on the target alone before the first query (the 'base' the runs share)."""
    steps_per_iteration: int = 50
    eval_every: int = 1
    """Evaluate (kNN + linear probe) every this many iterations, and after the last."""
    knn_k: int = 20

    def __post_init__(self):
        if min(self.pretrain_steps, self.steps_per_iteration) < 0 or self.eval_every < 1 or self.knn_k < 1:
            raise ValueError("steps must be >= 0, eval_every and knn_k >= 1")


MODALITIES = ("image", "text")
REWARD_ENCODERS = ("minilm", "lm")
TEXT_SCORERS = ("knn", "dsir", "classifier")  # the reward, or a peer in its place (explorer/score/selectors.py)
# L(N, D) = E + A/N^alpha + B/D^beta as fitted to Chinchilla's runs by Besiroglu et al. 2024: the
# planner's prior until a law fitted to this agent's own runs (`explorer plan`) is given.
TEXT_STRATEGIES = ("planner", "compute_optimal", "acquire", "train", "grow", "acquire_first")
TEXT_BASES = ("wordnet",)  # general-text corpora a base LM trains on (explorer/run/text.py base_corpus_texts)
PRIOR_LAW = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}


@dataclass(kw_only=True, frozen=True)
class TextConfig:
    """The text side (modality: text): target topic, LM learner and the compute budget."""

    topic: str = DEFAULT_TARGET_TOPIC
    """Target topic of the Wikipedia leads (explorer.web.text_sources.wikipedia_topics)."""
    holdout_fraction: float = 0.2
    """Share of the topic held out for perplexity (never trained on; fetched copies are dropped)."""
    target_fraction: float = 0.5
    """Share of the rest of the topic given as the target set; the remainder stays on the web."""
    web_limit_per_topic: int | None = None
    """Leads per topic in the default text web (None: all 10k); ignored when `corpus` is set."""
    eval_documents: int | None = 200
    """Held-out documents scored for perplexity each evaluation (None: all)."""
    validation_fraction: float = 0.0
    """Share of the target's documents the agent holds out from its own training to judge its LM
    (seeded; never trained on, never acquired, near-copies dropped like held-out ones). > 0: every
    evaluation also scores them (`val_loss`), the weights of the lowest validation loss are kept (in
    the checkpoint, and as lm-best.pt when the run ends) and their held-out perplexity is reported
    beside the last model's (`best_eval_perplexity`). 0: the whole target trains, nothing is kept."""
    patience: int | None = None
    """With `validation_fraction`: stop the run once the validation loss has not fallen for this many
    evaluations and the plan is to train (not to acquire: new documents can lower it again). None:
    run to the budget or `iterations`."""
    min_chars: int = 50
    """Fetched documents shorter than this are rejected as too_small."""
    tokenizer_vocab: int = 4096
    """SentencePiece BPE vocabulary (byte fallback), trained on the target set (on the base's corpus
    when `base` is set)."""
    base: str | None = None
    """A general-text base LM every run starts from (learners/base_lm.py), instead of a random
    initialisation: "wordnet" (WordNet 3.0's 117,659 definitions, 4.7M tokens, not on the text web).
    Trained once per size, recipe and seed and kept under ~/.cache/explorer/models/base-lm; the run
    then uses the base's tokenizer. None: the LM starts from scratch with the target's tokenizer."""
    base_steps: int = 2000
    """The base's pretraining steps (at `batch_size` x `seq_len` tokens; lr `base_lr`, cosine to a
    tenth after a 5% warm-up). Its FLOPs are recorded in the first metrics row, not charged."""
    base_lr: float = 3.0e-3
    lm_size: str = "nano"
    """Starting LM size, a key of learners.lm.LM_SIZES."""
    max_lm_size: str = "small"
    """Largest size the planner may grow the LM to."""
    seq_len: int = 128
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 20
    pretrain_tokens: int = 16_384
    """Tokens trained on the target alone before the first query."""
    tokens_per_iteration: int = 8_192
    """Tokens trained on (target + accepted) per iteration; rounded up to whole batches."""
    flop_budget: float = 1e13
    """Total FLOPs (training + acquisition + evaluation); the run stops when they are spent."""
    reward_encoder: str = "minilm"
    """Document embeddings for rewards: minilm (all-MiniLM-L6-v2) or lm (the LM's mean-pooled states)."""
    scorer: str = "knn"
    """What scores a fetched document for acceptance and for its query's reward: "knn" (the reward:
    k nearest target documents under `reward_encoder`, contrasted with the background), or a peer
    data-selection method in its place (explorer/score/selectors.py), fitted on the target and the
    background sample: "dsir" (hashed n-gram importance weights) or "classifier" (logistic regression
    on hashed n-grams, target positive, background negative). Each score is read on the target's own
    out-of-fold scores, so `reward.accept` and `reward.query` apply unchanged."""
    grow_factor: float = 2.0
    """Grow the LM when it is this many times below the compute-optimal size."""
    strategy: str = "planner"
    """What each iteration spends compute on. "planner": the plan of least predicted final loss
    under `law`, with repeated tokens discounted and each acquisition round charged what the run's
    past rounds cost (`learners.budget.plan_with_costs`); "compute_optimal": acquire while the law's
    compute-optimal D exceeds the tokens at hand, grow while N is far below its optimum
    (`learners.budget.decide`, costs ignored). Fixed strategies to test them against: "acquire"
    (always query, never grow), "train" (never query, never grow: the target-only control), "grow"
    (never query; grow the LM to `max_lm_size` at once), "acquire_first" (a fixed schedule: rounds back
    to back, without training between them, until `acquire_share` of the budget is spent, then train)."""
    acquire_share: float = 0.5
    """Strategy acquire_first: the share of `flop_budget` spent (pretraining included) before it stops
    acquiring and trains."""
    law: dict[str, float] = field(default_factory=lambda: dict(PRIOR_LAW))
    """Scaling law the planner decides with (E, A, B, alpha, beta)."""
    repeat_decay: float = REPEAT_DECAY
    """R* of the planner's repeated-token discount (learners.budget.effective_tokens). The default is
    the large-scale fit; `explorer plan --repeats RUN_DIR` fits it to a run that trained on the
    target alone (at small scale repeats lose their worth much sooner)."""
    max_passes: float | None = None
    """The planner's overfitting point: passes over the unique tokens after which more training is
    worth nothing (with `validation_fraction` the kept weights stop changing there; without, the loss
    rises). None: training always helps, less and less (`repeat_decay` alone). `explorer plan
    --repeats RUN_DIR` measures it on a run that trained on the target alone."""
    max_passes_exponent: float = 0.0
    """How the overfitting point moves with the unique tokens U: `max_passes`·(U /
    `max_passes_at`)^exponent (0: the same number of passes at every U). `explorer plan --repeats`
    given two runs of different U (the target alone, the target with web documents added) fits it."""
    max_passes_at: float | None = None
    """The unique tokens `max_passes` was measured on (needed with a `max_passes_exponent`)."""
    rounds_first: bool = False
    """The planner runs the acquisition rounds it plans back to back, training once they are done,
    instead of training an iteration after each round; only where the reward does not read the LM
    (`reward_encoder` minilm or a peer `scorer`)."""

    def __post_init__(self):
        if not 0 < self.holdout_fraction < 1 or not 0 < self.target_fraction <= 1:
            raise ValueError("holdout_fraction must be in (0, 1) and target_fraction in (0, 1]")
        if self.reward_encoder not in REWARD_ENCODERS:
            raise ValueError(f"unknown reward_encoder {self.reward_encoder!r}; valid: {', '.join(REWARD_ENCODERS)}")
        if self.scorer not in TEXT_SCORERS:
            raise ValueError(f"unknown text.scorer {self.scorer!r}; valid: {', '.join(TEXT_SCORERS)}")
        positive = ("tokenizer_vocab", "seq_len", "batch_size", "lr", "tokens_per_iteration", "flop_budget")
        bad = [name for name in positive if not getattr(self, name) > 0]
        if bad or self.pretrain_tokens < 0 or self.warmup_steps < 0 or self.grow_factor < 1:
            raise ValueError(f"{', '.join(bad) or 'pretrain_tokens, warmup_steps'} out of range "
                             "(sizes and budget > 0, pretrain_tokens and warmup_steps >= 0, grow_factor >= 1)")
        if self.base is not None and self.base not in TEXT_BASES:
            raise ValueError(f"unknown text.base {self.base!r}; valid: {', '.join(TEXT_BASES)} (or null)")
        if self.base_steps < 1 or not self.base_lr > 0:
            raise ValueError(f"base_steps and base_lr must be > 0, got {self.base_steps}, {self.base_lr}")
        if self.strategy not in TEXT_STRATEGIES:
            raise ValueError(f"unknown text.strategy {self.strategy!r}; valid: {', '.join(TEXT_STRATEGIES)}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.patience is not None and (self.patience < 1 or not self.validation_fraction):
            raise ValueError(f"patience must be >= 1 and needs validation_fraction > 0, got {self.patience}")
        if self.max_passes is not None and not self.max_passes > 0:
            raise ValueError(f"max_passes must be > 0 (or null), got {self.max_passes}")
        if self.max_passes_exponent and (self.max_passes is None or not (self.max_passes_at or 0) > 0
                                         or not math.isfinite(self.max_passes_exponent)):
            raise ValueError("max_passes_exponent needs max_passes and max_passes_at > 0 (the unique tokens it was "
                             f"measured on), and a finite value; got {self.max_passes_exponent}")
        if self.rounds_first and self.reward_encoder == "lm" and self.scorer == "knn":
            raise ValueError("rounds_first needs a reward that does not read the LM (reward_encoder: minilm or a "
                             "peer scorer): under reward_encoder lm the rounds need the training between them")
        if not 0 < self.acquire_share < 1:
            raise ValueError(f"acquire_share must be in (0, 1), got {self.acquire_share}")
        if not self.repeat_decay > 0:
            raise ValueError(f"repeat_decay must be > 0, got {self.repeat_decay}")
        if set(self.law) != set(PRIOR_LAW):
            raise ValueError(f"law needs exactly the keys {', '.join(PRIOR_LAW)}, got {', '.join(self.law)}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(kw_only=True, frozen=True)
class LMRoutingConfig:
    """How the text side's LM routes its MLPs (learners/routing.py); dense by default."""

    router: str = "dense"
    """dense, or one expert per token chosen by: switch (softmax top-1 + balancing loss), sbase
    (Sinkhorn-balanced assignment), hash (fixed token-id hash); the routing benchmark's controls:
    switch-unit (switch with a unit output gate), random (a random expert per token), dense-wide (the
    dense model with num_experts times wider MLPs)."""
    num_experts: int = 4
    """Experts per routed layer; compute per token stays that of the dense model."""
    route_every: int = 1
    """Route every layer (1) or every other layer (2)."""
    aux_loss_coef: float = 0.01
    """Weight of the switch router's balancing loss (the other routers have none)."""
    routed_law: dict[str, float] | None = None
    """a, b, c, d of log L = a·log N + b·log E + c·log N·log E + d (bench/exp_routing.py writes them
    to fit.json). Given, the planner (text.strategy: planner) may answer add_experts: restart the LM
    at the same active size with one of `expert_options` experts, when the law says it pays."""
    expert_options: tuple[int, ...] = ()
    """Expert counts the planner may move to (with routed_law)."""

    def __post_init__(self):
        if self.router != "dense":
            from learners.routing import ROUTER_NAMES  # only routed runs pay for importing transformers

            if self.router not in ROUTER_NAMES:
                raise ValueError(f"unknown lm.router {self.router!r}; valid: {', '.join(ROUTER_NAMES)}")
            if self.num_experts < 2:
                raise ValueError(f"lm.num_experts must be >= 2 for a routed LM, got {self.num_experts}")
        if self.route_every not in (1, 2) or self.aux_loss_coef < 0:
            raise ValueError("lm.route_every must be 1 or 2 and lm.aux_loss_coef >= 0")
        object.__setattr__(self, "expert_options", tuple(self.expert_options))
        if self.routed_law is not None and set(self.routed_law) != {"a", "b", "c", "d"}:
            raise ValueError(f"lm.routed_law needs exactly the keys a, b, c, d, got {', '.join(self.routed_law)}")
        if any(e < 2 for e in self.expert_options) or (self.expert_options and self.routed_law is None):
            raise ValueError("lm.expert_options must be counts >= 2, and need lm.routed_law")

    @property
    def experts(self) -> int:
        """Experts per routed layer; 1 for a dense LM."""
        return self.num_experts if self.router != "dense" else 1

    def lm_kwargs(self, experts: int | None = None) -> dict:
        """Keyword arguments of learners.lm.LMConfig; `experts` overrides `self.experts` (1: dense;
        more on a dense config: the S-BASE router)."""
        experts = self.experts if experts is None else experts
        if experts == 1:
            return dict(router="dense")
        return dict(router=self.router if self.router != "dense" else "sbase", num_experts=experts,
                    route_every=self.route_every, router_aux_loss_coef=self.aux_loss_coef)


@dataclass(kw_only=True, frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    modality: str = "image"
    """image (the MoCo loop over the image web) or text (the LM loop over the Wikipedia-leads web)."""
    seed: int = 0
    iterations: int = 10
    corpus: str | None = None
    """A corpus preset (world, fashion-web: explorer.web.presets; built in $EXPLORER_HOME/corpus/NAME
    on first use) or a corpus directory; None is the default preset, world. For modality text: a text
    corpus."""
    target: TargetConfig = field(default_factory=TargetConfig)
    vocabulary: VocabularyConfig = field(default_factory=VocabularyConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: MoCoConfig = field(default_factory=MoCoConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    text: TextConfig = field(default_factory=TextConfig)
    """Used when modality is text; `corpus` is then a text corpus (explorer.web.text_corpus)."""
    lm: LMRoutingConfig = field(default_factory=LMRoutingConfig)
    """The text LM's routing (modality text)."""
    disk: DiskConfig = field(default_factory=DiskConfig)
    """The run folder's disk budget (image runs; explorer/run/disk.py)."""

    def __post_init__(self):
        if self.iterations < 0:
            raise ValueError("iterations must be >= 0")
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; valid: {', '.join(MODALITIES)}")
        if self.modality == "text":
            if self.reward.encoder != "learner":
                raise ValueError("reward.encoder is for image runs; a text run chooses with text.reward_encoder")
            from learners.lm import LM_SIZES  # only text runs pay for importing transformers

            for name in (self.text.lm_size, self.text.max_lm_size):
                if name not in LM_SIZES:
                    raise ValueError(f"unknown LM size {name!r}; valid: {', '.join(LM_SIZES)}")


def _is_dataclass_type(t) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _check_type(value, hint, where: str):
    """Light type check of YAML scalars/collections against a field's annotation."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {hint}")
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    base = origin or hint
    if base is tuple and isinstance(value, list):
        return tuple(value)
    if base is Any or not isinstance(base, type):
        return value
    if base is bool and not isinstance(value, bool) or (base in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {base.__name__}, got {value!r}")
    if not isinstance(value, base):
        raise ConfigError(f"{where}: expected {base.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass `cls` from a mapping, recursively; unknown keys and bad values name the field."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key {prefix + unknown[0]!r}; valid keys{' of ' + where if where else ''}: "
                          f"{', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        here = f"{where}.{name}" if where else name
        hint = hints[name]
        kwargs[name] = from_dict(hint, value, here) if _is_dataclass_type(hint) else _check_type(value, hint, here)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def to_dict(cfg) -> dict:
    out = dataclasses.asdict(cfg)
    return yaml.safe_load(yaml.safe_dump(out))  # tuples -> lists: plain YAML types only


def load_config(path: str | Path, overrides: dict | None = None) -> ExperimentConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} not found") from e
    apply_overrides(data, overrides)
    try:
        return from_dict(ExperimentConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def apply_overrides(data: dict, overrides: dict | None) -> dict:
    """Set each {dotted key: value} of `overrides` in the parsed YAML mapping `data`, in place."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {p} is not a section")
        node[leaf] = value
    return data


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def parse_overrides(pairs: list[str]) -> dict:
    """`--set KEY=VALUE` pairs -> {dotted key: YAML-parsed value}, the overrides `load_config` takes."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set takes KEY=VALUE (e.g. policy.name=random), got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out
