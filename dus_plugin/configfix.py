"""Per-layer config lists that must follow the layer map.

mergekit sets ``num_hidden_layers`` to s but leaves per-layer lists (``layer_types`` and
friends) at length n. transformers then refuses the config (Qwen2/3, Gemma 2/3), or, worse,
a list extended by index would give output layer i the type of source layer i. The fix: output
layer i takes the entry of its source layer ``layer_map[i]``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

from dus_plugin.errors import PlanError
from dus_plugin.families import KV_SOURCE_KEYS, LAYER_INDEX_KEYS, PER_LAYER_KEYS, TEXT_MODULE

LOG = logging.getLogger(__name__)

def _sub_config(cfg: Any, layers_key: str) -> tuple[Any, str]:
    """The (sub)config object that holds ``layers_key`` (e.g. ``text_config.num_hidden_layers``)."""
    obj = cfg
    *path, last = layers_key.split(".")
    for part in path:
        obj = getattr(obj, part)
    return obj, last


def _by_layer_index(value: Any, n: Any) -> bool:
    """A non-empty mapping whose keys are all layer indices ("0" .. "n-1") and whose values are settings."""
    return (isinstance(value, dict) and bool(value) and isinstance(n, int)
            and all(isinstance(k, str) and k.isdigit() and int(k) < n and isinstance(v, dict) for k, v in value.items()))


def remap_per_layer(cfg: Any, layer_map: Sequence[int], layers_key: str = "num_hidden_layers") -> list[str]:
    """Set the layer count to s and rebuild every per-layer list by the layer map.

    Works on a transformers config object or a plain dict. Returns the keys it changed.
    Per-layer lists are set before the count, since transformers validates the pair together.
    """
    obj, last = _sub_config(cfg, layers_key) if not isinstance(cfg, dict) else (cfg, layers_key)
    get = obj.get if isinstance(obj, dict) else (lambda k, d=None: getattr(obj, k, d))
    n = get(last)
    items = obj.items() if isinstance(obj, dict) else obj.to_dict().items()
    changed: list[str] = []
    updates: dict[str, Any] = {}
    for key, value in list(items):
        if _by_layer_index(value, n):  # {"5": {...}}: settings of single layers, keyed by their index
            updates[key] = {str(i): value[str(s)] for i, s in enumerate(layer_map) if str(s) in value}
            changed.append(key)
            continue
        if not isinstance(value, list):
            continue
        if key in LAYER_INDEX_KEYS:
            src = set(value)
            updates[key] = [i for i, s in enumerate(layer_map) if s in src]
        elif key in KV_SOURCE_KEYS and len(value) == n:
            updates[key] = _kv_sources(key, value, layer_map)
        elif len(value) == n and (key in PER_LAYER_KEYS or "layer" in key):
            updates[key] = [value[s] for s in layer_map]
        else:
            continue
        changed.append(key)
    if isinstance(obj, dict):
        obj.update(updates)
        obj[last] = len(layer_map)
    else:
        # bypass per-attribute validation: the pair is only consistent once both are set
        obj.__dict__.update(updates)
        obj.__dict__[last] = len(layer_map)
        validate = getattr(obj, "validate", None)
        if callable(validate):
            validate()
    if changed:
        LOG.info("rebuilt per-layer config %s by the layer map", ", ".join(changed))
    return changed


def _kv_sources(key: str, value: list[int], layer_map: list[int]) -> list[int]:
    """Each output layer reads the KV cache of the nearest earlier copy of the layer its source reads from."""
    out: list[int] = []
    for i, s in enumerate(layer_map):
        reader = [j for j in range(i + 1) if layer_map[j] == value[s] and (j == i or out[j] == j)]
        if not reader:
            raise PlanError(f"{key}: output layer {i} copies layer {s}, which reads the KV cache of layer {value[s]}, "
                            "and no copy of that layer comes before it; choose a layout that keeps the order")
        out.append(reader[-1])
    return out


def _merge_layer_map(merge_config: Any) -> list[int] | None:
    """Layer map of a slices-based mergekit config (first source of each slice), or of its text_decoder module."""
    slices = getattr(merge_config, "slices", None)
    modules = getattr(merge_config, "modules", None) or {}
    if not slices and TEXT_MODULE in modules:
        slices = modules[TEXT_MODULE].slices
    if not slices:
        return None
    return [i for s in slices for i in range(*s.sources[0].layer_range)]


def _count_key(arch_info: Any) -> str:
    """The config key of the stack that grows: the text_decoder module's in a modular (multimodal) definition."""
    module = arch_info.modules.get(TEXT_MODULE) or next(iter(arch_info.modules.values()))
    return module.architecture.num_layers_config_key()


@contextlib.contextmanager
def mergekit_per_layer_fix() -> Iterator[None]:
    """Within this block, mergekit's output config follows the layer map for per-layer lists."""
    import mergekit.merge as mm

    original = mm._model_out_config

    def fixed(config: Any, arch_info: Any, trust_remote_code: bool = False) -> Any:
        layer_map = _merge_layer_map(config)
        src = config.referenced_models()[0].config(trust_remote_code=trust_remote_code)
        if layer_map is None:
            return original(config, arch_info, trust_remote_code=trust_remote_code)
        key = _count_key(arch_info)
        res = original(config, arch_info, trust_remote_code=trust_remote_code)
        # restore the source's per-layer view, then rebuild both together
        sub_src, last = _sub_config(src, key)
        sub_res, _ = _sub_config(res, key)
        sub_res.__dict__[last] = getattr(sub_src, last)
        remap_per_layer(res, layer_map, key)
        return res

    mm._model_out_config = fixed
    try:
        yield
    finally:
        mm._model_out_config = original
