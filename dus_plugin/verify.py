"""Check an upscaled folder against what its base and plan imply: tensors, config, loading, forward.

The expected result is derived from the base's own files, the plan's layer map and the model
class (built on the meta device), never from the output's list of its own tensors, so an engine
that drops, swaps or mis-zeroes a layer cannot describe its own mistake as the plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dus_plugin.errors import PlanError, VerifyError, first_line
from dus_plugin.io import TOKENIZER_MODEL_FILES
from dus_plugin.manifest import Manifest
from dus_plugin.tensors import (Regroup, SourceTensor, is_raw_copy, out_shape, read_tensor, tensor_headers,
                                weight_map)

if TYPE_CHECKING:
    from dus_plugin.architecture import Architecture

LOG = logging.getLogger(__name__)
# Config keys that legitimately differ between a base and its upscale.
VOLATILE_CONFIG_KEYS = frozenset({"dtype", "torch_dtype", "transformers_version", "_name_or_path"})


@dataclass
class VerifyReport:
    folder: str
    tensors: int = 0
    against_base: bool = False
    """True when every tensor was compared with the base's; False: with the manifest's hashes."""
    forward: bool = False
    trained: bool = False
    """A trained export: tensors are checked to be finite, not against the base."""
    against_parents: bool = False
    """A merge whose parents are at hand: every tensor was checked against their merge again."""
    held: str = ""
    """How the forward pass held the model: "streamed" (one module at a time) or "whole"."""
    image: bool = False
    """A multimodal model's forward pass had an image in its prompt (else text only)."""


@dataclass(frozen=True)
class Expected:
    """One output tensor as the plan implies it."""

    source: str
    zero: bool
    mean_with: str | None = None
    """Method average: the base tensor of the next layer, averaged with ``source`` before zeroing."""
    regroup: Regroup | None = None
    """A tensor outside the stack packed one block per layer (Gemma 4's per-layer embeddings): blocks by the map."""


def verify(folder: str | Path, base: str | Path | None = None, forward: bool = True,
           quiet: bool = False, arch: Architecture | None = None) -> VerifyReport:
    """Raise VerifyError naming the first mismatch; return what was checked.

    ``arch``: the base's architecture as the upscale resolved it (its meta models are reused); used only when its
    config is the base config verify reads itself."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VerifyError(f"{folder} is not a folder; pass the output folder of `dus upscale`")
    manifest = Manifest.read(folder)
    report = VerifyReport(str(folder))
    _check_tokenizer(folder)
    # a trained export (of an upscale or of a plain base) moved on from any plan by design
    report.trained = not manifest.is_upscale_output
    base_dir = None if report.trained else _base_dir(manifest, base)
    if report.trained:
        report.tensors = _check_trained(folder, quiet)
        report.against_parents = _recheck_merge(folder, manifest, quiet)
    else:
        base_config = _base_config(manifest, base_dir)
        if arch is None or arch.config != base_config:
            from dus_plugin.architecture import Architecture

            arch = Architecture(base_config)
        _check_config(folder, manifest, arch)
        report.against_base = base_dir is not None
        report.tensors = (_check_against_base(folder, manifest, base_dir, arch, quiet) if base_dir
                          else _check_hashes(folder, manifest, quiet))
    if forward:
        function_preserving = manifest.method in ("identity", "average") and not report.trained
        report.held, report.image = _forward(folder, base_dir if function_preserving else None)
        report.forward = True
    LOG.info("verified %s: %d tensors", folder, report.tensors)
    return report


def _base_config(manifest: Manifest, base_dir: Path | None) -> dict[str, Any]:
    if base_dir is not None and (base_dir / "config.json").is_file():
        return json.loads((base_dir / "config.json").read_text())
    return manifest.base.config


def _check_config(folder: Path, manifest: Manifest, arch: Architecture) -> None:
    """The output config is the base's with every per-layer setting following the layer map, and every
    output layer is built exactly as its source layer."""
    from dus_plugin.architecture import config_object, upscaled_config

    path = folder / "config.json"
    if not path.is_file():
        raise VerifyError(f"{folder} has no config.json")
    actual = json.loads(path.read_text())
    layer_map = manifest.plan.layer_map
    expected = upscaled_config(arch.config, layer_map)
    want, got = (config_object(c).to_dict() for c in (expected, actual))
    for key in sorted(set(want) | set(got)):
        if key not in VOLATILE_CONFIG_KEYS and want.get(key) != got.get(key):
            raise VerifyError(_config_mismatch(key, got.get(key), want.get(key)))
    try:  # the config read equals the expected one in every key that builds a layer, so its layers are these
        arch.check_layers(layer_map)
    except PlanError as e:
        raise VerifyError(f"config.json: {e}") from None


def _config_mismatch(key: str, got: Any, want: Any) -> str:
    """One line naming the first differing entry of a list (two long lists cut short look the same)."""
    if isinstance(got, list) and isinstance(want, list):
        if len(got) != len(want):
            return f"config.json {key} has {len(got)} entries, the layer map implies {len(want)}"
        i = next(k for k, (g, w) in enumerate(zip(got, want)) if g != w)
        return f"config.json {key}[{i}] is {_short(got[i])}, the layer map implies {_short(want[i])}"
    return f"config.json {key} is {_short(got)}, the layer map implies {_short(want)}"


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 160 else text[:157] + "..."


def _check_tokenizer(folder: Path) -> None:
    if not any((folder / f).is_file() for f in TOKENIZER_MODEL_FILES) or not (folder / "tokenizer_config.json").is_file():
        raise VerifyError(f"{folder} has no tokenizer (tokenizer_config.json with tokenizer.json or tokenizer.model)")


def _base_dir(manifest: Manifest, base: str | Path | None) -> Path | None:
    if base is not None:
        path = Path(base)
        if path.is_dir():
            return path
        from dus_plugin.source import local_snapshot, resolve_base

        return local_snapshot(resolve_base(str(base), manifest.base.revision))
    recorded = manifest.base.local_path
    return Path(recorded) if recorded and Path(recorded).is_dir() else None


def expected_tensors(base_dir: Path, arch: Architecture, layer_map: list[int], method: str) -> dict[str, Expected]:
    """Every output tensor the plan implies, from the base's files and the model class."""
    from dus_plugin.architecture import writer_filters
    from dus_plugin.plan import layer_list_plan

    names = list(weight_map(base_dir))
    arch.check_tensor_names(names)  # after the scope check the stack makes
    stack, n_base = arch.stack, arch.n
    zeroed: set[int] = set()
    filters: list[str] = []
    if method in ("identity", "average"):
        zeroed = set(layer_list_plan(n_base, layer_map).duplicated_outputs)
        filters = writer_filters([n for n in names if stack.index(n) is not None], arch.shared_in_stack)
    packed = arch.packed_per_layer(layer_map)
    out: dict[str, Expected] = {n: Expected(n, False, regroup=packed.get(n)) for n in names if stack.index(n) is None}
    by_layer: dict[int, list[str]] = {}
    for n in names:
        if (i := stack.index(n)) is not None:
            by_layer.setdefault(i, []).append(n)
    for i, src in enumerate(layer_map):
        averaged = method == "average" and i in zeroed and src + 1 < n_base
        for name in by_layer.get(src, []):
            new = stack.rename(name, i)
            out[new] = Expected(name, i in zeroed and any(f in new for f in filters),
                                stack.rename(name, src + 1) if averaged else None)
    return out


def _check_against_base(folder: Path, manifest: Manifest, base_dir: Path, arch: Architecture, quiet: bool) -> int:
    """Each output tensor against its source in the base (bytes, or the cast/zeroed bytes), in bounded chunks."""
    from tqdm import tqdm

    expected = expected_tensors(base_dir, arch, manifest.plan.layer_map, manifest.method)
    found = tensor_headers(folder)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise VerifyError(f"tensor {missing[0]} is implied by the base and the plan but missing from {folder}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise VerifyError(f"tensor {extra[0]} is in {folder} but the base and the plan do not imply it")
    sources = tensor_headers(base_dir)
    recorded = manifest.tensors or {}
    with tqdm(total=sum(t.nbytes for t in found.values()), unit="B", unit_scale=True, desc="Verifying tensors",
              disable=quiet) as bar:
        for name, t in found.items():
            want = expected[name]
            digest = _compare(name, t, sources[want.source], want, sources.get(want.mean_with or ""))
            if name in recorded and recorded[name].sha256 != digest:
                raise VerifyError(f"tensor {name} in {t.file.name} does not match its hash in the manifest")
            bar.update(t.nbytes)
    return len(found)


def _compare(name: str, t: SourceTensor, src: SourceTensor, want: Expected, mean_with: SourceTensor | None) -> str:
    """sha256 of the output tensor's bytes; VerifyError at the first byte that differs from what its source implies."""
    from dus_plugin.tensors import transformed_bytes

    shape = out_shape(src.shape, want.regroup)
    if shape != list(t.shape):
        raise VerifyError(f"tensor {name} has shape {list(t.shape)}; its source {want.source} {list(src.shape)} "
                          f"implies {shape}")
    if want.mean_with and (mean_with is None or mean_with.shape != t.shape):
        raise VerifyError(f"tensor {name} should be the mean of {want.source} and {want.mean_with}, and the base's "
                          f"{want.mean_with} is missing or has another shape")
    raw = is_raw_copy(src.dtype, t.dtype, want.zero, want.mean_with, want.regroup)
    expected = None if raw else transformed_bytes(src, want.source, t.dtype, want.zero, mean_with, want.regroup)
    h = hashlib.sha256()
    fd = os.open(t.file, os.O_RDONLY)
    sfd = os.open(src.file, os.O_RDONLY) if raw else None
    try:
        done = 0
        while done < t.nbytes:
            n = min(64 << 20, t.nbytes - done)
            chunk = os.pread(fd, n, t.start + done)
            h.update(chunk)
            ref = os.pread(sfd, n, src.start + done) if sfd is not None else expected[done:done + n]
            if chunk != ref:
                what = (f"mean of {want.source} and {want.mean_with}" if want.mean_with else
                        f"copy of {want.source} with its per-layer blocks in layer-map order" if want.regroup else
                        f"zeroed copy of {want.source}" if want.zero else f"copy of {want.source}")
                raise VerifyError(f"tensor {name} is not the {what} that the plan implies "
                                  f"(in {t.file.name}, from byte {done} of the tensor)")
            done += len(chunk)
    finally:
        os.close(fd)
        if sfd is not None:
            os.close(sfd)
    return h.hexdigest()


def _check_hashes(folder: Path, manifest: Manifest, quiet: bool) -> int:
    """Without the base: each tensor's bytes against the manifest's sha256."""
    from tqdm import tqdm

    from dus_plugin.stream import hash_range

    planned = manifest.tensors or {}
    found = tensor_headers(folder)
    for name in sorted(set(planned) ^ set(found)):
        where = "the manifest" if name in planned else folder
        raise VerifyError(f"tensor {name} is in {where} only")
    for name, t in tqdm(found.items(), desc="Hashing tensors", disable=quiet, unit="tensor"):
        if hash_range(t.file, t.start, t.nbytes) != planned[name].sha256:
            raise VerifyError(f"tensor {name} in {t.file.name} does not match its hash in the manifest")
    return len(found)


def _recheck_merge(folder: Path, manifest: Manifest, quiet: bool) -> bool:
    from dus_plugin.errors import MergeError
    from dus_plugin.manifest import MergeStage

    if not manifest.stages or not isinstance(manifest.stages[-1], MergeStage):
        return False
    from dus_plugin.merge import recheck

    try:
        return recheck(folder, quiet)
    except MergeError as e:
        raise VerifyError(str(e)) from None


def _check_trained(folder: Path, quiet: bool) -> int:
    import torch
    from tqdm import tqdm

    tensors = tensor_headers(folder)
    for name, t in tqdm(tensors.items(), desc="Checking tensors", disable=quiet, unit="tensor"):
        if not torch.isfinite(read_tensor(t).float()).all():
            raise VerifyError(f"tensor {name} in {folder} has NaN or infinite values")
    return len(tensors)


def _load(folder: Path):
    """The model in float32, refusing any missing, unexpected or mismatched key (transformers would
    fill a missing one with random weights and say nothing)."""
    import torch

    try:
        model, info = _model_class(folder).from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    except Exception as e:
        raise VerifyError(f"transformers cannot load {folder}: {first_line(e)}") from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            raise VerifyError(f"transformers loads {folder} with {len(keys)} {kind.replace('_', ' ')} "
                              f"(first: {keys[0]}); the folder does not match its model class")
    return model.eval()


def _model_class(folder: Path):
    """The class the folder's config names: a causal LM, or a multimodal family's image-text-to-text model."""
    from dus_plugin.architecture import model_class

    return model_class(json.loads((folder / "config.json").read_text()))


def _forward(folder: Path, identity_base: Path | None) -> tuple[str, bool]:
    """Run a forward pass (one module in memory at a time where the family allows it); an identity upscale
    must give exactly the base's logits. Returns how the model was held ("streamed" or "whole") and whether
    the prompt held an image (a multimodal model whose image inputs ``vision_inputs`` can build)."""
    import torch
    from transformers import AutoConfig

    from dus_plugin.errors import StreamUnsupported

    ids = (torch.arange(1, 17).unsqueeze(0) * 7) % AutoConfig.from_pretrained(folder).get_text_config().vocab_size
    image = False
    try:
        logits, ref = _logits_streamed(folder, identity_base, ids)
        how = "streamed"
    except StreamUnsupported as e:
        LOG.info("verify loads %s whole: %s", folder.name, e)
        logits, ref, image = _logits_whole(folder, identity_base, ids)
        how = "whole"
    if not torch.isfinite(logits).all():
        raise VerifyError(f"forward pass of {folder} gives non-finite logits")
    if ref is not None:
        _same_logits(logits, ref)
    return how, image


def _logits_streamed(folder: Path, identity_base: Path | None, ids):
    from dus_plugin.errors import ShapeMismatch
    from dus_plugin.layerwise import streamed_logits

    try:
        logits = streamed_logits(folder, ids)
        ref = None if identity_base is None else streamed_logits(identity_base, ids, round_to=_file_dtype(folder))
    except ShapeMismatch as e:
        raise VerifyError(f"{folder}: {e}") from None
    return logits, ref


def _file_dtype(folder: Path):
    import torch

    from dus_plugin.tensors import SAFETENSORS_DTYPES

    floating = [t.dtype for t in tensor_headers(folder).values() if t.dtype.startswith(("F", "BF"))]
    return getattr(torch, SAFETENSORS_DTYPES[max(set(floating), key=floating.count)])


def _forward_failed(folder: Path, e: Exception) -> VerifyError:
    return VerifyError(f"the forward pass of {folder} fails in transformers: {first_line(e)}")


def _logits_whole(folder: Path, identity_base: Path | None, ids):
    """The fallback: the whole model in float32 (and then the base, for an identity upscale)."""
    import torch

    from dus_plugin.vision_inputs import image_key, image_prompt

    model = _load(folder)
    inputs = image_prompt(model) or {"input_ids": ids}
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits
    except Exception as e:
        raise _forward_failed(folder, e) from None
    del model
    image = image_key(inputs) is not None
    if identity_base is None:
        return logits, None, image
    base = _model_class(identity_base).from_pretrained(identity_base, dtype=torch.float32).eval()
    out_dtype = _file_dtype(folder)
    with torch.no_grad():
        for p in base.parameters():  # a cast upscale equals the base rounded to its dtype, not the base itself
            p.copy_(p.to(out_dtype).float())
        return logits, base(**inputs, use_cache=False).logits, image


def _same_logits(logits, ref) -> None:
    import torch

    # exact on nearly every family; a few reorder float work by depth (a rounding-level 1e-7 difference),
    # far below what one un-zeroed projection does (1e-2 and up)
    if not torch.allclose(logits, ref, rtol=0, atol=1e-5 * float(ref.abs().max())):
        diff = (logits - ref).abs()
        pos = int(diff.amax(dim=-1).argmax())
        raise VerifyError(f"identity upscale: logits differ from the base's (max |diff| {diff.max().item():.3g} at "
                          f"token {pos}); a residual-writing projection of a duplicated copy is not zeroed")
