"""What llama.cpp computes for a model folder where it decides by layer index instead of by the config.

llama.cpp's converter (``convert_hf_to_gguf.py``) copies most of a config into GGUF keys, but some
per-layer choices its loader makes from the layer index or the layer count. A depth-upscaled model
keeps each source layer's settings at a new index, so these rules can pick something else there.
The rules below were read from llama.cpp as vendored in llama-cpp-python 0.3.36 and are checked
end to end by ``benchmarks/gguf_compat.py``:

- Sliding-window layers: the gemma2 / gemma3 loaders take the layer pattern from the GGUF key
  ``{arch}.attention.sliding_window_pattern`` (an array of bools, one per layer) when it is there,
  and otherwise from a period (2 / 6: every period-th layer is global). The converters write only
  the window, so an upscaled model gets the period rule unless the array is added: ``dus gguf-patch``.
- Attention scale: those loaders use 1/sqrt(hidden/heads) when the layer count is exactly 46
  (Gemma 2 27B) or 62 (Gemma 3 27B), and 1/sqrt(head_dim) otherwise. They never read
  ``query_pre_attn_scalar``, and no GGUF key overrides the choice.

Pure functions on config dicts: no torch, no gguf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from dus_plugin.plan import text_config


@dataclass(frozen=True)
class ArchRules:
    """How llama.cpp runs one transformers model type."""

    arch: str
    """``general.architecture`` that llama.cpp's converter writes for it."""
    swa_period: int | None = None
    """The loader's default sliding-window period when the GGUF has no per-layer pattern."""
    big_scale_layers: int | None = None
    """The one layer count at which the loader scales attention by 1/sqrt(hidden/heads)."""


# model_type -> rules, for the families benchmarks/gguf_compat.py has run through llama.cpp
RULES: dict[str, ArchRules] = {
    "llama": ArchRules("llama"),
    "mistral": ArchRules("llama"),
    "qwen2": ArchRules("qwen2"),
    "qwen3": ArchRules("qwen3"),
    "gemma2": ArchRules("gemma2", swa_period=2, big_scale_layers=46),
    "gemma3_text": ArchRules("gemma3", swa_period=6, big_scale_layers=62),
    "gemma3": ArchRules("gemma3", swa_period=6, big_scale_layers=62),
}

CONVERT_COMMAND = "python convert_hf_to_gguf.py {folder} --outfile {gguf}"


def rules_for(config: Mapping[str, Any]) -> ArchRules | None:
    """The llama.cpp rules for a config.json dict; None for a family dus has not run through llama.cpp."""
    return RULES.get(str(config.get("model_type", "")))


def period_pattern(n_layers: int, period: int) -> list[bool]:
    """llama.cpp's sliding-window layers by index: all but every period-th layer."""
    return [i % period < period - 1 for i in range(n_layers)]


def wanted_pattern(config: Mapping[str, Any]) -> list[bool] | None:
    """The sliding-window layers the config's ``layer_types`` ask for; None when it has none."""
    types = text_config(config).get("layer_types")
    if not isinstance(types, list) or "sliding_attention" not in types:
        return None
    return [t == "sliding_attention" for t in types]


def needs_pattern(config: Mapping[str, Any]) -> bool:
    """True when a GGUF of this folder needs its per-layer pattern written in: the loader's period rule disagrees."""
    rules = rules_for(config)
    wanted = wanted_pattern(config)
    return (rules is not None and rules.swa_period is not None and wanted is not None
            and wanted != period_pattern(len(wanted), rules.swa_period))


def scale_mismatch(config: Mapping[str, Any]) -> str | None:
    """Why llama.cpp's attention scale differs from transformers' for this config, or None when it agrees."""
    rules = rules_for(config)
    text = text_config(config)
    scalar = text.get("query_pre_attn_scalar")
    if rules is None or rules.big_scale_layers is None or not scalar:
        return None
    n = text["num_hidden_layers"]
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    head_dim = text.get("head_dim") or hidden // heads
    used = hidden // heads if n == rules.big_scale_layers else head_dim
    if math.isclose(used, scalar):
        return None
    rule = (f"scales attention by 1/sqrt(hidden/heads) = 1/sqrt({used}) because the model has {n} layers"
            if n == rules.big_scale_layers else
            f"scales attention by 1/sqrt(head_dim) = 1/sqrt({used}) unless the model has exactly "
            f"{rules.big_scale_layers} layers")
    return f"llama.cpp's {rules.arch} loader {rule}, but query_pre_attn_scalar is {scalar:g}; no GGUF key changes it"


@dataclass
class LlamaCppCompat:
    """Whether an output folder computes in llama.cpp what it computes in transformers."""

    checked: bool
    """False for families dus has not run through llama.cpp: nothing below is known."""
    needs_patch: bool = False
    """True when `dus gguf-patch` must add the per-layer sliding-window pattern after conversion."""
    mismatch: str | None = None
    """A difference no GGUF key can fix (the attention scale of Gemma 27B-style configs)."""
    overlaps_without_patch: list[int] = field(default_factory=list)
    """Overlaps m that would need no patch (SOLAR plans only)."""
    overlaps_without_mismatch: list[int] = field(default_factory=list)
    """Overlaps m at which the unfixable difference does not arise (SOLAR plans only)."""

    def lines(self, flag: str = "--drop") -> list[str]:
        """One line for each thing a user must know before running this output in llama.cpp."""
        out = []
        if self.mismatch:
            fix = (f"; {flag} {_ranges(self.overlaps_without_mismatch)} would avoid it"
                   if self.overlaps_without_mismatch else "; no overlap m avoids it")
            out.append(f"llama.cpp will compute this model differently from transformers: {self.mismatch}{fix}")
        if self.needs_patch:
            fix = (f"; {flag} {_ranges(self.overlaps_without_patch)} would need no patch"
                   if self.overlaps_without_patch else "")
            out.append("llama.cpp needs `dus gguf-patch FILE.gguf MODEL_DIR` after convert_hf_to_gguf.py: it "
                       "picks sliding-window layers by index, which this layer map moves" + fix)
        return out


def compat(config: Mapping[str, Any]) -> LlamaCppCompat:
    """llama.cpp compatibility of one output config.json dict."""
    if rules_for(config) is None:
        return LlamaCppCompat(checked=False)
    return LlamaCppCompat(checked=True, needs_patch=needs_pattern(config), mismatch=scale_mismatch(config))


def _ranges(values: Sequence[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> '1-3, 7, 9-10' (a short list of the overlaps that work)."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and runs[-1][1] == v - 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def notes_for(base_config: Mapping[str, Any], layer_map: Sequence[int]) -> list[str]:
    """What `dus plan` and `dus upscale` say about running this layer map's output in llama.cpp.

    For a SOLAR map the other overlaps m are tried too, so a line can name the ones that avoid a problem.
    A difference the base itself already has in llama.cpp is not blamed on the upscale.
    """
    from dus_plugin.architecture import num_layers, upscaled_config
    from dus_plugin.plan import recognise, solar_plan

    found = compat(upscaled_config(base_config, layer_map))
    plan = recognise(num_layers(base_config), layer_map)
    if plan.layout == "solar" and (found.needs_patch or found.mismatch):
        others = {k: compat(upscaled_config(base_config, solar_plan(plan.n, k).layer_map))
                  for k in range(1, (plan.n + 1) // 2) if k != plan.m}
        found.overlaps_without_patch = [k for k, c in others.items() if not c.needs_patch]
        found.overlaps_without_mismatch = [k for k, c in others.items() if not c.mismatch]
    base_mismatch = compat(base_config).mismatch
    if found.mismatch and base_mismatch:
        found.mismatch = None
        return found.lines() + [f"llama.cpp computes the base itself differently from transformers ({base_mismatch}), "
                                "and so this output too"]
    return found.lines()
