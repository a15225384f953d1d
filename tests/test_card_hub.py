"""Model card, push to a real Hub-compatible server on 127.0.0.1, and mergekit-yaml with a Hub id."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, snapshot_download

from dus_plugin.card import build_card, write_card
from dus_plugin.errors import DusError
from dus_plugin.fixtures import make_tiny_model
from dus_plugin.hub import HubError, push

from conftest import REPO
from helpers import assert_one_line_error, dus, dus_ok, free_port, tensors
from hub_server import HubServer

TOKEN = "hf_dusTestSecretToken1234567890"


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def upscaled(tiny_llama, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("card")
    dus_ok("plan", tiny_llama, "--drop", 2, "-o", root / "r.yml")
    assert dus("upscale", root / "r.yml", root / "out", "-q", "--no-forward").exit_code == 0
    (root / "held.txt").write_text((REPO / "data" / "tiny_corpus.txt").read_text()[:2000])
    assert dus("eval", root / "out", "--text", root / "held.txt", "--max-length", 64, "-q").exit_code == 0
    assert dus("eval", tiny_llama, "--text", root / "held.txt", "--max-length", 64, "-o", root / "base.json",
               "-q").exit_code == 0
    return root


def test_card_metadata_round_trips(upscaled):
    out = upscaled / "out"
    path = write_card(out, base_model="meta-llama/Llama-3.2-1B", license="llama3.2",
                      results=[upscaled / "base.json"])
    card = ModelCard.load(path)
    d = card.data.to_dict()
    assert d["base_model"] == "meta-llama/Llama-3.2-1B" and d["base_model_relation"] == "merge"
    assert d["license"] == "llama3.2" and d["library_name"] == "transformers" and d["pipeline_tag"] == "text-generation"
    assert {"mergekit", "merge", "depth-up-scaling"} <= set(d["tags"])
    assert card.data.eval_results[0].metric_type == "perplexity"
    own = json.loads((out / "eval" / "upscaled.json").read_text())
    assert card.data.eval_results[0].metric_value == round(own["perplexity"]["perplexity"], 4)
    again = ModelCard(str(card))  # parse the written text back: same metadata
    assert again.data.to_dict() == d
    text = card.text
    assert "# Llama-3.2-1B depth up-scaled to 12 layers" in text and "| 6–11 | 2–7 |" in text
    assert "merge_method: passthrough" in text and "arXiv:2312.15166" in text
    assert_no_machine_paths(str(card), upscaled)
    # the command the card shows runs from the pushed folder: its recipe is there, naming the base by Hub id
    assert "dus upscale dus_recipe.yml" in text and "pip install dus-plugin\n" not in text
    recipe = yaml.safe_load((out / "dus_recipe.yml").read_text())
    assert recipe["slices"][0]["sources"][0]["model"] == "meta-llama/Llama-3.2-1B"
    assert "| metric | base | upscaled |" in text  # base result copied in, ordered before the upscale
    assert (out / "eval" / "base.json").is_file()


def test_card_after_training_says_finetune(upscaled, tmp_path):
    import yaml

    from dus_plugin.train.config import load_train_config
    from dus_plugin.train.loop import train

    cfg = yaml.safe_load((REPO / "configs" / "cpt_tiny.yml").read_text())
    cfg.update(model=str(upscaled / "out"), output_dir=str(tmp_path / "run"), max_steps=4, save_every=0)
    cfg["data"].update(sources=[{"path": str(REPO / "data" / "tiny_corpus.txt")}], cache_dir=str(tmp_path / "c"))
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    final = Path(train(load_train_config(tmp_path / "c.yml"), quiet=True).export_dir)
    card = build_card(final, base_model="org/base")
    assert_no_machine_paths(str(card), upscaled, tmp_path)
    trained_with = yaml.safe_load((final / "dus_train.yml").read_text())
    assert trained_with["model"] == "upscaled" and trained_with["data"]["sources"][0]["path"] == "tiny_corpus.txt"
    # the text is not published with the model, and the file says so where a reader looks (issue 30)
    assert "#   tiny_corpus.txt\n" in (final / "dus_train.yml").read_text() and not (final / "tiny_corpus.txt").exists()
    assert card.data.to_dict()["base_model_relation"] == "finetune"
    assert "continued-pretraining" in card.data.tags
    assert "tokens seen: 2,048" in card.text and "![loss curve](loss_curve.png)" in card.text
    assert (final / "loss_curve.png").is_file()
    r = dus("verify", final, "-q")
    assert r.exit_code == 0 and "trained export" in r.output


def assert_no_machine_paths(text: str, *roots: Path) -> None:
    for path in {*roots, REPO, Path.cwd(), Path.home()}:
        assert str(path) not in text, f"{path} leaked into the card"


def test_a_plain_base_trained_without_upscale_goes_through_verify_card_and_push(tiny_llama, tmp_path, hub):
    """Issue 15 bug 1: its manifest has no plan and no base; verify, the card and push's message must work."""
    from dus_plugin.hub import commit_message
    from dus_plugin.manifest import Manifest
    from dus_plugin.train.config import load_train_config
    from dus_plugin.train.loop import train

    cfg = yaml.safe_load((REPO / "configs" / "cpt_tiny.yml").read_text())
    cfg.update(model=str(tiny_llama), output_dir=str(tmp_path / "run"), max_steps=2, save_every=0, seam={})
    cfg["data"].update(sources=[{"path": str(REPO / "data" / "tiny_corpus.txt")}], cache_dir=str(tmp_path / "c"))
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    final = Path(train(load_train_config(tmp_path / "c.yml"), quiet=True).export_dir)
    m = Manifest.read(final)
    assert m.plan is None and m.is_trained and not m.is_upscale_output
    r = dus("verify", final, "-q")
    assert r.exit_code == 0 and "trained export" in r.output, r.output
    r = dus("card", final, "--base-model", "org/base")
    assert r.exit_code == 0, r.output
    card = ModelCard.load(final / "README.md")
    assert card.data.base_model == "org/base" and "Continued pretraining of [org/base]" in card.text
    assert_no_machine_paths(str(card), tiny_llama, tmp_path)
    assert commit_message(final) == f"{tiny_llama.name}, continued pretraining [dus-plugin]"
    push(final, "me/plain", endpoint=hub.url, token=TOKEN)
    assert "model.safetensors" in hub.state.repos["me/plain"].commits[hub.state.repos["me/plain"].branches["main"]]


def test_push_round_trips_through_a_local_hub(upscaled, hub, caplog, capfd):
    out = upscaled / "out"
    write_card(out, base_model="org/base")
    caplog.set_level(logging.DEBUG)
    result = push(out, "me/tiny-dus", private=True, endpoint=hub.url, token=TOKEN)
    assert "/me/tiny-dus/commit/" in result.commit_url
    repo = hub.state.repos["me/tiny-dus"]
    assert repo.private and repo.messages[repo.branches["main"]].startswith("DUS ")
    local = snapshot_download("me/tiny-dus", endpoint=hub.url, token=TOKEN, cache_dir=str(upscaled / "dl"))
    for path, size in result.files:
        assert (Path(local) / path).read_bytes() == (out / path).read_bytes(), path
    assert ModelCard.load(Path(local) / "README.md").data.to_dict() == ModelCard.load(out / "README.md").data.to_dict()
    # the token went only into the Authorization header
    assert any(TOKEN in v for h in hub.state.headers_seen for k, v in h.items() if k.lower() == "authorization")
    captured = capfd.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err
    assert not any(TOKEN in p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file() and p.suffix != ".safetensors")


def test_push_to_a_branch_and_parent_commit_guard(upscaled, hub):
    out = upscaled / "out"
    write_card(out, base_model="org/base")
    push(out, "me/branchy", revision="v1", endpoint=hub.url, token=TOKEN)
    repo = hub.state.repos["me/branchy"]
    assert "README.md" in repo.commits[repo.branches["v1"]]
    assert "README.md" not in repo.commits[repo.branches["main"]]


def test_dry_run_lists_files_and_uploads_nothing(upscaled, hub):
    r = dus("push", upscaled / "out", "--repo-id", "me/x", "--dry-run", "--allow-unlinked")
    assert r.exit_code == 0, r.output
    assert "model.safetensors" in r.output and "would go to me/x@main" in r.output
    assert not hub.state.requests


def test_push_refuses_a_folder_that_fails_verify(upscaled, tmp_path, hub):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(upscaled / "out", bad)
    (bad / "tokenizer.json").unlink()
    with pytest.raises(HubError, match="fails dus verify"):
        push(bad, "me/bad", endpoint=hub.url, token=TOKEN)
    assert "me/bad" not in hub.state.repos
    assert_one_line_error(dus("push", bad, "--repo-id", "me/bad"), "refusing to push", "tokenizer")


def test_hub_errors_are_one_line(upscaled, hub):
    with pytest.raises(HubError, match="HTTP 404"):
        push(upscaled / "out", "me/x", revision="main", endpoint=hub.url + "/nowhere", token=TOKEN)


def test_stock_mergekit_yaml_runs_the_solar_recipe_with_its_hub_id(hub, tmp_path):
    """configs/dus_solar.yml, unchanged, against a tiny 32-layer Mistral served as mistralai/Mistral-7B-v0.1."""
    base = make_tiny_model("mistral", tmp_path / "mistral", layers=32, dtype="bfloat16")
    push_base(base, hub, "mistralai/Mistral-7B-v0.1")
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "home"))
    exe = Path(sys.executable).with_name("mergekit-yaml")
    proc = subprocess.run([str(exe), str(REPO / "configs" / "dus_solar.yml"), str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, src = tensors(tmp_path / "out"), tensors(base)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 48
    for i, s in enumerate(list(range(24)) + list(range(8, 32))):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        assert torch.equal(got[name], src[f"model.layers.{s}.mlp.down_proj.weight"]), name


def push_base(folder: Path, hub: HubServer, repo_id: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(repo_id)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id)


def test_dus_upscale_and_plan_with_a_hub_id(hub, tmp_path, monkeypatch):
    base = make_tiny_model("qwen2", tmp_path / "qwen", layers=8)
    push_base(base, hub, "Qwen/tiny")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "ENDPOINT", hub.url)
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    r = dus("plan", "Qwen/tiny", "--drop", 2, "-o", tmp_path / "r.yml")
    assert r.exit_code == 0, r.output
    assert "model: Qwen/tiny" in (tmp_path / "r.yml").read_text()
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "home"))
    exe = Path(sys.executable).with_name("dus")
    proc = subprocess.run([str(exe), "upscale", str(tmp_path / "r.yml"), str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "dus_manifest.json").read_text())
    head = hub.state.repos["Qwen/tiny"].branches["main"]
    assert manifest["base"]["hub_id"] == "Qwen/tiny" and manifest["base"]["revision"] == head
    assert json.loads((tmp_path / "out" / "config.json").read_text())["layer_types"][6] == "full_attention"


def test_push_checks_the_repo_id_before_any_work(upscaled, hub):
    line = assert_one_line_error(dus("push", upscaled / "out", "--repo-id", "not a repo id", "--dry-run"),
                                 "--repo-id", "is not a Hub repo id")
    assert "Traceback" not in line and not hub.state.requests


def test_a_dry_run_changes_nothing_on_disk(upscaled, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(upscaled / "out", folder, ignore=shutil.ignore_patterns("README.md"))
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    r = dus("push", folder, "--repo-id", "me/x", "--dry-run", "--allow-unlinked")
    assert r.exit_code == 0 and "README.md (written by the push)" in r.output, r.output
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before


def test_a_dry_run_refuses_what_the_push_refuses(upscaled, tmp_path, hub):
    """A local base gives a card without base_model: the real push refuses it, so the dry run does too (issue 30)."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(upscaled / "out", folder, ignore=shutil.ignore_patterns("README.md"))
    for args in ([], ["--dry-run"]):
        assert_one_line_error(dus("push", folder, "--repo-id", "me/x", *args), "names no base_model",
                              "--allow-unlinked")
    assert not hub.state.requests


def test_push_to_an_unreachable_hub_is_one_line(upscaled, tmp_path, monkeypatch):
    """Nothing listens on the port: huggingface_hub's connection error becomes one line naming the Hub."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    port = free_port()  # free a moment ago, and nothing listens on it
    write_card(upscaled / "out", base_model="org/base")
    with pytest.raises(DusError) as e:
        push(upscaled / "out", "me/x", endpoint=f"http://127.0.0.1:{port}", token=TOKEN)
    msg = str(e.value)
    assert msg.startswith(f"could not reach the Hub (http://127.0.0.1:{port}) while pushing to me/x") and "\n" not in msg
    assert "HF_HUB_OFFLINE" in msg and TOKEN not in msg


def test_push_refuses_a_card_without_base_model_unless_asked(upscaled, tmp_path, hub):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(upscaled / "out", folder, ignore=shutil.ignore_patterns("README.md"))
    write_card(folder)  # a local base and no --base-model: the card cannot link it
    with pytest.raises(HubError, match="names no base_model") as e:
        push(folder, "me/unlinked", endpoint=hub.url, token=TOKEN)
    assert "`allow_unlinked`" in str(e.value) and "me/unlinked" not in hub.state.repos
    push(folder, "me/unlinked", endpoint=hub.url, token=TOKEN, allow_unlinked=True)
    assert "me/unlinked" in hub.state.repos


def test_the_commands_on_a_pushed_card_run_from_the_pushed_folder_alone(hub, tmp_path):
    """A reader downloads the repo and runs `dus upscale dus_recipe.yml OUT` as the card says: the base comes from
    the Hub by the id the card names, and the result equals the pushed weights."""
    base = make_tiny_model("llama", tmp_path / "base")
    push_base(base, hub, "me/tiny-base")
    dus_ok("plan", base, "--drop", 2, "-o", tmp_path / "r.yml")
    dus_ok("upscale", tmp_path / "r.yml", tmp_path / "out", "-q", "--base-model-id", "me/tiny-base")
    dus_ok("card", tmp_path / "out")
    push(tmp_path / "out", "me/tiny-dus", endpoint=hub.url, token=TOKEN)
    local = Path(snapshot_download("me/tiny-dus", endpoint=hub.url, token=TOKEN, cache_dir=str(tmp_path / "dl")))
    card = (local / "README.md").read_text()
    assert "dus upscale dus_recipe.yml" in card and (local / "dus_recipe.yml").is_file()
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "home"))
    proc = subprocess.run([str(Path(sys.executable).with_name("dus")), "upscale", "dus_recipe.yml", str(tmp_path / "again"),
                           "-q"], capture_output=True, text=True, env=env, timeout=600, cwd=local)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pushed, again = tensors(local), tensors(tmp_path / "again")
    assert pushed.keys() == again.keys() and all(torch.equal(pushed[k], again[k]) for k in pushed)


def test_the_quickstart_base_draws_no_link_warning_but_a_local_copy_does(tmp_path, caplog):
    """The shipped base has no Hub id its user could give, so warning on every quickstart run only alarms."""
    import logging
    import shutil

    shipped = REPO / "dus_plugin" / "quickstart_data" / "base"
    copy = tmp_path / "base"
    shutil.copytree(shipped, copy)
    warned = {}
    for name, base in (("shipped", shipped), ("copy", copy)):
        dus_ok("plan", base, "--drop", 8, "-o", tmp_path / f"{name}.yml")
        dus_ok("upscale", tmp_path / f"{name}.yml", tmp_path / name, "-q", "--no-forward")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dus_plugin.card"):
            build_card(tmp_path / name)
        warned[name] = "cannot link" in caplog.text
    assert warned == {"shipped": False, "copy": True}
