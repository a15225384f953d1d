"""`dus run`: the whole chain on the shipped quickstart base, shortened; re-running skips every stage."""

import json

import pytest
import yaml
from click.testing import CliRunner

from dus_plugin.cli import main
from dus_plugin.pipeline import PKG

from conftest import REPO


def test_quickstart_assets_ship_with_the_package():
    data = PKG / "quickstart_data"
    cfg = json.loads((data / "base" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 32 and (data / "base" / "model.safetensors").is_file()
    assert "Python Software Foundation" in (data / "LICENSE-corpus.txt").read_text()
    size = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    assert size < 8 * 2**20  # "a few MB in total"


def test_dus_run_without_a_recipe_chains_every_stage_and_resumes(tmp_path, monkeypatch):
    """`dus run` with no argument (the README's command), shortened with --set, from any directory."""
    monkeypatch.chdir(tmp_path)
    short = ["--set", f"output_dir={tmp_path / 'qs'}", "--set", "train.max_steps=4", "--set", "train.eval_every=2",
             "--set", "train.save_every=2", "--set", "train.log_every=1"]
    r = CliRunner().invoke(main, ["run", "-q", *short], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "[7/7] model card: done" in r.output
    assert "| metric | base | upscaled | trained |" in r.output
    out = tmp_path / "qs"
    up = json.loads((out / "upscaled" / "dus_manifest.json").read_text())
    assert up["plan"]["n"] == 32 and up["plan"]["s"] == 48
    trained = json.loads((out / "train" / "final" / "eval" / "trained.json").read_text())
    assert trained["stage"] == "trained" and trained["step"] == 4
    card = (out / "train" / "final" / "README.md").read_text()
    assert "base_model_relation: finetune" in card and "| metric | base | upscaled | trained |" in card
    again = CliRunner().invoke(main, ["run", "-q", *short], catch_exceptions=False)
    assert again.exit_code == 0 and again.output.count("already complete, skipped") == 6


def test_quickstart_recipe_ships_inside_the_package():
    assert (REPO / "configs" / "quickstart.yml").resolve() == (PKG / "quickstart_data" / "quickstart.yml").resolve()
    assert yaml.safe_load((PKG / "quickstart_data" / "quickstart.yml").read_text())["upscale"]["drop"] == 8


@pytest.mark.parametrize("sets,message", [
    (["train.max_stepz=3"], "max_stepz"),
    (["upscale.drop=many"], "upscale.drop"),
    (["train"], "is not KEY=VALUE"),
    (["train..x=1"], "is not KEY=VALUE"),
])
def test_dus_run_set_errors_are_one_line(tmp_path, sets, message):
    args = ["run", "-q"] + [x for s in sets for x in ("--set", s)] + ["--set", f"output_dir={tmp_path / 'o'}"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
