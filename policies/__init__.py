"""Query policies: a registry (`POLICIES`) of everything that turns rewards into the next queries.

Importing the package imports every policy module, and each registers itself with `register_policy`;
`build_policy` then looks a name up. The builders live here, not in `policies.base`, so that no
policy module has to import the package that imports it.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from policies import gp, hybrid, knn_retrieval, oracle, ppo_llm, random_policy  # noqa: F401  (registration side effects)
from policies.base import POLICIES, Query, QueryPolicy, register_policy

__all__ = ["POLICIES", "Query", "QueryPolicy", "build_policy", "policy_options", "register_policy",
           "searches_by_image", "split_policy_options"]


def build_policy(name: str, **kwargs) -> QueryPolicy:
    """Create a registered policy; an unknown name lists the valid ones."""
    if name not in POLICIES:
        raise KeyError(f"unknown policy {name!r}; valid: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**kwargs)


def searches_by_image(name: str) -> bool:
    """Whether a registered policy queries the engine's image index (its engine must serve one)."""
    return bool(getattr(POLICIES.get(name), "searches_by_image", False))


def policy_options(name: str) -> set[str]:
    """The option names a registered policy takes: its constructor's keywords and its config's fields."""
    cls = POLICIES[name]
    params = inspect.signature(cls.__init__).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    config_class = getattr(cls, "config_class", None)
    if config_class is not None:
        names |= {f.name for f in dataclasses.fields(config_class)}
    return names - {"self", "concepts", "seed", "target_images"}  # given by the run, not the config


def split_policy_options(name: str, options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(options policy `name` takes, names of options meant for other policies, which it ignores).

    An option that no registered policy takes is a typo and raises, naming the valid ones."""
    if name not in POLICIES:
        raise KeyError(f"unknown policy {name!r}; valid: {', '.join(sorted(POLICIES))}")
    own = policy_options(name)
    known = set().union(*(policy_options(other) for other in POLICIES))
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"policy.options: {', '.join(unknown)} is not an option of any policy; "
                         f"the {name} policy takes: {', '.join(sorted(own)) or 'none'}")
    return {k: v for k, v in options.items() if k in own}, sorted(set(options) - own)
