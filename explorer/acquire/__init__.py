"""Acquisition: search clients, the guarded fetcher, robots.txt, validation of what comes back, and
the response cache that makes every run replayable."""
