"""`dus merge`: tuned variants of one model merged into one, the last step of SOLAR-Instruct.

The merge is stock mergekit YAML (`linear` with weights, or `slerp`), run by mergekit's engine into a temporary
folder. Each output tensor is then checked against the parents by this module's own arithmetic, and the folder's
manifest records the parents, so the card can show the family tree.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field

from dus_plugin.errors import MergeError, first_line

LOG = logging.getLogger(__name__)
# Config keys that may differ between variants of one model (they do not change its tensors).
FREE_CONFIG_KEYS = frozenset({"dtype", "torch_dtype", "transformers_version", "_name_or_path", "use_cache"})


class MergeOptions(BaseModel):
    """How the variants are merged; each field is a `dus merge` flag."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    method: Literal["linear", "slerp"] = "linear"
    """linear: the weighted mean of every tensor; slerp: spherical interpolation between two models."""
    weights: Optional[str] = None
    """linear: one weight per model, e.g. 0.7,0.3 (normalised to sum 1) [default: equal]."""
    t: Optional[float] = Field(None, ge=0, le=1)
    """slerp: 0 gives the first model, 1 the second [default: 0.5]."""
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None
    """Output dtype [default: the first model's]."""


def parse_weights(options: MergeOptions, count: int) -> list[float]:
    if options.weights is None:
        return [1.0] * count
    try:
        weights = [float(w) for w in options.weights.split(",")]
    except ValueError:
        raise MergeError(f"`weights` {options.weights!r} is not a list of numbers; e.g. 0.7,0.3",
                         setting="weights") from None
    if len(weights) != count or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise MergeError(f"`weights` gives {len(weights)} weights for {count} models; give one non-negative weight "
                         "per model, not all zero", setting="weights")
    return weights


def merge_recipe(models: list[str], options: MergeOptions) -> dict[str, Any]:
    """The stock mergekit YAML of the merge (local folders written absolute, so it runs from any folder)."""
    refs = [str(Path(m).resolve()) for m in models]
    dtype = options.dtype or _config(Path(models[0])).get("dtype") or "bfloat16"
    if options.method == "slerp":
        if len(models) != 2:
            raise MergeError(f"method slerp interpolates between two models; {len(models)} were given",
                             setting="method")
        if options.weights is not None:
            raise MergeError("`weights` is for method linear; slerp takes `t`", setting="weights")
        t = 0.5 if options.t is None else options.t
        return {"merge_method": "slerp", "base_model": refs[0], "models": [{"model": r} for r in refs],
                "parameters": {"t": t}, "dtype": dtype}
    if options.t is not None:
        raise MergeError("`t` is for method slerp; linear takes `weights`", setting="t")
    weights = parse_weights(options, len(models))
    return {"merge_method": "linear", "models": [{"model": r, "parameters": {"weight": w}}
                                                 for r, w in zip(refs, weights)], "dtype": dtype}


def render_merge_recipe(doc: dict[str, Any]) -> str:
    head = ["# Merging tuned variants (SOLAR-Instruct's last step) as a stock mergekit recipe.",
            "# run with: mergekit-yaml THIS.yml OUT/   (or: dus merge ... -o OUT/, which also checks every tensor)"]
    return "\n".join(head) + "\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def check_parents(models: list[str]) -> None:
    """MergeError unless every model is a folder of the same architecture with the same tensors and shapes."""
    from dus_plugin.io import model_folder_problem
    from dus_plugin.tensors import tensor_headers

    if len(models) < 2:
        raise MergeError(f"merging needs at least two models; {len(models)} was given")
    for m in models:
        if problem := model_folder_problem(m):
            raise MergeError(f"model folder {problem}; pass the folders of the tuned variants")
    first = {k: v for k, v in _config(Path(models[0])).items() if k not in FREE_CONFIG_KEYS}
    shapes = {n: t.shape for n, t in tensor_headers(Path(models[0])).items()}
    for m in models[1:]:
        other = {k: v for k, v in _config(Path(m)).items() if k not in FREE_CONFIG_KEYS}
        if key := next((k for k in sorted(set(first) | set(other)) if first.get(k) != other.get(k)), None):
            raise MergeError(f"{m} is another architecture than {models[0]}: config.json {key} is "
                             f"{json.dumps(other.get(key))}, not {json.dumps(first.get(key))}; merge variants of one "
                             "model")
        theirs = {n: t.shape for n, t in tensor_headers(Path(m)).items()}
        if diff := sorted(set(shapes) ^ set(theirs)) or [n for n in shapes if shapes[n] != theirs[n]]:
            raise MergeError(f"{m} and {models[0]} differ in tensor {diff[0]}; merge variants of one model")


def merge(models: list[str], out: str | Path, options: MergeOptions, quiet: bool = False,
          overwrite: bool = False):
    """Merge ``models`` into ``out`` (atomically), check every tensor, record the parents; return the manifest."""
    from dus_plugin.errors import OutputExistsError
    from dus_plugin.io import atomic_dir
    from dus_plugin.stream import copy_tokenizer_files

    out = Path(out).absolute()
    check_parents(models)
    doc = merge_recipe(models, options)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise OutputExistsError(f"output {out} exists and is not an empty folder; set `overwrite` or choose another "
                                "folder", setting="overwrite")
    with atomic_dir(out) as tmp:
        _run(doc, tmp, quiet)
        copy_tokenizer_files(Path(models[0]), tmp)
        checked = check_merge(tmp, doc, quiet)
        manifest = _manifest(models, doc, checked)
        manifest.write(tmp)
    LOG.info("merged %d models into %s (%s); %d tensors checked", len(models), out, doc["merge_method"], checked)
    return manifest


def _run(doc: dict[str, Any], tmp: Path, quiet: bool) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions as MergekitOptions

    text = render_merge_recipe(doc)
    try:
        run_merge(MergeConfiguration.model_validate(doc), str(tmp), config_source=text,
                  options=MergekitOptions(copy_tokenizer=True, quiet=quiet, write_model_card=False))
    except Exception as e:  # mergekit's own failure: one line, nothing left behind
        raise MergeError(f"mergekit failed: {first_line(e)}; nothing was written to the output") from None
    (tmp / "mergekit_config.yml").write_text(text, encoding="utf-8")


def _manifest(models: list[str], doc: dict[str, Any], checked: int):
    """The first parent's record with a merge stage naming every parent (a plain folder gets a fresh record)."""
    from dus_plugin.manifest import BaseRecord, Manifest, MergeParent, MergeStage, manifest_sha256, stage_name

    first = Path(models[0])
    manifest = Manifest.read_optional(first) or Manifest(base=BaseRecord(
        ref=first.name, local_path=str(first.absolute()), architecture=(_config(first).get("architectures") or
                                                                        [None])[0], config=_config(first)))
    weights = [m.get("parameters", {}).get("weight") for m in doc["models"]]
    parents = [MergeParent(ref=Path(m).name, local_path=str(Path(m).absolute()), manifest_sha256=manifest_sha256(m),
                           weight=w, stages=[stage_name(s) for s in (Manifest.read_optional(m) or Manifest()).stages])
               for m, w in zip(models, weights)]
    stage = MergeStage(method=doc["merge_method"], parents=parents, t=(doc.get("parameters") or {}).get("t"),
                       tensors_checked=checked)
    return manifest.append_stage(stage)


def recheck(folder: Path, quiet: bool = False) -> bool:
    """Check a merged folder against its parents again (`dus verify`); False when a parent is not at hand."""
    doc = yaml.safe_load((folder / "mergekit_config.yml").read_text())
    if not all(Path(m["model"]).is_dir() for m in doc["models"]):
        LOG.info("the parents of %s are not at hand; its tensors are checked for finite values only", folder)
        return False
    check_merge(folder, doc, quiet)
    return True


def check_merge(folder: Path, doc: dict[str, Any], quiet: bool = False) -> int:
    """Every output tensor against the merge of its parents' tensors, computed here (not by mergekit)."""
    from tqdm import tqdm

    from dus_plugin.tensors import read_tensor, tensor_headers

    parents = [tensor_headers(Path(m["model"])) for m in doc["models"]]
    found = tensor_headers(folder)
    if missing := sorted(set(parents[0]) - set(found)):
        raise MergeError(f"tensor {missing[0]} of the parents is missing from the merge in {folder}")
    for name in tqdm(sorted(found), desc="Checking merged tensors", disable=quiet, unit="tensor"):
        got = read_tensor(found[name])
        want = expected_tensor(doc, [read_tensor(p[name]).double() for p in parents]).to(got.dtype)
        if not _close(got, want):
            worst = (got.double() - want.double()).abs().max().item()
            raise MergeError(f"tensor {name} of {folder} is not the {doc['merge_method']} merge of its parents "
                             f"(largest difference {worst:.3g}); the merge is wrong, remove it and run again")
    return len(found)


def expected_tensor(doc: dict[str, Any], tensors: list):
    """The merge of one tensor, from the method's definition, in float64: the weighted mean, or SLERP of the
    whole tensor as one vector (linear where the two are nearly parallel)."""
    if doc["merge_method"] == "linear":
        weights = [m["parameters"]["weight"] for m in doc["models"]]
        return sum(w * x for w, x in zip(weights, tensors)) / sum(weights)
    return slerp(doc["parameters"]["t"], tensors[0], tensors[1])


def slerp(t: float, a, b, threshold: float = 0.9995):
    """``a`` moved towards ``b`` along the great circle between their directions, by the fraction ``t`` of the
    angle, the norms mixed as the angle goes."""
    import torch

    x, y = a.reshape(-1), b.reshape(-1)
    nx, ny = x.norm().clamp_min(1e-8), y.norm().clamp_min(1e-8)
    cos = float(torch.dot(x / nx, y / ny).clamp(-1, 1))
    if abs(cos) > threshold:
        return (1 - t) * a + t * b
    theta = torch.tensor(cos, dtype=torch.float64).arccos()
    return ((torch.sin((1 - t) * theta) * x + torch.sin(t * theta) * y) / torch.sin(theta)).reshape(a.shape)


def _close(got, want) -> bool:
    """Equal up to one rounding of the output dtype (mergekit sums in float32, this check in float64)."""
    import torch

    if got.dtype == torch.float32:
        return torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    eps = torch.finfo(got.dtype).eps
    return torch.allclose(got.double(), want.double(), rtol=eps, atol=eps * 1e-3)
