"""When to try again: a server's Retry-After, else bounded exponential backoff with jitter.

Shared by the fetcher (explorer.acquire.fetch) and the search clients (explorer.acquire.search), so both wait the
same way: Retry-After (seconds or an HTTP date) wins, cut to a maximum; otherwise attempt k waits
min(backoff_max, backoff_base * 2**k), jittered to [50%, 100%] so clients do not retry in step.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Mapping


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds asked for by a Retry-After header (delta or HTTP date), or None. Keys lower-case."""
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Jittered exponential backoff before retry number `attempt` (0-based)."""
    return min(cap, base * 2**attempt) * (0.5 + 0.5 * rng.random())


def retry_delay(headers: Mapping[str, str], attempt: int, *, base: float, cap: float, retry_after_max: float,
                rng: random.Random) -> float:
    """Retry-After when the server sent one (at most `retry_after_max`), else the backoff."""
    asked = retry_after(headers)
    return min(asked, retry_after_max) if asked is not None else backoff_delay(attempt, base, cap, rng)
