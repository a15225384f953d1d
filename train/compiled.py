"""torch.compile for training: each decoder layer on its own (the default), or the whole forward.

Compiling the layers leaves the causal mask to eager code. transformers skips building the mask there when
nothing is padded, so SDPA runs its causal kernel, which computes half of the attention scores. Traced inside
one graph, the same check cannot read the inputs (torch < 2.14 treats the trace as an export), so a full
[batch, 1, seq, seq] mask is built and every score is computed. One compiled layer serves every layer of the
stack: the layers share their code and differ only in their weights. The loss is compiled too, so that the
float32 upcast of the logits and the cross-entropy run as fused kernels.
"""

from __future__ import annotations

from typing import Any

from dus_plugin.errors import TrainConfigError


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated blocks: the modules whose class transformers names as not to be split."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_model(model: Any, scope: str) -> Any:
    """Compile in place per layer (``scope='layers'``), or wrap the whole model (``'model'``); return the model."""
    import torch

    if scope == "model":
        return torch.compile(model)
    layers = decoder_layers(model)
    if not layers:
        raise TrainConfigError(f"`compile_scope`: layers found no decoder layer in {type(model).__name__} (it names "
                               "none in _no_split_modules); set `compile_scope`: model", setting="compile_scope")
    for layer in layers:
        layer.compile()
    model.loss_function = torch.compile(model.loss_function)
    return model
