"""How long each source of a corpus preset takes to read, and what it gives.

Run: python bench/bench_corpus_sources.py [--preset world]
Per source: items read, distinct images (sha256 of the PNG bytes), distinct captions and seconds
to list, read, decode-check and encode them (what `build_corpus` spends before writing shards and
embedding captions). The caption embedding is timed separately by `explorer corpus build`.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explorer.web.corpus import SOURCE_READERS
from explorer.web.presets import CORPUS_PRESETS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="world", choices=list(CORPUS_PRESETS))
    spec = CORPUS_PRESETS[p.parse_args().preset]
    print("| source | items | distinct images | distinct captions | seconds |\n|---|---:|---:|---:|---:|")
    total = 0.0
    for source in spec.sources:
        t = time.perf_counter()
        items = list(SOURCE_READERS[source](spec))
        seconds = time.perf_counter() - t
        total += seconds
        sha = {hashlib.sha256(x.png).hexdigest() for x in items}
        print(f"| {source} | {len(items):,} | {len(sha):,} | {len({x.caption for x in items}):,} | {seconds:.1f} |")
    print(f"| all | | | | {total:.1f} |")


if __name__ == "__main__":
    main()
