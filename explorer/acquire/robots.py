"""Politeness toward the hosts the agent downloads from: robots.txt, X-Robots-Tag and pacing.

    RobotsRules      one origin's robots.txt as parsed (urllib.robotparser) plus its Crawl-delay
    RobotsPolicy     loads each origin's robots.txt once (through the fetcher's client and cache) and
                     answers "may this URL be fetched by this User-Agent?"; rules are kept for the
                     whole process (ROBOTS_TTL), so later fetch calls do not ask again
    HostPacer        per-host minimum interval between request starts (Crawl-delay, per_host_rate)
    ai_directive     the X-Robots-Tag `noai` / `noimageai` directives of an image response

How a robots.txt answer is read (RFC 9309, and what Google does where it leaves a choice):
    2xx                       parsed; rules are matched against the configured User-Agent
    4xx other than 429        no usable robots.txt: everything allowed (the local engine answers 404)
    429, 5xx, unreachable     everything disallowed (fail closed); the URLs get status 'blocked', or
                              the robots.txt fetch's own 'timeout' / 'network_error' (the host is
                              down), and the answer is re-read after ROBOTS_RETRY, not ROBOTS_TTL
    more redirects than the fetcher follows  treated like 4xx (RFC 9309 2.3.1.2)

Limits of urllib.robotparser: rules match by prefix in file order (first match wins), without the
`*` / `$` wildcards or Google's longest-match precedence. Crawl-delay is read here, not by
robotparser, because robotparser ignores fractional values ("Crawl-delay: 0.5").
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

ROBOTS_TTL = 24 * 3600.0  # seconds a robots.txt is trusted before it is read again (as Google)
ROBOTS_RETRY = 300.0  # seconds before a robots.txt that could not be read is asked for again
AI_DIRECTIVES = frozenset({"noai", "noimageai"})
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview",
                                "max-video-preview"})  # 'name: value', not 'useragent: ...'


@dataclass(frozen=True)
class RobotsRules:
    parser: RobotFileParser
    delays: tuple[tuple[tuple[str, ...], float], ...] = ()  # (user-agents of a group, Crawl-delay)
    source: str = ""  # how the rules came about, for refusal reasons
    outcome: str = "blocked"  # the status of the URLs these rules refuse
    ttl: float = ROBOTS_TTL

    def allows(self, url: str, user_agent: str) -> bool:
        return self.parser.can_fetch(user_agent, url)

    def crawl_delay(self, user_agent: str) -> float:
        """Seconds between requests asked of `user_agent` (its own group first, then '*'), or 0."""
        product = user_agent.split("/")[0].lower()  # robotparser's matching: token within product
        fallback = None
        for agents, delay in self.delays:
            if any(a != "*" and a.lower() in product for a in agents):
                return delay
            if "*" in agents and fallback is None:
                fallback = delay
        return fallback or 0.0


def _uniform(allow: bool, source: str, outcome: str = "blocked") -> RobotsRules:
    parser = RobotFileParser()
    parser.allow_all, parser.disallow_all = allow, not allow
    parser.modified()  # robotparser refuses everything until it believes the file was read
    return RobotsRules(parser=parser, source=source, outcome=outcome,
                       ttl=ROBOTS_TTL if allow else ROBOTS_RETRY)


def unreachable_rules(outcome: str, reason: str) -> RobotsRules:
    """Rules for a robots.txt that could not be fetched (`outcome` as the fetcher reports it)."""
    status = outcome if outcome in ("timeout", "network_error") else "blocked"
    return _uniform(False, f"robots.txt unreachable ({outcome}: {reason}; fail closed)", status)


def _crawl_delays(lines: list[str]) -> tuple[tuple[tuple[str, ...], float], ...]:
    """Crawl-delay per group: consecutive User-agent lines open a group, its rules follow."""
    groups: list[tuple[tuple[str, ...], float]] = []
    agents: list[str] = []
    in_rules = False
    for raw in lines:
        key, _, value = raw.split("#", 1)[0].partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "user-agent":
            agents = [value] if in_rules else agents + [value]
            in_rules = False
        elif key in ("allow", "disallow", "crawl-delay") and agents:
            in_rules = True
            try:
                delay = float(value) if key == "crawl-delay" else None
            except ValueError:
                delay = None
            if delay is not None and delay >= 0:
                groups.append((tuple(agents), delay))
    return tuple(groups)


def rules_from_answer(status: int, body: bytes) -> RobotsRules:
    """The rules one HTTP answer to a robots.txt request stands for."""
    if status == 429 or status >= 500:
        return _uniform(False, f"robots.txt HTTP {status} (fail closed)")
    if status >= 300:
        return _uniform(True, f"robots.txt HTTP {status} (none: allow all)")
    lines = body.decode("utf-8", errors="replace").splitlines()
    parser = RobotFileParser()
    parser.parse(lines)
    return RobotsRules(parser=parser, delays=_crawl_delays(lines), source="robots.txt")


def robots_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/robots.txt"


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.lower()}"


# origin -> (monotonic time read, rules): shared by every fetch call of this process
_KNOWN: dict[str, tuple[float, RobotsRules]] = {}
_MAX_KNOWN = 100_000


def _remember(key: str, rules: RobotsRules) -> None:
    now = time.monotonic()
    if len(_KNOWN) >= _MAX_KNOWN:  # a run of days meets many hosts: drop the expired ones
        for stale in [k for k, (at, _) in _KNOWN.items() if now - at >= ROBOTS_TTL]:
            del _KNOWN[stale]
    _KNOWN[key] = (now, rules)


def forget() -> None:
    """Drop every remembered robots.txt (the next fetch reads them again)."""
    _KNOWN.clear()


RobotsLoader = Callable[[str], Awaitable[RobotsRules]]
"""Fetches a robots.txt URL and reads it (rules_from_answer / unreachable_rules)."""


class RobotsPolicy:
    """robots.txt decisions for one fetch call; loads go through `load`, one per origin at a time."""

    def __init__(self, user_agent: str, load: RobotsLoader):
        self.user_agent, self.load = user_agent, load
        self._loading: dict[str, asyncio.Lock] = {}  # per origin, so concurrent URLs read it once

    async def rules(self, url: str) -> RobotsRules:
        key = origin(url)
        lock = self._loading.setdefault(key, asyncio.Lock())
        async with lock:
            known = _KNOWN.get(key)
            if known is not None and time.monotonic() - known[0] < known[1].ttl:
                return known[1]
            rules = await self.load(robots_url(url))
            _remember(key, rules)
            return rules

    async def refusal(self, url: str) -> tuple[str, str] | None:
        """None when robots.txt allows `url` to this agent, else (status, reason)."""
        rules = await self.rules(url)
        if rules.allows(url, self.user_agent):
            return None
        path = urlsplit(url).path or "/"
        return rules.outcome, f"{rules.source}: {path} disallowed for {self.user_agent.split('/')[0]}"

    def crawl_delay(self, url: str) -> float:
        """The Crawl-delay of an origin whose rules are already loaded (0 when not loaded)."""
        known = _KNOWN.get(origin(url))
        return known[1].crawl_delay(self.user_agent) if known is not None else 0.0


def ai_directive(values: list[str], user_agent: str) -> str | None:
    """The X-Robots-Tag directive (`noai` / `noimageai`) that forbids AI use of a response to
    everyone or to this agent, or None. Each header value is 'directive, directive' or
    'botname: directive, directive'."""
    product = user_agent.split("/")[0].lower()
    for value in values:
        head, sep, rest = value.partition(":")
        scoped = sep and head.strip().lower() not in _VALUED_DIRECTIVES and "," not in head
        if scoped and head.strip().lower() not in (product, "*"):
            continue  # addressed to another crawler
        directives = {d.strip().lower() for d in (rest if scoped else value).split(",")}
        for directive in sorted(AI_DIRECTIVES & directives):
            return directive
    return None


class HostPacer:
    """Spaces request starts per host: each request starts at least `interval` seconds after the
    previous one to that host. Turns are reserved in arrival order, so waiters never collide."""

    def __init__(self):
        self._last: dict[str, float] = {}  # host -> monotonic start of its latest reserved request
        self._lock = threading.Lock()  # fetch calls may run in several threads' event loops

    def reserve(self, host: str, interval: float, horizon: float) -> float | None:
        """Seconds to wait before this request may start, or None if that is beyond `horizon`
        (nothing is reserved then)."""
        with self._lock:
            now = time.monotonic()
            last = self._last.get(host)
            start = now if last is None else max(now, last + interval)
            if start - now > horizon:
                return None
            if len(self._last) >= 100_000:  # forget hosts idle for longer than any usable interval
                self._last = {h: t for h, t in self._last.items() if now - t < horizon + 3600}
            self._last[host] = start
            return start - now


PACER = HostPacer()  # one per process: spacing holds across fetch calls
