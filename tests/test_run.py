"""`dus run`: the whole chain on the shipped quickstart base, shortened; re-running skips every stage."""

import json

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


def test_dus_run_chains_every_stage_and_resumes(tmp_path):
    recipe = yaml.safe_load((REPO / "configs" / "quickstart.yml").read_text())
    recipe["output_dir"] = str(tmp_path / "qs")
    recipe["train"].update(max_steps=4, eval_every=2, save_every=2, log_every=1)
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    r = CliRunner().invoke(main, ["run", str(tmp_path / "r.yml"), "-q"], catch_exceptions=False)
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
    again = CliRunner().invoke(main, ["run", str(tmp_path / "r.yml"), "-q"], catch_exceptions=False)
    assert again.exit_code == 0 and again.output.count("already complete, skipped") == 6
