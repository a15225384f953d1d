"""What the "auto" training settings become on this machine, decided once, before the model loads.

- ``compile`` and ``fused_projections``: on where they pay, a CUDA GPU (fused only for the families
  ``train.fused`` rewrites); off on a CPU, where compiling costs more than it saves.
- ``activation_checkpointing``: the least recomputation whose memory estimate fits the device, or
  ``memory_limit_gb``, with ``HEADROOM`` to spare: none; else the first K decoder layers, for the smallest K
  that fits; else every layer.

``resolve`` returns the config with every auto setting replaced by its value, and the lines that say what was
chosen and why; the trainer and ``dus train --estimate`` print them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dus_plugin.errors import TrainConfigError
from dus_plugin.train import memory
from dus_plugin.train.config import TrainConfig, check_model_folder

HEADROOM = 0.06
"""The share of the device an automatic choice leaves free. The estimate is calibrated on
``torch.cuda.max_memory_allocated``; the CUDA context, cuBLAS workspaces and the caching allocator's
fragmentation sit above that figure."""


@dataclass
class Resolved:
    """A config with no "auto" left, its memory estimate, and what was chosen."""

    cfg: TrainConfig
    need: memory.MemoryEstimate
    capacity: float | None
    choices: list[str] = field(default_factory=list)
    multimodal: bool = False
    """An image-text-to-text model: only its language tower trains."""

    def report(self) -> str:
        return "\n".join([self.need.table()] + [f"  {line}" for line in self.choices])


def resolve(cfg: TrainConfig, processes: int, distributed_type: str, device_type: str,
            refuse: bool = True) -> Resolved:
    """Replace every auto setting by its value here; with ``refuse``, raise TrainConfigError when the result
    cannot fit (naming what would)."""
    check_model_folder(cfg.model)
    if cfg.fp8_weight_cast == "per_step" and distributed_type in memory.SHARDED:
        raise TrainConfigError(f"fp8_weight_cast: per_step keeps each weight's float8 cast for the step, but under "
                               f"{distributed_type} each forward gathers the weight anew; set fp8_weight_cast: "
                               "per_matmul, or train with DDP (train/ddp.yaml)", setting="fp8_weight_cast")
    choices: list[str] = []
    cfg = _kernels(cfg, device_type, choices)
    shape = memory.model_shape(cfg)
    if cfg.fp8_weight_cast == "per_step":
        choices.append(f"fp8_weight_cast: per_step (each weight cast to float8 once a step; the kept casts, "
                       f"{memory.size(shape.layers * shape.layer_params)}, count as weights)")
    capacity = memory.capacity(cfg, device_type, processes)
    if cfg.activation_checkpointing == "auto":
        cfg = _checkpointing(cfg, shape, processes, distributed_type, capacity, choices)
    if refuse:
        need = memory.check_fits(cfg, processes, distributed_type, device_type, shape)
    else:
        need = memory.estimate(cfg, shape, processes, distributed_type)
    from dus_plugin.architecture import Architecture

    return Resolved(cfg, need, capacity, choices, Architecture.from_folder(cfg.model).multimodal)


def _kernels(cfg: TrainConfig, device_type: str, choices: list[str]) -> TrainConfig:
    from dus_plugin.train.fused import SUPPORTED

    gpu = device_type == "cuda"
    update = {}
    if cfg.compile is None:
        update["compile"] = gpu
        choices.append(f"compile: {_yes(gpu)} (auto: {'a CUDA GPU' if gpu else 'no CUDA GPU'})")
    if cfg.fused_projections is None:
        family = json.loads((Path(cfg.model) / "config.json").read_text()).get("model_type", "")
        fuse = gpu and family in SUPPORTED
        update["fused_projections"] = fuse
        why = "no CUDA GPU" if not gpu else f"{family} {'is' if fuse else 'is not'} one of {', '.join(SUPPORTED)}"
        choices.append(f"fused_projections: {_yes(fuse)} (auto: {why})")
    update["attention_backend"] = _attention(cfg, gpu, choices)
    return cfg.model_copy(update=update)


def _attention(cfg: TrainConfig, gpu: bool, choices: list[str]) -> str:
    if cfg.attention_backend == "flex" and not gpu:
        raise TrainConfigError("attention_backend: flex needs a CUDA GPU (FlexAttention has no backward on a CPU); "
                               "set attention_backend: auto or sdpa")
    if cfg.attention_backend != "auto":
        return cfg.attention_backend
    # with a document mask SDPA gets a dense mask and leaves its flash kernel; flex skips the hidden blocks
    if not gpu:
        choice, why = "sdpa", "no CUDA GPU"
    elif not cfg.data.document_mask:
        choice, why = "sdpa", "no document mask"
    elif cfg.objective != "lm":
        choice, why = "sdpa", f"objective {cfg.objective}"
    else:
        choice, why = "flex", "data.document_mask on a CUDA GPU"
    choices.append(f"attention_backend: {choice} (auto: {why})")
    return choice


def _checkpointing(cfg: TrainConfig, shape: memory.ModelShape, processes: int, distributed_type: str,
                   capacity: float | None, choices: list[str]) -> TrainConfig:
    budget = capacity * (1 - HEADROOM) if capacity else float("inf")
    where = (f"{memory.size(budget)}: {memory.size(capacity)} less {HEADROOM:.0%} headroom" if capacity
             else "no known device capacity")
    trials = [0, *range(1, shape.layers), "full"]
    for value in trials:
        trial = cfg.model_copy(update={"activation_checkpointing": "none" if value == 0 else value})
        need = memory.estimate(trial, shape, processes, distributed_type).total
        if need <= budget:
            break
    none = memory.estimate(cfg.model_copy(update={"activation_checkpointing": "none"}), shape, processes,
                           distributed_type).total
    if value == 0:
        said = f"none (auto: {memory.size(none)} fits {where})"
    elif value == "full" and need > budget:
        said = f"full (auto: nothing less fits {where}; even every layer needs {memory.size(need)})"
    else:
        layers = shape.layers if value == "full" else value
        said = (f"{'full' if value == 'full' else f'the first {value} of {shape.layers} decoder layers'} (auto: "
                f"none needs {memory.size(none)}; recomputing {layers} layers needs {memory.size(need)}, within {where})")
    choices.append(f"activation_checkpointing: {said}")
    return trial


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
