"""Stock mergekit's modular definitions of multimodal models (Gemma 3, Qwen2.5-VL, Qwen3-VL, Mistral 3, Llama 4):
whether one names exactly a checkpoint's tensors, and the size of each of its modules.

mergekit 0.1.5 writes only the tensors its definition names. A checkpoint whose layout differs from the one the
definition was written for (transformers 5 saves Gemma 3's vision tower without `vision_model.`) would lose
tensors, so a `modules:` recipe is written only where every tensor of the checkpoint is named and every named
one is there.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from dus_plugin.architecture import get_path
from dus_plugin.families import TEXT_MODULE
from dus_plugin.source import mergekit_architectures


def module_layers(definition: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, int] | None:
    """Each module's layer count under ``config``; None where the definition cannot count one (a key the config
    no longer has, as Qwen2-VL's top-level num_hidden_layers under transformers 5)."""
    out = {}
    for name, module in definition["modules"].items():
        arch = module["architecture"]
        count = arch.get("override_num_layers")
        if count is None:
            count = get_path(config, arch.get("num_layers_config_key", "num_hidden_layers"))
        if not isinstance(count, int):
            return None
        out[name] = count
    return out


def expected_names(definition: Mapping[str, Any], layers: Mapping[str, int]) -> tuple[set[str], set[str]]:
    """The tensor names the definition reads: (required, optional), each with its module's prefix."""
    required, optional = set(), set()
    for name, module in definition["modules"].items():
        prefix, arch = module.get("weight_prefix") or "", module["architecture"]
        weights = list(arch.get("pre_weights", [])) + list(arch.get("post_weights", []))
        for i in range(layers[name]):
            weights += [{**w, "name": w["name"].replace("${layer_index}", str(i))}
                        for w in arch.get("layer_templates", {}).get("weights", [])]
        for w in weights:
            (optional if w.get("optional") else required).add(prefix + w["name"])
            optional.update(prefix + t for t in w.get("tied_names") or ())
    return required, optional


def stock_modules(config: Mapping[str, Any], names: Iterable[str] | None) -> tuple[dict[str, int] | None, str]:
    """(module -> layer count, "") when stock mergekit's modular definition of this base names exactly its
    tensors; else (None, why not)."""
    arch_name = (config.get("architectures") or [None])[0]
    definition = mergekit_architectures().get(arch_name)
    if not definition or definition.get("kind") != "modular" or TEXT_MODULE not in definition.get("modules", {}):
        return None, f"stock mergekit has no modular definition of {arch_name}"
    layers = module_layers(definition, config)
    if layers is None:
        return None, f"stock mergekit's definition of {arch_name} cannot count its layers in this config"
    if names is None:
        return None, "the base's tensor names are not readable here"
    have = set(names)
    required, optional = expected_names(definition, layers)
    if missing := sorted(required - have):
        return None, f"stock mergekit's definition of {arch_name} reads {missing[0]}, which this checkpoint lacks"
    if unread := sorted(have - required - optional):
        return None, f"stock mergekit's definition of {arch_name} leaves out {unread[0]}, which it would drop"
    return layers, ""
