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
