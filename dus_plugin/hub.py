"""Publish a verified model folder (weights, card, results) to the Hugging Face Hub.

The token comes only from the environment or huggingface_hub's login and is never printed or
written: nothing here formats it, and Hub errors are reduced to their status and message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from dus_plugin.errors import DusError

LOG = logging.getLogger(__name__)
IGNORE = [".dus-tmp-*", "**/.dus-tmp-*", ".*.tmp-*", "**/.tmp-*", "eval/step-*.json"]


class HubError(DusError, RuntimeError):
    """The Hub refused or failed an operation; the message says which and why."""


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
    from dus_plugin.manifest import read_manifest

    m = read_manifest(folder)
    plan = m["plan"]
    trained = any(s["stage"] == "train" for s in m.get("stages", []))
    base = m["base"].get("hub_id") or m["base"]["ref"]
    return (f"DUS {base}: {plan['n']} -> {plan['s']} layers"
            + (f" (m={plan['m']})" if plan.get("m") else "") + (", continued pretraining" if trained else "")
            + " [dus-plugin]")


def push(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         dry_run: bool = False, message: str | None = None, endpoint: str | None = None,
         token: str | None = None) -> PushResult:
    """Verify ``folder``, make sure it has a card, then create the repo and upload in one commit."""
    from dus_plugin.verify import verify

    folder = Path(folder)
    try:
        verify(folder, forward=False, quiet=True)
    except DusError as e:
        raise HubError(f"refusing to push {folder}: it fails dus verify ({e})") from None
    if not (folder / "README.md").is_file():
        from dus_plugin.card import write_card

        write_card(folder)
        LOG.info("wrote %s/README.md (no card yet)", folder)
    revision = revision or "main"
    result = PushResult(repo_id, revision, upload_listing(folder), dry_run=dry_run)
    if dry_run:
        return result
    result.commit_url = _upload(folder, repo_id, private, revision, message or commit_message(folder), endpoint, token)
    return result


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
    except (OSError, ValueError) as e:
        raise HubError(f"could not reach the Hub for {repo_id} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return str(info.commit_url if hasattr(info, "commit_url") else info)
