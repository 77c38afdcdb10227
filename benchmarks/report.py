"""Shared by the benchmark scripts: the machine line, peak memory of a child process, and output."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time


def machine() -> str:
    """``date on host (arch, N cores)``, for the line under each table."""
    return f"{datetime.date.today().isoformat()} on {platform.node()} ({platform.machine()}, {os.cpu_count()} cores)"


def timed(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """(process, wall seconds, peak RSS MiB) of a command run under /usr/bin/time."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss = int([line for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB")][-1].split()[1]) / 1024
    return proc, wall, rss


def publish(lines: list[str], write: str | None) -> None:
    """Print the Markdown section and append it to ``write`` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        with open(write, "a", encoding="utf-8") as f:
            f.write("\n" + text)
