"""Click options made from the typed option models, so `dus plan`/`dus upscale` and a run recipe share one
definition: the field's name is the flag, its type the choices, its docstring the help (as mergekit's
add_merge_options shares MergeOptions between its commands)."""

from __future__ import annotations

import typing
from typing import Any, Callable, Literal, TypeVar

import click
from pydantic import BaseModel

from dus_plugin.errors import DusError, RecipeError
from dus_plugin.validation import validated

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=BaseModel)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _click_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)])
    if typing.get_origin(annotation) is not None and len(args) == 1:  # Optional[X]
        return _click_type(args[0])
    return int if annotation is int else str


def model_options(model: type[BaseModel], short: dict[str, str] | None = None,
                  flags: dict[str, str] | None = None) -> Callable[[F], F]:
    """One click option per field of ``model``; ``flags`` renames a field's flag (``text_files`` -> ``--text``),
    and a list field is a repeatable flag."""
    short, flags = short or {}, flags or {}

    def decorate(fn: F) -> F:
        for name, field in reversed(model.model_fields.items()):
            decls = [flags.get(name, flag(name)), *([short[name]] if name in short else []), name]
            if field.annotation is bool:  # a switch, off unless given
                fn = click.option(*decls, is_flag=True, default=field.default, help=field.description)(fn)
                continue
            if typing.get_origin(field.annotation) is list:
                fn = click.option(*decls, multiple=True, help=field.description)(fn)
                continue
            fn = click.option(*decls, type=_click_type(field.annotation), default=field.default,
                              show_default=field.default is not None, help=field.description)(fn)
        return fn

    return decorate


def pop_model(model: type[M], kwargs: dict[str, Any]) -> M:
    """Take ``model``'s fields out of a command's kwargs and validate them (errors name the setting)."""
    values = {name: kwargs.pop(name) for name in model.model_fields}
    return validated(model, RecipeError, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})


def for_command(error: DusError) -> DusError:
    """The error with its setting shown as the running command's flag (when the command has one)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return error
    return error.naming({p.name: max(p.opts, key=len) for p in ctx.command.params
                         if isinstance(p, click.Option) and p.name})
