"""Checkpoints through accelerate's save_state, made atomic by a temporary folder and a rename."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from dus_plugin.errors import CheckpointError

LOG = logging.getLogger(__name__)
# accelerate warns "Removed shared tensor {'lm_head.weight'} while saving" on every checkpoint of a model with
# tied embeddings. Tying is by design, transformers re-ties at load, and `dus verify` refuses a folder that
# loads with missing keys, so the warning only alarms: it is silenced at its source, nothing else there.
logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
_STEP = re.compile(r"^step-(\d+)$")
STATE = "trainer_state.json"


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is complete once it has its final name)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    """The optimizer step a checkpoint folder (step-0000040) was saved at."""
    return int(_STEP.match(path.name).group(1))  # type: ignore[union-attr]


def latest(root: Path) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


def save(accelerator: Any, root: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Every process writes its part into .tmp-step-N; the main process renames it when all are done."""
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE).write_text(json.dumps(state, indent=2))
    except Exception as e:  # a full disk surfaces as OSError or as safetensors' own error type
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest(root)
        raise CheckpointError(f"could not write checkpoint {final.name} in {root} ({str(e).splitlines()[0][:200]}); "
                              f"free space there or set output_dir on another disk; the last complete checkpoint is "
                              f"{last.name if last else 'none'}", setting="output_dir") from None
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        LOG.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Any, path: Path) -> dict[str, Any]:
    accelerator.load_state(str(path))
    return json.loads((path / STATE).read_text())


# Settings that fix what a run computes: a checkpoint resumed under other values would continue another run.
RUN_IDENTITY = ("model", "data", "global_batch_size", "max_steps", "max_tokens", "optimizer", "schedule", "grad_clip",
                "precision", "master_weights", "train_only", "seam", "seed")
# Of those, the parts that may change freely: where tokens are cached, and a kernel choice.
_FREE = {"data": {"cache_dir"}, "optimizer": {"fused"}}


def run_identity(cfg: Any) -> dict[str, Any]:
    """The settings a checkpoint records, to refuse a resume under different ones."""
    dump = cfg.model_dump(mode="json", include=set(RUN_IDENTITY))
    for key, free in _FREE.items():
        if isinstance(dump.get(key), dict):
            dump[key] = {k: v for k, v in dump[key].items() if k not in free}
    return dump


def first_change(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> tuple[str, Any, Any] | None:
    """(dotted setting, saved value, current value) of the first difference, or None."""
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if (found := first_change(a, b, f"{prefix}{key}.")) is not None:
                return found
        elif a != b:
            return f"{prefix}{key}", a, b
    return None


class CheckpointManager:
    """A run's checkpoints: where they live, when one is due, how many are kept, and whether the one found at
    resume was made by this configuration (torchtitan's CheckpointManager)."""

    def __init__(self, cfg: Any, accelerator: Any) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        self.out = Path(cfg.output_dir)
        self.root = self.out / "checkpoints"

    def latest(self) -> Path | None:
        return latest(self.root)

    def claim(self, resume: bool, overwrite: bool) -> None:
        """A folder with checkpoints is continued or started over only when asked: never silently from step 0."""
        existing = self.latest()
        if existing is None or resume:
            return
        if not overwrite:
            raise CheckpointError(f"{self.out} already has training checkpoint {existing.name}; set `resume` to "
                                  "continue from it, or `overwrite` to start over (its checkpoints and metrics are "
                                  "removed)", setting="resume")
        if self.accelerator.is_main_process:
            for item in self.out.iterdir():
                if item.name != "token_cache":  # tokenized data does not depend on the run
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
        self.accelerator.wait_for_everyone()

    def due(self, done: int, end: int) -> bool:
        """Save after step ``done``: every ``save_every`` steps, and at the end of the schedule or of this job."""
        cfg = self.cfg
        return bool(cfg.save_every and done % cfg.save_every == 0) or (cfg.save_final and done in (cfg.total_steps(),
                                                                                                     end))

    def save(self, done: int, tokens: int) -> Path:
        state = {"step": done, "tokens": tokens, "samples": done * self.cfg.global_batch_size,
                 "config": run_identity(self.cfg)}
        return save(self.accelerator, self.root, done, state, self.cfg.keep_last)

    def resume(self) -> tuple[int, int]:
        """(step, tokens) of the latest checkpoint, loaded; (0, 0) when there is none. A checkpoint made under
        other run settings is refused, naming the first one that changed."""
        last = self.latest()
        if last is None:
            LOG.info("no checkpoint in %s; starting from step 0", self.root)
            return 0, 0
        saved = json.loads((last / STATE).read_text()).get("config")
        if saved is not None and (change := first_change(saved, run_identity(self.cfg))) is not None:
            key, was, now = change
            raise CheckpointError(f"checkpoint {last.name} was made with {key} = {json.dumps(was)}, and this config "
                                  f"says {json.dumps(now)}; set it back to continue that run, or set `overwrite` "
                                  "to start over", setting=key.split(".")[0])
        state = load(self.accelerator, last)
        LOG.info("resumed from %s at step %d", last, state["step"])
        return state["step"], state["tokens"]
