"""A forward pass that never holds the whole model.

The model is built on the meta device; each module's weights are read from the safetensors files
(plain reads, no mmap, so the pages do not stay in the process) just before the module runs and are
dropped right after it, so memory peaks at about one module plus the activations, whatever the model's
size. Between runs a weight is a NaN placeholder of its shape on the CPU: code that asks a weight for its
device or dtype gets the real answer, and code that uses a weight outside its module's forward (a parent
reading a child's weight) turns the logits into NaN instead of a silent wrong number. Then, and where a
family's module names differ from its file names (transformers converts some MoE checkpoints at load),
this raises StreamUnsupported and the caller loads the model whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dus_plugin.errors import ShapeMismatch, StreamUnsupported
from dus_plugin.tensors import SourceTensor, read_tensor, tensor_headers


def streamed_logits(folder: str | Path, input_ids, round_to: Any = None):
    """float32 logits of ``input_ids`` (1 x T) from the model in ``folder``, one module in memory at a time.

    ``round_to``: a torch dtype to round every weight to before computing in float32 (a base compared
    with its bf16 upscale must be rounded as the upscale was).
    """
    import torch

    folder = Path(folder)
    _return_freed_memory()
    try:
        model = _meta_model(folder)
    except Exception as e:  # a config transformers refuses: the whole load says why, in verify's words
        raise StreamUnsupported(f"transformers cannot build it ({type(e).__name__})") from None
    sources = _sources(model, tensor_headers(folder))
    _load_buffers(model, sources)
    why = ""
    for whole_layers in (False, True):  # module by module; else a parent reads a child's weight: layer by layer
        handles = _attach(model, sources, round_to, whole_layers)
        try:
            with torch.no_grad():
                logits = model(input_ids=input_ids, use_cache=False).logits
            if torch.isfinite(logits).all():  # a placeholder used anywhere would have made them NaN
                return logits.float()
            why = "uses weights outside the decoder layer that owns them"
        except ShapeMismatch:
            raise
        except Exception as e:  # only a whole load may judge the folder: a placeholder can fail where a weight works
            why = f"fails one part at a time ({type(e).__name__})"
        finally:
            for h in handles:
                h.remove()
    raise StreamUnsupported(f"{type(model).__name__} {why}")


def _return_freed_memory() -> None:
    """Serve every allocation over 1 MiB by mmap, so a weight freed after its module runs goes back to the system.

    glibc raises its mmap threshold (up to 32 MiB) each time such a block is freed; weights below it then
    come from the heap, which keeps freed blocks: a 1.5B model's pass grew to 2.1 GB RSS that way.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; a fixed value also turns the dynamic raise off
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass


def _meta_model(folder: Path):
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if config.get_text_config() is not config:  # a multimodal model: its towers are not one layer stack
        raise StreamUnsupported("a multimodal model is held whole")
    # buffers stay real: rotary tables and the like are computed at init and are not in the files
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _sources(model, files: dict[str, SourceTensor]) -> dict[str, SourceTensor]:
    """Each parameter and persistent buffer of the model -> the file tensor holding it; refuses any
    missing or unexpected key, as a whole-model load with ``output_loading_info`` would."""
    wanted = list(model.state_dict(keep_vars=True))
    tied = _tied_keys(model)
    out: dict[str, SourceTensor] = {}
    for name in wanted:
        if name in files:
            out[name] = files[name]
        elif tied.get(name) in files:
            out[name] = files[tied[name]]
    unexpected = sorted(set(files) - set(wanted))
    missing = sorted(set(wanted) - set(out))
    if unexpected or missing:
        # some families rename or fuse weights at load (transformers' conversion mapping): only a whole load knows
        raise StreamUnsupported(f"{len(missing)} model keys are not in the files and {len(unexpected)} file keys "
                                f"are not in the model (first: {(missing or unexpected)[0]})")
    return out


def _tied_keys(model) -> dict[str, str]:
    """Tied name -> the name it shares its tensor with (only one of them is in the files)."""
    try:
        return dict(model.get_expanded_tied_weights_keys(all_submodels=True))
    except (AttributeError, TypeError):  # transformers before 5.20 lists them as a class attribute
        keys = getattr(model, "_tied_weights_keys", None)
        return dict(keys) if isinstance(keys, dict) and getattr(model.config, "tie_word_embeddings", False) else {}


def _read(src: SourceTensor, name: str, shape, round_to: Any):
    import torch

    if list(src.shape) != list(shape):
        raise ShapeMismatch(f"tensor {name} has shape {src.shape}, the model class expects {list(shape)}")
    t = read_tensor(src)
    if not t.is_floating_point():
        return t
    return (t.to(round_to) if round_to is not None else t).to(torch.float32)


def _load_buffers(model, sources: dict[str, SourceTensor]) -> None:
    """Persistent buffers are small: load them once."""
    for name, buf in list(model.named_buffers()):
        if name in sources:
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name)._buffers[leaf] = _read(sources[name], name, buf.shape, None)


def _units(model, whole_layers: bool) -> list[tuple[Any, list[tuple[Any, str, str]]]]:
    """(module whose forward brings weights in, [(owner, leaf, full name)]): each module with weights of its
    own, or with ``whole_layers`` each decoder layer with everything under it."""
    from dus_plugin.architecture import find_stack

    stack = find_stack(model, model.config.num_hidden_layers) + "." if whole_layers else None
    units: dict[str, tuple[Any, list]] = {}
    for name, _ in model.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        unit = owner_name
        if stack and name.startswith(stack):
            unit = stack + name[len(stack):].split(".")[0]
        units.setdefault(unit, (model.get_submodule(unit), []))[1].append(
            (model.get_submodule(owner_name), leaf, name))
    return list(units.values())


def _attach(model, sources: dict[str, SourceTensor], round_to: Any, whole_layers: bool) -> list:
    """Hooks that fill a unit's weights before it runs and put placeholders back after."""
    import torch

    handles = []
    for unit, weights in _units(model, whole_layers):
        for owner, leaf, _ in weights:
            owner._parameters[leaf] = _placeholder(owner._parameters[leaf])

        def fill(_mod, _args, weights=weights):
            for owner, leaf, full in weights:
                owner._parameters[leaf] = torch.nn.Parameter(
                    _read(sources[full], full, owner._parameters[leaf].shape, round_to), requires_grad=False)

        def empty(_mod, _args, _out, weights=weights):
            for owner, leaf, _ in weights:
                owner._parameters[leaf] = _placeholder(owner._parameters[leaf])

        handles.append(unit.register_forward_pre_hook(fill))
        handles.append(unit.register_forward_hook(empty))
    return handles


def _placeholder(p):
    """A CPU stand-in of ``p``'s shape and dtype that costs one value: NaN, so any use of it shows."""
    import torch

    fill = float("nan") if p.dtype.is_floating_point else 0
    return torch.nn.Parameter(torch.full((), fill, dtype=p.dtype).expand(p.shape), requires_grad=False)
