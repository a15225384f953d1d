"""Network failures as one line: which host role was out of reach, what was being done, what to try.

Retries are huggingface_hub's own; this module only names the failure once they are spent.
"""

from __future__ import annotations

import importlib

from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from dus_plugin.errors import first_line


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The connection-level error classes of the HTTP clients our dependencies use, where installed."""
    found: list[type[BaseException]] = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"),
                         ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError, TimeoutError, OfflineModeIsEnabled, LocalEntryNotFoundError, *_transport_errors())

HINTS = {
    "the Hub": "check the network and HF_ENDPOINT, or work offline (HF_HUB_OFFLINE=1) from a local folder",
    "the dataset host": "lm-eval downloads task data from the Hub: run offline (HF_HUB_OFFLINE=1) with task YAMLs "
                        "over local files (--include-path)",
}


def unreachable(role: str, doing: str, error: BaseException, endpoint: str | None = None) -> str:
    """'could not reach the Hub (https://…) while pushing to me/x: ConnectError: …; check …'."""
    where = f" ({endpoint})" if endpoint else ""
    return f"could not reach {role}{where} while {doing}: {first_line(error)}; {HINTS[role]}"


def is_network_error(error: BaseException) -> bool:
    """True for a connection failure, also when a library wrapped it in its own error type."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, NETWORK_ERRORS):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False
