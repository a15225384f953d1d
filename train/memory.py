"""How much memory a training run needs on each device, before it starts, and what would make it fit.

The estimate is arithmetic over the config and the model's parameter counts (built on the meta device):

- weights: 4 bytes per parameter with fp32 master weights, 2 with bf16; frozen weights (train_only) of a bf16
  checkpoint stay bf16 under bf16 compute, since autocast would round them to bf16 anyway; with
  ``fp8_weight_cast: per_step``, one more byte per decoder-layer parameter for the kept float8 casts;
- gradients: the same per *trained* parameter (DDP keeps a second copy in its communication buckets);
- optimizer: AdamW 8 bytes per trained parameter; torchao's 8-bit AdamW 2 bytes plus a float scale per
  256-value block (tensors under 4096 values keep plain states); its compiled step keeps no float32 copy;
- activations: what backward keeps per token and layer for a Llama-shaped block (see ``_per_token_layer``),
  or, with activation checkpointing, each layer's input plus one layer being recomputed; the logits and
  their float32 loss (8 bytes per token and vocabulary entry, calibrated on the GPU); with fp32 master
  weights under bf16 autocast, the bf16 weight copies autocast keeps for backward (with precision fp8 only
  outside the decoder layers).

FSDP and DeepSpeed (ZeRO-3) divide weights, gradients and optimizer states by the process count and
add two layers gathered whole. The figure is compared with ``torch.cuda.max_memory_allocated`` in
benchmarks/solar_scale.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from dus_plugin.plan import human_count
from dus_plugin.train.config import TrainConfig, check_model_folder
from dus_plugin.validation import deep_merged

GB = 1e9
SHARDED = ("FSDP", "DEEPSPEED")
LOGIT_BYTES = 8
"""Per token and vocabulary entry at the peak: bf16 logits and their float32 copy for the loss. Counting the
log-softmax and its gradient as well (14) overestimated every GPU run by 0.4-0.8 GB (benchmarks/lowmem_parity.py)."""
COMPILED_ACTIVATIONS = 0.65
"""torch.compile's fused kernels keep less for backward than eager modules. Measured on the H100 at the 2.25B
benchmark shape (48 layers, seq 2048, four accumulated micro-batches; benchmarks/results/train_throughput.json):
the layers kept 0.58x the eager estimate compiled per layer (micro-batch 4 and 5: 68.9 and 76.2 GB peak) and
0.63x compiled as one graph (71.5 GB). 0.65 keeps the estimate above all three (72.2, 80.2 and 72.2 GB)."""
FLOAT8_ACTIVATIONS = 0.47
"""The same for precision fp8 (compiled): torchao's float8 layers keep less again, and no bf16 weight copies. Measured
on the H100 (benchmarks/results/train_throughput.json, 2026-11-24): 0.41x the eager estimate at the 2.25B shape
(micro-batch 4, 5, 6, 8: 57.0, 62.3, 67.5, 78.0 GB) and 0.43x at hidden 4096 (59.4, 65.9 GB). 0.47 keeps the
estimate 2-7% above each of them."""
SMALL_TENSOR = 4096
"""torchao keeps plain float states for tensors with fewer values than this."""


@dataclass
class ModelShape:
    """What the estimate needs to know about the model."""

    params: int
    trainable: int
    layers: int
    layer_params: int
    """Parameters of the largest decoder layer."""
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    low_bit_state_bytes: int
    """8-bit AdamW state bytes over the trained tensors (blocks, scales, small tensors kept plain)."""
    frozen_bytes: int = 4
    """Bytes per frozen parameter."""


@dataclass
class MemoryEstimate:
    """Bytes per device."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    params: int
    trainable: int
    processes: int
    distributed_type: str

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def table(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer states", self.optimizer),
                ("activations", self.activations), ("total", self.total)]
        head = (f"memory estimate per device: {human_count(self.params)} parameters, {human_count(self.trainable)} "
                f"trained, {self.processes} process(es), {self.distributed_type}")
        unit = self.total
        return "\n".join([head] + [f"  {name:<17}{size(value, unit):>10}" for name, value in rows])

    def parts(self) -> str:
        unit = self.total
        return (f"weights {size(self.weights, unit)}, gradients {size(self.gradients, unit)}, optimizer "
                f"{size(self.optimizer, unit)}, activations {size(self.activations, unit)}")


def size(n: float, unit_of: float | None = None) -> str:
    """GB, or MB below 0.1 GB; ``unit_of`` picks the unit for a whole table, so its rows read in one unit."""
    ref = n if unit_of is None else unit_of
    return f"{n / GB:.1f} GB" if ref >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def model_shape(cfg: TrainConfig) -> ModelShape:
    """Parameter counts of the configured model, with ``train_only`` applied, from a meta-device build."""
    from dus_plugin.architecture import Architecture
    from dus_plugin.train.seam import freeze, read_layout

    check_model_folder(cfg.model)
    arch = Architecture.from_folder(cfg.model)
    model = arch.meta
    config = model.config.get_text_config()
    trainable = freeze(model, cfg.train_only, read_layout(cfg.model), arch)
    stack = arch.layers_of(model)
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    trained = [p for p in model.parameters() if p.requires_grad]  # a tied tensor is listed once
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()), trainable=trainable,
        layers=len(stack),
        layer_params=max(sum(p.numel() for p in layer.parameters()) for layer in stack),
        hidden=config.hidden_size, intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
        kv_dim=(getattr(config, "num_key_value_heads", None) or heads) * head_dim, vocab=config.vocab_size,
        low_bit_state_bytes=sum(_low_bit_state(p.numel(), p.element_size() if cfg.master_weights == "fp32" else 2)
                                for p in trained),
        frozen_bytes=2 if cfg.master_weights == "bf16" or frozen_in_file_dtype(cfg) else 4)


def frozen_in_file_dtype(cfg: TrainConfig) -> bool:
    """Frozen weights of a bf16 checkpoint are kept in bf16: under bf16 compute they are the same numbers, at half
    the memory (and no bf16 copy for backward)."""
    import json
    from pathlib import Path

    if cfg.train_only is None or cfg.master_weights != "fp32" or not cfg.bf16_compute:
        return False
    config = json.loads((Path(cfg.model) / "config.json").read_text())
    return (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"


def _low_bit_state(numel: int, param_bytes: int) -> int:
    if numel < SMALL_TENSOR or numel % 256:
        return 2 * numel * param_bytes
    return 2 * numel + 2 * 4 * math.ceil(numel / 256)


def estimate(cfg: TrainConfig, shape: ModelShape, processes: int = 1, distributed_type: str = "NO") -> MemoryEstimate:
    """Peak bytes per device for this config on ``processes`` devices under ``distributed_type``."""
    wbytes = 2 if cfg.master_weights == "bf16" else 4
    shards = processes if distributed_type in SHARDED else 1
    weights = (shape.trainable * wbytes + (shape.params - shape.trainable) * shape.frozen_bytes) / shards
    if cfg.fp8_weight_cast == "per_step":  # a float8 copy of every decoder-layer weight, kept across the step
        weights += shape.layers * shape.layer_params
    gradients = shape.trainable * wbytes / shards * (2 if distributed_type == "MULTI_GPU" else 1)
    if cfg.optimizer.name == "adamw8bit":
        optimizer = shape.low_bit_state_bytes / shards
    else:
        optimizer = 8 * shape.trainable / shards * (wbytes / 4)
    activations = _activations(cfg, shape)
    if shards > 1:
        activations += 2 * shape.layer_params * 2  # the layer being computed and the next, gathered in bf16
    return MemoryEstimate(weights, gradients, optimizer, activations, shape.params, shape.trainable, processes,
                          distributed_type)


def _per_token_layer(cfg: TrainConfig, shape: ModelShape) -> float:
    """Bytes one token leaves for backward in one decoder layer (pre-norm attention + gated MLP, bf16 autocast):
    norms keep their float32 input and output, whatever the residual's dtype (RMSNorm upcasts inside; counting
    bf16 for bf16 weights underestimated the 10.7B runs by 0.5-2.2%, benchmarks/results/solar_throughput.json);
    every projection keeps its bf16 input; attention keeps q, k, v, the rotated q and k and its output; the
    gated MLP keeps gate, up, their activation and product."""
    act = 2 if cfg.bf16_compute else 4
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    norms = 2 * 2 * 4 * h
    projections = (3 + 1 + 2) * act * h  # q, k, v see the normed input; o sees attention out; gate, up the normed
    attention = act * (2 * h + 3 * kv + h)
    mlp = 4 * act * i
    return norms + projections + attention + mlp


def checkpointed_count(cfg: TrainConfig, layers: int) -> int:
    """How many decoder layers recompute in backward (the first ones of the stack); "auto" counts as none here,
    the most it could need (``train.auto.resolve`` picks the real value before a run)."""
    from dus_plugin.errors import TrainConfigError

    value = cfg.activation_checkpointing
    if value in ("none", "auto"):
        return 0
    if value == "full":
        return layers
    if value > layers:
        raise TrainConfigError(f"activation_checkpointing {value} is more layers than the model has ({layers}); "
                               f"give at most {layers}, or full", setting="activation_checkpointing")
    return value


def _activations(cfg: TrainConfig, shape: ModelShape) -> float:
    tokens = cfg.micro_batch_size * cfg.data.seq_len
    residual = 4 if cfg.master_weights == "fp32" or cfg.precision == "fp32" else 2
    per_layer = tokens * _per_token_layer(cfg, shape)
    recomputed = checkpointed_count(cfg, shape.layers)
    compiled = FLOAT8_ACTIVATIONS if cfg.precision == "fp8" else COMPILED_ACTIVATIONS
    whole = (shape.layers - recomputed) * per_layer * (compiled if cfg.compile else 1.0)
    inputs = recomputed * tokens * shape.hidden * residual
    kept = whole + inputs
    if recomputed:  # the first layers recompute: backward reaches them once every kept activation is freed
        kept = max(kept, inputs + per_layer)
    logits = tokens * shape.vocab * LOGIT_BYTES
    autocast_copies = 0.0
    if cfg.master_weights == "fp32" and cfg.bf16_compute:
        cast = shape.trainable if shape.frozen_bytes == 2 else shape.params  # bf16 weights need no copy
        if cfg.precision == "fp8":  # float8 layers cast their weights to float8 inside the matmul, keeping no copy
            cast = max(cast - shape.layers * shape.layer_params, 0)
        if recomputed == shape.layers:
            cast = min(cast, shape.layer_params)
        elif recomputed:  # a recomputing layer drops its copies until backward casts them again
            cast = max(cast - (recomputed - 1) * shape.layer_params, shape.layer_params)
        autocast_copies = 2 * cast
    return kept + logits + autocast_copies


def device_capacity(device_type: str, processes: int) -> float | None:
    """Bytes one process may use: the GPU's memory, or the machine's RAM shared by the processes."""
    if device_type == "cuda":
        import torch

        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / processes
    except (ValueError, OSError):
        return None


# What a user can change, in the order that costs the least model quality or speed.
REMEDIES: list[tuple[str, dict[str, Any]]] = [
    ("activation_checkpointing: full", {"activation_checkpointing": "full"}),
    ("micro_batch_size: 1", {"micro_batch_size": 1}),
    ("optimizer.name: adamw8bit and master_weights: bf16", {"optimizer": {"name": "adamw8bit"},
                                                            "master_weights": "bf16", "precision": "bf16"}),
    ("train_only.layers: duplicated", {"train_only": {"layers": "duplicated"}}),
]


def what_fits(cfg: TrainConfig, processes: int, distributed_type: str, capacity: float) -> str | None:
    """The first (cumulative) set of changes under which the estimate fits, as the words a user would type."""
    from dus_plugin.errors import DusError

    changed = cfg.model_dump()
    said: list[str] = []
    for words, change in REMEDIES:
        changed = deep_merged(changed, change)
        said.append(words)
        try:
            trial = TrainConfig.model_validate(changed)
            shape = model_shape(trial)
        except (ValueError, DusError):  # e.g. train_only: duplicated on a folder without a manifest
            continue
        need = estimate(trial, shape, processes, distributed_type)
        if need.total <= capacity:
            return f"{', '.join(said)} (about {size(need.total)})"
    return None


def capacity(cfg: TrainConfig, device_type: str, processes: int) -> float | None:
    """Bytes a process may plan for: memory_limit_gb when set, else what the device has."""
    return cfg.memory_limit_gb * GB if cfg.memory_limit_gb else device_capacity(device_type, processes)


def check_fits(cfg: TrainConfig, processes: int, distributed_type: str, device_type: str,
               shape: ModelShape | None = None) -> MemoryEstimate:
    """The estimate for this run; TrainConfigError naming what would fit when it exceeds the device."""
    from dus_plugin.errors import TrainConfigError

    need = estimate(cfg, shape or model_shape(cfg), processes, distributed_type)
    room = capacity(cfg, device_type, processes)
    if room is None or need.total <= room:
        return need
    fix = what_fits(cfg, processes, distributed_type, room)
    where = "the memory_limit_gb set" if cfg.memory_limit_gb else f"the {device_type.upper()} memory"
    advice = (f"it would fit with {fix}" if fix else
              "no single-device setting makes it fit; shard it over more GPUs with FSDP (train/fsdp.yaml)")
    raise TrainConfigError(f"training needs about {size(need.total)} per device ({need.parts()}), more than "
                           f"{where} ({size(room)}); {advice}", setting="memory_limit_gb")
