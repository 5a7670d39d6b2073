"""The run plane both modalities share: one run folder, its logs, ledger, checkpoints, disk budget,
TensorBoard, safe stopping and exact resume. `RunLoop.run` drives the iterations; a modality's loop
(`explorer.run.image.ImageLoop`, `explorer.run.text.TextLoop`) supplies what one iteration does.

    config.yaml        the fully resolved config
    backend.json       the search backend as recorded (replay rebuilds it on the cache alone)
    background.json    the queries of the reward's first background sample of the web and what they fetched
    metrics.jsonl      one line per iteration (iteration 0 = the state before any query)
    accepted.jsonl     every accepted item: iteration, url, queries, reward, sha256
    ledger.sqlite      queries, results, fetch statuses, accepted items, iterations (explorer/run/ledger.py)
    cache/             every search answer and fetched body (content-addressed)
    checkpoints/       iter-NNNNNN/: everything needed to continue after that iteration, the last K
                       kept (explorer/run/checkpoints.py; older runs have a single checkpoint.pt)
    tensorboard/       scalars per iteration
    sheets/            iter-NNNNNN.png (text: .html): the contact sheet of each iteration (explorer/run/sheets.py)

A search that fails is a missing observation, not a zero: its query gets no reward (None in the
metrics row's `query_rewards`, its error in `search_errors` and the ledger), the policy's update
leaves it out, and it is searched again in up to `search.failed_query_retries` later iterations
(the queue is part of the checkpoint). An iteration whose searches all failed says so in its row
(`all_searches_failed`), in the log and in `explorer status`.

and what a modality adds (images: acquired/ shards; text: tokenizer.model). Each finished
iteration is written in this order: accepted.jsonl, the modality's own files, metrics.jsonl, one
ledger transaction, the checkpoint, TensorBoard. A resume loads the newest complete checkpoint and
cuts everything else back to it, so a crash anywhere in between loses at most the unfinished
iteration. A replay writes replay-metrics.jsonl and replay-accepted.jsonl and no ledger or checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from explorer.acquire.cache import CacheMode, ResponseCache
from explorer.acquire.fetch import FetchConfig, allow_origin
from explorer.acquire.search import ImageQuery, SearchError, UnrecordedAnswer, search_many
from explorer.run.checkpoints import LoadedCheckpoint, load_latest_checkpoint, write_checkpoint
from explorer.run.config import ExperimentConfig, save_config
from explorer.run.disk import DiskBudgetExceeded, enforce_budget, folder_usage, is_disk_full
from explorer.run.ledger import LEDGER, FetchRecord, RunLedger, read_metrics
from explorer.run.searches import FailedSearch, query_status, recorded_failures, search_error
from explorer.run.sheets import best_rejected, record_sheet
from explorer.score.reward import RewardSpace
from policies.base import Query
from policies.random_policy import VocabularyPolicy

# Seeds the draw of background queries apart from the policy's own stream (same run seed).
BACKGROUND_STREAM = 0xB6


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def write_json(path: Path, data) -> None:
    """Write a JSON file atomically (a temp file, then a rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def search_input(query) -> str | ImageQuery:
    """What the search backend is asked for a policy's `Query`: its text, or its image (a query by
    example, which its text names)."""
    return query.text if query.image is None else ImageQuery(query.image, query.text)


def class_name_texts(names) -> list[str]:
    """A target's class names as search queries (`policy.class_name_queries`): underscores read as
    spaces, a leading catalogue number ('017.Cardinal') dropped, each distinct name once, in order."""
    texts = []
    for name in names:
        text = " ".join(re.sub(r"^\d+\.(?=\D)", "", str(name)).replace("_", " ").split())
        if text and text not in texts:
            texts.append(text)
    return texts


def background_seed(cfg: ExperimentConfig) -> int:
    """Seed of the background reservoir's draws: the run's seed on a stream of its own."""
    return int(np.random.default_rng([cfg.seed, BACKGROUND_STREAM]).integers(2**31))


def background_concepts(cfg: ExperimentConfig, vocab) -> list[int]:
    """The `reward.background_queries` vocabulary concepts (indices) of the reward's background
    sample, drawn with the run's seed on a stream of its own: every policy of a seed contrasts with
    the same sample of the web."""
    n = min(cfg.reward.background_queries, len(vocab.concepts))
    if n == 0:
        return []
    rng = np.random.default_rng([cfg.seed, BACKGROUND_STREAM])
    return [int(i) for i in sorted(rng.choice(len(vocab.concepts), n, replace=False))]


def background_queries(cfg: ExperimentConfig, vocab) -> list[str]:
    """The texts of `background_concepts`."""
    return [vocab.concepts[i] for i in background_concepts(cfg, vocab)]


def record_background(run_dir: Path, mode: CacheMode, texts: list[str], answers: list, rejected: dict[str, int],
                      precision: float | None, **found: int) -> None:
    """background.json: the start-up background queries, their result counts and what they
    fetched (`found`: the usable items, by the modality's name for them); a replay writes nothing.
    Warns when nothing usable came back."""
    if mode is not CacheMode.REPLAY:
        write_json(run_dir / "background.json", {
            "queries": texts, "results": [None if isinstance(a, SearchError) else len(a) for a in answers],
            "errors": [search_error(a) for a in answers], **found, "rejected": rejected, "precision": precision})
    if not any(found.values()):
        warnings.warn(f"the {len(texts)} background queries fetched nothing usable: the reward is the plain "
                      "similarity to the target", stacklevel=3)


@dataclass
class Candidates:
    """One search round's fetched items that the modality can use (decoded images, valid new
    documents), with their provenance."""

    urls: list[str]
    sha256: list[str]
    items: object                        # images: uint8 tensor (M, 3, S, S); text: M strings
    queries_of: list[list[int]]          # per item: indices of the queries that found it
    rejected: dict[str, int] = field(default_factory=dict)   # fetched but unusable, by reason
    fetches: list[FetchRecord] = field(default_factory=list)  # every fetched URL with its status
    signatures: np.ndarray | None = None  # near-duplicate signatures (M, D), where scoring computed them

    def __len__(self) -> int:
        return len(self.urls)

    def subset(self, keep: np.ndarray, reason: str) -> Candidates:
        """The items where `keep` (M,) is true; the others are counted as rejected for `reason`."""
        keep = np.asarray(keep, bool)
        rows = np.flatnonzero(keep)
        rejected = dict(self.rejected)
        if (~keep).any():
            rejected[reason] = rejected.get(reason, 0) + int((~keep).sum())
        items = self.items[rows] if hasattr(self.items, "shape") else [self.items[j] for j in rows]
        return Candidates([self.urls[j] for j in rows], [self.sha256[j] for j in rows], items,
                          [self.queries_of[j] for j in rows], rejected, self.fetches,
                          None if self.signatures is None else self.signatures[rows])


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


def compare_decisions(recorded: list[dict], replayed: list[dict], keys) -> list[str]:
    """Differences between a recorded run and its replay, in the keys that make up its decisions."""
    diffs = []
    if len(recorded) != len(replayed):
        diffs.append(f"{len(recorded)} recorded iterations but {len(replayed)} replayed")
    for a, b in zip(recorded, replayed):
        diffs += [f"iteration {a['iteration']}: {key} differs: {a.get(key)!r} != {b.get(key)!r}"
                  for key in keys if a.get(key) != b.get(key)]
    return diffs


class RunLoop(ABC):
    """One run folder, the acquisition round and the iterations written to the folder: the one
    loop both modalities run. A modality (`explorer.run.image.ImageLoop`, `explorer.run.text.TextLoop`)
    calls `_open_run` first, builds its parts (corpus and target, vocabulary, hidden truth, policy,
    learner, backend, background sample) and implements the methods under "what a modality
    implements": how fetched bodies become candidates, how they are embedded for the reward, where
    accepted items go, iteration 0, one iteration (`step`, which calls `acquire` for a search round),
    the evaluation, the state and the log line."""

    DECISION_KEYS: tuple[str, ...] = ()  # metrics keys a replay must reproduce
    TENSORBOARD_TAGS: dict[str, str] = {}  # metrics key -> TensorBoard tag
    checkpoint_start = False  # whether iteration 0 is checkpointed (when building it is costly)
    USABLE = "decoded"  # the metrics key of a round's usable items ("decoded" images, "valid" documents)
    MEAN_REWARD = "mean_image_reward"  # the metrics key of their mean reward
    held_out_sig: np.ndarray | None = None  # signatures an accepted item must not copy (an evaluation split)

    def _open_run(self, cfg: ExperimentConfig, run_dir: Path, *, replay: bool, progress: bool, resume: bool,
                  keep_checkpoints: int) -> LoadedCheckpoint | None:
        """The folder, cache and ledger; returns the checkpoint to resume from (None: a fresh start)."""
        if keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.keep_checkpoints = keep_checkpoints
        self.stop_requested = False  # set from a signal handler; honoured at the next safe point
        self.stopped_by: str | None = None  # why run() stopped early (disk budget, full disk), if it did
        checkpoint = load_latest_checkpoint(self.run_dir) if resume else None
        self.resumed_from = checkpoint.path if checkpoint else None  # the checkpoint it continues from
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.mode = CacheMode.REPLAY if replay else CacheMode.READWRITE
        self.ledger = None if replay else RunLedger(self.run_dir / LEDGER)
        self.scalars = None  # the TensorBoard writer, opened by the first finished iteration
        self._pending: dict = {}
        self.stage_seconds: dict[str, float] = {}  # this iteration's time split (`timed`)
        self.cache = ResponseCache(self.run_dir / "cache")
        self.iteration = 0
        self.seen_urls: set[str] = set()  # with search.skip_seen: every result URL of the policy's searches so far
        # failed searches to ask again (search.failed_query_retries); a checkpoint's are restored here
        self.failed_searches = [FailedSearch.from_state(f) for f in
                                (checkpoint.state.get("failed_searches", []) if checkpoint else [])]
        # iterations in a row that accepted nothing (a warning at two), carried across a resume
        self.empty_rounds = checkpoint.state.get("empty_rounds", 0) if checkpoint else 0
        self._background_round = None  # the background queries and their finds, until the policy hears them
        self.class_names: list[str] = []  # searched first with policy.class_name_queries (`use_class_names`)
        return checkpoint

    def use_class_names(self, names) -> None:
        """The target's class names, searched before the policy's batch if `policy.class_name_queries`."""
        if not self.cfg.policy.class_name_queries:
            return
        if not isinstance(self.policy, VocabularyPolicy):
            raise ValueError(f"policy.class_name_queries needs a vocabulary policy (random, gp, oracle), not "
                             f"{self.cfg.policy.name!r}; the LLM policies read the class names in their prompt")
        self.class_names = class_name_texts(names)
        if not self.class_names:
            warnings.warn("policy.class_name_queries: the target has no class names (no class subfolders), so "
                          "every round is the policy's own", stacklevel=2)

    def class_name_round(self, n: int) -> list[Query]:
        """The class names this round searches before the policy's batch: the first round's n, then
        the next n, ... (fixed by the iteration number, so a resumed or replayed round asks the same)."""
        start = (self.iteration - 1) * n
        return [Query(text) for text in self.class_names[start:start + n]]

    def _open_backend(self, build, name: str, engine_url: str | None):
        """The run's search backend, built by the modality's registry (`build(name, ...)`): in a
        replay, the recorded one on the cache alone; else `search.backend` at `search.url` or the
        local engine's URL."""
        sc = self.cfg.search
        if self.mode is CacheMode.REPLAY:
            recorded = json.loads((self.run_dir / "backend.json").read_text())
            return build("replay", cache=self.cache, recorded=recorded)
        url = sc.url or engine_url
        if url is None:
            raise ValueError("search.url is not set and no local engine was started for this run")
        options = dict(sc.options)
        if sc.backend == "local":
            options.setdefault("per_page", sc.results_per_query)
        return build(name, cache=self.cache, mode=self.mode, url=url, **options)

    def _search(self, texts: list[str | ImageQuery], background: bool = False) -> tuple[list, dict[str, list[int]]]:
        """Every query's answer (results, or a SearchError) and, per result URL in first-seen order,
        the queries that returned it; the URLs are what the modality fetches next. A replay fails
        the searches the recording logged as failed (`background`: in background.json) again. With
        `search.skip_seen` the policy's queries skip the URLs earlier rounds' searches returned."""
        failed = (recorded_failures(self.run_dir, self.iteration, texts, background)
                  if self.mode is CacheMode.REPLAY else {})
        known = () if background else self.seen_urls  # read only while the searches run; empty without skip_seen
        searched = iter(search_many(self.backend, [t for i, t in enumerate(texts) if i not in failed],
                                    self.cfg.search.results_per_query, concurrency=self.cfg.search.concurrency,
                                    known=known))
        answers = [failed[i] if i in failed else next(searched) for i in range(len(texts))]
        for answer in answers:
            if isinstance(answer, UnrecordedAnswer):  # a replay's cache lost an answer the recording had
                raise answer
        url_queries: dict[str, list[int]] = {}
        for qi, a in enumerate(answers):
            for r in [] if isinstance(a, SearchError) else a:
                url_queries.setdefault(r.image_url, []).append(qi)
        if self.cfg.search.skip_seen and not background:
            self.seen_urls.update(url_queries)
        return answers, url_queries

    def _fetch_config(self) -> FetchConfig:
        """The fetch settings, with the search engine's own host allowed (a local engine serves the items)."""
        return allow_origin(self.cfg.fetch, getattr(self.backend, "url", None))

    def _query_log(self, queries, q_rewards, answers, searches: list[int]) -> dict:
        """The iteration's queries for the ledger (`_pending`) and its metrics row, both modalities
        alike. A failed query has no reward and no result count (None); `searches` says how many
        times each query has been searched, this time included (> 1: a retry of a failure)."""
        failed = [isinstance(a, SearchError) for a in answers]
        self._pending = {"concepts": [None if q.concept is None else self.vocab.concepts[q.concept] for q in queries],
                         "results": [[] if bad else [(r.rank, r.image_url) for r in a] for a, bad in zip(answers, failed)],
                         "errors": [search_error(a) for a in answers]}
        return {"queries": [q.text for q in queries],
                "query_rewards": [None if bad else round(float(r), 6) for r, bad in zip(q_rewards, failed)],
                "results": [None if bad else len(a) for a, bad in zip(answers, failed)],
                "query_status": [query_status(a) for a in answers], "query_searches": searches,
                "search_errors": [e for e in map(search_error, answers) if e is not None],
                "all_searches_failed": bool(failed) and all(failed),
                "results_skipped": int(getattr(self.backend, "skipped", 0))}  # run total: results with no url

    def _record_start(self, backend, **extra) -> None:
        """A fresh run folder's config.yaml and backend.json (and `extra` JSON files by name)."""
        if self.mode is CacheMode.REPLAY:
            return
        save_config(self.cfg, self.run_dir / "config.yaml")
        write_json(self.run_dir / "backend.json", backend.describe())
        for name, data in extra.items():
            write_json(self.run_dir / name, data)

    def _resume_logs(self) -> None:
        """Cut logs and ledger back to the loaded checkpoint's iteration; the URLs searched so far
        come back from the ledger."""
        self._truncate_logs()
        self._cut_ledger()
        if self.ledger is not None and self.cfg.search.skip_seen:
            self.seen_urls = self.ledger.result_urls()

    # -- the acquisition round, both modalities alike ------------------------------------------
    def search_and_fetch(self, texts: list[str | ImageQuery], background: bool = False) -> tuple[list, Candidates]:
        """Search `texts` (or images), then fetch and convert every result URL once: (answers, candidates)."""
        with self.timed("search"):
            answers, url_queries = self._search(texts, background)
        with self.timed("fetch"):
            return answers, self.fetch_candidates(url_queries, len(texts))

    @contextlib.contextmanager
    def timed(self, stage: str):
        """Adds the seconds spent inside to `stage` of the iteration's time split (the metrics row's
        `stage_seconds`: search, fetch, reward, train, eval; `bench/bench_gpu.py` reports it)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + time.perf_counter() - t0

    def take_stage_seconds(self) -> dict[str, float]:
        """The time split since the last call (rounded), and a fresh one."""
        split, self.stage_seconds = self.stage_seconds, {}
        return {k: round(v, 3) for k, v in split.items()}

    def _fetch_background(self) -> list:
        """The first web sample the reward contrasts with: the results of `reward.background_queries`
        vocabulary concepts drawn with the run's seed (`background_queries`: the same for every
        policy of a seed), fetched through the run's cache, so a replay gets the same items back."""
        concepts = background_concepts(self.cfg, self.vocab) if self.cfg.reward.background_size else []
        if not concepts:
            return []
        texts = [self.vocab.concepts[i] for i in concepts]
        answers, cand = self.search_and_fetch(texts, background=True)
        record_background(self.run_dir, self.mode, texts, answers, cand.rejected,
                          self.truth.precision(cand.urls) if self.truth else None, **{self.USABLE: len(cand)})
        self._background_round = ([Query(t, c) for t, c in zip(texts, concepts)], answers, cand)
        return list(self.background_items(cand))

    def observe_background(self) -> None:
        """A policy that takes observations it did not choose (`observe`: the GP) hears the background
        queries' rewards under the first reward space before its first batch: their results were
        fetched and scored anyway, so the evidence costs no download. Each image's own background
        entry is left out of its contrast (`RewardSpace.member_rewards`). The rewards go into
        background.json as `query_rewards`."""
        pending, self._background_round = self._background_round, None
        observe = getattr(self.policy, "observe", None)
        if pending is None or observe is None:
            return
        queries, answers, cand = pending
        with self.timed("reward"):
            cand, emb = self.embed_candidates(cand)
            q_rewards = self.cfg.reward.query_rewards(self.space.member_rewards(emb), cand.queries_of, len(queries),
                                                      self.space.calibration, self.cfg.search.results_per_query)
        observed = [i for i, a in enumerate(answers) if not isinstance(a, SearchError)]
        heard = observe([queries[i] for i in observed], [q_rewards[i] for i in observed]) if observed else False
        path = self.run_dir / "background.json"
        if heard and self.mode is not CacheMode.REPLAY and path.exists():
            info = json.loads(path.read_text())
            info["query_rewards"] = [round(float(r), 6) if i in observed else None for i, r in enumerate(q_rewards)]
            write_json(path, info)

    def acquire(self) -> dict:
        """One search round: propose -> search -> fetch -> embed -> reward -> update the policy ->
        accept -> record. Returns its part of the metrics row; the accepted items are in the
        learner's data and `_pending` holds the round's ledger rows. Stops (StopRequested) only
        before anything is written."""
        cfg = self.cfg
        retries = self.failed_searches  # searched after the policy's batch
        n = cfg.policy.queries_per_iteration
        named = self.class_name_round(n)  # policy.class_name_queries: the target's class names first
        own = self.policy.propose(n - len(named)) if len(named) < n else []
        queries = named + own + [f.query for f in retries]
        searches = [1] * (len(queries) - len(retries)) + [f.searches + 1 for f in retries]
        answers, cand = self.search_and_fetch([search_input(q) for q in queries])
        self._check_stop()
        with self.timed("reward"):
            cand, emb = self.embed_candidates(cand)
            rewards = self.space.rewards(emb, cfg.reward.chunk_size)
            q_rewards = cfg.reward.query_rewards(rewards, cand.queries_of, len(queries), self.space.calibration,
                                                 cfg.search.results_per_query)
        observed = [i for i, a in enumerate(answers) if not isinstance(a, SearchError)]
        if observed:  # a failed search is a missing observation: the policy never hears of it
            self.policy.update([queries[i] for i in observed], [q_rewards[i] for i in observed])
        captions_heard = self.hear_captions(answers, cand, rewards)
        accepted = self.accept(cand, rewards)
        self._check_stop()  # last safe point: from here on the iteration writes its logs
        self.failed_searches = [FailedSearch(q, n) for q, n, a in zip(queries, searches, answers)
                                if isinstance(a, SearchError) and n <= cfg.search.failed_query_retries]
        query_log = self._query_log(queries, q_rewards, answers, searches)
        records = self._record_accepted(cand, accepted, rewards, queries)
        self._pending.update(fetches=cand.fetches, accepted=records)
        if len(accepted):
            self.keep_accepted(cand, accepted, records)
        if cfg.reward.background_update == "reservoir":  # later rounds contrast with what this one fetched
            self.background_sample.add(self.background_items(cand))
        self.acquired(cand)
        urls = cand.urls
        return {**query_log, **self._reward_diagnostics(rewards, len(accepted)),
                "fetched": len(cand) + sum(cand.rejected.values()), self.USABLE: len(cand),
                "rejected": cand.rejected, "accepted": len(accepted), "accepted_urls": [urls[j] for j in accepted],
                "precision_fetched": self.truth.precision(urls) if self.truth else None,
                "precision_accepted": self.truth.precision([urls[j] for j in accepted]) if self.truth else None,
                "reward_auc": self.truth.separation(urls, rewards) if self.truth else None,
                self.MEAN_REWARD: round(float(rewards.mean()), 6) if len(rewards) else None,
                "rejected_best": best_rejected(cand, rewards, accepted, cfg.reward.accept_mask(rewards, self.space.calibration)
                                               if len(rewards) else [], self.record_fields),  # for the contact sheet
                "policy_stats": dict(getattr(self.policy, "stats", None) or {}),  # LLM policies: seconds, KL, clean-up
                **({"captions_heard": captions_heard} if captions_heard else {})}

    def hear_captions(self, answers: list, cand: Candidates, rewards: np.ndarray) -> list[list]:
        """A policy that asks for them (`captions_wanted`: the GP's `caption_feedback`) hears the
        captions of the round's best-scored candidates, distinct and non-empty, each worth what a
        query returning only images like it would earn (`RewardConfig.image_values`); those worth
        nothing are not heard. Returns [caption, value] pairs as heard, for the metrics row."""
        wanted = int(getattr(self.policy, "captions_wanted", 0) or 0)
        if not wanted or not len(rewards):
            return []
        caption_of = {}
        for answer in answers:
            for r in [] if isinstance(answer, SearchError) else answer:
                for url in (r.image_url, r.page_url):
                    caption_of.setdefault(url, " ".join(str(r.caption or "").split()))
        values = self.cfg.reward.image_values(rewards, self.space.calibration)
        heard: dict[str, float] = {}
        for j in np.argsort(-values, kind="stable"):
            caption = caption_of.get(cand.urls[j], "")
            if len(heard) == wanted or not values[j] > 0:
                break
            if caption and caption not in heard:
                heard[caption] = round(float(values[j]), 6)
        if heard:
            self.policy.observe_captions(list(heard), list(heard.values()))
        return [[c, v] for c, v in heard.items()]

    def accept(self, cand: Candidates, rewards: np.ndarray) -> np.ndarray:
        """Indices of accepted candidates: reward selection (`RewardConfig.select`), then near-duplicate
        filters within the batch, against everything accepted so far and against `held_out_sig`."""
        return self.cfg.reward.select(rewards, self.space.calibration, lambda rows: self.signatures(cand, rows),
                                      self.accepted_sig, held_out=self.held_out_sig)

    def reward_space(self, embed_target, embed_items, embed_base=None) -> RewardSpace:
        """The reward space under the current encoder (`embed_target()`: the target's embeddings,
        `embed_items(items)`: any background items'), or under `embed_base` (the same pair: the base
        encoder, or the start encoder) when `reward.encoder` is "base" or "start", or when the current
        one has collapsed (its target rewards no longer spread: `RewardConfig.min_spread`) and the
        base's spread more. The collapse is logged either way
        (`reward_collapsed`)."""
        rc = self.cfg.reward
        bg, web = self.background_sample.items, self.web_sample

        def build(target_fn, items_fn, name):
            return rc.space(target_fn(), items_fn(bg) if len(bg) else None, items_fn(web) if len(web) else None,
                            encoder=name)

        if rc.encoder in ("base", "start") and embed_base is not None:  # the configured choice: no fallback
            space = build(*embed_base, rc.encoder)
            self.reward_health = space.health(rc.min_spread)  # names its encoder
            return space
        space = build(embed_target, embed_items, "learner")
        health = space.health(rc.min_spread)
        if health["reward_collapsed"]:
            base = build(*embed_base, "base") if embed_base is not None else None
            if base is not None and base.calibration.spread() > space.calibration.spread():
                space, choice = base, "it now reads the base encoder's embeddings"
            else:
                choice = "the base encoder spreads no better" if base is not None else "no base encoder to fall back on"
            warnings.warn(f"iteration {self.iteration}: the reward has collapsed under the current encoder (the "
                          f"target's own rewards spread {health['reward_spread']:.2g} from their 10th to 90th "
                          f"percentile, below reward.min_spread {rc.min_spread:g}; mean cosine between target "
                          f"embeddings {health['reward_anisotropy']:.4f}); {choice}", stacklevel=2)
        self.reward_health = {**health, "reward_encoder": space.encoder}
        return space

    def _reward_diagnostics(self, rewards: np.ndarray, accepted: int) -> dict:
        """What a user can read without ground truth: the reward's scale and how many candidates
        reached the threshold. Two rounds in a row that accept nothing get a warning that names the
        likely causes."""
        rc = self.cfg.reward
        threshold = self.space.calibration.threshold(rc.accept_percentile)
        above = int((rewards >= threshold).sum())
        self.empty_rounds = 0 if accepted else self.empty_rounds + 1
        if self.empty_rounds == 2:
            warnings.warn(
                f"iteration {self.iteration}: nothing accepted for 2 iterations ({above} of {len(rewards)} candidates "
                f"reached the threshold {threshold:.4f}). Likely causes: the web holds nothing of the target's kind "
                "for these queries; the reward has collapsed (see reward_spread and reward_collapsed in "
                "metrics.jsonl); or the target's style differs from the web's copies of its kind (lower "
                "reward.accept_percentile, or set reward.web_percentile)", stacklevel=2)
        spread = float(np.percentile(rewards, 90) - np.percentile(rewards, 10)) if len(rewards) else None
        return {**self.reward_health, "above_threshold": above,
                "candidate_spread": None if spread is None else round(spread, 6),
                "accepted_nothing_for": self.empty_rounds}

    def _record_accepted(self, cand: Candidates, accepted: np.ndarray, rewards: np.ndarray, queries) -> list[dict]:
        """Append the accepted items to accepted.jsonl and their keys and signatures to the run's
        memory of what it has; returns their records."""
        if not len(accepted):
            return []
        new = self.signatures(cand, accepted)
        self.accepted_sig = new if not len(self.accepted_sig) else np.concatenate([self.accepted_sig, new])
        records = [{"iteration": self.iteration, "url": cand.urls[j], **self.record_fields(cand, j),
                    "sha256": cand.sha256[j], "queries": [queries[q].text for q in cand.queries_of[j]],
                    "reward": round(float(rewards[j]), 6),
                    "relevant": self.truth.relevant(cand.urls[j]) if self.truth else None} for j in accepted]
        self.accepted_sha.update(r["sha256"] for r in records)
        with open(self.run_dir / self._log_name("accepted.jsonl"), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        return records

    # -- what a modality implements ----------------------------------------------------------
    @abstractmethod
    def fetch_candidates(self, url_queries: dict[str, list[int]], n_queries: int) -> Candidates:
        """Fetch the result URLs (through `self.cache`, with `self._fetch_config()`) and keep the
        usable, new items; `n_queries` searches were made for them."""

    @abstractmethod
    def embed_candidates(self, cand: Candidates) -> tuple[Candidates, np.ndarray]:
        """The candidates to score (a modality may drop some) and their unit embeddings (M, D)
        under the reward's encoder."""

    def signatures(self, cand: Candidates, rows: np.ndarray) -> np.ndarray:
        """Near-duplicate signatures (len(rows), D), unit rows, of candidates `rows`."""
        return cand.signatures[rows]

    def record_fields(self, cand: Candidates, j: int) -> dict:
        """Fields of accepted.jsonl beyond the shared ones (e.g. a document's title)."""
        return {}

    @abstractmethod
    def keep_accepted(self, cand: Candidates, accepted: np.ndarray, records: list[dict]) -> None:
        """Hand the accepted items to the learner's data."""

    def background_items(self, cand: Candidates):
        """The items of `cand` as the reward's background sample keeps them."""
        return cand.items

    def acquired(self, cand: Candidates) -> None:
        """Called at the end of a round (e.g. to update the reward's reference)."""

    @abstractmethod
    def start_row(self) -> dict:
        """Iteration 0's metrics row: the state before any query (evaluated; pretrained, if the
        modality pretrains)."""

    def needs_start(self) -> bool:
        """Whether iteration 0 is still to be written (a fresh start)."""
        return self.iteration == 0

    @abstractmethod
    def step(self) -> dict:
        """One iteration (a search round with `acquire`, training, evaluation): its metrics row.
        `_pending` holds its ledger rows when it returns."""

    def finished_early(self) -> str | None:
        """Why no further iteration can run (e.g. a spent FLOP budget), or None."""
        return None

    def summary(self, row: dict) -> str | None:
        """The line logged for a finished iteration (None: nothing)."""
        return f"iter {row['iteration']}"

    @abstractmethod
    def evaluate(self) -> dict:
        """The modality's evaluation as metrics keys (`eval_*`)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything a resume needs beyond the run folder's files (learner, policy, background
        sample, position); written as a checkpoint after every iteration."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` (a resume; the modality cuts its own files back to it)."""

    def close_modality(self) -> None:
        """Release what the modality holds open (files, temporary folders)."""

    # -- the run folder ----------------------------------------------------------------------
    def _log_name(self, name: str) -> str:
        """A replay writes its own logs next to the recorded ones."""
        return f"replay-{name}" if self.mode is CacheMode.REPLAY else name

    def _truncate_logs(self) -> None:
        truncate_logs(self.run_dir, map(self._log_name, ("metrics.jsonl", "accepted.jsonl")), self.iteration)

    def _cut_ledger(self) -> None:
        """Bring the ledger back to the checkpoint: delete later iterations, or fill it from the
        logs when the run folder is older than the ledger."""
        if self.ledger is None:
            return
        if self.ledger.last_iteration() is not None:
            self.ledger.truncate_after(self.iteration)
        elif (self.run_dir / "metrics.jsonl").exists():
            accepted = self.run_dir / "accepted.jsonl"
            self.ledger.import_logs(read_metrics(self.run_dir / "metrics.jsonl"),
                                    read_metrics(accepted) if accepted.exists() else [])

    def _check_stop(self) -> None:
        if self.stop_requested:
            raise StopRequested(f"stop requested during iteration {self.iteration}")

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

    def save_checkpoint(self) -> Path:
        """checkpoints/iter-NNNNNN/: everything needed to continue after the last finished
        iteration, complete or absent (see explorer/run/checkpoints.py); the last K are kept."""
        state = {**self.state_dict(), "failed_searches": [f.state() for f in self.failed_searches],
                 "empty_rounds": self.empty_rounds}
        return write_checkpoint(self.run_dir, self.iteration, state, keep=self.keep_checkpoints)

    def _finish(self, row: dict, metrics: Path) -> None:
        """Write a finished iteration: metrics.jsonl, the ledger (committed), the checkpoint, TensorBoard."""
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.mode is CacheMode.REPLAY:
            return
        self.ledger.record_iteration(row, **self._pending)
        record_sheet(self.run_dir, self.cfg, row, self._pending.get("accepted", []))  # sheets/iter-NNNNNN.*
        self._pending = {}
        if row["iteration"] > 0 or self.checkpoint_start:  # else rebuilt by a fresh start
            self.save_checkpoint()
        self._write_scalars(row)

    def _write_scalars(self, row: dict) -> None:
        if self.scalars is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events from this iteration on that a crashed attempt left behind
            self.scalars = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=row["iteration"])
        for tag, value in self.tensorboard_scalars(row).items():
            self.scalars.add_scalar(tag, value, global_step=row["iteration"])
        self.scalars.flush()

    def tensorboard_scalars(self, row: dict) -> dict[str, float]:
        """The scalar metrics of one metrics.jsonl row under their TensorBoard tags (absent or None: left out)."""
        out = {tag: float(row[key]) for key, tag in self.TENSORBOARD_TAGS.items() if row.get(key) is not None}
        observed = [r for r in row.get("query_rewards") or [] if r is not None]  # failed searches: None
        if observed:
            out["acquire/mean_query_reward"] = float(np.mean(observed))
        return out

    def close(self) -> None:
        """Close the ledger and the TensorBoard writer (the run folder stays as it is)."""
        for resource in (self.scalars, self.ledger):
            if resource is not None:
                resource.close()
        self.scalars = self.ledger = None
        self.close_modality()

    # -- the whole run --------------------------------------------------------------------
    def run(self, until: int | float | None = None, log=print) -> list[dict]:
        """Iterate until `until` iterations (default: the config's) are done, the modality has
        nothing left to run, or a stop is requested; an interrupted iteration is abandoned and redone
        on resume."""
        rows = []
        metrics = self.run_dir / self._log_name("metrics.jsonl")
        if self.needs_start():  # a fresh start: whatever an earlier attempt logged is void
            rows.append(self.start_row())
            metrics.write_text("")
            self._truncate_logs()
            if self.ledger is not None:
                self.ledger.truncate_after(-1)
            self._finish(rows[0], metrics)
            if self.summary(rows[0]):
                log(self.summary(rows[0]))
        until = self.cfg.iterations if until is None else until
        while self.iteration < until and not self.stop_requested:
            reason = self.finished_early()
            if reason:
                log(reason)
                break
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
            log(self.summary(row))
            if row.get("all_searches_failed"):
                log(f"iteration {row['iteration']}: all {len(row['queries'])} searches failed, no query was "
                    f"observed and the policy learned nothing: {row['search_errors'][0]}")
        else:  # every iteration done: the finished folder is held to the budget too
            try:
                self._check_disk()
            except DiskBudgetExceeded as e:
                self.stopped_by = str(e)
                log(f"finished, but {e}")
        return rows
