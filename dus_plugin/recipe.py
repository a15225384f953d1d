"""Recipes: the stock mergekit passthrough YAML that a DUS plan becomes, and its strict loader.

mergekit's own schema is permissive (it drops a misspelled key, accepts a reversed range);
``load_recipe`` validates strictly first and names the field in every error.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel as Model
from pydantic import ConfigDict, ValidationError, field_validator

from dus_plugin.errors import RecipeError
from dus_plugin.io import read_yaml_mapping
from dus_plugin.plan import DusPlan, Slice, human_count
from dus_plugin.validation import first_error

METHODS = ("solar", "identity")
# The projections that write into the residual stream; zeroing them makes a layer the identity.
OUTPUT_PROJECTIONS = ("o_proj", "down_proj")
DTYPES = ("float32", "float16", "bfloat16")


class Source(Model):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[dict[str, Any]] = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"must be [start, end] with 0 <= start < end, got {list(v)}")
        return v


class SliceSpec(Model):
    model_config = ConfigDict(extra="forbid")
    sources: list[Source]

    @field_validator("sources")
    @classmethod
    def _one_source(cls, v: list[Source]) -> list[Source]:
        if len(v) != 1:
            raise ValueError(f"a DUS slice has exactly one source, got {len(v)}")
        return v


class Recipe(Model):
    """The subset of mergekit's schema that a DUS recipe uses, validated strictly."""

    model_config = ConfigDict(extra="forbid")
    merge_method: Literal["passthrough"]
    slices: list[SliceSpec]
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None
    out_dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None
    tokenizer_source: Optional[str] = None
    base_model: Optional[str] = None
    chat_template: Optional[str] = None
    name: Optional[str] = None

    @field_validator("slices")
    @classmethod
    def _same_model(cls, v: list[SliceSpec]) -> list[SliceSpec]:
        if not v:
            raise ValueError("needs at least one slice")
        models = {s.sources[0].model for s in v}
        if len(models) != 1:
            raise ValueError(f"all slices of a DUS recipe take the same model, got {sorted(models)}")
        return v

    @property
    def model(self) -> str:
        return self.slices[0].sources[0].model

    @property
    def layer_ranges(self) -> list[tuple[int, int]]:
        return [s.sources[0].layer_range for s in self.slices]

    @property
    def layer_map(self) -> list[int]:
        return [i for a, b in self.layer_ranges for i in range(a, b)]

    def zeroed_outputs(self) -> dict[int, list[str]]:
        """Output layer -> name filters whose tensors this recipe scales to 0 (identity method)."""
        out: dict[int, list[str]] = {}
        i = 0
        for s in self.slices:
            src = s.sources[0]
            filters = _zero_filters(src.parameters)
            for _ in range(*src.layer_range):
                if filters:
                    out[i] = filters
                i += 1
        return out


def _zero_filters(parameters: dict[str, Any] | None) -> list[str]:
    scale = (parameters or {}).get("scale")
    if not isinstance(scale, list):
        return []
    return [c["filter"] for c in scale if isinstance(c, dict) and c.get("filter") and c.get("value") == 0]


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a YAML mapping with merge_method and slices, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(first_error(e, where, "unknown key (misspelled?); DUS recipes accept merge_method, slices, "
                                                "dtype, out_dtype, tokenizer_source, base_model, chat_template, name")) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    data = read_yaml_mapping(path, RecipeError, "recipe", f"write one with `dus plan BASE -o {path.name}`")
    return parse_recipe(data, where=str(path))


def check_against_base(recipe: Recipe, n: int, where: str = "recipe") -> None:
    """Cross-field check mergekit does not do: every range lies inside the base's n layers."""
    for k, (a, b) in enumerate(recipe.layer_ranges):
        if b > n:
            raise RecipeError(
                f"{where}: field slices[{k}].sources[0].layer_range: [{a}, {b}] goes past the base's {n} layers; "
                f"the end must be <= {n}"
            )


def plan_slices(plan: DusPlan, method: str) -> list[tuple[Slice, bool]]:
    """Slices with a flag 'zero the output projections', per method.

    identity (LLaMA-Pro style): the second copy of each duplicated layer gets its output
    projections zeroed, so it adds nothing to the residual stream and the stack computes the
    base's function; the SOLAR two-slice plan becomes [0, n-m) + [m, n-m) zeroed + [n-m, n).
    """
    if method == "solar":
        return [(sl, False) for sl in plan.slices]
    if method != "identity":
        raise RecipeError(f"`method` {method!r} is unknown; choose one of {', '.join(METHODS)}", setting="method")
    out: list[tuple[Slice, bool]] = []
    seen: set[int] = set()
    for sl in plan.slices:
        run_start = sl.start
        for i in sl.layers:
            dup = i in seen
            boundary = i == sl.start or (dup != (i - 1 in seen))
            if boundary and i != run_start:
                out.append((Slice(run_start, i), (i - 1) in seen))
                run_start = i
        out.append((Slice(run_start, sl.end), (sl.end - 1) in seen))
        seen.update(sl.layers)
    return out


def build_recipe(model: str, plan: DusPlan, *, method: str = "solar", dtype: str | None = None,
                 projections: tuple[str, ...] = OUTPUT_PROJECTIONS, tokenizer_source: bool = True) -> dict[str, Any]:
    """The mergekit YAML document (as a dict) for ``plan`` on ``model``."""
    slices = []
    for sl, zero in plan_slices(plan, method):
        src: dict[str, Any] = {"model": model, "layer_range": sl.as_list()}
        if zero:
            src["parameters"] = {"scale": [{"filter": p, "value": 0.0} for p in projections] + [{"value": 1.0}]}
        slices.append({"sources": [src]})
    doc: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
    if dtype:
        doc["dtype"] = dtype
    if tokenizer_source:
        doc["tokenizer_source"] = "base"
    return doc


def render_recipe(doc: dict[str, Any], plan: DusPlan, *, method: str, command: list[str] | None = None,
                  notes: list[str] = ()) -> str:
    """YAML text with a comment header that states the arithmetic and the command that made it."""
    p = plan.to_dict()
    head = [
        "# Depth up-scaling (SOLAR, Kim et al. 2023, arXiv:2312.15166) as a stock mergekit passthrough merge.",
        f"# n = {plan.n} base layers" + (f", m = {plan.overlap} dropped per copy" if plan.overlap is not None else "")
        + f" -> s = {plan.s} layers" + (f" = 2({plan.n}-{plan.overlap})" if plan.overlap is not None else ""),
        "# slices (half-open): " + " + ".join(f"[{a}, {b})" for a, b in p["slices"]) + f"; method: {method}",
    ]
    if "params_before" in p:
        head.append(f"# parameters: {human_count(p['params_before'])} -> {human_count(p['params_after'])}")
    if command:
        head.append("# made by: " + " ".join(shlex.quote(c) for c in command))
    head.extend(f"# {n}" for n in notes)
    head.append("# run with: mergekit-yaml THIS.yml OUT/   (or: dus upscale THIS.yml OUT/)")
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
    return "\n".join(head) + "\n" + body
