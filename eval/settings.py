"""How a model is evaluated, defined once: `dus eval`'s flags, a run recipe's `eval:` section and the trainer's
held-out hook (`train.eval`) are all made from ``EvalSettings``."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EvalSettings(BaseModel):
    """Held-out perplexity and lm-eval tasks. Each field is a `dus eval` flag and a key under `eval:`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    text_files: list[str] = []
    """Held-out text file (repeatable): perplexity on each."""
    max_length: Optional[int] = Field(None, gt=1)
    """Perplexity window in tokens [default: min(context, 512); in training: the sequence length]."""
    stride: Optional[int] = Field(None, gt=0)
    """Window step [default: half a window]."""
    batch_size: int = Field(8, gt=0)
    """Windows (and lm-eval requests) scored at once."""
    tasks: Optional[str] = None
    """lm-eval tasks: h6, or task[:shots[:metric]],... (needs the [eval] extra)."""
    include_paths: list[str] = []
    """Folder of extra lm-eval task YAMLs (repeatable)."""
    chat: bool = False
    """lm-eval through the model's chat template, few-shot examples as earlier turns: the Open LLM Leaderboard's
    settings for instruct models (apply_chat_template, fewshot_as_multiturn)."""


# The flags that read better than the field's name; every other flag is the field's name.
FLAGS = {"text_files": "--text", "include_paths": "--include-path"}


class RunEvalSettings(EvalSettings):
    """A run recipe's `eval:` section: the table compares perplexity, so it needs held-out text."""

    text_files: list[str] = Field(min_length=1)
    """Held-out text files: perplexity on each, before and after training."""


class HookSettings(EvalSettings):
    """The trainer's held-out hook (`train.eval`): perplexity during training. lm-eval tasks run after training
    (`dus eval`, or the run recipe's `eval:`), not inside it."""

    every: int = Field(0, ge=0)
    """Run the hook every N steps (0: only at the end, if text_files are given)."""
    max_tokens: int = Field(20000, gt=0)
    """Score the first N tokens of each file, so an evaluation inside training stays short."""

    @model_validator(mode="after")
    def _perplexity_only(self) -> HookSettings:
        if self.tasks or self.include_paths:
            raise ValueError("tasks and include_paths are not run inside training; evaluate the exported model "
                             "with `dus eval --tasks`, or give them in a run recipe's eval: section")
        return self
