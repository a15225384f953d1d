"""precision: fp8 — the decoder layers' linear layers trained in float8 through torchao's float8 training.

Float8Linear keeps each weight as the same parameter (float32 or bf16, as master_weights says) under the same
name; only its matmuls cast to float8 with dynamic scales. So checkpoints, the optimizer and the export (an ordinary
transformers folder in the base's dtype) are those of bf16 training. The output head stays in bf16:
its softmax is where float8's range would hurt most, and torchtitan leaves it out too.

``fp8_weight_cast: per_step`` casts each weight to float8 once per optimizer step instead of in every micro-batch's
forward and backward (and again in each recomputed forward). With tensorwise scaling the scale is the weight's own
amax, so the cast is the same whichever micro-batch makes it: losses and gradients are bit-for-bit those of
torchao's layer. The copy costs one byte per decoder-layer weight. torchao casts weights once per step only under
FSDP's float8 all-gather; a sharded weight is gathered anew each forward, so there the copy would be useless.
"""

from __future__ import annotations

import functools
import logging

import torch
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


def to_float8(model: nn.Module, recipe: str, weight_cast: str = "per_matmul") -> int:
    """Swap the convertible linear layers for torchao's float8 training layers in place; returns how many."""
    require_float8()
    return float8_layers(model, recipe, weight_cast)


def float8_layers(model: nn.Module, recipe: str, weight_cast: str = "per_matmul") -> int:
    """``to_float8`` without the device check (torch's float8 matmuls also run, slowly, on a CPU)."""
    try:
        from torchao.float8 import Float8LinearConfig
        from torchao.float8.float8_linear import Float8Linear
        from torchao.float8.float8_linear_utils import swap_linear_layers
    except ImportError:
        raise TrainConfigError("precision fp8 needs torchao: pip install 'dus-plugin[lowmem]'",
                               setting="precision") from None
    if weight_cast == "per_step" and recipe != "tensorwise":
        raise TrainConfigError("fp8_weight_cast: per_step needs fp8_recipe: tensorwise (a row-wise cast differs "
                               "between forward and backward)", setting="fp8_weight_cast")
    config = Float8LinearConfig.from_recipe_name(recipe)
    layer = _cast_once_class() if weight_cast == "per_step" else Float8Linear
    swap_linear_layers(model, lambda m: layer.from_float(m, config=config), module_filter_fn=_convertible)
    swapped = [m for m in model.modules() if isinstance(m, layer)]
    if weight_cast == "per_step":
        _refresh_before_forward(model, swapped)
    LOG.info("float8 (%s scaling) for %d linear layers, weights cast %s", recipe, len(swapped),
             "once per optimizer step" if weight_cast == "per_step" else "in every matmul")
    return len(swapped)


def _refresh_before_forward(model: nn.Module, layers: list) -> None:
    """Renew each float8 cast whose weight changed, before each forward of the whole model."""

    @torch._dynamo.disable  # the top module runs eagerly around compiled layers; a version check costs microseconds
    def refresh(module, args) -> None:
        for layer in layers:
            layer.refresh_cast()

    model.register_forward_pre_hook(refresh)


@functools.cache
def _cast_once_class():
    """Float8Linear whose weight is cast once per change of the weight (built on first use: torchao is optional)."""
    from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole

    @torch._dynamo.allow_in_graph
    class MatmulWithCastWeight(torch.autograd.Function):
        """torchao's float8 matmul handed the weight already cast; its gradient goes to the weight itself."""

        @staticmethod
        def forward(ctx, input_hp, weight, weight_fp8_t, linear_mm_config, config):
            return matmul_with_hp_or_float8_args.forward(ctx, input_hp, weight_fp8_t, linear_mm_config, config)

        @staticmethod
        def backward(ctx, grad_output):
            grad_input, grad_weight_t, *_ = matmul_with_hp_or_float8_args.backward(ctx, grad_output)
            return grad_input, grad_weight_t.t(), None, None, None

    class Float8LinearCastOnce(Float8Linear):
        """Float8Linear that keeps its weight's float8 cast until the weight changes (``Tensor._version``
        counts every in-place update: the optimizer's step, a checkpoint load)."""

        _cast_of = None
        _weight_fp8_t = None

        def refresh_cast(self) -> None:
            current = (self.weight._version, self.weight.data_ptr())
            if current == self._cast_of:
                return
            c = self.config
            self._weight_fp8_t = None  # frees the old cast before the new one is made
            with torch.inference_mode(False), torch.no_grad():  # a cast made in an eval stays usable
                self._weight_fp8_t = hp_tensor_to_float8_dynamic(
                    self.weight.t(), c.cast_config_weight.target_dtype, self.linear_mm_config,
                    gemm_input_role=GemmInputRole.WEIGHT, round_scales_to_power_of_2=c.round_scales_to_power_of_2)
            self._cast_of = current

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if torch.is_autocast_enabled():  # as Float8Linear: the output keeps autocast's dtype
                input = input.to(torch.get_autocast_gpu_dtype())
            output = MatmulWithCastWeight.apply(input, self.weight, self._weight_fp8_t, self.linear_mm_config,
                                                self.config)
            return output if self.bias is None else output + self.bias.to(output.dtype)

    return Float8LinearCastOnce
