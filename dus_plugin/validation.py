"""One-line messages from pydantic validation errors, naming the field the user wrote."""

from __future__ import annotations

from typing import Any


def field_path(loc: tuple[Any, ...]) -> str:
    """('slices', 1, 'sources', 0, 'layer_range') -> 'slices[1].sources[0].layer_range'."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def first_error(e: Any, where: str, unknown_hint: str = "unknown key (misspelled?)") -> str:
    """'<where>: field <path>: <message>' for the first error of a pydantic ValidationError."""
    err = e.errors()[0]
    msg = unknown_hint if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
    return f"{where}: field {field_path(err['loc'])}: {msg}"
