"""Seam-aware parameter groups: which output layers are duplicates, where the seam is, and LR per group.

Layers outside the focus are "frozen" by a learning rate of 0 rather than requires_grad=False,
so the same optimizer, DDP buckets and FSDP shards serve both phases (AdamW with lr 0 leaves a
weight bit-for-bit unchanged, weight decay included).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dus_plugin.train.config import SeamConfig, TrainConfigError, TrainOnlyConfig


@dataclass(frozen=True)
class SeamLayout:
    """What the manifest says about the stack (all indices are output layers)."""

    num_layers: int
    seam: list[int]
    duplicated: list[int]
    prefix: str = "model.layers."
    """Where the layers are in parameter names (the manifest's ``layers.prefix``: ``transformer.h.``, ...)."""

    def window(self, width: int) -> set[int]:
        out: set[int] = set()
        for s in self.seam:
            out.update(range(max(0, s - width), min(self.num_layers, s + width)))
        return out


def read_layout(model_dir: str | Path) -> SeamLayout | None:
    from dus_plugin.manifest import Manifest

    manifest = Manifest.read_optional(model_dir)
    if manifest is None or manifest.plan is None:  # a plain base, or its trained export: no seam to speak of
        return None
    prefix = manifest.layers.prefix if manifest.layers else "model.layers."
    return SeamLayout(manifest.plan.s, list(manifest.plan.seam), list(manifest.plan.duplicated_outputs), prefix)


def layer_of(name: str, prefix: str = "model.layers.") -> int | None:
    m = re.search(r"(?:^|\.)" + re.escape(prefix) + r"(\d+)\.", name)
    return int(m.group(1)) if m else None


def param_groups(model: Any, seam: SeamConfig, layout: SeamLayout | None, lr: float,
                 weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups keyed by (decay, in focus, in seam window), each with its own lr multiplier."""
    if (seam.focus != "none" or seam.seam_lr_multiplier != 1.0) and layout is None:
        raise TrainConfigError("seam.focus / seam.seam_lr_multiplier need dus_manifest.json in the model folder; "
                               "train a folder made by `dus upscale` or set seam.focus: none")
    focus: set[int] = set()
    window: set[int] = set()
    if layout is not None:
        window = layout.window(seam.window)
        focus = {"duplicated": set(layout.duplicated), "seam_window": window}.get(seam.focus, set())
    groups: dict[tuple[bool, bool, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_of(name, layout.prefix) if layout is not None else None
        key = (p.ndim >= 2, layer in focus, seam.seam_lr_multiplier != 1.0 and layer in window)
        g = groups.setdefault(key, {"params": [], "names": [], "weight_decay": weight_decay if key[0] else 0.0,
                                    "focus": key[1], "lr_mult": seam.seam_lr_multiplier if key[2] else 1.0})
        g["params"].append(p)
        g["names"].append(name)
    out = []
    for g in groups.values():
        g["lr"] = lr * g["lr_mult"]
        g["initial_lr"] = g["lr"]
        out.append(g)
    return out


def chosen_layers(train_only: TrainOnlyConfig, layout: SeamLayout | None, num_layers: int) -> set[int]:
    """The output layers that ``train_only`` keeps trainable."""
    if isinstance(train_only.layers, list):
        bad = [i for i in train_only.layers if not 0 <= i < num_layers]
        if bad:
            raise TrainConfigError(f"train_only.layers names layer {bad[0]}; the model has layers 0..{num_layers - 1}")
        return set(train_only.layers)
    if layout is None:
        raise TrainConfigError(f"train_only.layers: {train_only.layers} needs dus_manifest.json in the model folder; "
                               "train a folder made by `dus upscale` or list the layers")
    return set(layout.duplicated) if train_only.layers == "duplicated" else layout.window(train_only.window)


def freeze(model: Any, train_only: TrainOnlyConfig | None, layout: SeamLayout | None, arch: Any) -> int:
    """Turn off gradients outside the chosen layers (and, in a multimodal model, outside its language tower);
    returns the number of trainable parameters. ``arch``: the model's ``Architecture``."""
    from dus_plugin.architecture import find_stack

    if train_only is not None:
        n = arch.n
        keep = chosen_layers(train_only, layout, n)
        prefix = find_stack(model, n, arch.multimodal) + "."
        for name, p in model.named_parameters():
            layer = layer_of(name, prefix)
            p.requires_grad_(layer in keep if layer is not None else train_only.non_layer)
    arch.freeze_outside_language_tower(model)  # after train_only, whose non_layer would free the vision tower
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # parameters() lists a tied tensor once
