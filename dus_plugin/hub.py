"""Publish a verified model folder (weights, card, results) to the Hugging Face Hub.

The token comes only from the environment or huggingface_hub's login and is never printed or
written: nothing here formats it, and Hub errors are reduced to their status and message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from dus_plugin.errors import DusError, HubError, NetworkError
from dus_plugin.network import NETWORK_ERRORS, unreachable

LOG = logging.getLogger(__name__)
IGNORE = [".dus-tmp-*", "**/.dus-tmp-*", ".*.tmp-*", "**/.tmp-*", "eval/step-*.json"]


@dataclass
class PushResult:
    repo_id: str
    revision: str
    files: list[tuple[str, int]] = field(default_factory=list)
    commit_url: str | None = None
    dry_run: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def upload_listing(folder: Path) -> list[tuple[str, int]]:
    """(path in repo, size) of every file upload_folder would send, with IGNORE applied."""
    from huggingface_hub.utils import filter_repo_objects

    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    kept = list(filter_repo_objects(paths, ignore_patterns=IGNORE))
    return [(p, (folder / p).stat().st_size) for p in kept]


def commit_message(folder: Path) -> str:
    from dus_plugin.manifest import Manifest

    m = Manifest.read(folder)
    if m.plan is None:
        return f"{m.base_name()}, continued pretraining [dus-plugin]"
    return (f"DUS {m.base_name()}: {m.plan.n} -> {m.plan.s} layers" + (f" (m={m.plan.m})" if m.plan.m else "")
            + (", continued pretraining" if m.is_trained else "") + " [dus-plugin]")


def push(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         dry_run: bool = False, message: str | None = None, endpoint: str | None = None,
         token: str | None = None, allow_unlinked: bool = False) -> PushResult:
    """Verify ``folder``, make sure it has a card, then create the repo and upload in one commit."""
    from dus_plugin.validation import check_repo_id
    from dus_plugin.verify import verify

    folder = Path(folder)
    try:
        check_repo_id(repo_id)
    except ValueError as e:
        raise HubError(f"`repo_id` {e}", setting="repo_id") from None
    try:
        verify(folder, forward=False, quiet=True)
    except DusError as e:
        raise HubError(f"refusing to push {folder}: it fails dus verify ({e})") from None
    revision = revision or "main"
    card = folder / "README.md"
    _require_base_model(folder, card, allow_unlinked)  # a dry run refuses what the push would refuse
    if dry_run:  # changes nothing on disk: a card that is missing is listed as the one a push would write
        files = upload_listing(folder)
        return PushResult(repo_id, revision, files + ([("README.md (written by the push)", 0)]
                                                      if not card.is_file() else []), dry_run=True)
    if not card.is_file():
        from dus_plugin.card import write_card

        write_card(folder)
        LOG.info("wrote %s (no card yet)", card)
    result = PushResult(repo_id, revision, upload_listing(folder))
    result.commit_url = _upload(folder, repo_id, private, revision, message or commit_message(folder), endpoint, token)
    return result


def _require_base_model(folder: Path, card: Path, allow_unlinked: bool) -> None:
    """A Hub reader must be able to follow the model to its base; publishing without that is a choice.

    Without a card yet, the one the push would write names the manifest's base id.
    """
    from huggingface_hub import ModelCard

    from dus_plugin.manifest import Manifest

    if allow_unlinked:
        return
    if card.is_file() and ModelCard.load(card).data.base_model:
        return
    if not card.is_file() and (base := Manifest.read(folder).base) is not None and base.hub_id:
        return
    raise HubError(f"{card if card.is_file() else 'the card a push would write'} names no base_model, so the Hub cannot link this model to its base; write the card "
                   "with the base's Hub id (dus card --base-model ID, or base_model_id in a dus run recipe), "
                   "or set `allow_unlinked` to push without it", setting="allow_unlinked")


def _upload(folder: Path, repo_id: str, private: bool, revision: str, message: str, endpoint: str | None,
            token: str | None) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # the commit is guarded: if someone pushed since we looked, the Hub refuses instead of overwriting
        parent = api.repo_info(repo_id, revision=revision).sha
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision, commit_message=message,
                                 ignore_patterns=IGNORE, parent_commit=parent)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        reason = (e.server_message or str(e).splitlines()[0]).strip()
        raise HubError(f"the Hub refused the push to {repo_id}@{revision} (HTTP {status}: {reason}); "
                       "check the repo id and that your token (HF_TOKEN or `hf auth login`) can write to it") from None
    except NETWORK_ERRORS as e:
        raise NetworkError(unreachable("the Hub", f"pushing to {repo_id}", e, api.endpoint)) from None
    return str(info.commit_url if hasattr(info, "commit_url") else info)
