"""What a benchmark ran on: written beside every result so numbers are never read out of context."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path


def machine_info() -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "python": platform.python_version()}


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS (resident now), VmHWM (its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def write_machine(out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "machine.json").write_text(json.dumps({**machine_info(), "command": command}, indent=1) + "\n")


def finish_report(out: Path, lines: list[str], command: str) -> None:
    """out/report.md from `lines`, machine.json beside it, and the report on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_machine(out, command)
    print("\n".join(lines))


def print_and_save(text: str, path: Path | None) -> None:
    """`text` on stdout, and in `path` too when one is given (its folder made)."""
    print(text, end="" if text.endswith("\n") else "\n")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def print_report(out: Path, report: Path, argv: list[str] | None, started: float) -> None:
    """machine.json beside a written report (with the command that made it), the report on stdout
    and the time it took since `started` (time.time())."""
    import sys
    import time

    write_machine(out, " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]))
    print(report.read_text())
    print(f"took {time.time() - started:.0f}s")


def write_rows(out: Path, name: str, rows: list[dict]) -> None:
    """rows -> out/name.csv (the union of the rows' keys, in first-seen order) and out/name.json."""
    import csv

    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")


def loglog_plot(path: Path, series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str,
                title: str) -> None:
    """One line per series on log-log axes (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (x, y) in series.items():
        ax.loglog(x, y, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
