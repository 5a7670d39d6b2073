"""Helpers for tests that run `explorer daemon` in a process of its own and signal it."""

import json
import os
import subprocess
import sys
import time
from urllib.parse import urlsplit


def daemon_env(threads: int) -> dict:
    """The daemon's environment: offline, with the torch thread count of the reference run (equal floats)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}


def start_daemon(args: list[str], env: dict) -> subprocess.Popen:
    """`explorer daemon ARGS --quiet` in a new process (its own interpreter: a real process to signal)."""
    return subprocess.Popen([sys.executable, "-m", "explorer.cli", "daemon", *args, "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    """Poll `condition` while the daemon runs; fails (with its output) if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not condition():
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    assert condition(), f"timed out after {timeout} s"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate(timeout=30)


def events(run_dir) -> list[str]:
    """The daemon's events so far (a line still being appended is left out)."""
    path = run_dir / "daemon.jsonl"
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            found.append(json.loads(line)["event"])
        except ValueError:
            pass
    return found


def hostless(rows: list[dict]) -> list[dict]:
    """metrics rows with accepted URLs cut to their path: each run's engine listens on its own port."""
    return [{**r, "accepted_urls": [urlsplit(u).path for u in r["accepted_urls"]]} if "accepted_urls" in r else r
            for r in rows]
