"""Reading safetensors folders one tensor at a time, and naming layers in tensor names."""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

from dus_plugin.errors import BaseModelError

_LAYER = re.compile(r"^(.*?\blayers\.)(\d+)(\..+)$")


def layer_index(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(2)) if m else None


def with_layer(name: str, index: int) -> str:
    m = _LAYER.match(name)
    assert m is not None, name
    return f"{m.group(1)}{index}{m.group(3)}"


def weight_map(folder: Path) -> dict[str, str]:
    """tensor name -> safetensors file name, from the index or the single file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BaseModelError(f"{folder} has no .safetensors weights; save or convert the model with safe_serialization")
    out: dict[str, str] = {}
    for f in files:
        for key in _keys(f):
            out[key] = f.name
    return out


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError and OSError
        raise BaseModelError(
            f"{path} is not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            "re-download or re-save it"
        ) from None


def check_readable(folder: Path) -> None:
    """Parse every shard's header so a corrupt or truncated file fails before any work starts."""
    for name in sorted(set(weight_map(folder).values())):
        path = folder / name
        if not path.is_file():
            raise BaseModelError(f"{folder} index names {name}, which is missing; re-download the model")
        _keys(path)


class TensorReader:
    """Open shards lazily and hand out one tensor at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.map = weight_map(folder)
        self._stack = ExitStack()
        self._open: dict[str, object] = {}

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def get(self, name: str):
        from safetensors import safe_open

        file = self.map[name]
        if file not in self._open:
            self._open[file] = self._stack.enter_context(safe_open(str(self.folder / file), framework="pt"))
        return self._open[file].get_tensor(name)  # type: ignore[attr-defined]

    def names(self) -> list[str]:
        return list(self.map)

    def by_file(self) -> Iterator[tuple[str, list[str]]]:
        files: dict[str, list[str]] = {}
        for name, f in self.map.items():
            files.setdefault(f, []).append(name)
        yield from sorted(files.items())


def tensor_sha256(t) -> str:
    import torch

    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()
