"""Learning-rate schedules as plain functions of the step (warmup, then cosine, WSD or constant)."""

from __future__ import annotations

import math

from dus_plugin.train.config import ScheduleConfig


class LRSchedule:
    """Multiplier of the peak LR at ``step``; a picklable object so scheduler state round-trips."""

    def __init__(self, cfg: ScheduleConfig, total_steps: int, frozen_until: int = 0, focus: bool = True):
        self.kind, self.warmup, self.min_ratio = cfg.kind, cfg.warmup_steps, cfg.min_lr_ratio
        self.decay_fraction, self.total = cfg.decay_fraction, total_steps
        self.frozen_until, self.focus = frozen_until, focus

    def __call__(self, step: int) -> float:
        if step < self.frozen_until and not self.focus:
            return 0.0
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            span = max(1, self.total - self.warmup)
            t = min(1.0, (step - self.warmup) / span)
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        decay_start = int(self.total * (1 - self.decay_fraction))
        if step < decay_start:
            return 1.0
        t = min(1.0, (step - decay_start) / max(1, self.total - decay_start))
        return self.min_ratio + (1 - self.min_ratio) * (1 - t)
