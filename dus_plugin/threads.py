"""How dus's processes use the CPU's cores when other work shares them."""

from __future__ import annotations

import os


def share_cpus_politely() -> None:
    """Idle threads sleep instead of spinning, and tokenizers do not start a second pool beside torch's.

    OpenMP's default lets each idle torch thread spin for a while before it sleeps; on a machine whose cores are
    busy with other work, the spinning threads take the cores from the threads doing the work (issue 30: the
    quickstart took 25x longer at load 5-6 on 2 cores). Set before torch is imported, as OpenMP reads it once.
    A value the user set is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
