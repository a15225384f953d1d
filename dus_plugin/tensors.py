"""Reading safetensors folders one tensor at a time, and naming layers in tensor names."""

from __future__ import annotations

import hashlib
import json
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from dus_plugin.errors import BaseModelError

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
        for key in read_header(f):
            out[key] = f.name
    return out


@dataclass
class SourceTensor:
    """One tensor's place in a safetensors file."""

    file: Path
    dtype: str
    shape: list[int]
    start: int
    """Absolute byte offset of the data in the file."""
    nbytes: int


def _raw_header(path: Path) -> tuple[bytes, int]:
    """(the JSON header's bytes, the file's size), after checking the header fits in the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _unreadable(path, f"only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise _unreadable(path, f"header of {n} bytes in a file of {size}")
        return f.read(n), size


def _unreadable(path: Path, why: str) -> BaseModelError:
    return BaseModelError(f"{path} is not a readable safetensors file ({why}); re-download or re-save it")


def read_header(path: Path) -> dict[str, SourceTensor]:
    """Every tensor of a safetensors file with its byte range, checked against the file's size."""
    raw, size = _raw_header(path)
    try:
        header = json.loads(raw)
        base = 8 + len(raw)
        out = {name: SourceTensor(path, info["dtype"], list(info["shape"]), base + info["data_offsets"][0],
                                  info["data_offsets"][1] - info["data_offsets"][0])
               for name, info in header.items() if name != "__metadata__"}
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError):
        raise _unreadable(path, "its header is not valid") from None
    end = max((t.start + t.nbytes for t in out.values()), default=0)
    if end > size:
        raise _unreadable(path, f"truncated: the header needs {end} bytes, the file has {size}")
    return out


def header_sha256(path: Path) -> str:
    """sha256 of a safetensors file's header: identifies a shard without reading its data."""
    return hashlib.sha256(_raw_header(path)[0]).hexdigest()


def check_readable(folder: Path) -> None:
    """Parse every shard's header so a corrupt or truncated file fails before any work starts."""
    for name in sorted(set(weight_map(folder).values())):
        path = folder / name
        if not path.is_file():
            raise BaseModelError(f"{folder} index names {name}, which is missing; re-download the model")
        read_header(path)


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


def transformed_bytes(src: SourceTensor, name: str, dtype: str, zero: bool) -> bytes:
    """A tensor cast to ``dtype`` (safetensors name) and/or zeroed, computed as mergekit computes it
    (``x.to(dtype) * 0.0``): the bytes both engines write and verify expects."""
    import torch
    from safetensors import safe_open

    with safe_open(str(src.file), framework="pt") as f:
        x = f.get_tensor(name)
    x = x.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype])
    if zero:
        x = x * 0.0
    return x.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
