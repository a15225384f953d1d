"""Typed errors. Library code raises these; only the CLI turns them into messages.

Every message states the rule that was broken, the offending value and the fix, in one line.
"""


class DusError(Exception):
    """Base class of every error dus-plugin raises on purpose."""


class PlanError(DusError, ValueError):
    """A DUS plan is impossible for this base (bad overlap, bad layer list, unknown layer count)."""


class BaseModelError(DusError, ValueError):
    """The base model cannot be read: missing folder, missing config, unknown architecture."""


class RecipeError(DusError, ValueError):
    """A recipe YAML does not validate; the message names the field."""


class OutputExistsError(DusError, FileExistsError):
    """The output folder exists and is not empty, and overwriting was not asked for."""


class UpscaleError(DusError, RuntimeError):
    """The merge itself failed; nothing was left in the output folder."""


class VerifyError(DusError, RuntimeError):
    """An upscaled folder does not match its plan; the message names the first mismatch."""


class TrainingLaunchError(DusError, RuntimeError):
    """`accelerate launch` of the training stage failed; its own output says why."""
