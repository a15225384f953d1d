"""How dus's processes use the CPU's cores when other work shares them."""

from __future__ import annotations

import os
import time


def share_cpus_politely() -> None:
    """On a machine whose cores are already busy, idle OpenMP threads sleep instead of spinning.

    OpenMP's default lets each idle torch thread spin for a while before it sleeps. On an idle machine that is the
    fast choice; on a busy one the spinning threads take the cores from the threads doing the work. Measured on 2
    cores beside 4 busy processes (benchmarks/results/shared_cpu.json): spinning made a short training 11.6x slower,
    sleeping 3.0x (the cores' fair share), but sleeping costs 1.5x when the machine is idle. So the choice
    follows the load at start.
    Set before torch is imported, as OpenMP reads it once; a value the user set is kept. Tokenizers keep to one
    pool beside torch's.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "OMP_WAIT_POLICY" not in os.environ and other_runnable() >= (os.cpu_count() or 1):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def other_runnable(samples: int = 5) -> float:
    """Threads of other processes ready to run now (Linux: /proc/loadavg's running count, less this one);
    elsewhere the 1-minute load average."""
    try:
        counts = []
        for _ in range(samples):
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
            time.sleep(0.01)
        return sorted(counts)[len(counts) // 2]
    except (OSError, IndexError, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
