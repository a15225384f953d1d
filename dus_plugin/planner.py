"""One entry point from a base and plan options to a checked DUS recipe (the CLI and `dus run` share it)."""

from __future__ import annotations

import logging
from pathlib import Path
from dataclasses import dataclass, field
from typing import Literal, Optional

from pydantic import BaseModel as Model
from pydantic import ConfigDict

from dus_plugin.families import TEXT_MODULE
from dus_plugin.errors import BaseModelError, PlanError
from dus_plugin.plan import DusPlan, layer_list_plan, layout_plan, parse_layers
from dus_plugin.source import ResolvedBase

LOG = logging.getLogger(__name__)


class PlanOptions(Model):
    """How to grow the base; each field is a `dus plan` flag and a key under `upscale:` in a run recipe."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    layout: Literal["solar", "interpose", "stack"] = "solar"
    """Where the copies go. solar: [0, n-m) then [m, n); interpose: each of the layers [m, n-m) followed by its copy
    (same depth, no seam); stack: the whole base `repeat` times. docs/reproduction.md compares them."""
    drop: Optional[int] = None
    """Overlap m of the solar and interpose layouts [default: n/4]."""
    repeat: Optional[int] = None
    """g, the copies of the whole base in the stack layout [default: 2]."""
    layers: Optional[str] = None
    """Explicit stacking instead of a layout, e.g. 0:24,8:32."""
    allow_gaps: bool = False
    """Let `layers` leave base layers out (pruning on purpose); without it such a spec is refused."""
    method: Literal["solar", "identity", "average"] = "solar"
    """How the later copy of a duplicated layer starts. solar: a plain copy; identity: its residual-writing
    projections zeroed (the base's function at step 0); average: the mean of base layers i and i+1, then zeroed."""
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None
    """Output dtype [default: the base's]."""
    revision: Optional[str] = None
    """Hub revision of the base."""
    tokenizer_source: Literal["auto", "base", "copy"] = "auto"
    """base: `tokenizer_source: base`; copy: omit it; auto: base unless the base pads its vocabulary."""


@dataclass
class PlannedRecipe:
    base: ResolvedBase
    plan: DusPlan
    doc: dict
    """The mergekit YAML document."""
    notes: list[str] = field(default_factory=list)

    def render(self, method: str, command: list[str] | None = None) -> str:
        from dus_plugin.recipe import render_recipe

        return render_recipe(self.doc, self.plan, method=method, command=command, notes=self.notes)


def make_recipe(base_ref: str, options: PlanOptions) -> PlannedRecipe:
    """Resolve the base, check that its family can be grown by this layer map, and build the recipe."""
    for name in ("drop", "repeat"):  # before the base is read, so a typo costs no model load
        if (value := getattr(options, name)) is not None and value < 1:
            raise PlanError(f"`{name}` must be at least 1 (got {value}); leave it out for the default", setting=name)
    from dus_plugin.llamacpp import notes_for as llama_cpp_notes
    from dus_plugin.modular import stock_modules
    from dus_plugin.recipe import build_recipe
    from dus_plugin.source import base_tensor_names, mergekit_architectures, padded_vocab, resolve_base

    if options.layers is not None and (options.drop is not None or options.repeat is not None
                                       or options.layout != "solar"):
        raise PlanError("`layers` is an alternative to `layout`, `drop` and `repeat`; give one", setting="layers")
    base = resolve_base(base_ref, options.revision)
    arch, names = base.arch, base_tensor_names(base)
    arch.check_scope()
    if names is not None:
        arch.check_tensor_names(names)
    plan = _explicit_plan(arch.n, options) if options.layers else \
        layout_plan(arch.n, options.layout, options.drop, options.repeat)
    arch.check_layers(plan.layer_map)
    plan = plan.with_params(arch.param_count(plan.layer_map))  # counted on the model: any family
    filters: tuple[str, ...] = ()
    if options.method in ("identity", "average"):
        filters = identity_filters(base, names, options.method)
    dtype = options.dtype or base.config.get("dtype") or base.config.get("torch_dtype")
    notes: list[str] = []
    if options.layers is None and options.drop is None and options.layout != "stack" and plan.n % 4:
        notes.append(f"m = n/4 = {plan.n}/4 = {plan.n / 4:g}, rounded down to m = {plan.m} (s = {plan.s}); "
                     "choose another overlap with --drop (upscale.drop in a run recipe)")
    padded = padded_vocab(base) if options.tokenizer_source == "auto" else None
    if padded:
        notes.append(f"tokenizer_source omitted: the base pads its vocabulary to {padded[0]} rows for {padded[1]} "
                     "tokens, and with tokenizer_source mergekit would cut the embeddings to the tokenizer's size")
    if options.method == "average":
        notes.append("method average: mergekit has no per-layer mean, so this recipe runs only with `dus upscale` "
                     "(its streaming engine)")
    modules = None
    if arch.multimodal and options.method != "average":
        modules, why_not = stock_modules(base.config, names)
        notes.append(_multimodal_note(base.architecture, arch.stack.prefix, modules, why_not))
    elif not arch.multimodal and base.architecture not in mergekit_architectures():
        notes.append(f"stock mergekit has no definition of {base.architecture}: run this recipe with "
                     "`dus upscale` (its streaming engine reads the layer stack from transformers)")
    notes += llama_cpp_notes(base.config, plan.layer_map)
    use_source = options.tokenizer_source == "base" or (options.tokenizer_source == "auto" and not padded)
    # a local folder is written absolute, so stock mergekit finds it from any folder (a relative name sends it to the Hub)
    model_ref = str(Path(base_ref).resolve()) if Path(base_ref).is_dir() else base_ref
    doc = build_recipe(model_ref, plan, method=options.method, dtype=dtype, projections=filters,
                       tokenizer_source=use_source, modules=modules)
    return PlannedRecipe(base, plan, doc, notes)


def _multimodal_note(architecture: str, prefix: str, modules: dict[str, int] | None, why_not: str) -> str:
    head = f"{architecture} is multimodal: only its language tower ({prefix}N) grows"
    if modules:
        others = ", ".join(m for m in modules if m != TEXT_MODULE)
        return (f"{head}; the recipe is mergekit's modular form (text_decoder grows; {others} copied whole), so stock "
                "mergekit runs it")
    return f"{head}, and only `dus upscale` runs this recipe ({why_not})"


def _explicit_plan(n: int, options: PlanOptions) -> DusPlan:
    """The plan of a `layers` spec; one that skips a base layer (0:10,12:32) is a typo unless gaps are allowed."""
    layers = parse_layers(options.layers or "")
    plan = layer_list_plan(n, layers)
    missing = sorted(set(range(plan.n)) - set(layers))
    if missing and not options.allow_gaps:
        raise PlanError(f"`layers` {options.layers!r} leaves out base layers {missing[:8]}"
                        f"{'...' if len(missing) > 8 else ''}, so the grown model would lose them; cover every base "
                        "layer, or set `allow_gaps` to prune on purpose", setting="layers")
    return plan


def identity_filters(base: ResolvedBase, names: list[str] | None, method: str = "identity") -> tuple[str, ...]:
    """The residual writers of one layer, as mergekit scale filters."""
    from dus_plugin.architecture import get_path, writer_filters
    from dus_plugin.families import PASS_THROUGH_SETTINGS, POST_NORM, RESIDUAL_MIXERS

    stack = base.arch.stack
    why = POST_NORM.get(base.config.get("model_type", ""))
    why = next((w for key, w in PASS_THROUGH_SETTINGS.items() if get_path(base.config, key)), why)
    mixers = sorted({m for n in names or () for m in RESIDUAL_MIXERS if stack.index(n) is not None and m in n})
    if mixers:
        why = f"its layers rescale or mix the residual stream themselves ({', '.join(mixers)} tensors)"
    if why:
        raise PlanError(f"method {method} cannot make a copy of a {base.architecture} layer the identity: {why}; "
                        "use method solar")
    if names is None:
        raise BaseModelError(f"method {method} needs the base's tensor names, and {base.ref} has no readable "
                             "safetensors here or on the Hub; download the base and plan from its folder")
    filters = writer_filters([n for n in names if stack.index(n) is not None], base.arch.shared_in_stack)
    if not filters:
        raise PlanError(f"method {method}: no tensor of {base.architecture}'s layers is known to write into the "
                        "residual stream, so no copy can be made an identity; use method solar")
    return tuple(filters)
