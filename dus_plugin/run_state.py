"""The stages of `dus run` and what each was made from, so a re-run never reuses a stale output.

Each stage records its inputs (the recipe keys it reads, the upstream outputs' manifests, the versions
that shape its files) in OUTPUT_DIR/dus_run_state.json before it starts and marks them done after.
On the next run a stage is skipped only when it finished from the same inputs. When an input changed,
that stage and every stage that reads its output are redone, except that training is never discarded
without ``restart``: the run refuses first, before touching anything, naming the change.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dus_plugin.errors import StaleStageError
from dus_plugin.io import atomic_write_text

LOG = logging.getLogger(__name__)
STATE_FILE = "dus_run_state.json"


@dataclass
class Stage:
    key: str
    """Name in the state file and in messages: plan, upscale, train, ..."""
    title: str
    run: Callable[[], Any]
    inputs: Callable[[], dict[str, Any]] = dict
    """What the output is made from, keyed as the recipe names it (upscale.drop, train.optimizer.lr)."""
    outputs: tuple[Path, ...] = ()
    """Removed before the stage is redone from changed inputs."""
    keeps_work: Callable[[], bool] | None = None
    """True when discarding its output now would lose work (training checkpoints): refuse unless restart."""
    always: bool = False
    """Cheap and derived from everything before it (the card): run every time."""
    needs: tuple[str, ...] = ()
    """Stages whose output this one reads: redoing any of them makes this one stale too."""


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"upscale": {"drop": 8}} -> {"upscale.drop": 8}; lists stay whole."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: json.loads(json.dumps(value, default=str))}


def first_change(recorded: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """'upscale.drop changed from 8 to 12', or None when nothing did."""
    if recorded is None:
        return "no record of the inputs it was made from (an older dus-plugin or another tool wrote it)"
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key) != current.get(key):
            return f"{key} changed from {_show(recorded.get(key))} to {_show(current.get(key))}"
    return None


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class StageRunner:
    out: Path
    stages: list[Stage]
    echo: Callable[[str], None] = print
    restart: bool = False
    """Redo stale training too (its output is removed)."""
    current: str | None = field(default=None, init=False)
    """The stage running now (for the interrupt message)."""

    @property
    def state_path(self) -> Path:
        return self.out / STATE_FILE

    def _state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    def _record(self, stage: Stage, inputs: dict[str, Any], done: bool) -> None:
        state = self._state()
        state[stage.key] = {"inputs": inputs, "done": done}
        atomic_write_text(self.state_path, json.dumps(state, indent=2) + "\n")

    def check(self) -> None:
        """Before any work: refuse when a changed input would discard training."""
        state = self._state()
        changes: dict[str, str] = {}
        for stage in self.stages:
            if stage.always or not any(p.exists() for p in stage.outputs):
                continue
            why = first_change(state.get(stage.key, {}).get("inputs"), flatten(stage.inputs()))
            change = f"stage {stage.key}: {why}" if why else next((changes[n] for n in stage.needs if n in changes), None)
            if change is None:
                continue
            changes[stage.key] = change
            if stage.keeps_work and stage.keeps_work() and not self.restart:
                where = ", ".join(str(p) for p in stage.outputs)
                raise StaleStageError(
                    f"{change}, so {stage.key} would have to start over and {where} be discarded; "
                    "pass `restart` to do that, or set output_dir to a new folder", setting="restart")

    def run_all(self) -> None:
        self.check()
        for k, stage in enumerate(self.stages, 1):
            self.current = stage.key
            head = f"[{k}/{len(self.stages)}] {stage.title}"
            inputs = flatten(stage.inputs())
            record = self._state().get(stage.key)
            exists = any(p.exists() for p in stage.outputs)
            why = first_change(record and record.get("inputs"), inputs) if exists or record else None
            if not stage.always and record and record.get("done") and not why and all(p.exists() for p in stage.outputs):
                self.echo(f"{head}: already complete from the same inputs, skipped")
                continue
            if why and exists and not stage.always:
                self.echo(f"{head}: {why}; redoing it")
                for p in stage.outputs:
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            self.echo(f"{head} ...")
            t0 = time.perf_counter()
            self._record(stage, inputs, done=False)
            stage.run()
            self._record(stage, flatten(stage.inputs()) if stage.always else inputs, done=True)
            self.echo(f"{head}: done in {time.perf_counter() - t0:.1f} s")
        self.current = None
