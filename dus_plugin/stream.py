"""Streaming writer for pure-passthrough DUS plans: upscale at the speed of the disk.

A DUS plan is a copy of tensors (plus tensors scaled by 0 for the identity method, and means of
two neighbouring layers for the average method), so the
output's safetensors headers can be computed before any data is written, and each tensor's
bytes copied by range from the base shards. Memory stays bounded by one copy buffer, or by the
largest tensor that must be transformed (a dtype cast or a zeroed projection). The tensor
names, dtypes, bytes and config are exactly what mergekit writes for the same YAML; shard
boundaries may differ. Anything else falls back to mergekit's engine.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dus_plugin.errors import UpscaleError
from dus_plugin.recipe import Recipe
from dus_plugin.architecture import LayerStack
from dus_plugin.tensors import (DTYPE_SIZES, SAFETENSORS_CODES, Regroup, SourceTensor, is_raw_copy, out_shape, read_header,
                                transformed_bytes)

LOG = logging.getLogger(__name__)
CHUNK = 64 << 20
# What the output takes from the base beside the weights, as mergekit's tokenizer copy does.
TOKENIZER_COPY_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                        "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
                        "generation_config.json",
                        # what a multimodal model's processor reads: AutoProcessor loads the output like the base
                        "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """The tokenizer and generation files of ``src`` that ``dst`` does not have yet, as mergekit's copy does."""
    for name in TOKENIZER_COPY_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy(src / name, dst / name)


@dataclass
class OutTensor:
    name: str
    src: SourceTensor
    src_name: str
    dtype: str
    zero: bool
    mean_with: SourceTensor | None = None
    """Method average: the tensor of the next base layer that this one is averaged with."""
    regroup: Regroup | None = None
    """A tensor outside the stack packed one block per layer: its blocks gathered by the layer map."""

    @property
    def shape(self) -> list[int]:
        return out_shape(self.src.shape, self.regroup)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * DTYPE_SIZES[self.dtype]

    @property
    def raw_copy(self) -> bool:
        return is_raw_copy(self.src.dtype, self.dtype, self.zero, self.mean_with, self.regroup)


def streamable(recipe: Recipe) -> str | None:
    """None when the recipe is a pure passthrough this writer handles; else why it is not."""
    for k, s in enumerate(recipe.text_slices):
        params = s.sources[0].parameters
        if not params:
            continue
        if set(params) != {"scale"} or not isinstance(params["scale"], list):
            return f"slices[{k}] has parameters other than a scale list"
        for cond in params["scale"]:
            if not isinstance(cond, dict) or cond.get("value") not in (0, 0.0, 1, 1.0):
                return f"slices[{k}] scales by something other than 0 or 1"
            if cond.get("value") in (1, 1.0) and cond.get("filter"):
                return f"slices[{k}] has a filtered scale of 1"
    if recipe.chat_template:
        return "a chat_template is set"
    return None


def plan_tensors(recipe: Recipe, base_dir: Path, out_dtype: str | None, stack: LayerStack,
                 packed: dict[str, Regroup]) -> list[OutTensor]:
    """Every output tensor with its source byte range, in output order (non-layer tensors first).

    ``packed``: tensors outside the stack with one block per layer, and how the layer map regroups them."""
    from dus_plugin.tensors import weight_map

    sources: dict[str, SourceTensor] = {}
    for file in sorted(set(weight_map(base_dir).values())):
        sources.update(read_header(base_dir / file))
    zeroed = recipe.zeroed_outputs()
    averaged = recipe.averaged_outputs()
    layer_names: dict[int, list[str]] = {}
    outside: list[str] = []
    for name in sources:
        i = stack.index(name)
        (outside.append(name) if i is None else layer_names.setdefault(i, []).append(name))
    out: list[OutTensor] = []
    target = SAFETENSORS_CODES.get(out_dtype or "", None)
    for name in outside:
        out.append(OutTensor(name, sources[name], name, target or sources[name].dtype, False,
                             regroup=packed.get(name)))
    for i, src_layer in enumerate(recipe.layer_map):
        for src_name in layer_names.get(src_layer, []):
            name = stack.rename(src_name, i)
            zero = any(f in name for f in zeroed.get(i, []))
            mean_with = _neighbour(sources, stack, src_name, averaged[i]) if i in averaged else None
            out.append(OutTensor(name, sources[src_name], src_name, target or sources[src_name].dtype, zero,
                                 mean_with))
    return out


def _neighbour(sources: dict[str, SourceTensor], stack: LayerStack, name: str, layer: int) -> SourceTensor:
    """The tensor of base layer ``layer`` that ``name`` is averaged with; UpscaleError when the layers differ."""
    other = stack.rename(name, layer)
    if other not in sources or sources[other].shape != sources[name].shape:
        raise UpscaleError(f"method average needs base layer {layer} to hold {stack.relative(name)} with the shape "
                           f"{sources[name].shape} of layer {stack.index(name)}, and it does not (this family's "
                           "layers differ from each other); use method identity")
    return sources[other]


def shard(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and max_bytes > 0 and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header_bytes(tensors: list[OutTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def _copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, n: int) -> None:
    """Kernel-side copy (as cp does), with a read/write fallback where copy_file_range is refused."""
    done = 0
    while done < n:
        try:
            k = os.copy_file_range(src_fd, dst_fd, n - done, src_off + done, dst_off + done)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            chunk = os.pread(src_fd, min(CHUNK, n - done), src_off + done)
            k = os.pwrite(dst_fd, chunk, dst_off + done) if chunk else 0
        if k == 0:
            raise UpscaleError(f"the base ended inside a tensor at byte {src_off + done}; re-download the base")
        done += k


def hash_range(path: Path, start: int, nbytes: int) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            chunk = os.pread(fd, min(CHUNK, nbytes - done), start + done)
            if not chunk:
                raise UpscaleError(f"{path} ended inside a tensor; re-download the base")
            h.update(chunk)
            done += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def write_shard(path: Path, tensors: list[OutTensor], progress: Callable[[int], None], hasher) -> dict[str, Any]:
    """Write one output shard. Returns {tensor name: sha256 hex, or a future of it}.

    Plain copies go through copy_file_range and their hash is computed from the source range by
    ``hasher`` (a one-thread pool) on the other core, once per source tensor however often it is
    copied; transformed tensors are hashed here from the bytes written.
    """
    hashes: dict[str, Any] = {}
    fds: dict[Path, int] = {}
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        header = _header_bytes(tensors)
        os.pwrite(out, header, 0)
        offset = len(header)
        for t in tensors:
            if t.raw_copy:
                fd = fds.get(t.src.file) or fds.setdefault(t.src.file, os.open(t.src.file, os.O_RDONLY))
                _copy_range(fd, out, t.src.start, offset, t.nbytes)
                hashes[t.name] = hasher(t.src.file, t.src.start, t.nbytes)
            else:
                data = transformed_bytes(t.src, t.src_name, t.dtype, t.zero, t.mean_with, t.regroup)
                os.pwrite(out, data, offset)
                hashes[t.name] = hashlib.sha256(data).hexdigest()
            offset += t.nbytes
            progress(t.nbytes)
    finally:
        os.close(out)
        for fd in fds.values():
            os.close(fd)
    return hashes


def stream_merge(recipe: Recipe, recipe_text: str, base, base_dir: Path, tmp: Path, shard_bytes: int,
                 stack: LayerStack, quiet: bool = False) -> dict[str, str]:
    """Write weights, config, tokenizer and mergekit_config.yml into ``tmp``; return tensor hashes.

    The config is built by transformers in a thread while the tensors stream: the copy loop
    spends its time in system calls and hashing, which release the GIL, so transformers'
    import time (seconds) overlaps the I/O instead of adding to it.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    packed = base.arch.packed_per_layer(recipe.layer_map)
    tensors = plan_tensors(recipe, base_dir, recipe.out_dtype or recipe.dtype, stack, packed)
    shards = shard(tensors, shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    tmp.mkdir(parents=True)
    hashes: dict[str, str] = {}
    total = sum(t.nbytes for t in tensors)
    pending: dict[tuple[Path, int], Any] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="dus-config") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="dus-hash") as hash_pool:
        config = pool.submit(build_config, base.config, recipe.layer_map, recipe.out_dtype or recipe.dtype, str(tmp))

        def hasher(file: Path, start: int, nbytes: int):
            key = (file, start)
            if key not in pending:
                pending[key] = hash_pool.submit(hash_range, file, start, nbytes)
            return pending[key]

        try:
            with tqdm(total=total, unit="B", unit_scale=True, desc="Streaming tensors", disable=quiet) as bar:
                for name, group in zip(names, shards):
                    hashes.update(write_shard(tmp / name, group, bar.update, hasher))
            hashes = {k: v if isinstance(v, str) else v.result() for k, v in hashes.items()}
        except OSError as e:
            raise UpscaleError(f"could not write {tmp.parent}: {e.strerror or e} (is the disk full?); "
                               "nothing was left in the output") from None
        try:
            config.result()
        except OSError as e:
            raise UpscaleError(f"could not write the config into {tmp.parent}: {e.strerror or e}") from None
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {t.name: n for n, g in zip(names, shards) for t in g}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    copy_tokenizer_files(base_dir, tmp)
    (tmp / "mergekit_config.yml").write_text(recipe_text, encoding="utf-8")
    return hashes


def build_config(base_config: dict[str, Any], layer_map: list[int], dtype: str | None, out: str) -> None:
    """The output config: the base's, with the layer count and every per-layer setting following the
    layer map (``architecture.upscaled_config``), saved by transformers as mergekit's run saves it."""
    from dus_plugin.architecture import config_object, upscaled_config

    cfg = config_object(upscaled_config(base_config, layer_map))
    if dtype:
        cfg.dtype = dtype  # mergekit sets torch_dtype, which transformers 5 maps to dtype
    cfg.save_pretrained(out)


def hash_file_tensors(path: Path) -> dict[str, str]:
    """sha256 of every tensor's raw bytes in a safetensors file, read in chunks (no torch)."""
    return {name: hash_range(path, t.start, t.nbytes) for name, t in read_header(path).items()}
