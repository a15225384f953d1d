"""Run a command and measure it the way /usr/bin/time does: wall seconds and the command's own peak RSS.

A child forked straight from a benchmark that holds gigabytes counts those pages in its peak RSS until it
execs, so the command is started by a small Python probe instead and the probe reports
RUSAGE_CHILDREN. The working directory is /tmp so that the repository's own folders do not shadow the
installed package (`dus_plugin` at the repo root has no `train`/`eval`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

PROBE = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
         "print('__peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(rc)")
QUIET_PREFIXES = ("Writing", "Loading", "Verifying", "Hashing", "Checking", "Training", "Streaming")


def run_measured(cmd: list[str], env: dict | None = None, echo: bool = True) -> tuple[float, float, str]:
    """(seconds, peak RSS in GB of the command and its children, combined output); RuntimeError if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", PROBE, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})}, cwd="/tmp")
    lines, peak_kb = [], 0
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("__peak_rss_kb"):
            peak_kb = int(line.split()[1])
            continue
        lines.append(line)
        if echo and not line.lstrip().startswith(QUIET_PREFIXES):
            print("   ", line.rstrip()[:300], flush=True)
    rc = proc.wait()
    out = "".join(lines)
    if rc != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[-4:]))} exited {rc}: {out[-800:]}")
    return time.perf_counter() - t0, peak_kb / 1024 / 1024, out
