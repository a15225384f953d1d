"""One-line messages from pydantic validation errors, naming the field the user wrote."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ValidationError

from dus_plugin.errors import DusError

M = TypeVar("M", bound=BaseModel)


def field_path(loc: tuple[Any, ...]) -> str:
    """('slices', 1, 'sources', 0, 'layer_range') -> 'slices[1].sources[0].layer_range'."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def first_error(e: Any, where: str, unknown_hint: str = "unknown key (misspelled?)",
                overrides: dict[str, Any] | None = None, prefix: str = "") -> str:
    """'<where>: field <path>: <message>' for the first error of a pydantic ValidationError.

    When the field came from ``overrides`` (`--set KEY=VALUE`, nested; ``prefix`` is where the validated
    mapping sits in them), the line blames the --set, not the file.
    """
    err = e.errors()[0]
    key = prefix + field_path(err["loc"])
    if key in _dotted(overrides or {}):
        return f"--set {key}: {_message(err, unknown_hint)} (the recipe file was not the cause)"
    return f"{where}: field {field_path(err['loc'])}: {_message(err, unknown_hint)}"


def _dotted(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for k, v in tree.items():
        keys.add(prefix + k)
        if isinstance(v, dict):
            keys |= _dotted(v, f"{prefix}{k}.")
    return keys


def _message(err: dict[str, Any], unknown_hint: str = "unknown key (misspelled?)") -> str:
    return unknown_hint if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")


def validated(model: type[M], error: type[DusError], **values: Any) -> M:
    """``model(**values)``, or ``error`` naming the first bad field as a setting (the CLI shows its flag)."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        name = field_path(err["loc"])
        raise error(f"`{name}`: {_message(err)}", setting=name) from None


def check_repo_id(value: str) -> str:
    """A Hub repo id as huggingface_hub validates it ('org/name'); ValueError naming the rule otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as e:
        raise ValueError(f"{value!r} is not a Hub repo id ({str(e).splitlines()[0].rstrip('.')}); "
                         "write it as org/name") from None
    return value


HubId = Annotated[str, AfterValidator(check_repo_id)]
"""A Hub repo id, checked before any work."""


def deep_merged(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``change`` laid over it, nested mappings merged key by key (overrides on a config)."""
    out = dict(base)
    for key, value in change.items():
        out[key] = deep_merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
