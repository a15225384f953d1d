"""Reading safetensors folders one tensor at a time, and naming layers in tensor names."""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path

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
    """Tensor names of a safetensors file, after checking its header against the file's size."""
    import struct

    def bad(why: str) -> BaseModelError:
        return BaseModelError(f"{path} is not a readable safetensors file ({why}); re-download or re-save it")

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise bad(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError):
        raise bad("its header is not valid") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise bad(f"truncated: the header needs {8 + n + end} bytes, the file has {size}")
    return [k for k in header if k != "__metadata__"]


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
