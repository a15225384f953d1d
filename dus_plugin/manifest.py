"""dus_manifest.json: the record that travels with an upscaled folder through every stage.

Upscale writes it; training appends what it did; eval and the card read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dus_plugin.errors import VerifyError
from dus_plugin.io import atomic_write_text

MANIFEST = "dus_manifest.json"
FORMAT = 1


def manifest_path(folder: str | Path) -> Path:
    return Path(folder) / MANIFEST


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = manifest_path(folder)
    if not path.is_file():
        raise VerifyError(f"{folder} has no {MANIFEST}; make the folder with `dus upscale`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise VerifyError(f"{path} is not valid JSON (line {e.lineno}); re-run `dus upscale`") from None
    if data.get("format") != FORMAT:
        raise VerifyError(f"{path} has format {data.get('format')!r}, this dus-plugin reads format {FORMAT}")
    return data


def write_manifest(folder: str | Path, data: dict[str, Any]) -> Path:
    """Write atomically: a reader never sees half a manifest."""
    return atomic_write_text(manifest_path(folder), json.dumps(data, indent=2, sort_keys=False) + "\n")
