"""The query-policy protocol and its registry.

A policy proposes text queries drawn from a concept vocabulary, hears back one scalar reward per
query (the aggregate kNN reward of the images the query found), and keeps all of its state in a
`state_dict` so that a run can be checkpointed, resumed and replayed.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable


@dataclass(frozen=True)
class Query:
    """One search query. `concept` indexes the vocabulary when the query came from it."""

    text: str
    concept: int | None = None


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


def build_policy(name: str, **kwargs) -> QueryPolicy:
    """Create a registered policy; an unknown name lists the valid ones."""
    import policies  # noqa: F401  (importing the package registers every policy)

    if name not in POLICIES:
        raise KeyError(f"unknown policy {name!r}; valid: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**kwargs)


def policy_options(name: str) -> set[str]:
    """The option names a registered policy takes: its constructor's keywords and its config's fields."""
    import policies  # noqa: F401  (importing the package registers every policy)

    cls = POLICIES[name]
    params = inspect.signature(cls.__init__).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    config_class = getattr(cls, "config_class", None)
    if config_class is not None:
        names |= {f.name for f in dataclasses.fields(config_class)}
    return names - {"self", "concepts", "seed"}


def split_policy_options(name: str, options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(options policy `name` takes, names of options meant for other policies, which it ignores).

    An option that no registered policy takes is a typo and raises, naming the valid ones."""
    import policies  # noqa: F401

    if name not in POLICIES:
        raise KeyError(f"unknown policy {name!r}; valid: {', '.join(sorted(POLICIES))}")
    own = policy_options(name)
    known = set().union(*(policy_options(other) for other in POLICIES))
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"policy.options: {', '.join(unknown)} is not an option of any policy; "
                         f"the {name} policy takes: {', '.join(sorted(own)) or 'none'}")
    return {k: v for k, v in options.items() if k in own}, sorted(set(options) - own)
