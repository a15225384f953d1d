"""The decoder-layer stack of a model, read from transformers itself (no mergekit definitions).

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
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from dus_plugin.errors import BaseModelError, PlanError
from dus_plugin.plan import ParamCount
from dus_plugin.tensors import Regroup

LOG = logging.getLogger(__name__)

# Families outside the scope of DUS, with the reason a user is told (model_type -> reason).
NOT_DECODER_ONLY = "an encoder (BERT-style) or encoder-decoder model, not a decoder-only LM"
MULTIMODAL = "a multimodal wrapper; upscale its text model (the *ForCausalLM of its text config) instead"

# model_type -> why dus refuses it (out of scope for depth up-scaling).
OUT_OF_SCOPE: dict[str, str] = {
    **{t: NOT_DECODER_ONLY for t in (
        "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus", "plbart",
        "prophetnet", "trocr", "whisper", "musicgen", "musicgen_melody", "bert", "bert-generation", "big_bird",
        "camembert", "data2vec-text", "electra", "ernie", "megatron-bert", "rembert", "roc_bert", "roformer",
        "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "xmod", "xlm", "xlnet", "reformer")},
    **{t: MULTIMODAL for t in (
        "blt", "fuyu", "gemma3", "gemma3n", "gemma4", "gemma4_unified", "git", "got_ocr2", "emu3", "mllama",
        "phi4_multimodal", "qwen3_5", "qwen3_5_moe", "qwen4_exp", "dots3_note", "moss_transcribe_diarize", "moshi",
        "llama4", "gemma4_assistant", "gemma4_unified_assistant")},
}


# Attributes a layer module keeps that name its own position; they differ between a copy and its
# source by design (the KV-cache slot), so they are left out when layers are compared.
POSITION_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "layer_num", "idx",
                            "block_idx", "block_id"})
# Leaf names of projections that add into the residual stream, across the families of transformers.
WRITER_LEAVES = frozenset({"o_proj", "down_proj", "out_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "wo", "Wo",
                           "wo_b", "linear_out", "fc_out", "output_proj", "output_linear", "attention_out", "w_out",
                           "o_proj_bias", "down_proj_bias", "per_layer_projection"})
# Tensor names that show a layer scaling or mixing the residual stream itself (learned residual scales,
# hyper-connections): zeroing its output projections does not make such a layer the identity.
RESIDUAL_MIXERS = ("residual_scale", "residual_bias", "hc_attn_", "hc_ffn_")
# Config settings whose layers pass their input into the residual stream through no weight (LongCat-Flash's
# zero-computation experts return the token they are routed): no zeroed projection silences them.
PASS_THROUGH_SETTINGS = {"zero_expert_num": "its MoE routes tokens to zero-computation experts that return their "
                                            "input (zero_expert_num), which no weight can silence"}
# Families whose layers normalise the residual stream after adding to it (post-LayerNorm).
POST_NORM = {"openai-gpt": "each layer applies LayerNorm to the residual stream after adding to it (post-LN)"}
# Leaf names that are residual writers only inside an attention or recurrent-mixing block.
ATTENTION_WRITER_LEAVES = frozenset({"dense", "output"})


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
        raise BaseModelError(f"transformers refuses the base's config.json: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def model_class(config: Mapping[str, Any]):
    """The causal-LM class transformers builds for this config (its ``architectures`` entry when known)."""
    import transformers

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type", ""))
        cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise BaseModelError(f"transformers has no causal-LM class for architecture {arch!r}; DUS needs a "
                             "*ForCausalLM decoder")
    return cls


def meta_model(config: Mapping[str, Any]):
    """The model built from ``config`` on the meta device: the module tree, no memory."""
    import torch

    cls = model_class(config)
    cfg = config_object(config)
    try:
        with torch.device("meta"):
            return cls(cfg)
    except Exception as e:
        raise BaseModelError(f"transformers cannot build {cls.__name__} from this config: {_first_line(e)}") from None


def scope_refusal(config: Mapping[str, Any]) -> str | None:
    """Why a family is out of scope for DUS, or None."""
    arch = (config.get("architectures") or [""])[0]
    if arch and not arch.endswith(("ForCausalLM", "LMHeadModel")):
        return MULTIMODAL if "ConditionalGeneration" in arch else "not a decoder LM (*ForCausalLM)"
    why = OUT_OF_SCOPE.get(config.get("model_type", ""))
    if why:
        return why
    if getattr(config_object(config), "is_encoder_decoder", False):
        return NOT_DECODER_ONLY
    return None


def find_stack(model: Any, n: int) -> str:
    """The dotted module path of the decoder-layer ModuleList of length n."""
    import torch

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


def param_count(config: Mapping[str, Any], layer_map: Sequence[int]) -> ParamCount:
    """The base's parameters per layer and outside the layers, counted on the model transformers builds (on the
    meta device). A tensor tied or shared between layers (Zamba's shared block) counts once, outside the layers;
    a tensor packed with one block per layer (found by building the output of ``layer_map``, a map the plan has
    checked) counts a block in each layer."""
    from dus_plugin.plan import num_layers

    n = num_layers(config)
    model = meta_model(config)
    path = find_stack(model, n)
    stack = LayerStack(path + ".", count_key(config))
    packed = _grown_blocks(model, path, config, layer_map)
    layers, outside = [0] * n, 0
    for p, names in _names_by_tensor(model):
        homes = {stack.index(name) for name in names}
        if len(homes) == 1 and None not in homes:
            layers[homes.pop()] += p.numel()
        elif names[0] in packed:
            layers = [c + p.numel() // n for c in layers]
        else:
            outside += p.numel()
    return ParamCount(outside, tuple(layers))


def _names_by_tensor(model: Any) -> list[tuple[Any, list[str]]]:
    """Every parameter with all its names in the module tree: several where a tensor is tied or shared."""
    found: dict[int, tuple[Any, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        found.setdefault(id(p), (p, []))[1].append(name)
    return list(found.values())


def layer_stack(config: Mapping[str, Any], tensor_names: Iterable[str] | None = None) -> LayerStack:
    """The base's layer stack, checked against its checkpoint's tensor names when given."""
    from dus_plugin.plan import num_layers

    why = scope_refusal(config)
    if why:
        arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
        raise BaseModelError(f"the base is a {arch}: {why}; DUS grows decoder-only LMs")
    n = num_layers(config)
    model = meta_model(config)
    stack = LayerStack(find_stack(model, n) + ".", count_key(config))
    if tensor_names is not None:
        found = {stack.index(t) for t in tensor_names} - {None}
        if found != set(range(n)):
            layers = sorted(found)
            covered = f"{len(layers)} layers ({layers[0]}..{layers[-1]})" if layers else "no layer"
            raise BaseModelError(f"the checkpoint's tensors under {stack.prefix}N cover {covered}, not the {n} layers "
                                 "the config states; re-save the model with transformers")
    return stack


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


def shared_in_stack(config: Mapping[str, Any]) -> set[str]:
    """Names of the stack's tensors that the model ties to another name (one module used by several layers)."""
    from dus_plugin.plan import num_layers

    model = meta_model(config)
    stack = find_stack(model, num_layers(config)) + "."
    return {n for _, names in _names_by_tensor(model) if len(names) > 1 for n in names if n.startswith(stack)}


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


def upscaled_config(config: Mapping[str, Any], layer_map: Sequence[int], check: bool = True) -> dict[str, Any]:
    """The output config.json dict: layer count s, every per-layer setting by the layer map.

    With ``check``, both models are built on the meta device and every output layer is compared
    with its source layer; a layer the config cannot express raises PlanError naming it.
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
    if check:
        check_layers(config, out, layer_map)
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


def check_layers(base_config: Mapping[str, Any], out_config: Mapping[str, Any], layer_map: Sequence[int]) -> None:
    """PlanError unless every output layer is built exactly as its source layer (on the meta device)."""
    from dus_plugin.plan import num_layers

    n = num_layers(base_config)
    base, out = meta_model(base_config), meta_model(out_config)
    src_layers = base.get_submodule(find_stack(base, n))
    out_layers = out.get_submodule(find_stack(out, len(layer_map)))
    cache: dict[int, list[tuple]] = {}
    for i, s in enumerate(layer_map):
        want = cache.setdefault(s, layer_signature(src_layers[s], n))
        got = layer_signature(out_layers[i], len(layer_map))
        if got != want:
            raise PlanError(
                f"output layer {i} copies base layer {s}, but its config would build it differently "
                f"({first_difference(got, want)}); {type(base).__name__}'s config cannot express this layer map: "
                "choose another drop or layer list")
    packed_blocks(base, out, find_stack(base, n))  # refuses a shape change outside the stack it cannot regroup
    _check_index_settings(base_config)


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


def packed_per_layer(config: Mapping[str, Any], layer_map: Sequence[int]) -> dict[str, Regroup]:
    """``packed_blocks`` for a base config and a layer map (both models built on the meta device), each as the
    regrouping of its blocks that the layer map implies."""
    from dus_plugin.plan import num_layers

    base = meta_model(config)
    blocks = _grown_blocks(base, find_stack(base, num_layers(config)), config, layer_map)
    return {name: Regroup(dim, block, tuple(layer_map)) for name, (dim, block) in blocks.items()}


def _grown_blocks(base: Any, stack: str, config: Mapping[str, Any],
                  layer_map: Sequence[int]) -> dict[str, tuple[int, int]]:
    """``packed_blocks`` of ``base`` (built from ``config``, its stack at ``stack``) against the output it grows to."""
    return packed_blocks(base, meta_model(upscaled_config(config, layer_map, check=False)), stack)


def _check_index_settings(base_config: Mapping[str, Any]) -> None:
    """Settings that change behaviour by layer index at run time, where no layer module shows it."""
    if get_path(base_config, "scale_attn_by_inverse_layer_idx"):
        raise PlanError("scale_attn_by_inverse_layer_idx is set: attention is scaled by 1/(layer index + 1) at run "
                        "time, so a copied layer would compute differently at its new depth; DUS cannot preserve it")
