"""Resolve a base model reference (local folder or Hub id) to its config and identity."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dus_plugin.errors import BaseModelError

if TYPE_CHECKING:
    from dus_plugin.architecture import Architecture

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedBase:
    """A base as the user named it, plus what we learned about it."""

    ref: str
    """What the user typed: a folder or a Hub repo id."""
    config: dict[str, Any]
    local_path: Path | None
    """The folder holding config.json (for a Hub id: the cached snapshot)."""
    hub_id: str | None
    revision: str | None
    """The Hub commit sha the config came from, when the base is on the Hub."""

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["?"])[0]

    @cached_property
    def arch(self) -> Architecture:
        """Its architecture, resolved once and handed down the stages."""
        from dus_plugin.architecture import Architecture

        return Architecture(self.config)


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or Path(ref).exists() or ref.count("/") > 1


def resolve_base(ref: str, revision: str | None = None) -> ResolvedBase:
    """Read ``config.json`` of a local folder or a Hub model; raise BaseModelError if neither works."""
    if _looks_like_path(ref):
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise BaseModelError(f"base folder {ref} does not exist; pass an existing model folder or a Hub id")
        return ResolvedBase(ref, _read_config(path / "config.json", ref), path, None, None)
    return _resolve_hub(ref, revision)


def _resolve_hub(repo_id: str, revision: str | None) -> ResolvedBase:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        cfg_path = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BaseModelError(
            f"base {repo_id!r} is not a local folder and its config.json could not be fetched from the Hub "
            f"({reason}); check the id and your network, or pass a local folder"
        ) from None
    # hf_hub_download returns .../snapshots/<commit>/config.json
    commit = cfg_path.parent.name if cfg_path.parent.parent.name == "snapshots" else revision
    return ResolvedBase(repo_id, _read_config(cfg_path, repo_id), cfg_path.parent, repo_id, commit)


def local_snapshot(base: ResolvedBase) -> Path:
    """The folder holding the base's files: the folder itself, or the Hub snapshot (downloaded as needed)."""
    if base.hub_id is None:
        assert base.local_path is not None
        return base.local_path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(base.hub_id, revision=base.revision,
                                  allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "README.md"]))


def _read_config(path: Path, ref: str) -> dict[str, Any]:
    if not path.is_file():
        raise BaseModelError(f"base {ref} has no config.json; point at a transformers model folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BaseModelError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); re-download the base") from None
    if not isinstance(cfg, dict):
        raise BaseModelError(f"{path} is not a JSON object; re-download the base")
    return cfg


def mergekit_architectures() -> dict[str, dict[str, Any]]:
    """Architecture name -> mergekit's JSON definition, read from its package data.

    Importing mergekit costs seconds (it pulls in much of transformers); its architecture
    definitions are plain JSON files, so the plan and the streaming writer read them directly.
    """
    import importlib.util

    spec = importlib.util.find_spec("mergekit")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(list(spec.submodule_search_locations)[0]) / "_data" / "architectures"
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(folder.glob("*.json")):
        try:
            d = json.loads(f.read_text())
        except ValueError:
            continue
        for name in d.get("architectures", []):
            out.setdefault(name, d)
    return out


def tokenizer_size(base: ResolvedBase) -> int | None:
    """Number of tokens the base's tokenizer knows (vocabulary + added tokens); None if unreadable."""
    path = base.local_path / "tokenizer.json" if base.local_path else None
    if (path is None or not path.is_file()) and base.hub_id:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(base.hub_id, "tokenizer.json", revision=base.revision))
        except Exception:  # no tokenizer.json on the Hub (sentencepiece only) or no network
            return None
    if path is None or not path.is_file():
        return None
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        ids = set(tok["model"]["vocab"].values()) | {t["id"] for t in tok.get("added_tokens", [])}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return len(ids)


def padded_vocab(base: ResolvedBase) -> tuple[int, int] | None:
    """(embedding rows, tokenizer size) when the base pads its vocabulary beyond its tokenizer."""
    from dus_plugin.plan import text_config

    rows = text_config(base.config).get("vocab_size")
    size = tokenizer_size(base)
    if isinstance(rows, int) and size is not None and size != rows:
        return rows, size
    return None


def base_tensor_names(base: ResolvedBase) -> list[str] | None:
    """The base's checkpoint tensor names: from its files, or its Hub index; None when neither is at hand."""
    from dus_plugin.tensors import weight_map

    if base.local_path is not None and any(base.local_path.glob("*.safetensors")):
        return list(weight_map(base.local_path))
    if base.hub_id is None:
        return None
    try:
        from huggingface_hub import get_safetensors_metadata

        meta = get_safetensors_metadata(base.hub_id, revision=base.revision)
        return list(meta.weight_map)
    except Exception as e:  # no network or no safetensors: the plan still works without identity filters
        LOG.info("could not read the tensor names of %s from the Hub: %s", base.hub_id, e)
        return None
