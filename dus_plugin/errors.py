"""Every error dus-plugin raises on purpose. Library code raises these; only the CLI prints them.

Every message states the rule that was broken, the offending value and the fix, in one line.
A message about one setting names it neutrally, in backticks (`drop`), and carries it in
``setting``: the CLI renders it as its flag (--drop), `dus run` as its YAML key (upscale.drop).
"""

from __future__ import annotations

from typing import Mapping


def first_line(e: BaseException) -> str:
    """``Type: first line of the message``: what a one-line error quotes from a library's exception."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


class DusError(Exception):
    """Base class of every error dus-plugin raises on purpose."""

    def __init__(self, message: str = "", setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting
        """The setting the message is about, as the library calls it (``drop``, ``shard_size``)."""

    def naming(self, names: Mapping[str, str]) -> DusError:
        """The same error with each `setting` in its message called as ``names`` says (a flag, a YAML key)."""
        message = str(self)
        for setting, name in names.items():
            message = message.replace(f"`{setting}`", name)
        renamed = type(self).__new__(type(self))
        DusError.__init__(renamed, message, names.get(self.setting or "", self.setting))
        return renamed


class PlanError(DusError, ValueError):
    """A DUS plan is impossible for this base (bad overlap, bad layer list, unknown layer count)."""


class BaseModelError(DusError, ValueError):
    """The base model cannot be read: missing folder, missing config, unknown architecture."""


class RecipeError(DusError, ValueError):
    """A recipe YAML or option does not validate; the message names the field."""


class OutputExistsError(DusError, FileExistsError):
    """The output folder exists and is not empty, and overwriting was not asked for."""


class UpscaleError(DusError, RuntimeError):
    """The merge itself failed; nothing was left in the output folder."""


class VerifyError(DusError, RuntimeError):
    """A model folder does not match its plan; the message names the first mismatch."""


class ManifestError(DusError, ValueError):
    """dus_manifest.json is missing, unreadable or does not validate."""


class TrainConfigError(DusError, ValueError):
    """The training YAML does not validate; the message names the field."""


class TrainingLaunchError(DusError, RuntimeError):
    """`accelerate launch` of the training stage failed; its own output says why."""


class TrainingDiverged(DusError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(DusError, RuntimeError):
    """The output folder's checkpoints conflict with what was asked (resume, overwrite)."""


class EvalError(DusError, ValueError):
    """Evaluation input is unusable (missing file, empty text, bad window, mixed settings)."""


class CardError(DusError, ValueError):
    """The card cannot be written (no manifest, unreadable result file, no base id)."""


class HubError(DusError, RuntimeError):
    """The Hub refused or failed an operation; the message says which and why."""


class NetworkError(DusError, ConnectionError):
    """A host (the Hub, a dataset server) could not be reached; the message says what to try."""


class AnalyzeError(DusError, ValueError):
    """The analysis input is unusable."""


class Interrupted(DusError):
    """Ctrl-C: the message says what is on disk and the command that continues."""


class StaleStageError(DusError, RuntimeError):
    """`dus run` found a stage's output made from different inputs than the recipe asks for now."""


class GgufPatchError(DusError, ValueError):
    """A GGUF cannot be patched for a model folder (another model, not a GGUF, a family dus has not checked)."""


class PretrainedFetchError(DusError, RuntimeError):
    """The real pretrained base (a wheel on the package index) could not be fetched."""


class StreamUnsupported(DusError):
    """This model cannot be run one module at a time (verify's streamed forward pass); load it whole instead."""


class ShapeMismatch(DusError):
    """A tensor in the files does not have the shape the model class gives it."""


class MergeError(DusError, ValueError):
    """Tuned variants cannot be merged as asked, or their merge is not what the method defines."""
