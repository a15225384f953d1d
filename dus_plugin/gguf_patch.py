"""`dus gguf-patch`: write into a GGUF what llama.cpp needs to compute the folder's model as transformers does.

Today that is the per-layer sliding-window pattern (see ``llamacpp``): the file is copied with the
``{arch}.attention.sliding_window_pattern`` array added, checked, and renamed over the original.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dus_plugin.errors import GgufPatchError
from dus_plugin.llamacpp import ArchRules, period_pattern, rules_for, scale_mismatch, wanted_pattern
from dus_plugin.plan import text_config

LOG = logging.getLogger(__name__)


@dataclass
class PatchResult:
    path: Path
    written: dict[str, Any] = field(default_factory=dict)
    """GGUF keys written, with their values; empty when the file needed nothing."""
    mismatch: str | None = None
    """A difference from transformers that no GGUF key can fix."""


def patch_gguf(gguf_path: str | Path, model_dir: str | Path, quiet: bool = False) -> PatchResult:
    """Add to ``gguf_path`` the keys llama.cpp needs for ``model_dir``'s model; refuse a GGUF of another model."""
    gguf_path, config = Path(gguf_path), _folder_config(Path(model_dir))
    rules = rules_for(config)
    if rules is None:
        from dus_plugin.llamacpp import RULES

        raise GgufPatchError(f"dus knows how llama.cpp runs {', '.join(sorted(RULES))}, not model_type "
                             f"{config.get('model_type')!r} of {model_dir}; compare its logits yourself "
                             "before trusting the GGUF")
    reader = _read(gguf_path)
    _check_same_model(reader, rules, config, gguf_path, Path(model_dir))
    wanted = wanted_pattern(config)
    keys: dict[str, Any] = {}
    if rules.swa_period is not None and wanted is not None and _pattern_in(reader, rules) != wanted:
        keys[_pattern_key(rules)] = wanted
    if keys:
        _rewrite(reader, gguf_path, rules, keys, quiet)
    return PatchResult(gguf_path, keys, scale_mismatch(config))


def _folder_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise GgufPatchError(f"{model_dir} has no config.json; pass the model folder the GGUF was converted from")
    return json.loads(path.read_text(encoding="utf-8"))


def _read(path: Path):
    gguf = _gguf_module()
    if not path.is_file():
        raise GgufPatchError(f"{path} does not exist; convert the folder first with llama.cpp's convert_hf_to_gguf.py")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError on foreign bytes
        raise GgufPatchError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def _gguf_module():
    try:
        import gguf
    except ImportError:
        raise GgufPatchError("dus gguf-patch needs the gguf package: pip install 'dus-plugin[gguf]'") from None
    return gguf


def _value(reader, key: str) -> Any:
    f = reader.get_field(key)
    return None if f is None else f.contents()


def _check_same_model(reader, rules: ArchRules, config: dict, gguf_path: Path, model_dir: Path) -> None:
    arch = _value(reader, "general.architecture")
    if arch != rules.arch:
        raise GgufPatchError(f"{gguf_path} is a {arch!r} GGUF, but {model_dir} is {config.get('model_type')!r}, "
                             f"which llama.cpp converts to {rules.arch!r}; pass the GGUF converted from this folder")
    blocks, n = _value(reader, f"{arch}.block_count"), text_config(config)["num_hidden_layers"]
    if blocks != n:
        raise GgufPatchError(f"{gguf_path} has {blocks} layers, but {model_dir} has {n}; "
                             "pass the GGUF converted from this folder")
    if (_value(reader, "split.count") or 1) > 1:
        raise GgufPatchError(f"{gguf_path} is one part of a split GGUF; merge the parts with llama-gguf-split --merge, "
                             "then patch the merged file")


def _pattern_key(rules: ArchRules) -> str:
    return f"{rules.arch}.attention.sliding_window_pattern"


def _pattern_in(reader, rules: ArchRules) -> list[bool]:
    """The sliding-window layers llama.cpp will use for this GGUF: its array, its period, or the loader's default."""
    gguf = _gguf_module()
    n = _value(reader, f"{rules.arch}.block_count")
    f = reader.get_field(_pattern_key(rules))
    if f is not None and f.types[0] == gguf.GGUFValueType.ARRAY:
        return [bool(x) for x in f.contents()]
    return period_pattern(n, int(f.contents()) if f is not None else rules.swa_period)


def _rewrite(reader, path: Path, rules: ArchRules, keys: dict[str, Any], quiet: bool) -> None:
    """Copy ``path`` with ``keys`` set into a temporary file beside it, then rename it over ``path``."""
    from tqdm import tqdm

    gguf = _gguf_module()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(tmp, rules.arch, endianess=reader.endianess)
        writer.data_alignment = reader.alignment
        for name, f in reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture" or name in keys:
                continue
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
        for name, value in keys.items():
            writer.add_array(name, value)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(int(t.n_bytes) for t in reader.tensors)
        with tqdm(total=total, unit="B", unit_scale=True, desc="gguf-patch", disable=quiet) as bar:
            for t in reader.tensors:
                writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
                bar.update(int(t.n_bytes))
        writer.close()
        _check_copy(reader, tmp, rules, keys)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_copy(original, copy_path: Path, rules: ArchRules, keys: dict[str, Any]) -> None:
    """The copy holds the same tensors as the original (names, types, shapes, bytes), and llama.cpp will read
    the pattern that was written."""
    import numpy as np

    copy = _gguf_module().GGUFReader(copy_path)
    wanted = keys.get(_pattern_key(rules))
    if wanted is not None and _pattern_in(copy, rules) != wanted:
        raise GgufPatchError(f"the patched copy of {copy_path.name[1:].split('.tmp-')[0]} reads back another "
                             "sliding-window pattern; the original was left as it was")
    head = [(t.name, t.tensor_type, tuple(t.shape)) for t in original.tensors]
    if head != [(t.name, t.tensor_type, tuple(t.shape)) for t in copy.tensors] or not all(
            np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8))
            for a, b in zip(original.tensors, copy.tensors)):
        raise GgufPatchError(f"the patched copy of {copy_path.name[1:].split('.tmp-')[0]} differs from it in its "
                             "tensors; the original was left as it was")

