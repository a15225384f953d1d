"""Reading safetensors folders one tensor at a time, and naming layers in tensor names."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

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


def tensor_headers(folder: Path) -> dict[str, SourceTensor]:
    """Every tensor of a safetensors folder with its place on disk."""
    out: dict[str, SourceTensor] = {}
    for file in sorted(set(weight_map(folder).values())):
        out.update(read_header(folder / file))
    return out


# The dtype tables, in one place: safetensors' code -> torch's name, bytes per element, and back.
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
SAFETENSORS_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}


def read_tensor(t: SourceTensor):
    """One tensor, read with plain file reads: unlike an mmap, the pages do not stay in the process."""
    import torch

    buf = bytearray(t.nbytes)
    with open(t.file, "rb", buffering=0) as f:
        f.seek(t.start)
        view, done = memoryview(buf), 0
        while done < t.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise _unreadable(t.file, "it ended inside a tensor")
            done += n
    dtype = getattr(torch, SAFETENSORS_DTYPES[t.dtype])
    if not t.nbytes:
        return torch.empty(t.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(t.shape)


@dataclass(frozen=True)
class Regroup:
    """A tensor outside the stack that packs one block per layer along ``dim``: output block i is source block
    ``layers[i]`` (the layer map)."""

    dim: int
    block: int
    layers: tuple[int, ...]

    def shape(self, shape: Sequence[int]) -> list[int]:
        out = list(shape)
        out[self.dim] = self.block * len(self.layers)
        return out


def out_shape(shape: Sequence[int], regroup: Regroup | None) -> list[int]:
    """The shape ``transformed_bytes`` gives a source tensor of ``shape``."""
    return regroup.shape(shape) if regroup else list(shape)


def is_raw_copy(src_dtype: str, dtype: str, zero: bool, mean_with: object, regroup: Regroup | None) -> bool:
    """Whether ``transformed_bytes`` with these arguments returns the source's bytes unchanged."""
    return not zero and mean_with is None and regroup is None and dtype == src_dtype


def transformed_bytes(src: SourceTensor, name: str, dtype: str, zero: bool,
                      mean_with: SourceTensor | None = None, regroup: Regroup | None = None) -> bytes:
    """A tensor cast to ``dtype`` (safetensors name) and/or zeroed, computed as mergekit computes it
    (``x.to(dtype) * 0.0``): the bytes both engines write and verify expects. With ``mean_with``, the
    tensor is first the element-wise mean of the two, computed in float32 (method average). With
    ``regroup``, its per-layer blocks are first gathered by the layer map."""
    import torch

    x = read_tensor(src)
    if regroup is not None:
        x = torch.cat([x.narrow(regroup.dim, j * regroup.block, regroup.block) for j in regroup.layers], regroup.dim)
    if mean_with is not None:
        x = (x.float() + read_tensor(mean_with).float()) / 2
    x = x.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype])
    if zero:
        x = x * 0.0
    return x.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
