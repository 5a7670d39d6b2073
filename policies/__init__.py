"""Query policies. Importing the package registers every policy in `policies.base.POLICIES`."""

from policies import gp, oracle, ppo_llm, random_policy  # noqa: F401  (registration side effects)
from policies.base import POLICIES, Query, QueryPolicy, build_policy, register_policy

__all__ = ["POLICIES", "Query", "QueryPolicy", "build_policy", "register_policy"]
