"""The image modality: its parts (the image web, the target set, the hidden truth, MoCo-v3 and its
evaluation) and its loop, on `explorer.run.loop.RunLoop` (the acquisition round, run folder,
ledger, checkpoints, disk budget, stopping and resume are described there): search round ->
train MoCo-v3 -> refresh the reward's reference -> evaluate -> log. Fetched images are decoded and
validated, embedded by the current encoder for the reward, and accepted ones are written to shards.
Besides the shared files, an image run folder holds

    run.json           the shared base checkpoint the run started from, if any
    acquired/          the accepted images, as webdataset tar shards + index.jsonl (learners/shards.py);
                       the learner's batches read them from here

A checkpoint holds the learner, the policy, the background sample and the position in acquired/,
not the images, so its size does not grow with them; a resume cuts the shards back to it. A replay
writes its shards to a temporary folder that is removed when it closes.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from explorer.acquire.cache import CacheMode
from explorer.acquire.fetch import fetch_images
from explorer.acquire.search import SearchBackend, build_backend
from explorer.run.assembly import HiddenTruth, digest, load_vocabulary, make_policy
from explorer.run.config import ExperimentConfig
from explorer.run.ledger import FetchRecord
from explorer.run.loop import Candidates, RunLoop, background_seed, resident_bytes
from explorer.run.ranks import Ranks, collective, map_rows
from explorer.score.evaluation import eval_metrics, evaluate_embeddings
from explorer.score.reward import BackgroundSample, image_signature
from explorer.score.target import TargetSet, load_target
from explorer.web.corpus import WebCorpus
from explorer.web.presets import open_image_corpus
from explorer.web.sources import INSTALLED_TARGETS
from learners.checkpoint import atomic_torch_save
from learners.mixture import TrainingMixture
from learners.moco import MoCoLearner
from learners.shards import ShardStore, cut_batches

ACQUIRED = "acquired"  # the run folder's shards of accepted images


def _stack(images: list[torch.Tensor], size: int) -> torch.Tensor:
    return torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)


# -- the modality's parts ------------------------------------------------------------------------
def open_corpus(cfg: ExperimentConfig, progress: bool = False) -> WebCorpus:
    """The image web `cfg.corpus` names (a preset, built on first use, or a corpus directory)."""
    return open_image_corpus(cfg.corpus, progress=progress)


def image_vocabulary(cfg: ExperimentConfig, corpus: WebCorpus | None):
    """The vocabulary of `explorer.run.assembly.load_vocabulary` over the image web's captions."""
    return load_vocabulary(cfg, corpus.root if corpus else None, lambda: corpus.distinct_captions)


@dataclass
class GroundTruth(HiddenTruth):
    """The image web's hidden truth: an item is relevant when its hidden source ('fashion-mnist')
    or class ('animals') is of the target's kind."""

    corpus: WebCorpus
    relevant_kinds: frozenset

    @property
    def name(self) -> str:
        return digest(sorted(self.relevant_kinds))

    def is_relevant(self, i: int) -> bool:
        h = self.corpus.hidden
        return bool(h["source"][i] in self.relevant_kinds or h["class_name"][i] in self.relevant_kinds)


def ground_truth(cfg: ExperimentConfig, corpus: WebCorpus | None) -> GroundTruth | None:
    """The local web's hidden truth about the target's kind, or None where there is none to read."""
    kinds = cfg.target.relevant
    if kinds is None and cfg.target.name in INSTALLED_TARGETS:
        kinds = (cfg.target.name,)  # an installed target's kind is its web source's name
    if corpus is None or not kinds:
        return None
    return GroundTruth(corpus, frozenset(kinds))


START_ENCODER = "start-encoder.pt"  # reward.encoder: start -- the encoder the run's first round read


def target_description(cfg: ExperimentConfig) -> str:
    """What the target is, in words, for an LLM policy's prompt (`policy.options.target_description`
    overrides it): Fashion-MNIST's own description, or the target folder's name and its class subfolders."""
    if cfg.target.name == "fashion-mnist":
        return "product photos of clothes, shoes and bags on a plain background"
    if cfg.target.name == "mnist":
        return "handwritten digits, white on black"
    folder = Path(cfg.target.name)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())[:10] if folder.is_dir() else []
    return f"images like {folder.name}" + (f" ({', '.join(classes)})" if classes else "")


def build_learner(cfg: ExperimentConfig, target: TargetSet, store=None, distributed: bool = True) -> MoCoLearner:
    """The learner on a mixture of the target's acquire split (accepted images kept in `store`, by
    default in memory); an unset `learner.total_steps` is the run's own step count, so that the lr
    and momentum schedules end where the run ends."""
    return learner_on(cfg, target.part("acquire")[0], store, distributed)


def learner_on(cfg: ExperimentConfig, acquire: torch.Tensor, store=None, distributed: bool = True) -> MoCoLearner:
    """`build_learner` on the target's training images `acquire` (uint8 (N, 3, S, S))."""
    learner_cfg = cfg.learner
    if learner_cfg.total_steps is None:
        steps = cfg.train.pretrain_steps + cfg.iterations * cfg.train.steps_per_iteration
        learner_cfg = dataclasses.replace(learner_cfg, total_steps=max(steps, learner_cfg.warmup_steps, 1))
    return MoCoLearner(learner_cfg, mixture=TrainingMixture(acquire, cfg.mixture, store=store), distributed=distributed)


class ImageTraining:
    """What every rank of an image run holds (explorer/run/ranks.py): the target's training images,
    the learner and its mixture. Rank 0's mixture keeps the accepted images in the run folder's
    shards (`store`); the other ranks' keep copies in memory. Its `@collective` methods run on every
    rank; with one process they are plain calls."""

    def __init__(self, cfg: ExperimentConfig, acquire: torch.Tensor, *, ranks: Ranks, store: ShardStore | None = None):
        self.cfg, self.acquire, self.store, self.ranks = cfg, acquire, store, ranks
        self.learner: MoCoLearner | None = None

    @collective
    def start(self, base_state: dict | None, pretrain: bool, progress: bool) -> None:
        """The learner: from a shared base's state, or pretrained on the target (`train.pretrain_steps`)."""
        learner = learner_on(self.cfg, self.acquire, self.store)
        if base_state is not None:  # the shared starting point of runs that are compared
            learner.load_state_dict(base_state)
        elif pretrain and self.cfg.train.pretrain_steps:
            learner.train_steps(learner.mixture, self.cfg.train.pretrain_steps, progress=progress and self.ranks.leader)
        self.learner = learner

    @collective
    def add_accepted(self, images: torch.Tensor, records: list[dict]) -> None:
        self.learner.mixture.add_accepted(images, records)  # rank 0: written to acquired/

    @collective
    def train(self, steps: int, progress: bool) -> list[float]:
        """`steps` steps on the mixture, each rank on its rows of every global batch; the losses."""
        return self.learner.train_steps(self.learner.mixture, steps, progress=progress and self.ranks.leader)

    @collective
    def embed(self, images: torch.Tensor) -> np.ndarray:
        """The current encoder's unit embeddings of `images`, each rank embedding a share of them."""
        return map_rows(self.learner.embed, images, self.ranks)

    @collective
    def restore(self, state: dict, accepted: tuple[torch.Tensor, list[int]] | None) -> None:
        """Load a checkpoint's learner `state`; the other ranks also get rank 0's `accepted` images
        and the sizes they were appended in (their mixture keeps no shards of its own)."""
        if not self.ranks.leader and state["mixture"] is not None:
            images, batches = accepted
            state = {**state, "mixture": {**state["mixture"], "store": {"images": images, "batches": batches}}}
        self.learner.load_state_dict(state)

    def accepted_for_ranks(self, state: dict) -> tuple[torch.Tensor, list[int]] | None:
        """Rank 0: what `restore` hands the other ranks for a checkpoint's learner `state` (None alone)."""
        if not self.ranks.distributed or state["mixture"] is None:
            return None
        n = int(state["mixture"]["position"])
        return self.store.read(torch.arange(n)), cut_batches(self.store.batches, n)


def evaluate_learner(learner: MoCoLearner, target: TargetSet, k: int) -> dict[str, float]:
    """kNN (cosine, k) and linear-probe accuracy of the learner's embeddings on the target's labelled
    probe split, as {'eval_knn_accuracy', 'eval_linear_probe_accuracy'}; {} for a target without labels."""
    (tx, ty), (vx, vy) = target.part("probe_train"), target.part("probe_test")
    if not len(ty) or not len(vy) or (ty < 0).any() or (vy < 0).any():
        return {}  # a target without labels: nothing to evaluate
    return eval_metrics(evaluate_embeddings(learner.embed(tx), ty, learner.embed(vx), vy, k=k))


class ImageLoop(RunLoop):
    """Acquires images for a target set and trains MoCo-v3 on them (see the module docstring)."""

    DECISION_KEYS = ("queries", "query_rewards", "accepted_urls", "ssl_loss")
    TENSORBOARD_TAGS = {"eval_knn_accuracy": "eval/knn_accuracy",
                        "eval_linear_probe_accuracy": "eval/linear_probe_accuracy",
                        "ssl_loss": "train/ssl_loss", "mean_image_reward": "acquire/mean_image_reward",
                        "precision_fetched": "acquire/precision_fetched",
                        "precision_accepted": "acquire/precision_accepted", "accepted": "acquire/accepted",
                        "fetched": "acquire/fetched", "decoded": "acquire/decoded",
                        "seconds": "time/seconds_per_iteration"}

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, *, engine_url: str | None = None,
                 replay: bool = False, base_checkpoint: Path | None = None, progress: bool = True,
                 resume: bool = False, keep_checkpoints: int = 3, base_scores: dict | None = None,
                 ranks: Ranks | None = None):
        """`base_scores`: the evaluation of `base_checkpoint`, when already known (runs that share a
        base share its scores; iteration 0 then reuses them instead of evaluating again). `ranks`:
        this process's place in a torchrun run (explorer/run/ranks.py; rank 0 builds the loop)."""
        self.ranks = ranks or Ranks.alone()
        checkpoint = self._open_run(cfg, run_dir, replay=replay, progress=progress, resume=resume,
                                    keep_checkpoints=keep_checkpoints)
        resume = checkpoint is not None
        self.base_scores = dict(base_scores) if base_scores and base_checkpoint is not None else None
        self.corpus = open_corpus(cfg, progress) if cfg.search.backend == "local" or cfg.corpus else None
        self.target = load_target(cfg.target)
        self.vocab = image_vocabulary(cfg, self.corpus)
        self.truth = ground_truth(cfg, self.corpus)
        self.policy = make_policy(cfg, self.vocab, self.corpus.root if self.corpus else None, self.truth,
                                  target_description(cfg), self.target.part("acquire")[0])
        if hasattr(self.policy, "use_generation_cache"):  # LLM policies: a replay reads what they wrote
            self.policy.use_generation_cache(self.run_dir / "cache" / "generations")
        self.use_class_names(self.target.class_names)
        self._replay_dir = Path(tempfile.mkdtemp(prefix=".replay-acquired-", dir=self.run_dir)) if replay else None
        self.store = ShardStore(self._replay_dir or self.run_dir / ACQUIRED, cfg.fetch.image_size)
        self.training = self.ranks.replicate(ImageTraining, cfg, self.target.part("acquire")[0], store=self.store)
        base_state = None if resume or base_checkpoint is None else \
            torch.load(base_checkpoint, map_location="cpu", weights_only=True)
        self.training.start(base_state, not resume, progress)
        self._start_encoder = self._keep_start_encoder(resume) if cfg.reward.encoder == "start" else None
        self.backend = self._backend(engine_url)
        self.accepted_sig = np.zeros((0, 0), np.float32)
        self.held_out_sig = image_signature(self.target.part("probe_test")[0])  # no copy of it is accepted
        self.accepted_sha: set[str] = set()
        self.background_sample = BackgroundSample(cfg.reward.background_size, background_seed(cfg))
        if not resume or "background" not in checkpoint.state:  # (a checkpoint holds the reservoir)
            self.background_sample.add(self._fetch_background())  # before resume: nothing is filtered out yet
        self.web_sample = list(self.background_sample.items)  # the first sample: the web's reference
        self._base_encoder: MoCoLearner | None = None
        if resume:
            self.load_state_dict(checkpoint.state)
            self._resume_logs()
        else:
            self._record_start(self.backend, **{"run.json": {
                "base_checkpoint": str(Path(base_checkpoint).resolve()) if base_checkpoint else None,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")}})
        self.refresh_index()
        if resume:  # the policy heard them before its checkpoint
            self._background_round = None
        else:
            self.observe_background()

    def refresh_index(self) -> None:
        """Re-embed the target, the background and the web sample with the current encoder (or the
        base encoder, when the current one has collapsed): the reward's neighbours and its scale."""
        acquire = self.target.part("acquire")[0]

        def encoder_pair(learner):  # `learner()` is called only when its embeddings are needed
            return lambda: learner().embed(acquire), lambda items: learner().embed(torch.stack(items))

        self.space = self.reward_space(*encoder_pair(lambda: self.learner),
                                       embed_base=encoder_pair(self.reference_encoder))

    def reference_encoder(self) -> MoCoLearner:
        """What the reward reads instead of the current learner: the start encoder with
        `reward.encoder: start`, else the base encoder (`reward.encoder: base`, or a collapse)."""
        return self._start_encoder if self._start_encoder is not None else self.base_encoder()

    def _keep_start_encoder(self, resume: bool) -> MoCoLearner:
        """`reward.encoder: start`: a frozen copy of the learner as the run's first round reads it (after
        `train.pretrain_steps` on the target, or the shared base), kept in the run folder
        (`START_ENCODER`) so that a resumed run reads the same one."""
        path = self.run_dir / START_ENCODER
        if resume:
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: this run's rewards read the encoder it held there "
                                        "(reward.encoder: start), so it cannot be resumed without it")
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:  # the model's weights only: a frozen encoder has no use for the optimizer or the mixture
            state = {"model": self.learner.model.state_dict()}
            if self.mode is not CacheMode.REPLAY:  # a replay retrains to the same state
                atomic_torch_save(state, path)
        with torch.random.fork_rng():  # the run's own random streams stay as they were
            encoder = MoCoLearner(self.learner.config, distributed=False)
        encoder.model.load_state_dict(state["model"])  # a whole learner's state (written before) has it too
        return encoder

    def base_encoder(self) -> MoCoLearner:
        """The learner as the config builds it, before any training here (ImageNet weights with
        `learner.pretrained`): what the reward reads when the current encoder collapses. Built once."""
        if self._base_encoder is None:
            with torch.random.fork_rng():  # the run's own random streams stay as they were
                self._base_encoder = MoCoLearner(self.learner.config, distributed=False)
        return self._base_encoder

    @property
    def learner(self) -> MoCoLearner:
        return self.training.learner

    def _backend(self, engine_url: str | None) -> SearchBackend:
        return self._open_backend(build_backend, self.cfg.search.backend, engine_url)

    # -- one acquisition round: the modality's part -------------------------------------------
    def fetch_candidates(self, url_queries: dict[str, list[int]], n_queries: int) -> Candidates:
        """Fetch and decode every result URL; images accepted before come back as `already_accepted`."""
        results = fetch_images(list(url_queries), self._fetch_config(), self.cache, self.mode, progress=self.progress)
        ok = [r for r in results if r.ok and r.sha256 not in self.accepted_sha]
        rejected: dict[str, int] = {}
        for r in results:
            if not r.ok:
                rejected[r.status] = rejected.get(r.status, 0) + 1
        fetches = [FetchRecord(r.url, r.status if not r.ok else "already_accepted" if r.sha256 in self.accepted_sha
                               else "decoded", r.sha256) for r in results]
        images = _stack([r.image for r in ok], self.cfg.fetch.image_size)
        return Candidates([r.url for r in ok], [r.sha256 for r in ok], images,
                          [url_queries[r.url] for r in ok], rejected, fetches)

    def embed_candidates(self, cand: Candidates) -> tuple[Candidates, np.ndarray]:
        """The current encoder's embeddings of every decoded image."""
        if not len(cand):
            return cand, np.zeros((0, self.space.index.dim), np.float32)
        if self.space.encoder == "learner":  # as the space was built; split over the ranks
            return cand, self.training.embed(cand.items)
        return cand, self.reference_encoder().embed(cand.items)

    def signatures(self, cand: Candidates, rows: np.ndarray) -> np.ndarray:
        """Pixel signatures (`image_signature`): computed only for the images the reward chose."""
        return image_signature(cand.items[rows])

    def keep_accepted(self, cand: Candidates, accepted: np.ndarray, records: list[dict]) -> None:
        self.training.add_accepted(cand.items[accepted], records)  # written to acquired/

    def background_items(self, cand: Candidates):
        return (img.clone() for img in cand.items)  # rows of their own, not views of the batch

    def step(self) -> dict:
        cfg, t0 = self.cfg, time.time()
        self.take_stage_seconds()  # the split counts this iteration only
        disk = self._check_disk()
        self.iteration += 1
        row = {"iteration": self.iteration, **self.acquire()}
        threshold = self.space.calibration.threshold(cfg.reward.accept_percentile)  # the one the round accepted by
        with self.timed("train"):
            losses = self.training.train(cfg.train.steps_per_iteration, self.progress)
        with self.timed("reward"):
            self.refresh_index()
        row.update({"accept_threshold": round(threshold, 6) if cfg.reward.accept == "value" else None,
                    "acquired_total": len(self.learner.mixture),
                    "ssl_loss": float(np.mean(losses)) if losses else None, "learner_step": self.learner.step,
                    "rss_bytes": resident_bytes(),
                    **disk})  # the folder's size by part before the iteration; with a budget, what was evicted for it
        if self.iteration % cfg.train.eval_every == 0 or self.iteration == cfg.iterations:
            with self.timed("eval"):
                row.update(self.evaluate())
        row["stage_seconds"] = self.take_stage_seconds()
        row["seconds"] = round(time.time() - t0, 2)
        row["time"] = round(time.time(), 3)
        return row

    def evaluate(self) -> dict:
        """kNN (k=train.knn_k, cosine) and linear-probe accuracy on the target's labelled split."""
        return evaluate_learner(self.learner, self.target, self.cfg.train.knn_k)

    def state_dict(self) -> dict:
        """Learner (its mixture: a position in acquired/), policy, background sample, iteration. What
        was accepted is not in it: `load_state_dict` reads it back from acquired/."""
        return {"iteration": self.iteration, "learner": self.learner.state_dict(),
                "policy": self.policy.state_dict(),
                "background": {**self.background_sample.state_dict(),
                               "items": _stack(self.background_sample.items, self.cfg.fetch.image_size)},
                "web_sample": _stack(self.web_sample, self.cfg.fetch.image_size)}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.training.restore(state["learner"], self.training.accepted_for_ranks(state["learner"]))
        self.policy.load_state_dict(state["policy"])
        self._reload_accepted()
        if "background" in state:  # checkpoints of earlier versions: the first sample stays
            self.background_sample.load_state_dict({**state["background"],
                                                    "items": list(state["background"]["items"])})
        if "web_sample" in state:  # else (earlier checkpoints) the background stands in for it
            self.web_sample = list(state["web_sample"])
        else:
            self.web_sample = list(self.background_sample.items)

    def _reload_accepted(self, chunk: int = 4096) -> None:
        """The keys and near-duplicate signatures of everything accepted, from acquired/ (read a
        chunk at a time: the signatures are kept, the images are not)."""
        store = self.store
        self.accepted_sha = set(store.keys)
        sigs = [image_signature(store.read(torch.arange(i, min(i + chunk, len(store)))))
                for i in range(0, len(store), chunk)]
        self.accepted_sig = np.concatenate(sigs) if sigs else np.zeros((0, 0), np.float32)

    def close_modality(self) -> None:
        """Close the shard store; a replay's temporary shards are removed."""
        self.store.close()
        if self._replay_dir is not None:
            shutil.rmtree(self._replay_dir, ignore_errors=True)
            self._replay_dir = None

    # -- iteration 0 and the log line -----------------------------------------------------------
    def start_row(self) -> dict:
        """Iteration 0: the starting encoder's scores (a shared base's, when known)."""
        scores = self.base_scores if self.base_scores is not None else self.evaluate()
        return {"iteration": 0, "learner_step": self.learner.step, **scores}

    def summary(self, row: dict) -> str | None:
        if row["iteration"] == 0:
            return None
        prec = row.get("precision_accepted")
        ev = (f" knn={row['eval_knn_accuracy']:.3f} probe={row['eval_linear_probe_accuracy']:.3f}"
              if "eval_knn_accuracy" in row else "")
        return (f"iter {row['iteration']}: {len(row['queries'])} queries, {row['decoded']}/{row['fetched']} decoded, "
                f"{row['accepted']} accepted" + (f" (precision {prec:.2f})" if prec is not None else "")
                + f", loss {row['ssl_loss']:.3f}{ev}, {row['seconds']:.0f}s")
