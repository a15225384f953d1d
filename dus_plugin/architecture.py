"""A base's architecture, read from transformers itself (no mergekit definitions): ``Architecture``, made once
per base and handed down the stages, and the rules it applies.

A DUS plan is a pure copy of tensors, so what it needs to know about a family is small:
where the decoder layers live in the checkpoint (``model.layers.N``, ``transformer.h.N``,
``gpt_neox.layers.N``, ``backbone.layers.N``, ...), which config key holds their count, how the
config describes each layer (so the output config gives layer i its source layer's settings), and
which tensors write into the residual stream (zeroed by the identity method). The model class,
built on the meta device (no memory), answers the first and third; the checkpoint's own tensor
names answer the last, since transformers may rename tensors between file and module.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Mapping, Sequence

from dus_plugin.errors import BaseModelError, PlanError, first_line
from dus_plugin.families import (ATTENTION_WRITER_LEAVES, MULTIMODAL, NOT_DECODER_ONLY, OUT_OF_SCOPE, POSITION_ATTRS,
                                 WRITER_LEAVES)
from dus_plugin.plan import ParamCount
from dus_plugin.tensors import Regroup

LOG = logging.getLogger(__name__)

@dataclass(frozen=True)
class LayerStack:
    """Where a model's decoder layers are, as tensor names and as a config key."""

    prefix: str
    """Tensor-name prefix of layer N, without the index: ``model.layers.``, ``transformer.h.``."""
    count_key: str
    """The config key that holds the layer count (``num_hidden_layers``, ``n_layer``, ``text_config.num_layers``)."""

    def index(self, name: str) -> int | None:
        """The layer a tensor belongs to, or None for a tensor outside the stack."""
        if not name.startswith(self.prefix):
            return None
        head, _, rest = name[len(self.prefix):].partition(".")
        return int(head) if head.isdigit() and rest else None

    def rename(self, name: str, index: int) -> str:
        """The tensor's name in layer ``index``."""
        return f"{self.prefix}{index}.{self.relative(name)}"

    def relative(self, name: str) -> str:
        """The tensor's name inside its layer (``self_attn.o_proj.weight``)."""
        return name[len(self.prefix):].partition(".")[2]

    def to_dict(self) -> dict[str, str]:
        return {"prefix": self.prefix, "count_key": self.count_key}


class Architecture:
    """One base's architecture, resolved once and handed down the stages (as mergekit hands down ``arch_info``).

    Made from the base's config.json. It holds the model transformers builds from it on the meta device (built
    on first need, once) and the grown model of each layer map it is asked about, and answers what planning,
    upscale, stream and verify ask about the family: the layer count and its key, the layer stack, the
    layer-by-layer check of an output, parameter counts, tensors packed per layer, shared tensors and the scope
    refusal. (The trainer finds the stack of its own model with ``find_stack``.)
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        self._grown: dict[tuple[int, ...], Any] = {}

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Architecture":
        """The architecture of a model folder (its config.json), as the trainer hands it down."""
        return cls(json.loads((Path(folder) / "config.json").read_text()))

    @property
    def model_class(self):
        """The class transformers loads this folder with: a causal LM, or the family's image-text-to-text model."""
        return model_class(self.config)

    def layers_of(self, model: Any) -> Any:
        """The decoder-layer list of a loaded model of this architecture (the language tower's, when multimodal)."""
        return model.get_submodule(find_stack(model, self.n, self.multimodal))

    def freeze_outside_language_tower(self, model: Any) -> int:
        """Turn off gradients of the vision tower, projector and every other non-text part of a multimodal model
        (the language tower and the output head keep theirs); returns the parameters frozen."""
        if not self.multimodal:
            return 0
        tower = language_tower(model) + "."
        frozen = 0
        for name, p in model.named_parameters():
            if not name.startswith(tower) and not name.startswith("lm_head.") and p.requires_grad:
                p.requires_grad_(False)
                frozen += p.numel()
        return frozen

    @property
    def name(self) -> str:
        return (self.config.get("architectures") or [self.config.get("model_type", "?")])[0]

    @cached_property
    def count_key(self) -> str:
        return count_key(self.config)

    @cached_property
    def n(self) -> int:
        return num_layers(self.config)

    @cached_property
    def multimodal(self) -> bool:
        """An image-text-to-text model (a vision tower beside a language tower): only the language tower grows."""
        return is_multimodal(self.config)

    @cached_property
    def refusal(self) -> str | None:
        """Why the family is out of scope for DUS, or None."""
        arch = (self.config.get("architectures") or [""])[0]
        if self.multimodal:
            return _tower_refusal(self.config)
        if arch and not arch.endswith(("ForCausalLM", "LMHeadModel")):
            return MULTIMODAL if "ConditionalGeneration" in arch else "not a decoder LM (*ForCausalLM)"
        why = OUT_OF_SCOPE.get(self.config.get("model_type", ""))
        if why:
            return why
        if getattr(config_object(self.config), "is_encoder_decoder", False):
            return NOT_DECODER_ONLY
        return None

    def check_scope(self) -> None:
        if self.refusal:
            raise BaseModelError(f"the base is a {self.name}: {self.refusal}; DUS grows decoder-only LMs")

    @cached_property
    def meta(self):
        """The base built on the meta device."""
        return _build_meta(self.config)

    @cached_property
    def stack_path(self) -> str:
        """The dotted module path of the decoder-layer list (``model.layers``; ``model.language_model.layers`` in a
        multimodal model, where a vision tower may hold a list of the same length)."""
        self.check_scope()
        path = find_stack(self.meta, self.n, self.multimodal)
        second = _second_pass(self.meta, path, self.n)
        if second:
            raise BaseModelError(f"the base is a {self.name}: its {second} run the language tower's layers a second "
                                 "time (the same weights, with per-layer buffers of their own), which DUS does not "
                                 "grow; DUS grows decoder-only LMs with one layer stack")
        return path

    @cached_property
    def tower(self) -> str:
        """The language tower's module path in a multimodal model (``model.language_model``), else ''."""
        return language_tower(self.meta) if self.multimodal else ""

    @property
    def stack(self) -> LayerStack:
        """The stack as the checkpoint's tensors name it (once ``check_tensor_names`` has read them; a multimodal
        checkpoint may keep an older layout, ``language_model.model.layers.N``, that transformers renames at load)."""
        return LayerStack(self._file_prefix or self.stack_path + ".", self.count_key)

    _file_prefix: str | None = None

    def check_tensor_names(self, names: Iterable[str]) -> None:
        """BaseModelError unless the checkpoint's tensors cover exactly the layers the config states."""
        names = list(names)
        self._file_prefix = self._checkpoint_prefix(names)
        found = {self.stack.index(t) for t in names} - {None}
        if found != set(range(self.n)):
            layers = sorted(found)
            covered = f"{len(layers)} layers ({layers[0]}..{layers[-1]})" if layers else "no layer"
            raise BaseModelError(f"the checkpoint's tensors under {self.stack.prefix}N cover {covered}, not the "
                                 f"{self.n} layers the config states; re-save the model with transformers")

    def _checkpoint_prefix(self, names: list[str]) -> str:
        """The prefix under which the files hold layer N: the module path, or else the prefix whose layers are
        numbered 0..n-1 and share the most tensor names with the model's text layers (a vision stack of the
        same depth shares none; transformers may still rename a few inside a layer at load)."""
        module = self.stack_path + "."
        if any(name.startswith(module) for name in names):
            return module
        inner = {k for layer in self.meta.get_submodule(self.stack_path) for k, _ in layer.named_parameters()}
        found: dict[str, tuple[set[int], set[str]]] = {}
        for name in names:
            m = re.match(r"^(.*\.)(\d+)\.(.+)$", name)
            if m:
                entry = found.setdefault(m.group(1), (set(), set()))
                entry[0].add(int(m.group(2)))
                entry[1].add(m.group(3))
        scored = [(len(rel & inner), prefix) for prefix, (idx, rel) in found.items() if idx == set(range(self.n))]
        best = max(scored, default=(0, module))
        if not best[0] and len(scored) == 1:  # the one stack of n layers, in the model's original naming (Mistral)
            return scored[0][1]
        return best[1] if best[0] else module

    @property
    def shared_in_stack(self) -> frozenset[str]:
        """Names of the stack's tensors that the model ties to another name (one module used by several layers)."""
        module, prefix = self.stack_path + ".", self.stack.prefix
        return frozenset(prefix + n[len(module):] for _, names in _names_by_tensor(self.meta) if len(names) > 1
                         for n in names if n.startswith(module))

    def grown(self, layer_map: Sequence[int]):
        """The output of ``layer_map`` built on the meta device (once per layer map)."""
        key = tuple(layer_map)
        if key not in self._grown:
            self._grown[key] = _build_meta(upscaled_config(self.config, key))
        return self._grown[key]

    def check_layers(self, layer_map: Sequence[int]) -> None:
        """PlanError unless every output layer is built exactly as its source layer (on the meta device)."""
        out = self.grown(layer_map)
        src_layers = self.meta.get_submodule(self.stack_path)
        out_layers = out.get_submodule(find_stack(out, len(layer_map), self.multimodal))
        cache: dict[int, list[tuple]] = {}
        for i, s in enumerate(layer_map):
            want = cache.setdefault(s, layer_signature(src_layers[s], self.n))
            got = layer_signature(out_layers[i], len(layer_map))
            if got != want:
                raise PlanError(
                    f"output layer {i} copies base layer {s}, but its config would build it differently "
                    f"({first_difference(got, want)}); {type(self.meta).__name__}'s config cannot express this layer "
                    "map: choose another drop or layer list")
        self._packed(layer_map)  # refuses a shape change outside the stack it cannot regroup
        _check_index_settings(self.config)
        _check_vision_reads(self.config, layer_map)

    def _packed(self, layer_map: Sequence[int]) -> dict[str, tuple[int, int]]:
        return packed_blocks(self.meta, self.grown(layer_map), self.stack_path)

    def packed_per_layer(self, layer_map: Sequence[int]) -> dict[str, Regroup]:
        """Tensors outside the stack packed one block per layer, each as the regrouping ``layer_map`` implies."""
        return {name: Regroup(dim, block, tuple(layer_map)) for name, (dim, block) in self._packed(layer_map).items()}

    def param_count(self, layer_map: Sequence[int]) -> ParamCount:
        """The base's parameters per layer and outside the layers, counted on the model transformers builds.

        A tensor tied or shared between layers (Zamba's shared block) counts once, outside the layers; a tensor
        packed with one block per layer (found by growing ``layer_map``, a map the plan has checked) counts a
        block in each layer."""
        n, packed = self.n, self._packed(layer_map)
        layers, outside = [0] * n, 0
        module = LayerStack(self.stack_path + ".", self.count_key)  # the meta model's own names
        for p, names in _names_by_tensor(self.meta):
            homes = {module.index(name) for name in names}
            if len(homes) == 1 and None not in homes:
                layers[homes.pop()] += p.numel()
            elif names[0] in packed:
                layers = [c + p.numel() // n for c in layers]
            else:
                outside += p.numel()
        return ParamCount(outside, tuple(layers))


def _config_class(model_type: str | None):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not model_type or model_type not in CONFIG_MAPPING:
        return None
    return CONFIG_MAPPING[model_type]


def count_key(config: Mapping[str, Any]) -> str:
    """The key of ``config`` (a config.json dict) that holds the layer count, through the class's attribute map."""
    cls = _config_class(config.get("model_type"))
    key = getattr(cls, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers") if cls else "num_hidden_layers"
    if key in config:
        return key
    for sub in ("text_config", "language_config", "llm_config"):
        if isinstance(config.get(sub), Mapping):
            inner = count_key(config[sub])
            if inner in config[sub]:
                return f"{sub}.{inner}"
    for alias in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if alias in config:
            return alias
    return key


def get_path(config: Mapping[str, Any], dotted: str) -> Any:
    obj: Any = config
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, Mapping) else None
    return obj


def config_object(config: Mapping[str, Any]):
    """A transformers config object for a config.json dict."""
    cls = _config_class(config.get("model_type"))
    if cls is None:
        raise BaseModelError(f"config.json has model_type {config.get('model_type')!r}, which this transformers "
                             "does not know; upgrade transformers or check the folder")
    # config.json keeps inf/NaN as {"__float__": "Infinity"}; from_pretrained decodes them, from_dict does not
    data = cls._decode_special_floats({k: v for k, v in config.items() if k != "model_type"})
    try:
        return cls.from_dict(data)
    except Exception as e:  # transformers validates configs with its own exception types
        raise BaseModelError(f"transformers refuses the base's config.json: {first_line(e)}") from None


def is_multimodal(config: Mapping[str, Any]) -> bool:
    """transformers maps the model type to image-text-to-text and the class is not a plain causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    arch = (config.get("architectures") or [MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(
        config.get("model_type", ""), "")])[0]
    return (config.get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            and not arch.endswith(("ForCausalLM", "LMHeadModel")))


def _tower_refusal(config: Mapping[str, Any]) -> str | None:
    """Why a multimodal family's language tower cannot grow, or None: it must be a decoder-only stack that the
    text config counts."""
    outer = config_object(config)
    text = outer.get_text_config()
    if getattr(outer, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        return "an encoder-decoder multimodal model"
    if getattr(text, "is_decoder", False) and getattr(text, "encoder_hidden_size", None):  # BLIP
        return "an encoder-decoder multimodal model (its text decoder cross-attends to the image in every layer)"
    if text is outer or "." not in count_key(config):
        return "a multimodal model whose config has no separate text config stating the language tower's layers"
    return OUT_OF_SCOPE.get(getattr(text, "model_type", ""))


def language_tower(model: Any) -> str:
    """The module path of a multimodal model's language tower: what ``get_decoder()`` returns."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    path = next((name for name, mod in model.named_modules() if mod is decoder), None) if decoder is not None else None
    if not path:
        raise BaseModelError(f"{type(model).__name__} names no language tower (get_decoder); DUS cannot tell "
                             "which layers are the text stack")
    return path


def model_class(config: Mapping[str, Any]):
    """The class transformers builds for this config (its ``architectures`` entry when known): a causal LM, or
    the image-text-to-text model of a multimodal family."""
    import transformers

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

        mapping = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES if is_multimodal(config) else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        name = mapping.get(config.get("model_type", ""))
        cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise BaseModelError(f"transformers has no causal-LM class for architecture {arch!r}; DUS needs a "
                             "*ForCausalLM decoder")
    return cls


META_BUILDS = 0
"""Models this process has built on the meta device; a test holds one `dus upscale` with verify to two."""


def _build_meta(config: Mapping[str, Any]):
    """The model built from ``config`` on the meta device: the module tree, no memory."""
    global META_BUILDS
    import torch

    cls = model_class(config)
    cfg = config_object(config)
    META_BUILDS += 1
    try:
        with torch.device("meta"):
            return cls(cfg)
    except Exception as e:
        raise BaseModelError(f"transformers cannot build {cls.__name__} from this config: {first_line(e)}") from None


def num_layers(config: Mapping[str, Any]) -> int:
    """n, the layer count (under the key its config class maps num_hidden_layers to), or a PlanError."""
    key = count_key(config)
    n = get_path(config, key)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise PlanError(f"config.json has no usable {key} (got {n!r}); "
                        "DUS needs a decoder LM config that states its layer count")
    return n


def find_stack(model: Any, n: int, multimodal: bool = False) -> str:
    """The dotted module path of the decoder-layer ModuleList of length n (in a multimodal model, the one inside
    its language tower)."""
    import torch

    if multimodal:
        tower = language_tower(model)
        return f"{tower}.{find_stack(model.get_submodule(tower), n)}"
    found = [name for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and name]
    if not found:
        raise BaseModelError(f"{type(model).__name__} has no list of {n} decoder layers; DUS needs a layer stack")
    if len(found) > 1:
        outer = [f for f in found if not any(f != g and f.startswith(g + ".") for g in found)]
        if len(outer) != 1:
            raise BaseModelError(f"{type(model).__name__} has {len(found)} lists of {n} modules ({', '.join(found)}); "
                                 "DUS cannot tell which one is the decoder stack")
        found = outer
    return found[0]


def _second_pass(model: Any, path: str, n: int) -> str | None:
    """Another list of n layers built on the stack's own weights (DiffusionGemma's encoder runs the decoder's
    layers again): its own buffers would stay at n layers while the stack grows."""
    import torch

    owned = {id(p) for p in model.get_submodule(path).parameters()}
    return next((name for name, mod in model.named_modules() if isinstance(mod, torch.nn.ModuleList)
                 and len(mod) == n and name != path and any(id(p) in owned for p in mod.parameters())), None)


def _names_by_tensor(model: Any) -> list[tuple[Any, list[str]]]:
    """Every parameter with all its names in the module tree: several where a tensor is tied or shared."""
    found: dict[int, tuple[Any, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        found.setdefault(id(p), (p, []))[1].append(name)
    return list(found.values())


# --- residual writers (identity method) ------------------------------------------------------

def _is_writer(relative: str) -> bool:
    parts = [p for p in relative.split(".") if not p.isdigit()]
    if parts and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    if not parts:
        return False
    leaf, parents = parts[-1], parts[:-1]
    if leaf in WRITER_LEAVES:
        return True
    if leaf in ATTENTION_WRITER_LEAVES and any("attn" in p or "attention" in p for p in parents):
        return True
    return leaf == "value" and parents[-1:] == ["feed_forward"]  # RWKV's channel mix


def writer_filters(layer_names: Sequence[str], shared: Iterable[str] = ()) -> list[str]:
    """Substring filters (mergekit's ``scale`` filter syntax) that select exactly the residual
    writers among one layer's tensor names (full names, e.g. ``model.layers.3.self_attn.o_proj.weight``).

    The shortest suffix of each writer's path that selects only writers is used, so Llama gets the
    familiar ``o_proj`` / ``down_proj`` and Falcon ``self_attention.dense.``. ``shared``: tensors the model
    ties across layers (Zamba's shared block); zeroing a copy would untie them, so no filter selects them.
    """
    shared = set(shared)
    writers = [nm for nm in layer_names if nm not in shared and
               (_is_writer(_after_index(nm)) or _is_sequential_output(nm, layer_names))]
    parents = {nm.rsplit(".", 2)[0] for nm in writers}
    writers += [nm for nm in layer_names if nm.endswith(".bias") and nm not in writers
                and any((p + ".").startswith(nm[:-len("bias")]) for p in parents)]  # a bias added after a writer (JetMoE)
    others = [nm for nm in layer_names if nm not in writers]
    filters: list[str] = []
    for nm in writers:
        if any(f in nm for f in filters):
            continue
        parts = _after_index(nm).split(".")
        if parts[-1] in ("weight", "bias"):
            parts = parts[:-1]
        for k in range(1, len(parts) + 1):
            cands = [".".join(parts[-k:]), ".".join(parts[-k:]) + "."]
            pick = next((c for c in cands if not any(c in o for o in others)), None)
            if pick:
                filters.append(pick)
                break
        else:
            filters.append(_after_index(nm))
    return filters


def _is_sequential_output(name: str, names: Sequence[str]) -> bool:
    """The last module of a feed-forward nn.Sequential (CTRL's ``ffn.2``)."""
    m = re.match(r"^(.*\.(?:ffn|mlp))\.(\d+)\.(weight|bias)$", name)
    if not m:
        return False
    siblings = [int(k.group(1)) for nm in names if (k := re.match(re.escape(m.group(1)) + r"\.(\d+)\.", nm))]
    return int(m.group(2)) == max(siblings)


def _after_index(name: str) -> str:
    m = re.match(r"^.*?\.(\d+)\.(.+)$", name)
    return m.group(2) if m else name


# --- per-layer config ------------------------------------------------------------------------

def _scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str, type(None))) or (
        isinstance(v, (tuple, list)) and all(isinstance(x, (bool, int, float, str, type(None))) for x in v))


def layer_signature(layer: Any, count: int) -> list[tuple]:
    """What a layer module is, apart from its position: submodule types, parameter and persistent
    buffer shapes, and every scalar setting the module keeps. A list as long as the stack (``count``)
    is the model's per-layer table kept whole in each layer (GPT-Neo); the config check covers it."""
    sig = []
    for name, mod in layer.named_modules():
        attrs = tuple(sorted((k, repr(v)) for k, v in vars(mod).items()
                             if not k.startswith("_") and k not in POSITION_ATTRS and k != "training" and _scalar(v)
                             and not (isinstance(v, (list, tuple)) and len(v) == count)))
        params = tuple((k, tuple(p.shape), str(p.dtype)) for k, p in mod.named_parameters(recurse=False))
        bufs = tuple((k, tuple(b.shape)) for k, b in mod.named_buffers(recurse=False)
                     if k not in getattr(mod, "_non_persistent_buffers_set", ()))
        sig.append((name, type(mod).__name__, attrs, params, bufs))
    return sig


def first_difference(a: list[tuple], b: list[tuple]) -> str:
    """A short phrase naming where two layer signatures differ."""
    for x, y in zip(a, b):
        if x == y:
            continue
        where = x[0] or "the layer"
        if x[0] != y[0] or x[1] != y[1]:
            return f"{x[0] or 'the layer'} is {x[1]} where its source has {y[1]} at {y[0] or 'the layer'}"
        for label, i in (("setting", 2), ("parameter", 3), ("buffer", 4)):
            dx, dy = dict((t[0], t[1:]) for t in x[i]), dict((t[0], t[1:]) for t in y[i])
            for k in sorted(set(dx) | set(dy)):
                if dx.get(k) != dy.get(k):
                    return f"{where}.{k} ({label}) is {_show(dx.get(k))} where its source has {_show(dy.get(k))}"
    if len(a) != len(b):
        return f"it has {len(a)} submodules where its source has {len(b)}"
    return "they differ"


def _show(v: Any) -> str:
    if v is None:
        return "nothing"
    return str(v[0]) if isinstance(v, tuple) and len(v) == 1 else str(v)


def upscaled_config(config: Mapping[str, Any], layer_map: Sequence[int]) -> dict[str, Any]:
    """The output config.json dict: layer count s, every per-layer setting by the layer map.

    A rewrite of the dict alone; ``Architecture.check_layers`` proves that it builds every layer as its source.
    """
    from dus_plugin.configfix import remap_per_layer

    key = count_key(config)
    out = copy.deepcopy(dict(config))
    *path, last = key.split(".")
    holder = out
    for part in path:
        holder = holder[part]
    remap_per_layer(holder, layer_map, last)
    base_holder = config if not path else get_path(config, ".".join(path))
    n = get_path(config, key)
    _sparse_step_as_list(holder, base_holder, n, layer_map)
    _residual_scale(holder, len(layer_map), n)
    _patterns_as_lists(holder, base_holder, n, layer_map)
    return out


def _sparse_step_as_list(out: dict, base: Mapping[str, Any], n: int, layer_map: Sequence[int]) -> None:
    """MoE-every-k-th-layer (``decoder_sparse_step``) follows the index, so a copied layer could change
    kind; the same model is expressed with step 1 and the dense layers listed in ``mlp_only_layers``."""
    step = base.get("decoder_sparse_step")
    if not isinstance(step, int) or step <= 1 or "mlp_only_layers" not in base:
        return
    only = set(base.get("mlp_only_layers") or ())
    dense_src = {i for i in range(n) if (i + 1) % step != 0 or i in only}
    out["decoder_sparse_step"] = 1
    out["mlp_only_layers"] = [i for i, s in enumerate(layer_map) if s in dense_src]


def _residual_scale(out: dict, s: int, n: int) -> None:
    """MiniCPM-style residual scaling (scale_depth / sqrt(num_hidden_layers)) depends on the layer
    count; scale_depth is set so every copied layer keeps its source's factor to the last bit."""
    import math

    depth = out.get("scale_depth")
    if not isinstance(depth, (int, float)) or isinstance(depth, bool) or n == s:
        return
    want = depth / math.sqrt(n)
    x = want * math.sqrt(s)
    for _ in range(64):  # walk by ulps to the value whose quotient rounds back to exactly ``want``
        got = x / math.sqrt(s)
        if got == want:
            break
        x = math.nextafter(x, math.inf if got < want else -math.inf)
    out["scale_depth"] = x


def _patterns_as_lists(out: dict, base: Mapping[str, Any], n: int, layer_map: Sequence[int]) -> None:
    """Settings that describe layers by a repeating pattern, rewritten as one full-length pattern."""
    if isinstance(base.get("attention_types"), list) and isinstance(base.get("attention_layers"), list):
        out["attention_types"] = [[[base["attention_layers"][s] for s in layer_map], 1]]  # GPT-Neo
    end = base.get("moe_layer_end_index")
    if isinstance(end, int) and end == n - 1:
        out["moe_layer_end_index"] = len(layer_map) - 1  # Ernie 4.5: "MoE up to the last layer" stays so
    if isinstance(base.get("block_types"), list) and base["block_types"]:
        types = [base["block_types"][i % len(base["block_types"])] for i in range(n)]
        out["block_types"] = [types[s] for s in layer_map]  # RecurrentGemma cycles this list


def packed_blocks(base, out, stack: str) -> dict[str, tuple[int, int]]:
    """Tensors outside the stack that pack one block per layer: name -> (dimension, block size).

    Gemma 4's per-layer embeddings are [vocab, n x 256] and their projection [n x 256, hidden]; layer i reads
    block i, so an output layer must read its source layer's block."""
    n = len(base.get_submodule(stack))
    s = len(out.get_submodule(stack))
    want = {k: tuple(v.shape) for k, v in base.state_dict().items() if not k.startswith(f"{stack}.")}
    got = {k: tuple(v.shape) for k, v in out.state_dict().items() if not k.startswith(f"{stack}.")}
    packed: dict[str, tuple[int, int]] = {}
    for name in sorted(set(want) & set(got)):
        if want[name] == got[name]:
            continue
        dims = [d for d, (a, b) in enumerate(zip(want[name], got[name])) if a != b]
        d = dims[0] if len(dims) == 1 and len(want[name]) == len(got[name]) else None
        if d is None or want[name][d] % n or got[name][d] != want[name][d] // n * s:
            raise PlanError(f"{name} is outside the layer stack but its shape follows the layer count "
                            f"({list(want[name])} for the base, {list(got[name])} for the output) in a way that is "
                            f"not one block per layer; {type(base).__name__} cannot be depth-upscaled here")
        packed[name] = (d, want[name][d] // n)
    return packed


def _check_index_settings(base_config: Mapping[str, Any]) -> None:
    """Settings that change behaviour by layer index at run time, where no layer module shows it."""
    if get_path(base_config, "scale_attn_by_inverse_layer_idx"):
        raise PlanError("scale_attn_by_inverse_layer_idx is set: attention is scaled by 1/(layer index + 1) at run "
                        "time, so a copied layer would compute differently at its new depth; DUS cannot preserve it")


def _check_vision_reads(config: Mapping[str, Any], layer_map: Sequence[int]) -> None:
    """Vision settings that name text layers by index: the image features they add must reach the same layers,
    so each named layer must stay where it is (the solar layout keeps the first n - m)."""
    for setting, layers in _vision_text_layers(config):
        moved = [i for i in layers if i >= len(layer_map) or layer_map[i] != i]
        if moved:
            named = f"{layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)
            raise PlanError(f"{setting} feeds image features into text layers {named} by index, and this layer map "
                            f"puts base layers {[layer_map[i] if i < len(layer_map) else None for i in moved]} at "
                            f"{moved}; keep those base layers in place (the solar layout does)")


def _vision_text_layers(config: Mapping[str, Any]) -> list[tuple[str, list[int]]]:
    """(setting, text layers it feeds). Qwen3-VL adds one deepstack feature per deepstack_visual_indexes entry
    after text layers 0..k-1; Granite 4 Vision names its deepstack targets as (vision, text) layer pairs, and its
    spatial targets as a list."""
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), Mapping) else {}
    found = [("vision_config.deepstack_visual_indexes", list(range(len(vision.get("deepstack_visual_indexes") or ()))))]
    if isinstance(config.get("deepstack_layer_map"), list):
        found.append(("deepstack_layer_map", [int(text) for _, text in config["deepstack_layer_map"]]))
        found.append(("spatial_target_layers", [int(i) for i in config.get("spatial_target_layers") or ()]))
    return [(setting, sorted(layers)) for setting, layers in found if layers]
