"""dus_manifest.json: the one typed record that travels with a model folder through every stage.

Upscale writes it; training appends a stage; verify, eval, the card and push read it. Every read
and write goes through :class:`Manifest`, so "trained", "upscaled" and "has a plan" mean one thing.
A plain base that was trained without an upscale has a manifest too: no ``plan``, one train stage.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dus_plugin.errors import ManifestError
from dus_plugin.io import atomic_write_text, file_sha256
from dus_plugin.validation import first_error

MANIFEST = "dus_manifest.json"
FORMAT = 1


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ShardId(_Record):
    """A base shard named cheaply: its size and the sha256 of its safetensors header."""

    size: int
    header_sha256: str


class BaseRecord(_Record):
    """The model that was upscaled."""

    ref: str
    """What the user passed: a Hub id or a folder."""
    hub_id: Optional[str] = None
    """The Hub id, when known (a Hub base, or a local base whose id the user gave)."""
    revision: Optional[str] = None
    local_path: Optional[str] = None
    """Where the base was read on the machine that upscaled (never shown in a card)."""
    architecture: Optional[str] = None
    config: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, ShardId] = Field(default_factory=dict)


class PlanRecord(_Record):
    """The layer map and what follows from it (see ``dus_plugin.plan.DusPlan``)."""

    layout: Optional[Literal["solar", "interpose", "stack", "layers"]] = None
    """How the layer map was built (absent in manifests older than layouts: solar or layers)."""
    n: int
    m: Optional[int] = None
    repeat: Optional[int] = None
    """g, for the stack layout."""
    s: int
    slices: list[list[int]]
    layer_map: list[int]
    """Output layer i copies base layer layer_map[i]."""
    seam: list[int]
    duplicated_outputs: list[int]
    params_before: Optional[int] = None
    params_after: Optional[int] = None
    params_per_layer: Optional[int] = None


class LayersRecord(_Record):
    """Where the decoder layers are in tensor names, and the config key that counts them."""

    prefix: str
    count_key: str


class TensorRecord(_Record):
    source: str
    """The base tensor this output tensor copies."""
    dtype: str
    shape: list[int]
    sha256: str
    zeroed: Optional[bool] = None
    """True when identity init zeroed this copy (a residual writer of a duplicated layer)."""
    mean_with: Optional[str] = None
    """Method average: the base tensor averaged with ``source`` (the same tensor of the next base layer)."""


class UpscaleStage(_Record):
    stage: Literal["upscale"] = "upscale"
    date: str = Field(default_factory=lambda: dt.date.today().isoformat())


class TrainStage(_Record):
    stage: Literal["train"] = "train"
    objective: Literal["lm", "sft", "dpo"] = "lm"
    """What the run learned: lm, continued pretraining on text; sft, instruction tuning on the assistant's turns;
    dpo, preference tuning on chosen and rejected answers."""
    date: str = Field(default_factory=lambda: dt.date.today().isoformat())
    from_: Optional[str] = Field(default=None, alias="from")
    """The folder training started from."""
    steps: int
    tokens: int
    loss: Optional[float] = None
    val_loss: Optional[float] = None
    config: dict[str, Any] = Field(default_factory=dict)
    """The training YAML, as validated."""


def stage_name(stage: Any) -> str:
    """A stage as the family tree names it: upscale, train (continued pretraining), sft, dpo or merge."""
    objective = getattr(stage, "objective", "lm")
    return stage.stage if objective == "lm" else objective


class MergeParent(_Record):
    """One model a merge averaged."""

    ref: str
    local_path: Optional[str] = None
    """Where it was read on the machine that merged (never shown in a card)."""
    manifest_sha256: Optional[str] = None
    """Its dus_manifest.json, which holds its own family tree."""
    weight: Optional[float] = None
    """linear: its weight."""
    stages: list[str] = Field(default_factory=list)
    """Its stages (upscale, train, ...), for the family tree."""


class MergeStage(_Record):
    stage: Literal["merge"] = "merge"
    date: str = Field(default_factory=lambda: dt.date.today().isoformat())
    method: Literal["linear", "slerp"]
    parents: list[MergeParent]
    t: Optional[float] = None
    """slerp: 0 is the first parent, 1 the second."""
    tensors_checked: int = 0


Stage = Annotated[Union[UpscaleStage, TrainStage, MergeStage], Field(discriminator="stage")]


class Manifest(_Record):
    format: Literal[1] = FORMAT
    created: Optional[str] = None
    versions: dict[str, str] = Field(default_factory=dict)
    method: Literal["solar", "identity", "average"] = "solar"
    engine: Optional[str] = None
    base: Optional[BaseRecord] = None
    """None for a plain base that was trained without an upscale."""
    recipe: Optional[dict[str, Any]] = None
    recipe_file: Optional[str] = None
    recipe_yaml: Optional[str] = None
    plan: Optional[PlanRecord] = None
    layers: Optional[LayersRecord] = None
    tensors: Optional[dict[str, TensorRecord]] = None
    """Per-tensor record of the upscale; dropped by any stage that changes the weights."""
    stages: list[Stage] = Field(default_factory=list)

    @property
    def is_trained(self) -> bool:
        return any(isinstance(s, TrainStage) for s in self.stages)

    @property
    def last_train(self) -> TrainStage | None:
        return next((s for s in reversed(self.stages) if isinstance(s, TrainStage)), None)

    @property
    def is_upscale_output(self) -> bool:
        """The folder is exactly what an upscale wrote: its tensors can be checked against the plan."""
        return self.plan is not None and self.tensors is not None and not self.is_trained

    def base_name(self) -> str:
        """The base as a reader should see it: its Hub id, else the last part of what was passed."""
        if self.base is None:
            return "a base model"
        return self.base.hub_id or Path(self.base.ref).name

    def append_stage(self, stage: UpscaleStage | TrainStage | MergeStage) -> Manifest:
        """A copy with ``stage`` added; a train or merge stage drops the tensor hashes (the weights moved on)."""
        update: dict[str, Any] = {"stages": [*self.stages, stage]}
        if isinstance(stage, (TrainStage, MergeStage)):
            update["tensors"] = None
        return self.model_copy(update=update)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2) + "\n"

    def write(self, folder: str | Path) -> Path:
        """Write atomically: a reader never sees half a manifest."""
        return atomic_write_text(manifest_path(folder), self.to_json())

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        path = manifest_path(folder)
        if not path.is_file():
            raise ManifestError(f"{folder} has no {MANIFEST}; make the folder with `dus upscale` or `dus train`")
        return cls.parse(path.read_text(encoding="utf-8"), str(path))

    @classmethod
    def read_optional(cls, folder: str | Path) -> Manifest | None:
        """None for a folder without a manifest (a plain base)."""
        return cls.read(folder) if manifest_path(folder).is_file() else None

    @classmethod
    def parse(cls, text: str, where: str = MANIFEST) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where} is not valid JSON (line {e.lineno}); re-run the stage that wrote it") from None
        if isinstance(data, dict) and data.get("format", FORMAT) != FORMAT:
            raise ManifestError(f"{where} has format {data.get('format')!r}; this dus-plugin reads format {FORMAT}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ManifestError(first_error(e, where, "unknown key (written by a newer dus-plugin?)")) from None


def manifest_path(folder: str | Path) -> Path:
    return Path(folder) / MANIFEST


def manifest_sha256(folder: str | Path) -> str | None:
    """Identifies one exact state of a folder's record (eval results point at it)."""
    return file_sha256(manifest_path(folder))
