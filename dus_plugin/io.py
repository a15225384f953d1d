"""Atomic file writes: a reader never sees a half-written file."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def parse_size(value: str | int) -> int:
    """'5B' -> 5_000_000_000 (K, M, B suffixes, as mergekit's option syntax)."""
    from dus_plugin.errors import RecipeError

    if isinstance(value, int):
        return value
    units = {"k": 10**3, "m": 10**6, "b": 10**9}
    text = value.strip().lower()
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise RecipeError(f"--shard-size {value!r} is not a size; write a number with K, M or B, e.g. 5B") from None
