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

and what a modality adds (images: acquired/ shards; text: tokenizer.model). Each finished
iteration is written in this order: accepted.jsonl, the modality's own files, metrics.jsonl, one
ledger transaction, the checkpoint, TensorBoard. A resume loads the newest complete checkpoint and
cuts everything else back to it, so a crash anywhere in between loses at most the unfinished
iteration. A replay writes replay-metrics.jsonl and replay-accepted.jsonl and no ledger or checkpoint.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np

from explorer.acquire.cache import CacheMode, ResponseCache
from explorer.acquire.fetch import FetchConfig, allow_origin
from explorer.acquire.search import SearchError, search_many
from explorer.run.checkpoints import LoadedCheckpoint, load_latest_checkpoint, write_checkpoint
from explorer.run.config import ExperimentConfig, save_config
from explorer.run.disk import DiskBudgetExceeded, enforce_budget, folder_usage, is_disk_full
from explorer.run.ledger import LEDGER, RunLedger, read_metrics

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
        write_json(run_dir / "background.json", {
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


def compare_decisions(recorded: list[dict], replayed: list[dict], keys) -> list[str]:
    """Differences between a recorded run and its replay, in the keys that make up its decisions."""
    diffs = []
    if len(recorded) != len(replayed):
        diffs.append(f"{len(recorded)} recorded iterations but {len(replayed)} replayed")
    for a, b in zip(recorded, replayed):
        diffs += [f"iteration {a['iteration']}: {key} differs: {a.get(key)!r} != {b.get(key)!r}"
                  for key in keys if a.get(key) != b.get(key)]
    return diffs


class RunLoop:
    """One run folder and the iterations written to it. A modality's loop calls `_open_run` first
    and implements `start_row` (iteration 0), `step` (one iteration's metrics row), `state_dict` /
    `load_state_dict`, `summary(row)`, and sets `iteration` and `_pending` (the ledger rows of the
    iteration in progress)."""

    DECISION_KEYS: tuple[str, ...] = ()  # metrics keys a replay must reproduce
    TENSORBOARD_TAGS: dict[str, str] = {}  # metrics key -> TensorBoard tag
    checkpoint_start = False  # whether iteration 0 is checkpointed (when building it is costly)

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
        self.cache = ResponseCache(self.run_dir / "cache")
        self.iteration = 0
        return checkpoint

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

    def _search(self, texts: list[str]) -> tuple[list, dict[str, list[int]]]:
        """Every query's answer (results, or a SearchError) and, per result URL in first-seen order,
        the queries that returned it; the URLs are what the modality fetches next."""
        answers = search_many(self.backend, texts, self.cfg.search.results_per_query,
                              concurrency=self.cfg.search.concurrency)
        url_queries: dict[str, list[int]] = {}
        for qi, a in enumerate(answers):
            for r in [] if isinstance(a, SearchError) else a:
                url_queries.setdefault(r.image_url, []).append(qi)
        return answers, url_queries

    def _fetch_config(self) -> FetchConfig:
        """The fetch settings, with the search engine's own host allowed (a local engine serves the items)."""
        return allow_origin(self.cfg.fetch, getattr(self.backend, "url", None))

    def _query_log(self, queries, q_rewards, answers) -> dict:
        """The iteration's queries for the ledger (`_pending`) and its metrics row, both modalities alike."""
        self._pending = {"concepts": [None if q.concept is None else self.vocab.concepts[q.concept] for q in queries],
                         "results": [[] if isinstance(a, SearchError) else [r.image_url for r in a] for a in answers]}
        return {"queries": [q.text for q in queries], "query_rewards": [round(float(r), 6) for r in q_rewards],
                "results": [0 if isinstance(a, SearchError) else len(a) for a in answers],
                "search_errors": [str(a) for a in answers if isinstance(a, SearchError)],
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
        """Cut logs and ledger back to the loaded checkpoint's iteration."""
        self._truncate_logs()
        self._cut_ledger()

    # -- what a modality implements ----------------------------------------------------------
    def start_row(self) -> dict:
        raise NotImplementedError

    def needs_start(self) -> bool:
        """Whether iteration 0 is still to be written (a fresh start)."""
        return self.iteration == 0

    def step(self) -> dict:
        raise NotImplementedError

    def finished_early(self) -> str | None:
        """Why no further iteration can run (e.g. a spent FLOP budget), or None."""
        return None

    def summary(self, row: dict) -> str | None:
        """The line logged for a finished iteration (None: nothing)."""
        return f"iter {row['iteration']}"

    def state_dict(self) -> dict:
        raise NotImplementedError

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
        return write_checkpoint(self.run_dir, self.iteration, self.state_dict(), keep=self.keep_checkpoints)

    def _finish(self, row: dict, metrics: Path) -> None:
        """Write a finished iteration: metrics.jsonl, the ledger (committed), the checkpoint, TensorBoard."""
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.mode is CacheMode.REPLAY:
            return
        self.ledger.record_iteration(row, **self._pending)
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
        if row.get("query_rewards"):
            out["acquire/mean_query_reward"] = float(np.mean(row["query_rewards"]))
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
        else:  # every iteration done: the finished folder is held to the budget too
            try:
                self._check_disk()
            except DiskBudgetExceeded as e:
                self.stopped_by = str(e)
                log(f"finished, but {e}")
        return rows
