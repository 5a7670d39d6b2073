"""What the run records of a round's searches: a query's status and error, the failed searches
waiting to be asked again, and, for a replay, which searches the recording logged as failed.

A search that fails is a missing observation: its query gets no reward and the policy never hears
of it (explorer/run/loop.py). Failures are never cached, and a query retried later has a cached
answer by then, so a replay cannot tell from the cache alone which searches failed; the recorded
metrics.jsonl (`query_status`, `search_errors`) and background.json (`results`, `errors`) can.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from explorer.acquire.search import SearchError
from explorer.run.ledger import read_metrics
from policies.base import Query


def search_error(answer) -> str | None:
    """Why a query's search failed (a SearchError), or why its paging stopped early (partial
    results); None for a complete answer."""
    return str(answer) if isinstance(answer, SearchError) else getattr(answer, "partial", None)


def query_status(answer) -> str:
    """"failed" (no observation), "partial" (results, but a later page failed) or "ok"."""
    if isinstance(answer, SearchError):
        return "failed"
    return "partial" if getattr(answer, "partial", None) else "ok"


@dataclass(frozen=True)
class FailedSearch:
    """A query whose search failed, waiting to be searched again; `searches` made so far."""

    query: Query
    searches: int

    def state(self) -> list:
        return [self.query.text, self.query.concept, self.searches]

    @classmethod
    def from_state(cls, state: list) -> FailedSearch:
        text, concept, searches = state
        return cls(Query(text, concept), int(searches))


def recorded_failures(run_dir: Path, iteration: int, texts: list[str], background: bool) -> dict[int, SearchError]:
    """The positions of `texts` whose search failed in the recorded run, with its error: in
    iteration `iteration` of metrics.jsonl, or (`background`) in background.json."""
    if background:
        path = Path(run_dir) / "background.json"
        recorded = json.loads(path.read_text()) if path.exists() else {}
        errors = [e if n is None else None for n, e in zip(recorded.get("results", []), recorded.get("errors", []))]
    else:
        rows = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["iteration"] == iteration]
        recorded = rows[0] if rows else {}
        problems, errors = iter(recorded.get("search_errors", [])), []  # one per failed or partial query
        for status in recorded.get("query_status", []):
            error = None if status == "ok" else next(problems)
            errors.append(error if status == "failed" else None)
    issued = recorded.get("queries", [])
    return {i: SearchError(f"{e} (as recorded)") for i, e in enumerate(errors)
            if e is not None and i < len(texts) and texts[i] == issued[i]}
