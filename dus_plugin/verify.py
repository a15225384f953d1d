"""Check an upscaled folder against its plan: tensors, config, tokenizer, and a real forward pass."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dus_plugin.configfix import remap_per_layer
from dus_plugin.errors import BaseModelError, VerifyError
from dus_plugin.manifest import read_manifest
from dus_plugin.plan import text_config
from dus_plugin.tensors import TensorReader

LOG = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class VerifyReport:
    folder: str
    tensors: int = 0
    against_base: bool = False
    """True when every tensor was compared with the base's; False: with the manifest's hashes."""
    forward: bool = False
    trained: bool = False
    """A trained export: tensors are checked to be finite, not against the base."""
    notes: list[str] = field(default_factory=list)


def verify(folder: str | Path, base: str | Path | None = None, forward: bool = True,
           quiet: bool = False) -> VerifyReport:
    """Raise VerifyError naming the first mismatch; return what was checked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VerifyError(f"{folder} is not a folder; pass the output folder of `dus upscale`")
    manifest = read_manifest(folder)
    report = VerifyReport(str(folder))
    _check_config(folder, manifest)
    _check_tokenizer(folder)
    base_dir = _base_dir(manifest, base) if "tensors" in manifest else None
    report.against_base = base_dir is not None
    report.trained = "tensors" not in manifest
    report.tensors = _check_tensors(folder, manifest, base_dir, quiet)
    if forward:
        _forward(folder)
        report.forward = True
    LOG.info("verified %s: %d tensors %s", folder, report.tensors,
             "equal to the base's" if report.against_base else "match the manifest hashes")
    return report


def _check_config(folder: Path, manifest: dict[str, Any]) -> None:
    path = folder / "config.json"
    if not path.is_file():
        raise VerifyError(f"{folder} has no config.json")
    cfg = json.loads(path.read_text())
    plan = manifest["plan"]
    got = text_config(cfg).get("num_hidden_layers")
    if got != plan["s"]:
        raise VerifyError(f"config.json num_hidden_layers is {got}, the plan says s = {plan['s']}")
    expected = json.loads(json.dumps(text_config(manifest["base"]["config"])))
    remap_per_layer(expected, plan["layer_map"])
    actual = text_config(cfg)
    for key, value in expected.items():
        if isinstance(value, list) and key in actual and actual[key] != value:
            raise VerifyError(f"config.json {key} does not follow the layer map: got {actual[key]}, expected {value}")


def _check_tokenizer(folder: Path) -> None:
    if not any((folder / f).is_file() for f in TOKENIZER_FILES) or not (folder / "tokenizer_config.json").is_file():
        raise VerifyError(f"{folder} has no tokenizer (tokenizer_config.json with tokenizer.json or tokenizer.model)")


def _base_dir(manifest: dict[str, Any], base: str | Path | None) -> Path | None:
    if base is not None:
        path = Path(base)
        if not path.is_dir():
            from dus_plugin.source import resolve_base

            resolved = resolve_base(str(base), manifest["base"].get("revision"))
            from dus_plugin.upscale import _local_base

            return _local_base(resolved)
        return path
    recorded = manifest["base"].get("local_path")
    return Path(recorded) if recorded and Path(recorded).is_dir() else None


def _check_tensors(folder: Path, manifest: dict[str, Any], base_dir: Path | None, quiet: bool) -> int:
    """Each tensor's bytes against its manifest hash and, with the base at hand, against its source.

    Reads both files in bounded chunks (no mmap, no full tensors), so memory stays flat however
    large the model; only cast or zeroed tensors are rebuilt with torch, one at a time.
    """
    from tqdm import tqdm

    from dus_plugin.tensors import read_header, weight_map

    if "tensors" not in manifest:  # a trained export: weights moved on, so check they are sane
        return _check_trained(folder, quiet)
    planned: dict[str, Any] = manifest["tensors"]
    found = {}
    for file in sorted(set(weight_map(folder).values())):
        found.update(read_header(folder / file))
    missing = sorted(set(planned) - set(found))
    if missing:
        raise VerifyError(f"tensor {missing[0]} is in the plan but not in {folder}")
    extra = sorted(set(found) - set(planned))
    if extra:
        raise VerifyError(f"tensor {extra[0]} is in {folder} but not in the plan")
    sources = {}
    if base_dir is not None:
        for file in sorted(set(weight_map(base_dir).values())):
            sources.update(read_header(base_dir / file))
    total = sum(t.nbytes for t in found.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="Verifying tensors", disable=quiet) as bar:
        for name, t in found.items():
            entry = planned[name]
            src = None
            if base_dir is not None:
                src = sources.get(entry["source"])
                if src is None:
                    raise VerifyError(f"tensor {name}: its planned source {entry['source']} is not in the base")
            if _digest_and_compare(name, t, src, entry) != entry["sha256"]:
                raise VerifyError(f"tensor {name} in {t.file.name} does not match its hash in the manifest")
            bar.update(t.nbytes)
    return len(planned)


def _digest_and_compare(name: str, t, src, entry: dict[str, Any]) -> str:
    """sha256 of the output tensor's bytes; raises if they differ from what its source implies."""
    import hashlib
    import os

    h = hashlib.sha256()
    raw = src is not None and not entry.get("zeroed") and src.dtype == t.dtype
    expected = _expected_bytes(src, t, entry) if src is not None and not raw else None
    if src is not None and src.shape != t.shape:
        raise VerifyError(f"tensor {name} has shape {t.shape}, its planned source {entry['source']} {src.shape}")
    fd = os.open(t.file, os.O_RDONLY)
    sfd = os.open(src.file, os.O_RDONLY) if raw else None
    try:
        done = 0
        while done < t.nbytes:
            n = min(64 << 20, t.nbytes - done)
            chunk = os.pread(fd, n, t.start + done)
            h.update(chunk)
            want = os.pread(sfd, n, src.start + done) if raw else (expected[done:done + n] if expected is not None else None)
            if want is not None and chunk != want:
                raise VerifyError(f"tensor {name} differs from its planned source {entry['source']} in the base "
                                  f"(in {t.file.name}, from byte {done} of the tensor)")
            done += len(chunk)
    finally:
        os.close(fd)
        if sfd is not None:
            os.close(sfd)
    return h.hexdigest()


def _expected_bytes(src, t, entry: dict[str, Any]) -> bytes:
    """A cast or zeroed tensor, rebuilt as mergekit computes it."""
    from dus_plugin.stream import OutTensor, _transformed

    return _transformed(OutTensor(entry["source"], src, entry["source"], t.dtype, bool(entry.get("zeroed"))))


def _check_trained(folder: Path, quiet: bool) -> int:
    import torch
    from tqdm import tqdm

    with TensorReader(folder) as out:
        names = out.names()
        for name in tqdm(names, desc="Checking tensors", disable=quiet, unit="tensor"):
            if not torch.isfinite(out.get(name).float()).all():
                raise VerifyError(f"tensor {name} in {folder} has NaN or infinite values")
    return len(names)


def _forward(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception as e:
        raise VerifyError(f"transformers cannot load {folder}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    ids = torch.arange(1, 9).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        raise VerifyError(f"forward pass of {folder} gives non-finite logits")
