"""The image modality's loop: propose -> search -> fetch/validate -> score -> update policy -> accept
-> train MoCo-v3 -> evaluate -> log, on the run plane of `explorer.run.loop.RunLoop` (the run
folder, ledger, checkpoints, disk budget, stopping and resume are described there). Besides the
shared files, an image run folder holds

    run.json           the shared base checkpoint the run started from, if any
    acquired/          the accepted images, as webdataset tar shards + index.jsonl (learners/shards.py);
                       the learner's batches read them from here

A checkpoint holds the learner, the policy, the background sample and the position in acquired/,
not the images, so its size does not grow with them; a resume cuts the shards back to it. A replay
writes its shards to a temporary folder that is removed when it closes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from explorer.acquire.fetch import fetch_images
from explorer.acquire.search import SearchBackend, build_backend
from explorer.run import agent
from explorer.run.baselines import evaluate_learner
from explorer.run.config import ExperimentConfig
from explorer.run.ledger import FetchRecord
from explorer.run.loop import RunLoop, background_queries, background_seed, record_background, resident_bytes
from explorer.score.reward import BackgroundSample, TargetIndex, image_signature
from explorer.score.target import load_target
from learners.moco import MoCoLearner
from learners.shards import ShardStore

ACQUIRED = "acquired"  # the run folder's shards of accepted images


def _stack(images: list[torch.Tensor], size: int) -> torch.Tensor:
    return torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)


@dataclass
class Candidates:
    """This iteration's fetched images that decoded, with their provenance."""

    urls: list[str]
    sha256: list[str]
    images: torch.Tensor                 # uint8 (M, 3, S, S)
    queries_of: list[list[int]]          # per image: indices of the queries that found it
    rejected: dict[str, int] = field(default_factory=dict)
    fetches: list[FetchRecord] = field(default_factory=list)  # every fetched URL with its status


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
                 resume: bool = False, keep_checkpoints: int = 3, base_scores: dict | None = None):
        """`base_scores`: the evaluation of `base_checkpoint`, when already known (runs that share a
        base share its scores; iteration 0 then reuses them instead of evaluating again)."""
        checkpoint = self._open_run(cfg, run_dir, replay=replay, progress=progress, resume=resume,
                                    keep_checkpoints=keep_checkpoints)
        resume = checkpoint is not None
        self.base_scores = dict(base_scores) if base_scores and base_checkpoint is not None else None
        self.corpus = agent.open_corpus(cfg) if cfg.search.backend == "local" or cfg.corpus else None
        self.target = load_target(cfg.target)
        self.vocab = agent.load_vocabulary(cfg, self.corpus)
        self.truth = agent.ground_truth(cfg, self.corpus)
        self.policy = agent.build_agent_policy(cfg, self.vocab, self.corpus, self.truth)
        if hasattr(self.policy, "use_generation_cache"):  # LLM policies: a replay reads what they wrote
            self.policy.use_generation_cache(self.run_dir / "cache" / "generations")
        self._replay_dir = Path(tempfile.mkdtemp(prefix=".replay-acquired-", dir=self.run_dir)) if replay else None
        self.store = ShardStore(self._replay_dir or self.run_dir / ACQUIRED, cfg.fetch.image_size)
        self.learner = self._learner(None if resume else base_checkpoint, pretrain=not resume)
        self.backend = self._backend(engine_url)
        self.accepted_sig = np.zeros((0, 0), np.float32)
        self.probe_test_sig = image_signature(self.target.part("probe_test")[0])
        self.accepted_sha: set[str] = set()
        self.background_sample = BackgroundSample(cfg.reward.background_size, background_seed(cfg))
        if not resume or "background" not in checkpoint.state:  # (a checkpoint holds the reservoir)
            self.background_sample.add(self._fetch_background())  # before resume: nothing is filtered out yet
        if resume:
            self.load_state_dict(checkpoint.state)
            self._resume_logs()
        else:
            self._record_start(self.backend, **{"run.json": {
                "base_checkpoint": str(Path(base_checkpoint).resolve()) if base_checkpoint else None,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")}})
        self.index: TargetIndex | None = None
        self.refresh_index()

    def refresh_index(self) -> None:
        """Re-embed the target and the background with the current encoder: the reward's
        neighbours and its scale."""
        target = self.learner.embed(self.target.part("acquire")[0])
        if self.index is None:
            self.index = TargetIndex(target)
        else:
            self.index.refresh(target)
        self.background = (TargetIndex(self.learner.embed(torch.stack(self.background_sample.items)))
                           if len(self.background_sample) else None)
        self.calibration = self.cfg.reward.calibrate(self.index, self.background)

    def _fetch_background(self) -> torch.Tensor | list:
        """The first web sample the reward contrasts with: the decoded results of
        `reward.background_queries` vocabulary concepts drawn with the run's seed (the same for every
        policy of a seed), searched and fetched through the run's cache, so a replay gets the same
        images back."""
        texts = background_queries(self.cfg, self.vocab) if self.cfg.reward.background_size else []
        if not texts:
            return []
        answers, cand = self.search_and_fetch(texts)
        record_background(self.run_dir, self.mode, texts, answers, cand.rejected,
                          self.truth.precision(cand.urls) if self.truth else None, decoded=len(cand.urls))
        return cand.images

    def _learner(self, base_checkpoint: Path | None, pretrain: bool = True) -> MoCoLearner:
        learner = agent.build_learner(self.cfg, self.target, store=self.store)
        if base_checkpoint is not None:  # the shared starting point of runs that are compared
            state = torch.load(base_checkpoint, map_location="cpu", weights_only=True)
            learner.load_state_dict(state)
        elif pretrain and self.cfg.train.pretrain_steps:
            learner.train_steps(learner.mixture, self.cfg.train.pretrain_steps, progress=self.progress)
        return learner

    def _backend(self, engine_url: str | None) -> SearchBackend:
        return self._open_backend(build_backend, self.cfg.search.backend, engine_url)

    # -- one iteration ------------------------------------------------------------------
    def search_and_fetch(self, texts: list[str]) -> tuple[list, Candidates]:
        answers, url_queries = self._search(texts)
        results = fetch_images(list(url_queries), self._fetch_config(), self.cache, self.mode, progress=self.progress)
        ok = [r for r in results if r.ok and r.sha256 not in self.accepted_sha]
        rejected: dict[str, int] = {}
        for r in results:
            if not r.ok:
                rejected[r.status] = rejected.get(r.status, 0) + 1
        fetches = [FetchRecord(r.url, r.status if not r.ok else "already_accepted" if r.sha256 in self.accepted_sha
                               else "decoded", r.sha256) for r in results]
        s = self.cfg.fetch.image_size
        images = torch.stack([r.image for r in ok]) if ok else torch.empty(0, 3, s, s, dtype=torch.uint8)
        return answers, Candidates([r.url for r in ok], [r.sha256 for r in ok], images,
                                   [url_queries[r.url] for r in ok], rejected, fetches)

    def accept(self, cand: Candidates, rewards: np.ndarray) -> np.ndarray:
        """Indices of accepted candidates: reward selection, then near-duplicate filters (within
        the batch, against everything accepted so far, and against the probe test split)."""
        return self.cfg.reward.select(rewards, self.calibration, lambda rows: image_signature(cand.images[rows]),
                                      self.accepted_sig, held_out=self.probe_test_sig)

    def step(self) -> dict:
        cfg, t0 = self.cfg, time.time()
        disk = self._check_disk()
        self.iteration += 1
        queries = self.policy.propose(cfg.policy.queries_per_iteration)
        answers, cand = self.search_and_fetch([q.text for q in queries])
        self._check_stop()
        emb = self.learner.embed(cand.images) if len(cand.urls) else np.zeros((0, self.index.dim), np.float32)
        rewards = cfg.reward.image_rewards(emb, self.index, self.background) if len(emb) else np.zeros(0, np.float32)
        q_rewards = cfg.reward.query_rewards(rewards, cand.queries_of, len(queries), self.calibration,
                                             cfg.search.results_per_query)
        self.policy.update(queries, q_rewards)
        threshold = self.calibration.threshold(cfg.reward.accept_percentile)
        accepted = self.accept(cand, rewards)
        self._check_stop()  # last safe point: from here on the iteration writes its logs
        query_log = self._query_log(queries, q_rewards, answers)
        self._pending.update(fetches=cand.fetches, accepted=self._record_accepted(cand, accepted, rewards, queries))
        if len(accepted):
            self.learner.mixture.add_accepted(cand.images[accepted], self._pending["accepted"])
        self.background_sample.add(img.clone() for img in cand.images)  # later iterations contrast with it
        losses = self.learner.train_steps(self.learner.mixture, cfg.train.steps_per_iteration, progress=self.progress)
        self.refresh_index()
        row = {"iteration": self.iteration, **query_log,
               "fetched": len(cand.urls) + sum(cand.rejected.values()), "decoded": len(cand.urls),
               "rejected": cand.rejected, "accepted": len(accepted),
               "accepted_urls": [cand.urls[j] for j in accepted],
               "precision_fetched": self.truth.precision(cand.urls) if self.truth else None,
               "precision_accepted": self.truth.precision([cand.urls[j] for j in accepted]) if self.truth else None,
               "mean_image_reward": float(rewards.mean()) if len(rewards) else None,
               "accept_threshold": round(threshold, 6) if cfg.reward.accept == "value" else None,
               "acquired_total": len(self.learner.mixture),
               "ssl_loss": float(np.mean(losses)) if losses else None, "learner_step": self.learner.step,
               "policy_stats": dict(getattr(self.policy, "stats", None) or {}),  # LLM policies: seconds, KL, clean-up
               "rss_bytes": resident_bytes(),
               **disk}  # the folder's size by part before the iteration; with a budget, what was evicted for it
        if self.iteration % cfg.train.eval_every == 0 or self.iteration == cfg.iterations:
            row.update(self.evaluate())
        row["seconds"] = round(time.time() - t0, 2)
        row["time"] = round(time.time(), 3)
        return row

    def _record_accepted(self, cand: Candidates, accepted: np.ndarray, rewards: np.ndarray, queries) -> list[dict]:
        """Append the accepted items to accepted.jsonl; returns their records."""
        if not len(accepted):
            return []
        new = image_signature(cand.images[accepted])
        self.accepted_sig = new if not len(self.accepted_sig) else np.concatenate([self.accepted_sig, new])
        records = [{"iteration": self.iteration, "url": cand.urls[j], "sha256": cand.sha256[j],
                    "queries": [queries[q].text for q in cand.queries_of[j]], "reward": round(float(rewards[j]), 6),
                    "relevant": self.truth.relevant(cand.urls[j]) if self.truth else None} for j in accepted]
        self.accepted_sha.update(r["sha256"] for r in records)
        with open(self.run_dir / self._log_name("accepted.jsonl"), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        return records

    def evaluate(self) -> dict:
        """kNN (k=train.knn_k, cosine) and linear-probe accuracy on the target's labelled split."""
        return evaluate_learner(self.learner, self.target, self.cfg.train.knn_k)

    def state_dict(self) -> dict:
        """Learner (its mixture: a position in acquired/), policy, background sample, iteration. What
        was accepted is not in it: `load_state_dict` reads it back from acquired/."""
        return {"iteration": self.iteration, "learner": self.learner.state_dict(),
                "policy": self.policy.state_dict(),
                "background": {**self.background_sample.state_dict(),
                               "items": _stack(self.background_sample.items, self.cfg.fetch.image_size)}}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.learner.load_state_dict(state["learner"])
        self.policy.load_state_dict(state["policy"])
        self._reload_accepted()
        if "background" in state:  # checkpoints of earlier versions: the first sample stays
            self.background_sample.load_state_dict({**state["background"],
                                                    "items": list(state["background"]["items"])})

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
