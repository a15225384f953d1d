"""File helpers: atomic writes (a reader never sees a half-written file), YAML mappings read with one-line errors."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# A tokenizer folder has tokenizer_config.json and one of these (the fast tokenizer, or a sentencepiece model).
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model")


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A hidden sibling folder to fill; renamed to ``path`` when the block ends cleanly, removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_folder_problem(path: str | Path) -> str | None:
    """What keeps ``path`` from being a model folder, said plainly (missing, or no config.json); None if it is one."""
    p = Path(path)
    if not p.is_dir():
        return f"{p} does not exist"
    if not (p / "config.json").is_file():
        return f"{p} has no config.json, so it is not a model folder"
    return None


def check_writable(path: str | Path) -> None:
    """Raise the OSError a later write to ``path`` would meet (read-only, no permission, full), before the work
    whose result it would hold is done."""
    import tempfile

    parent = Path(path).parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=parent, prefix=".dus-probe-"):
        pass


def not_utf8(path: str | Path, error: UnicodeDecodeError) -> str:
    """The one-line reason and fix for a text file that is not UTF-8."""
    bad = error.object[error.start:error.start + 1].hex()
    return (f"{path} is not UTF-8 text (byte 0x{bad} at offset {error.start}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path} > {Path(path).stem}.utf8{Path(path).suffix}`")


def file_sha256(path: str | Path) -> str | None:
    """sha256 of a small file's bytes (a manifest, a recipe); None when it does not exist."""
    import hashlib

    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def parse_size(value: str | int) -> int:
    """'5B' -> 5_000_000_000 (K, M, B suffixes, as mergekit's option syntax); ValueError if it is none."""
    if isinstance(value, int):
        return value
    units = {"k": 10**3, "m": 10**6, "b": 10**9}
    text = value.strip().lower()
    try:
        size = int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        size = 0
    if size <= 0:
        raise ValueError(f"{value!r} is not a size; write a positive number with K, M or B, e.g. 5B")
    return size


def read_yaml_mapping(path: str | Path, error: type[Exception], what: str, hint: str) -> dict:
    """The YAML mapping in ``path`` (empty file: {}); ``error`` with one line when missing, malformed or not a mapping.

    ``what`` names the file in messages ("training config"), ``hint`` says where to start when it is missing.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist; {hint}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise error(f"{what} {path} is not valid YAML{f' at line {mark.line + 1}' if mark else ''}; "
                    "fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {path} must be a YAML mapping of fields, not a {type(data).__name__}")
    return data
