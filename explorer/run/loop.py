"""The acquisition loop: propose -> search -> fetch/validate -> score -> update policy -> accept
-> train -> evaluate -> log. One `AcquisitionLoop` is one run folder:

    config.yaml        the fully resolved config
    backend.json       the search backend as recorded (replay rebuilds it on the cache alone)
    background.json    the queries of the reward's first background sample of the web and what they fetched
    run.json           the shared base checkpoint the run started from, if any
    metrics.jsonl      one line per iteration (iteration 0 = the state before any query)
    accepted.jsonl     every accepted item: iteration, url, query, reward, sha256
    ledger.sqlite      queries, results, fetch statuses, accepted items, iterations (explorer/run/ledger.py)
    cache/             every search answer and fetched body (content-addressed)
    acquired/          the accepted images, as webdataset tar shards + index.jsonl (learners/shards.py);
                       the learner's batches read them from here
    checkpoints/       iter-NNNNNN/: learner + policy + loop position after that iteration, the last
                       K kept (explorer/run/checkpoints.py; older runs have a single checkpoint.pt)
    tensorboard/       scalars per iteration

Each finished iteration is written in this order: accepted.jsonl, the accepted images to acquired/,
metrics.jsonl, one ledger transaction, the checkpoint, TensorBoard. A checkpoint holds the learner,
the policy and the position in acquired/, not the images, so its size does not grow with them.
A resume loads the newest complete checkpoint and cuts everything else back to it (shards
included), so a crash anywhere in between loses at most the unfinished iteration. (A replay
writes replay-metrics.jsonl and replay-accepted.jsonl; its shards go to a temporary folder that
is removed when it closes.)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from explorer.acquire.cache import CacheMode, ResponseCache
from explorer.acquire.fetch import allow_origin, fetch_images
from explorer.acquire.search import SearchBackend, SearchError, build_backend, search_many
from explorer.run import agent
from explorer.run.baselines import evaluate_learner
from explorer.run.checkpoints import load_latest_checkpoint, write_checkpoint
from explorer.run.config import ExperimentConfig, save_config
from explorer.run.disk import DiskBudgetExceeded, enforce_budget, folder_usage, is_disk_full
from explorer.run.ledger import LEDGER, FetchRecord, RunLedger, read_metrics
from explorer.score.reward import BackgroundSample, TargetIndex, dedupe_within, image_signature, near_duplicates
from explorer.score.target import load_target
from learners.moco import MoCoLearner
from learners.shards import ShardStore

ACQUIRED = "acquired"  # the run folder's shards of accepted images


# Seeds the draw of background queries apart from the policy's own stream (same run seed).
BACKGROUND_STREAM = 0xB6


def _stack(images: list[torch.Tensor], size: int) -> torch.Tensor:
    return torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def background_seed(cfg: ExperimentConfig) -> int:
    """Seed of the background reservoir's draws: the run's seed on a stream of its own."""
    return int(np.random.default_rng([cfg.seed, BACKGROUND_STREAM]).integers(2**31))


def background_queries(cfg: ExperimentConfig, vocab) -> list[str]:
    """The `reward.background_queries` vocabulary concepts of the reward's background sample,
    drawn with the run's seed on a stream of its own: every policy of a seed contrasts with the
    same sample of the web."""
    n = min(cfg.reward.background_queries, len(vocab.concepts))
    if n == 0:
        return []
    rng = np.random.default_rng([cfg.seed, BACKGROUND_STREAM])
    return [vocab.concepts[i] for i in sorted(rng.choice(len(vocab.concepts), n, replace=False))]


def record_background(run_dir: Path, mode: CacheMode, texts: list[str], answers: list, rejected: dict[str, int],
                      precision: float | None, **found: int) -> None:
    """background.json: the start-up background queries, their result counts and what they
    fetched (`found`: the usable items, by the modality's name for them); a replay writes nothing.
    Warns when nothing usable came back."""
    if mode is not CacheMode.REPLAY:
        agent.write_json(run_dir / "background.json", {
            "queries": texts, "results": [0 if isinstance(a, SearchError) else len(a) for a in answers],
            **found, "rejected": rejected, "precision": precision})
    if not any(found.values()):
        warnings.warn(f"the {len(texts)} background queries fetched nothing usable: the reward is the plain "
                      "similarity to the target", stacklevel=3)


class StopRequested(Exception):
    """A signal asked the loop to stop; the current iteration is abandoned."""


def _iteration_of(line: str) -> int | None:
    """The iteration a JSONL log line belongs to; None for a line torn by a crash mid-append."""
    try:
        return int(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return None


def truncate_logs(run_dir: Path, names, iteration: int) -> None:
    """Drop JSONL log lines of iterations after `iteration`: a crash may have written them before
    the checkpoint that would have covered them. Those iterations are run again. A line torn by a
    crash (or a full disk) in the middle of an append can only be the last one written, after the
    checkpoint it belongs to; it is dropped too."""
    for name in names:
        path = run_dir / name
        if path.exists():
            iterations = [(line, _iteration_of(line)) for line in path.read_text().splitlines() if line.strip()]
            keep = [line for line, it in iterations if it is not None and it <= iteration]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(path)


@dataclass
class Candidates:
    """This iteration's fetched images that decoded, with their provenance."""

    urls: list[str]
    sha256: list[str]
    images: torch.Tensor                 # uint8 (M, 3, S, S)
    queries_of: list[list[int]]          # per image: indices of the queries that found it
    rejected: dict[str, int] = field(default_factory=dict)
    fetches: list[FetchRecord] = field(default_factory=list)  # every fetched URL with its status


class AcquisitionLoop:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path, *, engine_url: str | None = None,
                 replay: bool = False, base_checkpoint: Path | None = None, progress: bool = True,
                 resume: bool = False, keep_checkpoints: int = 3, base_scores: dict | None = None):
        """`base_scores`: the evaluation of `base_checkpoint`, when already known (runs that share a
        base share its scores; iteration 0 then reuses them instead of evaluating again)."""
        if keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.keep_checkpoints = keep_checkpoints
        self.base_scores = dict(base_scores) if base_scores and base_checkpoint is not None else None
        self.stop_requested = False  # set from a signal handler; honoured at the next safe point
        self.stopped_by: str | None = None  # why run() stopped early (disk budget, full disk), if it did
        checkpoint = load_latest_checkpoint(self.run_dir) if resume else None
        self.resumed_from = checkpoint.path if checkpoint else None  # the checkpoint it continues from
        resume = checkpoint is not None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.mode = CacheMode.REPLAY if replay else CacheMode.READWRITE
        self.ledger = None if replay else RunLedger(self.run_dir / LEDGER)
        self.scalars = None  # the TensorBoard writer, opened by run()
        self._pending: dict = {}  # the ledger rows of the iteration in progress
        self.cache = ResponseCache(self.run_dir / "cache")
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
        self.iteration = 0
        self.accepted_sig = np.zeros((0, 0), np.float32)
        self.probe_test_sig = image_signature(self.target.part("probe_test")[0])
        self.accepted_sha: set[str] = set()
        self.background_sample = BackgroundSample(cfg.reward.background_size, background_seed(cfg))
        if not resume or "background" not in checkpoint.state:  # (a checkpoint holds the reservoir)
            self.background_sample.add(self._fetch_background())  # before resume: nothing is filtered out yet
        if resume:
            self.load_state_dict(checkpoint.state)
            self._truncate_logs()
            self._cut_ledger()
        elif not replay:
            save_config(cfg, self.run_dir / "config.yaml")
            agent.write_json(self.run_dir / "backend.json", self.backend.describe())
            agent.write_json(self.run_dir / "run.json", {
                "base_checkpoint": str(Path(base_checkpoint).resolve()) if base_checkpoint else None,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
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
        sc = self.cfg.search
        if self.mode is CacheMode.REPLAY:
            recorded = json.loads((self.run_dir / "backend.json").read_text())
            return build_backend("replay", cache=self.cache, recorded=recorded)
        url = sc.url or engine_url
        if url is None:
            raise ValueError("search.url is not set and no local engine was started for this run")
        options = dict(sc.options)
        if sc.backend == "local":
            options.setdefault("per_page", sc.results_per_query)
        return build_backend(sc.backend, cache=self.cache, mode=self.mode, url=url, **options)

    # -- one iteration ------------------------------------------------------------------
    def search_and_fetch(self, texts: list[str]) -> tuple[list, Candidates]:
        answers = search_many(self.backend, texts, self.cfg.search.results_per_query,
                              concurrency=self.cfg.search.concurrency)
        url_queries: dict[str, list[int]] = {}
        for qi, a in enumerate(answers):
            for r in [] if isinstance(a, SearchError) else a:
                url_queries.setdefault(r.image_url, []).append(qi)
        urls = list(url_queries)
        results = fetch_images(urls, allow_origin(self.cfg.fetch, getattr(self.backend, "url", None)),
                               self.cache, self.mode, progress=self.progress)
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
        rc = self.cfg.reward
        chosen = np.flatnonzero(rc.accept_mask(rewards, self.calibration)) if len(rewards) else np.zeros(0, int)
        if len(chosen) == 0:
            return chosen
        chosen = chosen[np.argsort(-rewards[chosen], kind="stable")]  # best first for the greedy dedupe
        sig = image_signature(cand.images[chosen])
        keep = dedupe_within(sig, rc.dedupe_threshold)
        if len(self.accepted_sig):
            keep &= ~near_duplicates(sig, self.accepted_sig, rc.dedupe_threshold)
        keep &= ~near_duplicates(sig, self.probe_test_sig, rc.decontaminate_threshold)
        return np.sort(chosen[keep])

    def _check_disk(self) -> dict:
        """The run folder's size by part before an iteration (for `explorer status` and the soak
        test), held to `disk.max_gb` when there is one: rejected bodies are evicted first, and
        DiskBudgetExceeded stops the run when that is not enough (explorer/run/disk.py)."""
        if self.mode is CacheMode.REPLAY:
            return {}
        if self.cfg.disk.max_gb is None:
            return {"disk": folder_usage(self.run_dir)}
        done = enforce_budget(self.run_dir, self.cfg.disk, self.cache, self.ledger)
        return {"disk": done["usage"], "evicted": done["evicted"], "evicted_bytes": done["freed"]}

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
        self._pending = {"concepts": [None if q.concept is None else self.vocab.concepts[q.concept] for q in queries],
                         "results": [[] if isinstance(a, SearchError) else [r.image_url for r in a] for a in answers],
                         "fetches": cand.fetches,
                         "accepted": self._record_accepted(cand, accepted, rewards, queries)}
        if len(accepted):
            self.learner.mixture.add_accepted(cand.images[accepted], self._pending["accepted"])
        self.background_sample.add(img.clone() for img in cand.images)  # later iterations contrast with it
        losses = self.learner.train_steps(self.learner.mixture, cfg.train.steps_per_iteration, progress=self.progress)
        self.refresh_index()
        row = {"iteration": self.iteration, "queries": [q.text for q in queries],
               "query_rewards": [round(float(r), 6) for r in q_rewards],
               "results": [0 if isinstance(a, SearchError) else len(a) for a in answers],
               "search_errors": [str(a) for a in answers if isinstance(a, SearchError)],
               "results_skipped": int(getattr(self.backend, "skipped", 0)),  # run total: results with no url
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

    def _log_name(self, name: str) -> str:
        """A replay writes its own logs next to the recorded ones."""
        return f"replay-{name}" if self.mode is CacheMode.REPLAY else name

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

    def _truncate_logs(self) -> None:
        truncate_logs(self.run_dir, map(self._log_name, ("metrics.jsonl", "accepted.jsonl")), self.iteration)

    def _cut_ledger(self) -> None:
        """Bring the ledger back to the checkpoint: delete later iterations, or fill it from the
        logs when the run folder is older than the ledger."""
        if self.ledger.last_iteration() is not None:
            self.ledger.truncate_after(self.iteration)
        elif (self.run_dir / "metrics.jsonl").exists():
            accepted = self.run_dir / "accepted.jsonl"
            self.ledger.import_logs(read_metrics(self.run_dir / "metrics.jsonl"),
                                    read_metrics(accepted) if accepted.exists() else [])

    def _check_stop(self) -> None:
        if self.stop_requested:
            raise StopRequested(f"stop requested during iteration {self.iteration}")

    def save_checkpoint(self) -> Path:
        """checkpoints/iter-NNNNNN/: everything needed to continue after the last finished
        iteration, complete or absent (see explorer/run/checkpoints.py); the last K are kept."""
        return write_checkpoint(self.run_dir, self.iteration, self.state_dict(), keep=self.keep_checkpoints)

    def _finish(self, row: dict, metrics: Path) -> None:
        """Write a finished iteration: metrics.jsonl, the ledger (committed), the checkpoint, TensorBoard."""
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.mode is CacheMode.REPLAY:
            return
        self.ledger.record_iteration(row, **self._pending)
        self._pending = {}
        if row["iteration"] > 0:  # iteration 0 is the starting point, rebuilt by a fresh start
            self.save_checkpoint()
        self._write_scalars(row)

    def _write_scalars(self, row: dict) -> None:
        if self.scalars is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events from this iteration on that a crashed attempt left behind
            self.scalars = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=row["iteration"])
        for tag, value in tensorboard_scalars(row).items():
            self.scalars.add_scalar(tag, value, global_step=row["iteration"])
        self.scalars.flush()

    def close(self) -> None:
        """Close the ledger and the TensorBoard writer (the run folder stays as it is)."""
        for resource in (self.scalars, self.ledger, self.store):
            if resource is not None:
                resource.close()
        self.scalars = self.ledger = None
        if self._replay_dir is not None:
            shutil.rmtree(self._replay_dir, ignore_errors=True)
            self._replay_dir = None

    # -- the whole run --------------------------------------------------------------------
    def run(self, until: int | None = None, log=print) -> list[dict]:
        """Iterate until `until` iterations (default: the config's) are done, or a stop is
        requested; an interrupted iteration is abandoned and redone on resume."""
        rows = []
        metrics = self.run_dir / self._log_name("metrics.jsonl")
        if self.iteration == 0:  # a fresh start: whatever an earlier attempt logged is void
            scores = self.base_scores if self.base_scores is not None else self.evaluate()
            rows.append({"iteration": 0, "learner_step": self.learner.step, **scores})
            metrics.write_text("")
            self._truncate_logs()
            if self.ledger is not None:
                self.ledger.truncate_after(-1)
            self._finish(rows[0], metrics)
        until = self.cfg.iterations if until is None else until
        while self.iteration < until and not self.stop_requested:
            saved = self.iteration
            try:
                row = self.step()
                self._finish(row, metrics)
            except StopRequested:
                self.iteration = saved  # the checkpoint on disk is the one after `saved`
                log(f"stopped during iteration {saved + 1}; it will be redone on resume")
                break
            except DiskBudgetExceeded as e:
                self.iteration, self.stopped_by = saved, str(e)
                log(f"stopped before iteration {saved + 1}: {e}")
                break
            except Exception as e:
                if not is_disk_full(e):
                    raise
                self.iteration = saved
                self.stopped_by = (f"the disk is full ({e}); iteration {saved + 1} was abandoned and the checkpoint of "
                                   f"iteration {saved} is complete: free space, then resume")
                log(f"stopped: {self.stopped_by}")
                break
            rows.append(row)
            log(_summary(row))
        else:  # every iteration done: the finished folder is held to the budget too
            try:
                self._check_disk()
            except DiskBudgetExceeded as e:
                self.stopped_by = str(e)
                log(f"finished, but {e}")
        return rows


TENSORBOARD_TAGS = {"eval_knn_accuracy": "eval/knn_accuracy", "eval_linear_probe_accuracy": "eval/linear_probe_accuracy",
                    "ssl_loss": "train/ssl_loss", "mean_image_reward": "acquire/mean_image_reward",
                    "precision_fetched": "acquire/precision_fetched", "precision_accepted": "acquire/precision_accepted",
                    "accepted": "acquire/accepted", "fetched": "acquire/fetched", "decoded": "acquire/decoded",
                    "seconds": "time/seconds_per_iteration"}


def tensorboard_scalars(row: dict) -> dict[str, float]:
    """The scalar metrics of one metrics.jsonl row under their TensorBoard tags (absent or None: left out)."""
    out = {tag: float(row[key]) for key, tag in TENSORBOARD_TAGS.items() if row.get(key) is not None}
    if row.get("query_rewards"):
        out["acquire/mean_query_reward"] = float(np.mean(row["query_rewards"]))
    return out


def _summary(row: dict) -> str:
    prec = row.get("precision_accepted")
    ev = (f" knn={row['eval_knn_accuracy']:.3f} probe={row['eval_linear_probe_accuracy']:.3f}"
          if "eval_knn_accuracy" in row else "")
    return (f"iter {row['iteration']}: {len(row['queries'])} queries, {row['decoded']}/{row['fetched']} decoded, "
            f"{row['accepted']} accepted" + (f" (precision {prec:.2f})" if prec is not None else "")
            + f", loss {row['ssl_loss']:.3f}{ev}, {row['seconds']:.0f}s")


DECISION_KEYS = ("queries", "query_rewards", "accepted_urls", "ssl_loss")


def compare_decisions(recorded: list[dict], replayed: list[dict]) -> list[str]:
    """Differences between a recorded run and its replay, in the keys that make up its decisions."""
    diffs = []
    if len(recorded) != len(replayed):
        diffs.append(f"{len(recorded)} recorded iterations but {len(replayed)} replayed")
    for a, b in zip(recorded, replayed):
        for key in DECISION_KEYS:
            if a.get(key) != b.get(key):
                diffs.append(f"iteration {a['iteration']}: {key} differs: {a.get(key)!r} != {b.get(key)!r}")
    return diffs
