"""The text modality: its parts (the text web, the target topic's split, the hidden truth, the
LLaMA-style LM and its perplexity) and its loop, on `explorer.run.loop.RunLoop` (the acquisition
round, run folder, ledger, checkpoints, disk budget, stopping and resume are described there):
plan -> search round -> train the LM -> held-out perplexity -> log. Fetched pages become text,
copies of target and held-out documents are dropped, the rest is embedded (MiniLM or the LM) for
the reward, and accepted documents join the LM's token stream. Besides the shared files, a text
run folder holds

    tokenizer.model    the SentencePiece model, trained on the target set, or the base LM's (`text.base`);
                       replay and resume reuse it

and its metrics rows carry the FLOPs spent per category and the planner's decision and reason. A
checkpoint holds the LM (with its data cursor and the accepted documents' tokens), the policy, the
FLOP ledger and the loop position; iteration 0 (pretraining on the target) is checkpointed too.

With `text.base` set the LM starts from a base pretrained on general text (learners/base_lm.py,
built once and kept under ~/.cache/explorer/models/base-lm), and every size the planner grows to
starts from that size's base: the run is domain-adaptive continued training on the target and what
the agent acquires.

Each iteration first asks the planner (`text.strategy`; `learners.budget.plan_with_costs` by
default) what the remaining FLOPs should buy: `acquire` runs the queries; `grow_model` restarts the
LM at a larger table size on the same documents; `train` only trains. A run stops after
`iterations` or once `text.flop_budget` is spent; the last iteration trains only the steps the budget
still pays for. Evaluation FLOPs are logged but not charged to the budget.

With `text.validation_fraction` the agent holds part of its target out of training and judges its LM
on it at every evaluation: the weights of the lowest validation loss are kept (checkpoint state,
lm-best.pt at the end) with their held-out perplexity (`best_eval_perplexity`), and `text.patience`
ends a run whose validation loss stalls while the plan is to train.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import scipy.sparse
import torch

from explorer.acquire.cache import CacheMode
from explorer.acquire.documents import TEXT_BACKEND_FOR, build_text_backend, fetch_documents
from explorer.acquire.search import SearchBackend
from explorer.run.assembly import HiddenTruth, load_vocabulary, make_policy
from explorer.run.config import ExperimentConfig
from explorer.run.ledger import FetchRecord
from explorer.run.loop import Candidates, RunLoop, background_seed, resident_bytes
from explorer.run.ranks import Ranks, collective, map_rows
from explorer.score.reward import BackgroundSample, near_duplicates
from explorer.score.selectors import PeerSpace, ngram_counts, peer_space
from explorer.web.corpus import explorer_home
from explorer.web.text_corpus import (
    TextCorpus,
    TextCorpusSpec,
    TextTarget,
    build_text_corpus,
    default_text_corpus_dir,
    document_key,
    document_text,
    split_text_target,
    text_sha256,
)
from learners.base_lm import BaseLM, BaseLMSpec, corpus_tokens, ensure_base_lm
from learners.budget import AcquisitionRound, Decision, RoutedLaw, ScalingLaw, decide, plan_with_costs
from learners.checkpoint import atomic_torch_save
from learners.flops import FlopLedger, ModelShape, forward_flops, training_flops
from learners.lm import LM_SIZES, LMConfig, LMLearner, active_non_embedding_params, lm_embeddings, non_embedding_params
from learners.ngram import count_baselines
from learners.text_data import PackedTextStream
from learners.tokenizer import TextTokenizer, TokenizerConfig, train_tokenizer


# -- the modality's parts ------------------------------------------------------------------------
def open_text_corpus(cfg: ExperimentConfig, progress: bool = False) -> TextCorpus:
    """`corpus` if set, else the default text web over the installed leads, built on first use."""
    if cfg.corpus:
        return TextCorpus(cfg.corpus)
    root = default_text_corpus_dir(cfg.text.web_limit_per_topic)
    if (root / "corpus.json").exists():
        return TextCorpus(root)
    return build_text_corpus(root, TextCorpusSpec(limit_per_topic=cfg.text.web_limit_per_topic), progress=progress)


@dataclass
class TopicTruth(HiddenTruth):
    """The text web's hidden truth: a document is relevant when it is on the target topic."""

    corpus: TextCorpus
    topic: str

    @property
    def name(self) -> str:
        return re.sub(r"[^a-z]+", "-", self.topic.lower())

    def is_relevant(self, i: int) -> bool:
        return bool(self.corpus.hidden["topic"][i] == self.topic)


def model_shape(size: str) -> ModelShape:
    """An LM_SIZES entry as the planner's shape."""
    s = LM_SIZES[size]
    return ModelShape(d_model=s.hidden_size, n_layers=s.num_layers, n_heads=s.num_heads,
                      ffn_dim=s.intermediate_size, n_kv_heads=s.num_kv_heads)


def size_table(max_size: str) -> dict[str, ModelShape]:
    """LM_SIZES up to `max_size`, as the planner's shapes."""
    return {n: model_shape(n) for n in list(LM_SIZES)[:list(LM_SIZES).index(max_size) + 1]}


def base_corpus_texts(name: str) -> list[str]:
    """The general text a base LM of `text.base` trains on."""
    if name == "wordnet":
        from explorer.web.vocabulary import wordnet_glosses
        return wordnet_glosses()
    raise ValueError(f"unknown base corpus {name!r}")


def base_lm_home() -> Path:
    return explorer_home() / "models" / "base-lm"


class TextTraining:
    """What every rank of a text run holds (explorer/run/ranks.py): the token stream (the target's
    documents, then every accepted one) and the LM training on it. Its `@collective` methods run on
    every rank; with one process they are plain calls."""

    def __init__(self, target_tokens: list[list[int]], seq_len: int, eos_id: int, seed: int, *, ranks: Ranks):
        self.ranks, self.seq_len = ranks, seq_len
        self.stream = PackedTextStream(target_tokens, seq_len=seq_len, eos_id=eos_id, seed=seed)
        self.learner: LMLearner | None = None

    @collective
    def start(self, config: LMConfig, weights: dict | None = None) -> None:
        """A new LM (a fresh run, a model grown or given experts mid-run, a resume at another size),
        from `weights` (a base LM's) when given, else from its seeded initialisation."""
        self.learner = LMLearner(config)
        if weights is not None:
            self.learner.model.load_state_dict(weights)

    @collective
    def add_documents(self, tokens: list[list[int]]) -> None:
        self.stream.add_documents(tokens)

    @collective
    def train(self, steps: int) -> list[float]:
        """`steps` steps on the stream, each rank on its rows of every global batch; the losses."""
        return self.learner.train_steps(self.stream, steps, progress=False)

    @collective
    def embed(self, tokens: list[list[int]]) -> np.ndarray:
        """The LM's unit embeddings of documents' tokens (`lm_embeddings`), each rank embedding a share."""
        return map_rows(lambda rows: lm_embeddings(self.learner.model, rows, self.seq_len), tokens, self.ranks)

    @collective
    def restore(self, learner_state: dict, stream_state: dict) -> None:
        self.learner.load_state_dict(learner_state)
        self.stream.load_state_dict(stream_state)
        self.learner.data = self.stream  # one cursor: the learner's and the loop's


def split_validation(target: TextTarget, fraction: float, seed: int) -> tuple[TextTarget, list[dict]]:
    """(the target without its validation documents, the validation documents): a seeded `fraction`
    of the target's documents (at least one when `fraction` > 0) that the agent does not train on."""
    if not fraction:
        return target, []
    order = np.random.default_rng([seed, 2]).permutation(len(target.train))
    n = max(1, int(round(fraction * len(target.train))))
    if n >= len(target.train):
        raise ValueError(f"validation_fraction {fraction} leaves none of the target's {len(target.train)} documents "
                         "to train on")
    held, kept = sorted(order[:n].tolist()), sorted(order[n:].tolist())
    return replace(target, train=[target.train[i] for i in kept]), [target.train[i] for i in held]


class TextLoop(RunLoop):
    """Acquires documents for a target topic and trains the LM on them (see the module docstring)."""

    DECISION_KEYS = ("queries", "query_rewards", "accepted_urls", "planner_action", "lm_size", "train_loss")
    TENSORBOARD_TAGS = {"eval_perplexity": "eval/perplexity", "train_loss": "train/loss",
                        "precision_fetched": "acquire/precision_fetched",
                        "precision_accepted": "acquire/precision_accepted", "accepted": "acquire/accepted",
                        "fetched": "acquire/fetched", "valid": "acquire/valid", "flops_total": "budget/flops_total",
                        "tokens_available": "data/tokens_available", "seconds": "time/seconds_per_iteration"}
    checkpoint_start = True  # pretraining is iteration 0, and worth keeping
    USABLE, MEAN_REWARD = "valid", "mean_doc_reward"

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, *, engine_url: str | None = None,
                 replay: bool = False, progress: bool = True, resume: bool = False, keep_checkpoints: int = 3,
                 ranks=None):
        if cfg.modality != "text":
            raise ValueError(f"TextLoop needs modality: text, got {cfg.modality!r}")
        self.ranks = ranks or Ranks.alone()
        checkpoint = self._open_run(cfg, run_dir, replay=replay, progress=progress, resume=resume,
                                    keep_checkpoints=keep_checkpoints)
        resume = checkpoint is not None
        tc = cfg.text
        self.corpus = open_text_corpus(cfg, progress)
        self.target = split_text_target(self.corpus.documents(), tc.topic, holdout_fraction=tc.holdout_fraction,
                                        target_fraction=tc.target_fraction, seed=cfg.seed)
        self.target, self.validation = split_validation(self.target, tc.validation_fraction, cfg.seed)
        self.truth = TopicTruth(self.corpus, tc.topic)
        self.vocab = load_vocabulary(cfg, self.corpus.root, lambda: [
            f"{t} {d}" for t, d in zip(self.corpus.titles, self.corpus.descriptions)])
        self.policy = make_policy(cfg, self.vocab, self.corpus.root, self.truth,
                                  f"encyclopedia articles on {tc.topic.lower()}")
        if hasattr(self.policy, "use_generation_cache"):  # LLM policies: a replay reads what they wrote
            self.policy.use_generation_cache(self.run_dir / "cache" / "generations")
        self.use_class_names(())  # a text target is a topic, without classes
        self.bases: dict[str, BaseLM] = {}
        from explorer.web.text_encoder import default_encoder
        self.encoder = default_encoder()
        self.tokenizer = self._tokenizer()
        train_texts = [document_text(d) for d in self.target.train]
        self.training = self.ranks.replicate(TextTraining, self.tokenizer.encode_batch(train_texts), tc.seq_len,
                                             self.tokenizer.eos_id, cfg.seed)
        eval_docs = self.target.holdout[:tc.eval_documents]
        self.eval_tokens = self.tokenizer.encode_batch([document_text(d) for d in eval_docs])
        self.val_tokens = self.tokenizer.encode_batch([document_text(d) for d in self.validation])
        self.best: dict | None = None  # the lowest validation loss so far: where, its scores, its weights
        self._last_eval: dict | None = None  # an iteration that trained nothing reports these again
        self.lm_size = tc.lm_size
        self.experts = cfg.lm.experts  # add_experts changes it
        self._learner(self.lm_size, self._schedule_steps(self.lm_size, grown=False))
        self.flops = FlopLedger()
        self.law = ScalingLaw(**tc.law)
        self.sizes = size_table(tc.max_lm_size)
        self.backend = self._backend(engine_url)
        self._known_documents(train_texts)
        self.pretrained, self.tokens_trained = False, 0
        self.rounds: list[tuple[float, int]] = []  # (FLOPs, tokens accepted) of every acquisition round
        self.background_sample = BackgroundSample(cfg.reward.background_size, background_seed(cfg))
        self._minilm_rows: dict[str, np.ndarray] = {}  # MiniLM rows of the background's documents
        self.background_fetched = False  # fetched before the first round: a run that never queries never pays
        self.web_sample: list[str] = []
        self.space = None  # the reward space, built by refresh_reference
        self._target_counts = None  # a peer scorer's n-gram counts of the target, and of background documents
        self._ngram_rows: dict[str, scipy.sparse.csr_matrix] = {}
        if resume:
            self.load_state_dict(checkpoint.state)
            self._resume_logs()
        else:
            self._record_start(self.backend)
        spent = dict(self.flops.spent)
        self.refresh_reference()
        if resume:  # the checkpoint's ledger already paid for embedding the background under this state
            self.flops.spent = spent

    def ensure_background(self) -> None:
        """The background sample, fetched once, before the first acquisition round."""
        if self.background_fetched:
            return
        self.background_sample.add(self._fetch_background())  # accepted_sha is still empty: nothing filtered
        self.web_sample = list(self.background_sample.items)  # the first sample: the web's reference
        self.background_fetched = True
        self.refresh_reference()
        self.observe_background()

    # -- parts ------------------------------------------------------------------------------
    def _known_documents(self, train_texts: list[str]) -> None:
        """Exact copies (text sha256) of target, held-out and validation documents are never acquired;
        MiniLM near-copies of held-out and validation documents are dropped too (decontamination of the
        sets the LM is judged on)."""
        self.target_sha = {text_sha256(t) for t in train_texts}
        unseen = self.target.holdout + self.validation  # the agent's validation documents are held out too
        self.holdout_sha = {text_sha256(document_text(d)) for d in unseen}
        self.holdout_sig = self._corpus_embeddings(unseen)  # (H, 384) MiniLM
        self.accepted_sha: set[str] = set()
        self.accepted_sig = np.zeros((0, self.holdout_sig.shape[1]), np.float32)

    def _tokenizer(self) -> TextTokenizer:
        """The run's tokenizer file when there is one (resume, replay), else trained on the target."""
        path = self.run_dir / "tokenizer.model"
        if path.exists():
            return TextTokenizer.load(path)
        if self.cfg.text.base is not None:
            tokenizer = self.base(self.cfg.text.lm_size).tokenizer
        else:
            texts = [document_text(d) for d in self.target.train]
            tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=self.cfg.text.tokenizer_vocab))
        if self.mode is not CacheMode.REPLAY:
            tokenizer.save(path)
        return tokenizer

    def base(self, size: str) -> BaseLM:
        """The base LM of `text.base` at `size` (trained the first time any run asks for it)."""
        if size not in self.bases:
            tc = self.cfg.text
            spec = BaseLMSpec(corpus=tc.base, size=size, vocab_size=tc.tokenizer_vocab, steps=tc.base_steps,
                              lr=tc.base_lr, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=self.cfg.seed)
            self.bases[size] = ensure_base_lm(spec, lambda: base_corpus_texts(tc.base), base_lm_home(),
                                              progress=self.progress)
        return self.bases[size]

    @property
    def steps_per_iteration(self) -> int:
        tc = self.cfg.text
        return math.ceil(tc.tokens_per_iteration / tc.tokens_per_step)

    def _schedule_steps(self, size: str, grown: bool) -> int:
        """The LR schedule's length: the steps a model of `size` can still take. A fresh run's model
        has pretraining and every iteration; a model grown mid-run the iterations left from the current
        one. Fewer when the budget (left, charged to this size's training alone) ends them first."""
        tc = self.cfg.text
        pretrain = 0 if grown else math.ceil(tc.pretrain_tokens / tc.tokens_per_step)
        left = self.cfg.iterations - (self.iteration - 1 if grown else 0)
        budget = self.remaining_flops() if grown else tc.flop_budget
        affordable = int(budget // training_flops(model_shape(size).non_embedding_params, tc.tokens_per_step))
        return max(1, min(pretrain + left * self.steps_per_iteration, affordable))

    def _learner(self, size: str, total: int) -> None:
        """A new LM of `size` (on every rank) whose schedule runs `total` steps."""
        tc = self.cfg.text
        self.schedule_steps = total
        config = LMConfig(size=size, vocab_size=self.tokenizer.vocab_size, seq_len=tc.seq_len,
                          batch_size=tc.batch_size, lr=tc.lr, min_lr=tc.lr / 10, warmup=min(tc.warmup_steps, total),
                          total_steps=total, seed=self.cfg.seed, **self.cfg.lm.lm_kwargs(self.experts))
        weights = None
        if tc.base is not None:
            if config.routed:
                raise ValueError(f"text.base {tc.base!r} starts a dense LM; a routed LM ({config.router}, "
                                 f"{config.num_experts} experts) trains from scratch (set text.base: null)")
            weights = self.base(size).weights()
        self.training.start(config, weights)

    @property
    def learner(self) -> LMLearner:
        return self.training.learner

    @property
    def stream(self) -> PackedTextStream:
        """The training stream: the target's documents, then every accepted one."""
        return self.training.stream

    @property
    def n_params(self) -> int:
        """Non-embedding parameters a token goes through (one expert per routed layer): the N of
        every FLOP count; `_status` reports the total beside it."""
        return active_non_embedding_params(self.learner.model)

    def _backend(self, engine_url: str | None) -> SearchBackend:
        name = self.cfg.search.backend
        if self.mode is not CacheMode.REPLAY and name not in TEXT_BACKEND_FOR:
            raise ValueError(f"text runs search with {', '.join(TEXT_BACKEND_FOR)}; got {name!r}")
        return self._open_backend(build_text_backend, TEXT_BACKEND_FOR.get(name, name), engine_url)

    def _corpus_embeddings(self, docs: list[dict]) -> np.ndarray:
        """MiniLM rows of documents the corpus already embedded (target and held-out sets)."""
        rows = [self.corpus.index_of[document_key(d["title"])] for d in docs]
        return self.corpus.caption_embeddings()[rows]

    def _target_embeddings(self) -> np.ndarray:
        if self.cfg.text.reward_encoder == "minilm":
            return self._corpus_embeddings(self.target.train)
        return self.training.embed(self.stream_documents(len(self.target.train)))

    def refresh_reference(self) -> None:
        """Embed the target, the background and the web sample under the reward encoder (MiniLM
        when the LM's own states have collapsed): neighbours and scale. A peer scorer
        (`text.scorer`) is fitted on the target and the background instead (none before the
        background is fetched: no round scores anything before it)."""
        if self.cfg.text.scorer != "knn":
            self.space = self._peer_space()
            return
        minilm = (lambda: self._corpus_embeddings(self.target.train), self._minilm_embeddings)
        if self.cfg.text.reward_encoder == "minilm":
            self.space = self.reward_space(*minilm)
        else:
            self.space = self.reward_space(self._target_embeddings, lambda items: self.embed(items)[0],
                                           embed_base=minilm)

    def _peer_space(self) -> PeerSpace | None:
        bg = self.background_sample.items
        if not len(bg):
            self.reward_health = {"reward_encoder": self.cfg.text.scorer}
            return None
        if self._target_counts is None:
            self._target_counts = ngram_counts([document_text(d) for d in self.target.train])
        missing = [t for t in dict.fromkeys(bg) if t not in self._ngram_rows]
        self._ngram_rows.update(zip(missing, ngram_counts(missing)))
        self._ngram_rows = {t: self._ngram_rows[t] for t in bg}
        space = peer_space(self.cfg.text.scorer, self._target_counts,
                           scipy.sparse.vstack([self._ngram_rows[t] for t in bg], format="csr"), self.cfg.seed)
        self.reward_health = space.health(self.cfg.reward.min_spread)
        return space

    def _minilm_embeddings(self, items: list[str]) -> np.ndarray:
        """Background or web-sample documents under MiniLM (each embedding counted as scoring).
        MiniLM does not change, so the rows of both samples are kept and only new items are embedded."""
        missing = [t for t in dict.fromkeys(items) if t not in self._minilm_rows]
        if missing:
            self._minilm_rows.update(zip(missing, self.encoder.encode(missing)))
            self.flops.add_scoring(len(missing))
        keep = set(self.background_sample.items) | set(self.web_sample) | set(items)
        self._minilm_rows = {t: r for t, r in self._minilm_rows.items() if t in keep}
        return np.stack([self._minilm_rows[t] for t in items])

    def stream_documents(self, n: int) -> list[list[int]]:
        """The first n documents' tokens of the training stream (the target set comes first)."""
        state = self.stream.state_dict()
        bounds = np.cumsum([0] + state["lengths"].tolist()[:n])
        flat = state["tokens"].tolist()
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(reward embeddings, MiniLM signatures for duplicate tests) of fetched documents; counts FLOPs.
        The reward embeddings are MiniLM's under that reward encoder or after a collapse of the LM's."""
        sig = self.encoder.encode(texts) if texts else np.zeros((0, self.holdout_sig.shape[1]), np.float32)
        self.flops.add_scoring(len(texts))
        if self.cfg.text.scorer != "knn":
            return ngram_counts(texts), sig
        if self.cfg.text.reward_encoder == "minilm" or self.space is not None and self.space.encoder == "base":
            return sig, sig
        tokens = [t[:self.cfg.text.seq_len] for t in self.tokenizer.encode_batch(texts)]
        self.flops.add("score", forward_flops(self.n_params, sum(map(len, tokens))))
        return self.training.embed(tokens), sig

    # -- one iteration ------------------------------------------------------------------------
    def remaining_flops(self) -> float:
        """The budget left to the agent (evaluation is logged but not charged: `FlopLedger.charged`)."""
        return self.flops.remaining(self.cfg.text.flop_budget)

    def plan(self) -> Decision:
        """The planner's decision, or the configured fixed strategy (`text.strategy`)."""
        tc = self.cfg.text
        budget, tokens, params = self.remaining_flops(), float(self.stream.num_tokens), float(self.n_params)
        if tc.strategy == "planner":
            iterations_left = self.cfg.iterations - self.iteration + 1  # this one included
            return plan_with_costs(self.law, budget, unique_tokens=tokens, current_params=params,
                                   trained_tokens=self.learner.step * tc.tokens_per_step,
                                   acquisition=self.expected_round(),
                                   first_round_extra=0.0 if self.background_fetched else self._background_cost(),
                                   rounds_left=iterations_left, size_table=self.sizes,
                                   max_train_tokens=iterations_left * tc.tokens_per_iteration,
                                   r_star=tc.repeat_decay, max_passes=tc.max_passes,
                                   passes_exponent=tc.max_passes_exponent, passes_at=tc.max_passes_at,
                                   deferred_tokens=tc.tokens_per_iteration if tc.rounds_first else 0.0,
                                   **self._expert_plans())
        if tc.strategy == "compute_optimal":
            return decide(self.law, budget, tokens, params, grow_factor=tc.grow_factor, size_table=self.sizes)
        if tc.strategy == "acquire_first":
            spent = tc.flop_budget - budget
            if spent < tc.acquire_share * tc.flop_budget:
                return Decision(action="acquire", n_target=params, d_target=tokens,
                                reason=f"fixed strategy acquire_first: {spent:.3g} of {tc.flop_budget:.3g} FLOPs "
                                       f"spent, below its share {tc.acquire_share:g}: another round, no training")
            return Decision(action="train", n_target=params, d_target=tokens,
                            reason=f"fixed strategy acquire_first: its share {tc.acquire_share:g} of the budget is "
                                   "spent: train")
        if tc.strategy == "grow":  # compute goes to the model: the largest size allowed, never a query
            name, shape = list(self.sizes.items())[-1]
            if shape.non_embedding_params > params:
                return Decision(action="grow_model", n_target=float(shape.non_embedding_params), d_target=tokens,
                                reason=f"fixed strategy grow: the largest size allowed, {name}")
            return Decision(action="train", n_target=params, d_target=tokens,
                            reason=f"fixed strategy grow: already {name}, the largest size allowed")
        return Decision(action="acquire" if tc.strategy == "acquire" else "train", n_target=params,
                        d_target=tokens, reason=f"fixed strategy {tc.strategy}")

    def _expert_plans(self) -> dict:
        """The planner's "more experts" options (lm.routed_law and lm.expert_options), if configured."""
        lm = self.cfg.lm
        if lm.routed_law is None:
            return {}
        return dict(routed=RoutedLaw(**lm.routed_law), experts=self.experts, expert_options=lm.expert_options)

    def add_experts(self, decision: Decision) -> int:
        """Restart the LM at the same size with the planned experts per routed layer."""
        self.experts = int(decision.experts)
        self._learner(self.lm_size, self._schedule_steps(self.lm_size, grown=True))
        return self.experts

    def expected_round(self) -> AcquisitionRound:
        """What the next round costs and adds: the mean of the run's rounds, or before any round an
        optimistic bound (every result requested is new, accepted and of the target's mean length)."""
        if self.rounds:
            flops, tokens = np.asarray(self.rounds, float).mean(axis=0)
            return AcquisitionRound(flops=float(flops), tokens=float(tokens))
        results = self.cfg.policy.queries_per_iteration * self.cfg.search.results_per_query
        return AcquisitionRound(flops=self._search_cost(self.cfg.policy.queries_per_iteration),
                                tokens=results * self.stream.num_tokens / max(1, len(self.target.train)),
                                measured=False)

    def _search_cost(self, n_queries: int) -> float:
        """Queries and the scoring of every result they ask for (fetching is a rounding error)."""
        costs = self.flops.costs
        return costs.query_flops(n_queries) + costs.score_flops(n_queries * self.cfg.search.results_per_query)

    def _background_cost(self) -> float:
        return self._search_cost(self.cfg.reward.background_queries) if self.cfg.reward.background_size else 0.0

    def _acquisition_flops(self) -> float:
        return sum(self.flops.spent[k] for k in ("query", "fetch", "score"))

    def affordable_steps(self) -> int:
        """This iteration's training steps: the configured number, or fewer when the budget ends."""
        per_step = training_flops(self.n_params, self.cfg.text.tokens_per_step)
        return min(self.steps_per_iteration, int(self.remaining_flops() // per_step))

    def grow(self, decision: Decision) -> str:
        """Restart the LM at the planned size on the same documents (no function-preserving growth)."""
        name = next(n for n, s in self.sizes.items() if s.non_embedding_params == int(decision.n_target))
        self.lm_size = name
        self._learner(name, self._schedule_steps(name, grown=True))
        return name

    # -- one acquisition round: the modality's part -----------------------------------------------
    def fetch_candidates(self, url_queries: dict[str, list[int]], n_queries: int) -> Candidates:
        """Fetch every result URL as text; documents of the target or the held-out set and copies of
        accepted ones (by text sha256) are rejected. Queries and fetches are counted in the FLOP ledger."""
        results = fetch_documents(list(url_queries), self._fetch_config(), self.cache, self.mode,
                                  min_chars=self.cfg.text.min_chars, progress=self.progress)
        self.flops.add_queries(n_queries)
        self.flops.add_fetch(sum(r.n_bytes for r in results), len(results))
        rejected: dict[str, int] = {}
        docs, seen = [], set()
        fetches = []
        for r in results:
            status = r.status if not r.ok else (
                "known_target" if r.sha256 in self.target_sha else "held_out" if r.sha256 in self.holdout_sha
                else "duplicate" if r.sha256 in self.accepted_sha or r.sha256 in seen else "ok")
            # (a document's sha256 is of its text, not of the cached body: the disk budget never evicts it)
            fetches.append(FetchRecord(r.url, "valid" if status == "ok" else status))
            if status == "ok":
                docs.append(r)
                seen.add(r.sha256)
            else:
                rejected[status] = rejected.get(status, 0) + 1
        return Candidates([d.url for d in docs], [d.sha256 for d in docs], [d.text for d in docs],
                          [url_queries[d.url] for d in docs], rejected, fetches)

    def embed_candidates(self, cand: Candidates) -> tuple[Candidates, np.ndarray]:
        """Reward embeddings of the documents that are no near-copy of a held-out one (MiniLM
        signatures at `reward.decontaminate_threshold`: decontamination of the perplexity set)."""
        emb, sig = self.embed(cand.items)
        cand.signatures = sig
        fresh = ~near_duplicates(sig, self.holdout_sig, self.cfg.reward.decontaminate_threshold)
        if not fresh.all():
            cand, emb = cand.subset(fresh, "held_out"), emb[fresh]
        return cand, emb

    def record_fields(self, cand: Candidates, j: int) -> dict:
        return {"title": cand.items[j].split("\n", 1)[0][:200]}

    def keep_accepted(self, cand: Candidates, accepted: np.ndarray, records: list[dict]) -> None:
        self.training.add_documents(self.tokenizer.encode_batch([cand.items[j] for j in accepted]))

    def acquired(self, cand: Candidates) -> None:
        """A MiniLM reference moves with the background sample (the LM's moves after training)."""
        if self.cfg.reward.background_size and self.cfg.text.reward_encoder == "minilm":
            self._minilm_rows.update(zip(cand.items, cand.signatures))
            self.refresh_reference()

    def train(self, steps: int) -> dict:
        losses = self.training.train(steps) if steps else []
        tokens = steps * self.cfg.text.tokens_per_step
        self.flops.add_training(self.n_params, tokens)
        self.tokens_trained += tokens
        if self.cfg.text.reward_encoder == "lm":  # the reward's reference moves with the LM
            self.refresh_reference()
        return {"train_loss": round(float(np.mean(losses)), 6) if losses else None}

    def evaluate(self) -> dict:
        """Held-out perplexity on the target topic (documents never trained on); with a validation
        split its loss too, and the weights of the lowest so far are kept (`best`)."""
        ppl = self.learner.evaluate_perplexity(self.eval_tokens, eos_id=self.tokenizer.eos_id)
        self.flops.add("eval", forward_flops(self.n_params, sum(len(t) + 1 for t in self.eval_tokens)))
        row = {"eval_perplexity": round(ppl, 4), "eval_loss": round(math.log(ppl), 6)}
        if self.val_tokens:
            val = math.log(self.learner.evaluate_perplexity(self.val_tokens, eos_id=self.tokenizer.eos_id))
            self.flops.add("eval", forward_flops(self.n_params, sum(len(t) + 1 for t in self.val_tokens)))
            row["val_loss"] = round(val, 6)
            if self.best is None or val < self.best["val_loss"]:
                weights = {k: v.detach().cpu().clone() for k, v in self.learner.model.state_dict().items()}
                self.best = {"iteration": self.iteration, "val_loss": val, "eval_perplexity": row["eval_perplexity"],
                             "config": asdict(self.learner.config), "model": weights, "since": 0}
            else:
                self.best["since"] += 1
            row.update(best_iteration=self.best["iteration"], best_val_loss=round(self.best["val_loss"], 6),
                       best_eval_perplexity=self.best["eval_perplexity"], val_stalled=self.best["since"])
        self._last_eval = row
        return row

    def stalled(self) -> int:
        """Evaluations since the lowest validation loss (0 without a validation split)."""
        return 0 if self.best is None else self.best["since"]

    def save_best(self) -> Path | None:
        """lm-best.pt: the weights of the lowest validation loss, with where they were and their scores."""
        if self.best is None or self.mode is CacheMode.REPLAY:
            return None
        path = self.run_dir / "lm-best.pt"
        atomic_torch_save({k: v for k, v in self.best.items() if k != "since"}, path)
        return path

    def run(self, until: int | float | None = None, log=print) -> list[dict]:
        rows = super().run(until, log)
        if self.save_best():
            log(f"kept the weights of iteration {self.best['iteration']} (validation loss {self.best['val_loss']:.4f}, "
                f"held-out perplexity {self.best['eval_perplexity']:.1f}): {self.run_dir / 'lm-best.pt'}")
        return rows

    def _status(self) -> dict:
        return {"lm_size": self.lm_size, "experts": self.experts, "n_params": self.n_params,
                "n_params_total": non_embedding_params(self.learner.model), "learner_step": self.learner.step,
                "tokens_available": self.stream.num_tokens, "documents": self.stream.num_documents,
                "tokens_trained": self.tokens_trained, "flops": {k: float(v) for k, v in self.flops.spent.items()},
                "flops_total": self.flops.total, "flop_budget": self.cfg.text.flop_budget,
                "flops_remaining": self.remaining_flops()}

    def count_baselines(self) -> dict:
        """The floor the LM is read against: a count unigram and an interpolated bigram fitted on the
        target's training tokens, as held-out nats per token on the evaluation documents
        (learners/ngram.py), beside `eval_loss`."""
        target = self.stream_documents(len(self.target.train))
        floor = count_baselines(target, self.eval_tokens, self.tokenizer.eos_id, self.tokenizer.vocab_size)
        row = {"count_unigram_loss": round(floor["unigram"], 6), "count_bigram_loss": round(floor["bigram"], 6)}
        if self.cfg.text.base is not None:  # the counts of everything the based LM saw before the web
            general = corpus_tokens(self.base(self.lm_size).spec, lambda: base_corpus_texts(self.cfg.text.base),
                                    base_lm_home(), self.tokenizer)
            floor = count_baselines(general + target, self.eval_tokens, self.tokenizer.eos_id,
                                    self.tokenizer.vocab_size)
            row["count_bigram_base_loss"] = round(floor["bigram"], 6)
        return row

    def pretrain(self) -> dict:
        """Iteration 0: the target alone, before any query; with the count baselines' losses."""
        t0 = time.time()
        row = {"iteration": 0, **self.train(math.ceil(self.cfg.text.pretrain_tokens / self.cfg.text.tokens_per_step))}
        self.pretrained = True
        if self.cfg.text.base is not None:
            record = self.base(self.lm_size).record
            row.update(base=record["key"], base_flops=record["flops"], base_train_loss=record["final_train_loss"])
        return {**row, **self.evaluate(), **self.count_baselines(), **self._status(),
                "seconds": round(time.time() - t0, 2)}

    def step(self) -> dict:
        t0 = time.time()
        self.take_stage_seconds()  # the split counts this iteration only
        disk = self._check_disk()
        self.iteration += 1
        decision = self.plan()
        row: dict = {"iteration": self.iteration, "planner_action": decision.action,
                     "planner": {**asdict(decision), "budget_flops": self.remaining_flops()}}
        if decision.action == "grow_model":
            row["grew_from"], row["grew_to"] = self.lm_size, self.grow(decision)
        if decision.action == "add_experts":
            row["experts_from"], row["experts_to"] = self.experts, self.add_experts(decision)
        if decision.action == "acquire":
            self.ensure_background()  # a one-time cost, not a round's
            spent, tokens = self._acquisition_flops(), self.stream.num_tokens
            row.update(self.acquire())
            if not row["all_searches_failed"]:  # a round the engine never answered is no evidence of what one adds
                self.rounds.append((self._acquisition_flops() - spent, self.stream.num_tokens - tokens))
        steps = self.affordable_steps()
        tc = self.cfg.text
        if decision.action == "acquire" and (tc.strategy == "acquire_first" or tc.rounds_first and
                                             (decision.rounds or 0) > 1):
            steps, row["deferred_training"] = 0, True  # more rounds to come: train once they are done
        with self.timed("train"):
            row.update(self.train(steps))
        with self.timed("eval"):
            row.update(self.evaluate() if steps or self._last_eval is None else self._last_eval)
        row.update(self._status())
        row.update(rss_bytes=resident_bytes(), stage_seconds=self.take_stage_seconds(), **disk)
        row["seconds"] = round(time.time() - t0, 2)
        row["time"] = round(time.time(), 3)
        return row

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "pretrained": self.pretrained, "tokens_trained": self.tokens_trained,
                "lm_size": self.lm_size, "experts": self.experts, "schedule_steps": self.schedule_steps,
                "learner": self.learner.state_dict(), "stream": self.stream.state_dict(),
                "policy": self.policy.state_dict(), "ledger": self.flops.state_dict(),
                "accepted_sha": sorted(self.accepted_sha), "accepted_sig": torch.from_numpy(self.accepted_sig),
                "background": self.background_sample.state_dict(), "background_fetched": self.background_fetched,
                "web_sample": list(self.web_sample),
                "rounds": torch.tensor(self.rounds, dtype=torch.float64), "best": self.best,
                "last_eval": self._last_eval}

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.pretrained = int(state["iteration"]), bool(state["pretrained"])
        self.tokens_trained = int(state["tokens_trained"])
        experts = int(state.get("experts", self.experts))
        if state["lm_size"] != self.lm_size or experts != self.experts:
            self.lm_size, self.experts = state["lm_size"], experts
            self._learner(
                state["lm_size"], int(state.get("schedule_steps") or self._schedule_steps(state["lm_size"], grown=True)))
        self.training.restore(state["learner"], state["stream"])
        self.policy.load_state_dict(state["policy"])
        self.flops.load_state_dict(state["ledger"])
        self.accepted_sha = set(state["accepted_sha"])
        self.accepted_sig = state["accepted_sig"].numpy()
        self.rounds = [tuple(r) for r in state["rounds"].tolist()] if "rounds" in state else []
        if "background" in state:  # (checkpoints of earlier versions fetched it before pretraining)
            self.background_sample.load_state_dict(state["background"])
        self.background_fetched = bool(state.get("background_fetched", "background" in state))
        self.web_sample = list(state.get("web_sample", self.background_sample.items))
        self.best, self._last_eval = state.get("best"), state.get("last_eval")

    # -- the run plane's hooks ---------------------------------------------------------------------
    def needs_start(self) -> bool:
        return not self.pretrained

    def start_row(self) -> dict:
        return self.pretrain()

    def finished_early(self) -> str | None:
        if self.affordable_steps() == 0:
            return f"FLOP budget {self.cfg.text.flop_budget:.3g} spent after iteration {self.iteration}"
        patience = self.cfg.text.patience
        if patience and self.stalled() >= patience and self.plan().action == "train":
            return (f"stopped after iteration {self.iteration}: the validation loss has not fallen in {self.stalled()} "
                    f"evaluation(s) (text.patience {patience}) and the plan is to train; the best weights are those of "
                    f"iteration {self.best['iteration']}")
        return None

    def summary(self, row: dict) -> str:
        return summary(row)


def summary(row: dict) -> str:
    acquired = (f"{len(row['queries'])} queries, {row['valid']}/{row['fetched']} documents, {row['accepted']} accepted"
                + (f" (precision {row['precision_accepted']:.2f})" if row.get("precision_accepted") is not None else "")
                + ", ") if "queries" in row else ""
    plan = f"plan {row['planner_action']}: " if "planner_action" in row else "pretrain: "
    return (f"iter {row['iteration']}: {plan}{acquired}loss {row['train_loss']}, ppl {row['eval_perplexity']:.1f}, "
            f"{row['flops_total']:.3g} FLOPs, {row['seconds']:.0f}s")
