"""The query-policy protocol and its registry.

A policy proposes queries — text, usually drawn from a concept vocabulary, or an image to find the
neighbours of (a query by example) — hears back one scalar reward per query (the aggregate kNN
reward of the images the query found), and keeps all of its state in a
`state_dict` so that a run can be checkpointed, resumed and replayed. A policy may also define
`observe(queries, rewards) -> bool`: rewards of queries the run issued that it did not choose (the
reward's background sample), heard before its first batch; and `captions_wanted` (how many) with
`observe_captions(captions, values) -> bool`: the captions of a round's best-scored images, heard
as free text (the GP does both; see `GPConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable


@dataclass(frozen=True)
class Query:
    """One search query. `concept` indexes the vocabulary when the query came from it; `image` (image
    file bytes) makes it a query by example, which `text` then names in logs."""

    text: str
    concept: int | None = None
    image: bytes | None = field(default=None, repr=False)


@runtime_checkable
class QueryPolicy(Protocol):
    name: str

    def propose(self, n: int) -> list[Query]: ...

    def update(self, queries: list[Query], rewards: list[float]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


POLICIES: dict[str, Callable[..., QueryPolicy]] = {}


def register_policy(name: str):
    def deco(cls):
        if name in POLICIES:
            raise ValueError(f"policy {name!r} registered twice")
        cls.name = name
        POLICIES[name] = cls
        return cls
    return deco
