"""What trains: self-supervised learners and their registry.

`LEARNERS` maps a name to a learner class; `build_learner(name, config=...)` creates one and an
unknown name lists the valid ones.
"""

from __future__ import annotations

from typing import Any

from learners.lm import LMConfig, LMLearner
from learners.moco import MoCoConfig, MoCoLearner

LEARNERS: dict[str, type] = {"mocov3": MoCoLearner, "lm": LMLearner}
LEARNER_CONFIGS: dict[str, type] = {"mocov3": MoCoConfig, "lm": LMConfig}


def build_learner(name: str, **kwargs: Any):
    """Create a registered learner, e.g. `build_learner("mocov3", config=MoCoConfig())`."""
    if name not in LEARNERS:
        raise KeyError(f"unknown learner {name!r}; valid: {', '.join(sorted(LEARNERS))}")
    return LEARNERS[name](**kwargs)
