"""The zoo test's independent checks: plain transformers and safetensors, none of dus's own comparisons."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

IDS = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))


def load_clean(folder: Path, auto_class=None):
    """The model, refusing any missing, unexpected or mismatched key."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if auto_class is None:  # a text model transformers maps to image-text-to-text only (Mistral 4) loads from there
        text = json.loads((Path(folder) / "config.json").read_text())["model_type"] in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        auto_class = AutoModelForCausalLM if text else AutoModelForImageTextToText
    model, info = auto_class.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    assert not bad, bad
    return in_own_memory(model).eval()


def in_own_memory(model):
    """The model with every tensor copied out of the file it was mapped from. transformers maps float32 tensors
    straight from the safetensors file, so their addresses keep the file's byte offsets; on an AVX2 CPU the matmul
    kernels pick their code path by alignment, which makes the same weights round differently in the last bit (seen
    with an image in the prompt: 1.2e-7 between the base and its identity upscale, equal once copied)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def blocks_by_map(t, shape, n: int, layer_map: list[int]):
    """A tensor that packs one block per base layer (of n) along the dimension where ``shape`` differs, with its
    blocks taken in layer-map order."""
    dim = next(d for d in range(t.dim()) if shape[d] != t.shape[d])
    block = t.shape[dim] // n
    return torch.cat([t.narrow(dim, s * block, block) for s in layer_map], dim)


def stacked_reference(base, out_config, prefix: str, layer_map: list[int], out=None):
    """The base's own layer modules, stacked by the layer map, under the upscaled config: each copy
    keeps the module its source layer was built as; its position attributes follow its new index.
    A tensor outside the stack that packs one block per layer (shaped otherwise in ``out``) gets its blocks
    by the map."""
    ref = copy.deepcopy(base)
    path = prefix.rstrip(".")
    layers = ref.get_submodule(path)
    for name, p in ref.named_parameters():
        shape = out.get_parameter(name).shape if out is not None and not name.startswith(prefix) else p.shape
        if shape != p.shape:
            p.data = blocks_by_map(p.data, shape, len(layers), layer_map)
    new = torch.nn.ModuleList([copy.deepcopy(layers[s]) for s in layer_map])
    for i, layer in enumerate(new):
        for mod in layer.modules():
            for attr in ("layer_idx", "layer_id", "layer_index"):
                if isinstance(getattr(mod, attr, None), int):
                    setattr(mod, attr, i)
    parent_path, _, leaf = path.rpartition(".")
    setattr(ref.get_submodule(parent_path) if parent_path else ref, leaf, new)
    text = out_config.get_text_config() if hasattr(out_config, "get_text_config") else out_config
    swaps = {type(out_config): out_config, type(text): text}  # a multimodal tower holds its own text config
    for mod in ref.modules():
        if getattr(mod, "config", None) is not None and type(mod.config) in swaps:
            mod.config = swaps[type(mod.config)]
        if isinstance(getattr(mod, "cross_attention_layers", None), list):  # mllama keeps its own copy of the list
            mod.cross_attention_layers = text.cross_attention_layers
        if isinstance(getattr(mod, "rope_types", None), list) and len(mod.rope_types) == len(layers):
            mod.rope_types = [mod.rope_types[s] for s in layer_map]  # Molmo 2's per-layer rotary kinds, built once
    return ref.eval()


def tensors_follow_map(out: Path, base: Path, prefix: str, layer_map: list[int], zeroed: set[str]) -> None:
    """Every output tensor equals its source (or is zero where the identity method zeroes it)."""
    from safetensors.torch import load_file

    def read(folder):
        d = {}
        for f in sorted(folder.glob("*.safetensors")):
            d.update(load_file(f))
        return d

    got, src = read(out), read(base)

    def source(name):
        if not name.startswith(prefix):
            return name
        i, _, rest = name[len(prefix):].partition(".")
        return f"{prefix}{layer_map[int(i)]}.{rest}"

    expected = {n for n in src if not n.startswith(prefix)} | {
        f"{prefix}{i}.{n[len(prefix):].partition('.')[2]}" for i, s in enumerate(layer_map)
        for n in src if n.startswith(f"{prefix}{s}.")}
    assert set(got) == expected, sorted(set(got) ^ expected)[:5]
    n = 1 + max(int(k[len(prefix):].partition(".")[0]) for k in src if k.startswith(prefix))
    for name, t in got.items():
        want = src[source(name)]
        if t.shape != want.shape and not name.startswith(prefix):  # one block per layer (Gemma 4): by the map
            want = blocks_by_map(want, t.shape, n, layer_map)
        if name in zeroed:
            assert torch.count_nonzero(t) == 0, name
        else:
            assert torch.equal(t, want), name


def per_layer_lists_follow_map(out: Path, base: Path, layer_map: list[int], sub: str | None = None) -> None:
    """Every per-layer list of the config (of its ``sub`` config, e.g. a multimodal model's text_config)."""
    cfg, base_cfg = (json.loads((f / "config.json").read_text()) for f in (out, base))
    if sub:
        cfg, base_cfg = cfg[sub], base_cfg[sub]
    n = len(set(layer_map)) if max(layer_map) + 1 == len(set(layer_map)) else max(layer_map) + 1
    from dus_plugin.families import KV_SOURCE_KEYS, LAYER_INDEX_KEYS

    for key, value in base_cfg.items():
        if key in KV_SOURCE_KEYS:  # each copy reads an earlier (or its own) cache of its source's KV layer
            assert all(j <= i and layer_map[j] == value[s] and cfg[key][j] == j
                       for i, (s, j) in enumerate(zip(layer_map, cfg[key]))), key
            continue
        if key == "mlp_only_layers" and (base_cfg.get("decoder_sparse_step") or 1) > 1:
            continue  # rewritten as step 1 plus an explicit list; the stacked-reference logits check it
        if key in LAYER_INDEX_KEYS and isinstance(value, list):
            assert cfg[key] == [i for i, s in enumerate(layer_map) if s in set(value)], key
        elif isinstance(value, list) and len(value) == n and "layer" in key:
            assert cfg[key] == [value[s] for s in layer_map], key
