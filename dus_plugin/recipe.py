"""Recipes: the stock mergekit passthrough YAML that a DUS plan becomes, and its strict loader.

mergekit's own schema is permissive (it drops a misspelled key, accepts a reversed range);
``load_recipe`` validates strictly first and names the field in every error.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel as Model
from pydantic import ConfigDict, ValidationError, field_validator, model_validator

from dus_plugin.errors import RecipeError
from dus_plugin.families import TEXT_MODULE
from dus_plugin.io import read_yaml_mapping
from dus_plugin.plan import DusPlan, Slice, human_count
from dus_plugin.validation import first_error

METHODS = ("solar", "identity", "average")
# dus's own merge method for `method: average`: mergekit has no per-layer mean in passthrough, and refuses
# a merge method it does not know, so a recipe that needs dus's engine never runs half-right in mergekit.
AVERAGE_METHOD = "dus_average"
# The projections that write into the residual stream; zeroing them makes a layer the identity.
OUTPUT_PROJECTIONS = ("o_proj", "down_proj")


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
    """One run of output layers. With two sources (merge_method dus_average), output layer j of the run is the
    element-wise mean of the two sources' j-th layers, then scaled by the first source's filters."""

    model_config = ConfigDict(extra="forbid")
    sources: list[Source]

    @field_validator("sources")
    @classmethod
    def _one_or_two_sources(cls, v: list[Source]) -> list[Source]:
        if len(v) not in (1, 2):
            raise ValueError(f"a DUS slice has one source (a copy) or two (their mean), got {len(v)}")
        if len(v) == 2:
            (a, b), (c, d) = v[0].layer_range, v[1].layer_range
            if (c, d) != (a + 1, b + 1) or v[1].parameters:
                raise ValueError(f"a mean of two sources takes layer i with layer i + 1: after layer_range {[a, b]} "
                                 f"the second source is [{a + 1}, {b + 1}] without parameters, got {[c, d]}")
        return v


class TextModule(Model):
    model_config = ConfigDict(extra="forbid")
    slices: list[SliceSpec]


class Modules(Model):
    """A multimodal recipe's modules (mergekit's modular form): the language tower grows, every other module (the
    vision tower, the projector) is copied whole."""

    model_config = ConfigDict(extra="allow")
    text_decoder: TextModule

    @model_validator(mode="after")
    def _others_copied_whole(self) -> Modules:
        for name, module in (self.model_extra or {}).items():
            slices = module.get("slices") if isinstance(module, dict) else None
            sources = slices[0].get("sources") if isinstance(slices, list) and len(slices) == 1 and \
                isinstance(slices[0], dict) else None
            src = sources[0] if isinstance(sources, list) and len(sources) == 1 and isinstance(sources[0], dict) \
                else {}
            rng = src.get("layer_range")
            if set(src) != {"model", "layer_range"} or not (isinstance(rng, list) and len(rng) == 2 and rng[0] == 0):
                raise ValueError(f"module {name}: dus grows only text_decoder; every other module is one slice of "
                                 "one source with layer_range [0, its layer count] and no parameters")
        return self

    def copied_models(self) -> set[str]:
        return {m["slices"][0]["sources"][0]["model"] for m in (self.model_extra or {}).values()}


class Recipe(Model):
    """The subset of mergekit's schema that a DUS recipe uses, validated strictly."""

    model_config = ConfigDict(extra="forbid")
    merge_method: Literal["passthrough", "dus_average"]
    slices: Optional[list[SliceSpec]] = None
    """The layer stack of a text model."""
    modules: Optional[Modules] = None
    """A multimodal model's modules, mergekit's modular form: text_decoder's slices grow."""
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None
    out_dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None
    tokenizer_source: Optional[str] = None
    base_model: Optional[str] = None
    chat_template: Optional[str] = None
    name: Optional[str] = None

    @model_validator(mode="after")
    def _one_stack_of_one_model(self) -> Recipe:
        if (self.slices is None) == (self.modules is None):
            raise ValueError("give slices (a text model's layer stack) or modules (a multimodal model's), one of them")
        if not self.text_slices:
            raise ValueError("needs at least one slice")
        models = {src.model for s in self.text_slices for src in s.sources}
        models |= self.modules.copied_models() if self.modules else set()
        if len(models) != 1:
            raise ValueError(f"all slices of a DUS recipe take the same model, got {sorted(models)}")
        return self

    @property
    def text_slices(self) -> list[SliceSpec]:
        """The slices of the stack that grows: the recipe's, or its text_decoder module's."""
        return self.slices if self.slices is not None else self.modules.text_decoder.slices  # type: ignore[union-attr]

    @model_validator(mode="after")
    def _means_need_dus_average(self) -> Recipe:
        two = next((k for k, s in enumerate(self.text_slices) if len(s.sources) == 2), None)
        if two is not None and self.merge_method != AVERAGE_METHOD:
            raise ValueError(f"slices[{two}] has two sources, a mean, which only merge_method {AVERAGE_METHOD} "
                             "(run by `dus upscale`) computes")
        return self

    @property
    def model(self) -> str:
        return self.text_slices[0].sources[0].model

    @property
    def layer_ranges(self) -> list[tuple[int, int]]:
        return [s.sources[0].layer_range for s in self.text_slices]

    @property
    def layer_map(self) -> list[int]:
        return [i for a, b in self.layer_ranges for i in range(a, b)]

    def averaged_outputs(self) -> dict[int, int]:
        """Output layer -> the base layer averaged into it, besides its source (method average)."""
        out: dict[int, int] = {}
        i = 0
        for s in self.text_slices:
            first = s.sources[0].layer_range
            for k in range(first[1] - first[0]):
                if len(s.sources) == 2:
                    out[i] = s.sources[1].layer_range[0] + k
                i += 1
        return out

    def zeroed_outputs(self) -> dict[int, list[str]]:
        """Output layer -> name filters whose tensors this recipe scales to 0 (identity method)."""
        out: dict[int, list[str]] = {}
        i = 0
        for s in self.text_slices:
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
        raise RecipeError(first_error(e, where, "unknown key (misspelled?); DUS recipes accept merge_method, slices "
                                                "(or modules), dtype, out_dtype, tokenizer_source, base_model, "
                                                "chat_template, name")) from None


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


@dataclass(frozen=True)
class PlannedSlice:
    """A run of output layers copied from consecutive base layers, all treated alike."""

    layers: Slice
    zero: bool = False
    """Zero the residual writers: each layer is a later occurrence of its source (identity, average)."""
    average: bool = False
    """Average each layer i with base layer i + 1 before zeroing (average)."""


def plan_slices(plan: DusPlan, method: str) -> list[PlannedSlice]:
    """The plan's runs, split where the method treats layers differently.

    In every duplicated pair the later occurrence in output order is the one changed: identity zeroes
    its residual writers (LLaMA Pro), average first replaces it with the mean of base layers i and i + 1
    (layer i alone for the last layer, OpT-DeUS's averaging baseline), so both start as the base's function.
    """
    if method not in METHODS:
        raise RecipeError(f"`method` {method!r} is unknown; choose one of {', '.join(METHODS)}", setting="method")
    runs: list[PlannedSlice] = []
    later = set(plan.duplicated_outputs) if method != "solar" else set()
    for i, src in enumerate(plan.layer_map):
        zero = i in later
        average = zero and method == "average" and src + 1 < plan.n
        last = runs[-1] if runs else None
        if last and last.layers.end == src and (last.zero, last.average) == (zero, average):
            runs[-1] = PlannedSlice(Slice(last.layers.start, src + 1), zero, average)
        else:
            runs.append(PlannedSlice(Slice(src, src + 1), zero, average))
    return runs


def build_recipe(model: str, plan: DusPlan, *, method: str = "solar", dtype: str | None = None,
                 projections: tuple[str, ...] = OUTPUT_PROJECTIONS, tokenizer_source: bool = True,
                 modules: dict[str, int] | None = None) -> dict[str, Any]:
    """The mergekit YAML document (as a dict) for ``plan`` on ``model``; method average needs dus's engine.
    ``modules`` (module -> layer count, a multimodal base that stock mergekit defines): the modular form, the text
    stack under text_decoder and every other module copied whole."""
    slices = []
    for run in plan_slices(plan, method):
        src: dict[str, Any] = {"model": model, "layer_range": run.layers.as_list()}
        if run.zero:
            src["parameters"] = {"scale": [{"filter": p, "value": 0.0} for p in projections] + [{"value": 1.0}]}
        sources = [src]
        if run.average:
            sources.append({"model": model, "layer_range": [run.layers.start + 1, run.layers.end + 1]})
        slices.append({"sources": sources})
    doc: dict[str, Any] = {"merge_method": AVERAGE_METHOD if method == "average" else "passthrough", "slices": slices}
    if modules:
        doc.pop("slices")
        doc["modules"] = {name: {"slices": slices} if name == TEXT_MODULE else
                          {"slices": [{"sources": [{"model": model, "layer_range": [0, count]}]}]}
                          for name, count in modules.items()}
    if dtype:
        doc["dtype"] = dtype
    if tokenizer_source:
        doc["tokenizer_source"] = "base"
    return doc


def render_recipe(doc: dict[str, Any], plan: DusPlan, *, method: str, command: list[str] | None = None,
                  notes: list[str] = ()) -> str:
    """YAML text with a comment header that states the arithmetic and the command that made it."""
    p = plan.to_dict()
    stock = doc["merge_method"] == "passthrough"
    head = [
        "# Depth up-scaling (SOLAR, Kim et al. 2023, arXiv:2312.15166) "
        + ("as a stock mergekit passthrough merge." if stock else
           f"with dus's {AVERAGE_METHOD} merge: mergekit cannot average layers, run it with `dus upscale`."),
        f"# layout {plan.layout}: {layout_arithmetic(plan)}",
        "# slices (half-open): " + " + ".join(f"[{a}, {b})" for a, b in p["slices"]) + f"; method: {method}",
    ]
    if "params_before" in p:
        head.append(f"# parameters: {human_count(p['params_before'])} -> {human_count(p['params_after'])}")
    if command:
        head.append("# made by: " + " ".join(shlex.quote(c) for c in command))
    head.extend(f"# {n}" for n in notes)
    head.append("# run with: mergekit-yaml THIS.yml OUT/   (or: dus upscale THIS.yml OUT/)" if stock else
                "# run with: dus upscale THIS.yml OUT/")
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
    return "\n".join(head) + "\n" + body


def layout_arithmetic(plan: DusPlan) -> str:
    """n, m (or g) and s, as the layout computes them."""
    n, m, s = plan.n, plan.m, plan.s
    if plan.layout == "solar":
        return f"n = {n} base layers, m = {m} dropped per copy -> s = 2({n}-{m}) = {s} layers"
    if plan.layout == "interpose":
        return f"n = {n} base layers, layers [{m}, {n - m}) each followed by its copy -> s = 2({n}-{m}) = {s} layers"
    if plan.layout == "stack":
        return f"n = {n} base layers, the whole base {plan.repeat} times -> s = {s} layers"
    return f"n = {n} base layers -> s = {s} layers (explicit layer list)"
