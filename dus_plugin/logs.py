"""Logging set-up shared by the entry points (`dus` and `python -m dus_plugin.train`)."""

from __future__ import annotations

import logging

# Benign messages printed on every run once torchao (the [lowmem] extra) is installed, because transformers
# imports it when it builds any model: its CUDA-only kernel libraries fail to load on a CPU torch, and
# torch's pytree warns that torchao registers enums it now supports natively. Neither affects dus.
BENIGN_LOGGERS = ("torchao", "torch.utils._pytree")


def silence_benign() -> None:
    for name in BENIGN_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
