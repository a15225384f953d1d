"""Where a training step's time goes: torch.profiler over a few steps, device time grouped by what it does.

Set ``profile: {start: 10, steps: 3}`` in the training YAML; the trainer then writes
``OUTPUT_DIR/profile.json`` (milliseconds per step and share of the step, by category, plus the top
kernels) and a Chrome trace ``profile_trace.json.gz``. Kernel names are matched in order, so a fused
Triton kernel that computes a log-softmax counts as loss, one that computes an rsqrt as a norm, and one that also
computes a float8 scale (an amax) counts as float8 scaling.
"""

from __future__ import annotations

import gzip
import json
import shutil
import time
from pathlib import Path
from typing import Any

# (category, substrings of the lower-cased kernel name); the first match wins
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    # precision fp8: inductor names the amax reductions (abs, max) and the scaled casts it fuses in front of
    # torch._scaled_mm "..._scaled_mm_..."; the float8 GEMMs themselves are cuBLAS kernels, counted as GEMM
    ("float8 scaling (amax and casts)", ("_abs_", "fused_abs", "fused__scaled_mm")),
    ("loss", ("cross_entropy", "log_softmax", "logsoftmax", "nll_loss", "logsumexp", "softmax")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "_amp_", "lerp")),
    ("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90", "matmul", "wgmma", "aten::mm", "aten::addmm",
              "aten::bmm", "scaled_mm")),
    ("norms", ("rsqrt", "norm")),
    ("elementwise and casts", ("triton_", "elementwise", "copy", "cast", "vectorized", "unrolled", "fill",
                               "reduce", "silu", "mul", "add")),
)


def category(kernel: str) -> str:
    name = kernel.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in name for k in keys)), "other")


class StepProfiler:
    """Profiles steps [start, start + steps) of a loop that calls ``step_done(step)`` after every step."""

    def __init__(self, out: Path, start: int, steps: int, device: str) -> None:
        self.out, self.start, self.steps, self.device = Path(out), start, steps, device
        self._prof = None
        self._t0 = 0.0

    def step_begins(self, step: int) -> None:
        if step != self.start:
            return
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._sync()
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def step_done(self, step: int) -> Path | None:
        """After the last profiled step: stop, write the summary and the trace; returns the summary's path."""
        if self._prof is None or step + 1 != self.start + self.steps:
            return None
        self._sync()
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        summary = summarize(self._prof, wall, self.steps, self.device)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "profile.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        trace = self.out / "profile_trace.json"
        self._prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as f, gzip.open(f"{trace}.gz", "wb") as g:
            shutil.copyfileobj(f, g)
        trace.unlink()
        self._prof = None
        return path

    def _sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()


def summarize(prof, wall_s: float, steps: int, device: str) -> dict[str, Any]:
    """Milliseconds per step by category; "idle" is the step's wall time no kernel covered."""
    per_kernel: dict[str, float] = {}
    for e in prof.key_averages():
        t = e.self_device_time_total if device == "cuda" else e.self_cpu_time_total
        # "Optimizer.step#AdamW.step" and other record_function ranges also show as device time: they span the
        # kernels counted below, so counting them too would count those kernels twice
        annotation = "#" in e.key or e.key.startswith("ProfilerStep")
        if t > 0 and not annotation and (device != "cuda" or e.device_type.name == "CUDA"):
            per_kernel[e.key] = per_kernel.get(e.key, 0.0) + t / 1e3 / steps
    step_ms = wall_s * 1e3 / steps
    by_cat: dict[str, float] = {}
    for name, ms in per_kernel.items():
        cat = category(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + ms
    busy = sum(by_cat.values())
    by_cat["idle (no kernel running)"] = max(step_ms - busy, 0.0)
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:60]
    return {"step_ms": step_ms, "steps": steps, "device": device,
            "categories": {k: {"ms": round(v, 3), "share": round(v / step_ms, 4)}
                           for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:160], "ms": round(ms, 3), "category": category(n)} for n, ms in top]}
