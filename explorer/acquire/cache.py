"""A content-addressed on-disk cache of HTTP answers, so that a run can be replayed offline exactly.

Layout under `root` (every write is a temp file + `os.replace`, so a crash never leaves half a file):

    requests/ab/<key>.json    one answer: canonical request, final url, status, headers, time,
                              body_sha256, size  (key = sha256 of the canonical request)
    blobs/ab/<sha256>         the body, stored once however many requests returned it
    quarantine/               entries whose body no longer matches its sha256
    evicted/ab/<sha256>       an empty marker: this body was evicted by the run's disk budget
                              (explorer/run/disk.py); its answers read as misses, not as corruption

Modes (`CacheMode`), shared by the search client and the fetcher:
    readwrite  use a cached answer when there is one, else go to the network and store the answer
    refresh    always go to the network, store the answer
    replay     cache only: a miss raises `CacheMiss` naming the request; no socket is ever opened
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path


class CacheMode(str, Enum):
    READWRITE = "readwrite"
    REFRESH = "refresh"
    REPLAY = "replay"


class CacheMiss(LookupError):
    """Replay asked for an answer that was never recorded."""


class CacheCorruption(RuntimeError):
    """A recorded answer exists but its body no longer matches its sha256 (it was quarantined)."""


@dataclass(frozen=True)
class CachedResponse:
    url: str  # final URL, after redirects
    status: int  # HTTP status; 0 when no HTTP answer came (the fetcher records network failures)
    headers: dict[str, str]
    body: bytes = field(repr=False)
    fetched_at: float  # unix time
    request: dict  # the canonical request (method, url, params, json)


def canonical_request(method: str, url: str, params: dict | None = None, json_body=None) -> dict:
    return {"method": method.upper(), "url": url, "params": params or {}, "json": json_body}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder and rename: readers see the old bytes or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResponseCache:
    """Answers keyed by `request_key`; bodies verified against their sha256 on every read."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._hits = self._misses = self._corrupt = 0
        self._quarantined: dict[str, Path] = {}  # key -> where its metadata went
        self._evicted: set[str] = set()  # keys whose body the disk budget evicted

    @staticmethod
    def request_key(method: str, url: str, params: dict | None = None, json_body=None) -> str:
        """sha256 hex of the canonical request as JSON with sorted keys."""
        canonical = canonical_request(method, url, params, json_body)
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return _sha256(text.encode("utf-8"))

    def _meta_path(self, key: str) -> Path:
        return self.root / "requests" / key[:2] / f"{key}.json"

    def _blob_path(self, sha: str) -> Path:
        return self.root / "blobs" / sha[:2] / sha

    def _evicted_path(self, sha: str) -> Path:
        return self.root / "evicted" / sha[:2] / sha

    def evict_body(self, sha: str) -> int:
        """Delete the body `sha` (the answers that returned it stay, marked as evicted); returns the
        bytes freed (0 when it was not there)."""
        blob = self._blob_path(sha)
        try:
            size = blob.stat().st_size
        except FileNotFoundError:
            return 0
        atomic_write_bytes(self._evicted_path(sha), b"")  # marker first: a kill in between is a plain miss
        blob.unlink(missing_ok=True)
        return size

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and self._meta_path(key).is_file()

    def put(self, key: str, response: CachedResponse) -> None:
        sha = _sha256(response.body)
        blob = self._blob_path(sha)
        if not blob.is_file():  # content-addressed: an existing blob already holds these bytes
            atomic_write_bytes(blob, response.body)
        meta = {
            "request": response.request,
            "url": response.url,
            "status": response.status,
            "headers": dict(response.headers),
            "fetched_at": response.fetched_at,
            "body_sha256": sha,
            "size": len(response.body),
        }
        atomic_write_bytes(self._meta_path(key), json.dumps(meta, sort_keys=True, indent=1).encode())
        self._quarantined.pop(key, None)

    def get(self, key: str) -> CachedResponse | None:
        """The recorded answer, or None on a miss or a corrupted entry (which is quarantined)."""
        meta_path, sha = self._meta_path(key), None
        try:
            meta = json.loads(meta_path.read_bytes())
            sha = meta["body_sha256"]
            body = self._blob_path(sha).read_bytes()
        except FileNotFoundError:
            if sha is not None and self._evicted_path(sha).exists():  # (then the blob was what was missing)
                self._misses += 1
                self._evicted.add(key)
                return None
            if meta_path.is_file():  # metadata without its blob: the blob was lost or quarantined
                self._quarantine(key, meta_path, blob=None)
                return None
            self._misses += 1
            return None
        except (ValueError, KeyError, TypeError):  # unreadable metadata
            self._quarantine(key, meta_path, blob=None)
            return None
        if _sha256(body) != sha or len(body) != meta.get("size"):
            self._quarantine(key, meta_path, blob=self._blob_path(sha))
            return None
        self._hits += 1
        return CachedResponse(
            url=meta["url"], status=int(meta["status"]), headers=dict(meta["headers"]),
            body=body, fetched_at=float(meta["fetched_at"]), request=meta["request"],
        )

    def require(self, key: str, description: str) -> CachedResponse:
        """Replay lookup: the answer, or an error that names the request and this cache."""
        response = self.get(key)
        if response is not None:
            return response
        if key in self._quarantined:
            raise CacheCorruption(
                f"cached answer for {description} is corrupted and was moved to "
                f"{self._quarantined[key]} (cache {self.root}); re-record it online"
            )
        if key in self._evicted:
            raise CacheMiss(f"the cached body of {description} was evicted by the run's disk budget (disk.max_gb; "
                            f"cache {self.root}): this part of the run cannot be replayed exactly")
        raise CacheMiss(f"no cached answer for {description} in cache {self.root} (key {key})")

    def _quarantine(self, key: str, meta_path: Path, blob: Path | None) -> None:
        self._corrupt += 1
        target = self.root / "quarantine"
        target.mkdir(parents=True, exist_ok=True)
        for path in (meta_path, blob):
            if path is not None and path.exists():
                shutil.move(str(path), target / path.name)
        self._quarantined[key] = target / meta_path.name

    def stats(self) -> dict:
        return {"hits": self._hits, "misses": self._misses, "corrupt": self._corrupt}
