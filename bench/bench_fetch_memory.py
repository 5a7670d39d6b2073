"""Peak memory of the fetcher under hostile-but-valid input: 32 images at the size limit at once.

A loopback server serves 32 valid 4096x4096 RGB PNGs (the `max_side` limit; ~0.25 MB each on the
wire, 48 MiB each once decoded). Each setting runs in a fresh process that fetches all 32 with 32
concurrent downloads and reports its resident memory before the fetch (imports done, server up)
and its peak (VmHWM) after, so the difference is what the fetch itself held at its worst (torch is
imported first: the decode path imports it on first use, and the agent has it loaded anyway). The
settings: the default decoded-pixel budget (`FetchConfig.decode_budget_bytes`, 256 MiB), a
smaller one, and no budget (as many decodes as threads: what the peak was before the budget).

    python bench/bench_fetch_memory.py                       # ~1 min
Outputs bench/results/fetch_memory/: report.md, results.json, machine.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test server lives in tests/

from bench.machine import status_kib  # noqa: E402

SIDE = 4096
N_IMAGES = 32
MIB = 2**20


def _fetch_in_child(body: bytes, budget: int, out) -> None:
    import torch  # noqa: F401  (the first decode would import it: ~0.5 GB that is not the fetch's)

    from explorer.acquire.fetch import FetchConfig, allow_origin, fetch_images
    from tests.explorer.acquire.fault_server import FaultServer, Route

    with FaultServer({f"/{i}.png": Route(body=body) for i in range(N_IMAGES)}) as srv:
        cfg = allow_origin(FetchConfig(max_bytes=len(body), respect_robots=False, decode_budget_bytes=budget,
                                       concurrency=N_IMAGES), srv.url("/"))
        before = status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        results = fetch_images([srv.url(f"/{i}.png") for i in range(N_IMAGES)], cfg, progress=False)
        peak = status_kib("VmHWM")
    out.send({"ok": sum(r.ok for r in results), "before_mib": before / 1024, "peak_mib": peak / 1024,
              "held_mib": (peak - before) / 1024})


def measure(body: bytes, budget: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_fetch_in_child, args=(body, budget, child))
    proc.start()
    result = parent.recv()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fetch_memory")
    args = parser.parse_args(argv)

    import numpy as np

    from bench.machine import finish_report
    from explorer.acquire.fetch import FetchConfig
    from tests.explorer.acquire.fault_server import png_bytes

    pattern = np.indices((SIDE, SIDE)).sum(axis=0) % 251  # compresses to ~0.25 MB, decodes to 48 MiB
    body = png_bytes(np.stack([pattern, pattern[::-1], pattern.T], axis=-1).astype(np.uint8))
    default = FetchConfig().decode_budget_bytes
    settings = {"default budget": default, "budget 128 MiB": 128 * MIB, "no budget": 2**40}
    rows = {}
    for name, budget in settings.items():
        rows[name] = {"budget_mib": budget / MIB if budget < 2**40 else None, **measure(body, budget)}
        print(name, rows[name], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Fetcher peak memory: 32 concurrent 4096x4096 PNGs (48 MiB each decoded)", "",
             f"PNG on the wire: {len(body) / MIB:.2f} MiB; 32 downloads in flight; each setting in a fresh process.", "",
             "| setting | decode budget (MiB) | images ok | RSS before (MiB) | peak (MiB) | held by the fetch (MiB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        budget = "-" if r["budget_mib"] is None else f"{r['budget_mib']:.0f}"
        lines.append(f"| {name} | {budget} | {r['ok']}/{N_IMAGES} | {r['before_mib']:.0f} | {r['peak_mib']:.0f} "
                     f"| {r['held_mib']:.0f} |")
    finish_report(args.out, lines, "python bench/bench_fetch_memory.py " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
