"""precision: fp8 — the decoder layers' linear layers trained in float8 through torchao's float8 training.

Float8Linear keeps each weight as the same parameter (float32 or bf16, as master_weights says) under the same
name; only its matmuls cast to float8 with dynamic scales. So checkpoints, the optimizer and the export (an ordinary
transformers folder in the base's dtype) are those of bf16 training. The output head stays in bf16:
its softmax is where float8's range would hurt most, and torchtitan leaves it out too.
"""

from __future__ import annotations

import logging

from torch import nn

from dus_plugin.errors import TrainConfigError

LOG = logging.getLogger(__name__)


def _convertible(module: nn.Module, fqn: str) -> bool:
    """A decoder layer's linear layer whose sizes float8 GEMMs take (multiples of 16)."""
    return (isinstance(module, nn.Linear) and ".layers." in f".{fqn}" and module.in_features % 16 == 0
            and module.out_features % 16 == 0)


def require_float8() -> None:
    """TrainConfigError unless this process will train on a GPU with float8 tensor cores."""
    import torch
    from accelerate.utils import parse_flag_from_env

    # accelerate launch sets ACCELERATE_USE_CPU=False on GPU launches: read it as a flag, not as "set"
    if parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available() or \
            torch.cuda.get_device_capability() < (8, 9):
        raise TrainConfigError("precision fp8 needs a CUDA GPU with float8 tensor cores (compute capability 8.9+: "
                               "H100, L40S, RTX 4090); use precision bf16 here", setting="precision")


def to_float8(model: nn.Module, recipe: str) -> int:
    """Swap the convertible linear layers for torchao's Float8Linear in place; returns how many."""
    require_float8()
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise TrainConfigError("precision fp8 needs torchao: pip install 'dus-plugin[lowmem]'",
                               setting="precision") from None
    count = sum(_convertible(m, n) for n, m in model.named_modules())
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=_convertible)
    LOG.info("float8 (%s scaling) for %d linear layers", recipe, count)
    return count
