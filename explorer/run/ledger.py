"""The run ledger: `RUN_DIR/ledger.sqlite`, SQLite in WAL mode, one transaction per iteration.

Tables (every row carries the iteration that wrote it):
    iterations  learner step, eval metrics, seconds, counts; `metrics` holds the full metrics.jsonl row
    queries     each issued query: position, text, concept (None for free text), reward, n results, error:
                a failed search has no reward and no count (NULL) and its error; a partial one (a
                later page failed) its count and the error that cut it short
    results     each distinct search result: the query's position, the rank of the URL's first
                occurrence in the engine's answer, the image URL
    fetches     each fetched URL of an iteration: `decoded`, `already_accepted` or the rejection reason
    accepted    each accepted item: url, sha256, reward, hidden relevance (None without ground truth)
    evicted     bodies the disk budget deleted (explorer/run/disk.py): sha256, the last iteration that had
                fetched it, bytes, time; kept across resumes (a deleted file stays deleted)

The acquisition loop commits an iteration here before it writes the checkpoint that covers it,
and on resume deletes the rows of iterations after the checkpoint, so the ledger always agrees
with the checkpoint. WAL lets `explorer status` read while the daemon writes; synchronous=FULL
makes a commit durable before the checkpoint is written.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

LEDGER = "ledger.sqlite"
TABLES = ("iterations", "queries", "results", "fetches", "accepted")
# metrics.jsonl keys that get their own column (the rest stays in `metrics`)
ITERATION_COLUMNS = ("learner_step", "seconds", "time", "ssl_loss", "mean_image_reward", "precision_fetched",
                     "precision_accepted", "fetched", "decoded", "accepted", "eval_knn_accuracy",
                     "eval_linear_probe_accuracy")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS iterations (iteration INTEGER PRIMARY KEY,
    {", ".join(ITERATION_COLUMNS)}, metrics TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS queries (iteration INTEGER NOT NULL, position INTEGER NOT NULL, text TEXT NOT NULL,
    concept TEXT, reward REAL, n_results INTEGER, error TEXT, PRIMARY KEY (iteration, position));
CREATE TABLE IF NOT EXISTS results (iteration INTEGER NOT NULL, query INTEGER NOT NULL, rank INTEGER NOT NULL,
    url TEXT NOT NULL, PRIMARY KEY (iteration, query, rank));
CREATE TABLE IF NOT EXISTS fetches (iteration INTEGER NOT NULL, url TEXT NOT NULL, status TEXT NOT NULL,
    sha256 TEXT, PRIMARY KEY (iteration, url));
CREATE TABLE IF NOT EXISTS accepted (iteration INTEGER NOT NULL, url TEXT NOT NULL, sha256 TEXT NOT NULL,
    reward REAL NOT NULL, relevant INTEGER, PRIMARY KEY (iteration, url));
CREATE INDEX IF NOT EXISTS accepted_sha256 ON accepted (sha256);
CREATE INDEX IF NOT EXISTS fetches_sha256 ON fetches (sha256);
CREATE TABLE IF NOT EXISTS evicted (sha256 TEXT PRIMARY KEY, iteration INTEGER NOT NULL, bytes INTEGER NOT NULL,
    time REAL NOT NULL);
"""


@dataclass(frozen=True)
class FetchRecord:
    url: str
    status: str                # "decoded", "already_accepted" or a rejection reason
    sha256: str | None = None


class RunLedger:
    """One run folder's ledger. `readonly=True` opens it for readers (status) without writing."""

    def __init__(self, path: Path, *, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        else:
            self.db = sqlite3.connect(self.path, isolation_level=None)  # transactions are explicit
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A ledger written before queries had an `error` column gets one (NULL for its old rows)."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(queries)")}
        if "error" not in columns:
            self.db.execute("ALTER TABLE queries ADD COLUMN error TEXT")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> RunLedger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------
    def record_iteration(self, row: dict, *, concepts: Sequence[str | None] = (),
                         results: Sequence[Sequence[str | tuple[int, str]]] = (), errors: Sequence[str | None] = (),
                         fetches: Iterable[FetchRecord] = (), accepted: Iterable[dict] = ()) -> None:
        """One iteration in one transaction. `row` is its metrics.jsonl row; `concepts`, `results`
        and `errors` are per query (in the row's query order): a query's results are (rank, url)
        pairs, or URLs ranked by position; `accepted` are accepted.jsonl records."""
        with _transaction(self.db):
            self._insert(row, concepts, results, errors, fetches, accepted)

    def _insert(self, row, concepts, results, errors, fetches, accepted) -> None:
        it = int(row["iteration"])
        self.db.execute(f"INSERT INTO iterations VALUES (?, {', '.join('?' * len(ITERATION_COLUMNS))}, ?)",
                        (it, *(row.get(k) for k in ITERATION_COLUMNS), json.dumps(row)))
        texts, rewards, counts = row.get("queries", []), row.get("query_rewards", []), row.get("results", [])

        def at(values, i):
            return values[i] if i < len(values) else None
        self.db.executemany(
            "INSERT INTO queries (iteration, position, text, concept, reward, n_results, error) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(it, i, text, at(concepts, i), at(rewards, i), at(counts, i), at(errors, i)) for i, text in enumerate(texts)])
        self.db.executemany("INSERT INTO results VALUES (?, ?, ?, ?)", [
            (it, q, *(r if isinstance(r, (tuple, list)) else (position, r)))
            for q, ranked in enumerate(results) for position, r in enumerate(ranked)])
        self.db.executemany("INSERT INTO fetches VALUES (?, ?, ?, ?)",
                            [(it, f.url, f.status, f.sha256) for f in fetches])
        self.db.executemany("INSERT INTO accepted VALUES (?, ?, ?, ?, ?)", [
            (it, a["url"], a["sha256"], a["reward"], None if a.get("relevant") is None else int(a["relevant"]))
            for a in accepted])

    def truncate_after(self, iteration: int) -> int:
        """Delete every row of iterations after `iteration` (all of them for -1); returns how many
        iteration rows went."""
        with _transaction(self.db):
            gone = self.db.execute("DELETE FROM iterations WHERE iteration > ?", (iteration,)).rowcount
            for table in TABLES[1:]:
                self.db.execute(f"DELETE FROM {table} WHERE iteration > ?", (iteration,))
        return gone

    def import_logs(self, metrics: Sequence[dict], accepted: Sequence[dict]) -> None:
        """Fill an empty ledger from a run's metrics.jsonl and accepted.jsonl rows (a run folder from
        before the ledger existed); per-URL fetch statuses and concepts were not logged there."""
        with _transaction(self.db):
            for row in metrics:
                self._insert(row, (), (), (), (), [a for a in accepted if a["iteration"] == row["iteration"]])

    def record_evicted(self, rows: Iterable[tuple[str, int, int, float]]) -> None:
        """(sha256, last iteration that fetched it, bytes, time) of evicted bodies; then the WAL is
        folded into the database and truncated, so what the ledger adds on disk is its new rows."""
        with _transaction(self.db):
            self.db.executemany("INSERT OR REPLACE INTO evicted VALUES (?, ?, ?, ?)", rows)
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # (a reader in the way makes it partial, not fail)

    # -- reading ------------------------------------------------------------------------
    def rejected_bodies(self) -> list[tuple[str, int]]:
        """(sha256, last iteration that fetched it) of every fetched body never accepted and still
        on disk as far as the ledger knows, least recently fetched first: what the disk budget evicts."""
        return self.db.execute(
            "SELECT f.sha256, MAX(f.iteration) AS last FROM fetches f LEFT JOIN evicted e ON e.sha256 = f.sha256 "
            "WHERE f.sha256 IS NOT NULL AND f.sha256 NOT IN (SELECT sha256 FROM accepted) "
            "GROUP BY f.sha256 HAVING MAX(e.iteration) IS NULL OR MAX(f.iteration) > MAX(e.iteration) "
            "ORDER BY last, MIN(f.rowid)").fetchall()

    def evictions(self) -> tuple[int, int]:
        """(bodies evicted, bytes freed) so far."""
        try:
            n, freed = self.db.execute("SELECT COUNT(*), TOTAL(bytes) FROM evicted").fetchone()
        except sqlite3.OperationalError:  # a ledger from before the table, opened read-only
            return 0, 0
        return n, int(freed)

    def result_urls(self) -> set[str]:
        """Every URL the run's queries have returned (the results table)."""
        return {url for (url,) in self.db.execute("SELECT DISTINCT url FROM results")}

    def last_iteration(self) -> int | None:
        return self.db.execute("SELECT MAX(iteration) FROM iterations").fetchone()[0]

    def metrics(self) -> list[dict]:
        """The metrics.jsonl rows of every recorded iteration, in order."""
        return [json.loads(m) for (m,) in self.db.execute("SELECT metrics FROM iterations ORDER BY iteration")]

    def count(self, table: str, after: int = 0) -> int:
        if table not in TABLES:
            raise ValueError(f"unknown ledger table {table!r}; tables: {', '.join(TABLES)}")
        return self.db.execute(f"SELECT COUNT(*) FROM {table} WHERE iteration > ?", (after,)).fetchone()[0]

    def summary(self, recent: int = 5) -> dict:
        """Totals over iterations >= 1 and the rejection reasons of the last `recent` iterations."""
        done, seconds, fetched, accepted = self.db.execute(
            "SELECT COUNT(*), TOTAL(seconds), TOTAL(fetched), TOTAL(accepted) FROM iterations WHERE iteration > 0"
        ).fetchone()
        last = self.last_iteration() or 0
        rejected = dict(self.db.execute(
            "SELECT status, COUNT(*) FROM fetches WHERE iteration > ? AND status NOT IN "
            "('decoded', 'already_accepted', 'valid') GROUP BY status ORDER BY status", (last - recent,)).fetchall())
        return {"iterations_done": done, "seconds": seconds, "fetched": int(fetched), "accepted_total": int(accepted),
                "queries_issued": self.count("queries"), "accepted_items": self.count("accepted"),
                "recent_rejected": rejected}


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error: an iteration is in the ledger whole or not at all."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def open_ledger(run_dir: Path) -> RunLedger:
    return RunLedger(Path(run_dir) / LEDGER)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a JSON-lines log (metrics.jsonl, accepted.jsonl, sweep.jsonl), in order; a line that
    is no JSON is named (ValueError "path:N: not a JSON object")."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON object ({e.msg})") from None
    return rows
