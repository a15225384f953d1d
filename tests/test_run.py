"""`dus run`: the whole chain on the shipped quickstart base, shortened; re-running skips every stage."""

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dus_plugin.cli import main
from dus_plugin.pipeline import PKG

from conftest import REPO
from helpers import free_port


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
    first = json.loads((out / "train" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["baseline_val_loss"] > 0  # the base's line on the loss curve
    card = (out / "train" / "final" / "README.md").read_text()
    assert "base_model_relation: finetune" in card and "| metric | base | upscaled | trained |" in card
    again = CliRunner().invoke(main, ["run", "-q", *short], catch_exceptions=False)
    assert again.exit_code == 0 and again.output.count("from the same inputs, skipped") == 6
    assert f"model:      {out / 'train' / 'final'}" in again.output and f"summary:    {out / 'summary.md'}" in again.output
    summary = (out / "summary.md").read_text()  # the table and where every result lies, relative to the summary
    assert "| metric | base | upscaled | trained |" in summary and "- card: `train/final/README.md`" in summary
    for rel in ("eval/base.json", "upscaled/eval/upscaled.json", "train/final/eval/trained.json"):
        assert f"- result file: `{rel}`" in summary and (out / rel).is_file()

    # a changed eval setting redoes the evals only; training is kept
    evals = CliRunner().invoke(main, ["run", "-q", *short, "--set", "eval.max_length=32"], catch_exceptions=False)
    assert evals.exit_code == 0, evals.output
    assert evals.output.count("eval.max_length changed from 128 to 32; redoing it") == 3
    assert "continued pretraining: already complete from the same inputs" in evals.output
    assert json.loads((out / "eval" / "base.json").read_text())["perplexity"]["max_length"] == 32

    # issue 15: --set upscale.drop=12 in the same folder never reuses the 48-layer model built for m = 8
    manifest = (out / "upscaled" / "dus_manifest.json").read_bytes()
    stale = CliRunner().invoke(main, ["run", "-q", *short, "--set", "upscale.drop=12"])
    assert stale.exit_code == 1, stale.output
    assert "upscale.drop changed from 8 to 12" in stale.output and "--restart" in stale.output
    assert len(stale.output.strip().splitlines()) == 1
    assert (out / "upscaled" / "dus_manifest.json").read_bytes() == manifest  # refused before touching anything
    redo = CliRunner().invoke(main, ["run", "-q", *short, "--set", "upscale.drop=12", "--restart"],
                              catch_exceptions=False)
    assert redo.exit_code == 0, redo.output
    assert json.loads((out / "upscaled" / "dus_manifest.json").read_text())["plan"]["s"] == 40
    assert json.loads((out / "train" / "final" / "config.json").read_text())["num_hidden_layers"] == 40
    assert "upscale + verify: stage plan" not in redo.output and "trained: train.data" not in redo.output


def test_dus_run_names_the_yaml_key_and_dus_plan_the_flag(tmp_path, tiny_llama):
    """Issue 15: one library error, named as the caller wrote the setting."""
    r = CliRunner().invoke(main, ["run", "-q", "--set", "upscale.drop=0", "--set", f"output_dir={tmp_path / 'o'}"])
    assert r.exit_code == 1 and "error: upscale.drop must be at least 1" in r.output, r.output
    r = CliRunner().invoke(main, ["plan", str(tiny_llama), "--drop", "0"])
    assert r.exit_code == 1 and "error: --drop must be at least 1" in r.output, r.output
    r = CliRunner().invoke(main, ["upscale", "x.yml", str(tmp_path / "u"), "--shard-size", "lots"])
    assert r.exit_code == 1 and "error: --shard-size: 'lots' is not a size" in r.output, r.output


def test_quickstart_recipe_ships_inside_the_package():
    assert (REPO / "configs" / "quickstart.yml").resolve() == (PKG / "quickstart_data" / "quickstart.yml").resolve()
    assert yaml.safe_load((PKG / "quickstart_data" / "quickstart.yml").read_text())["upscale"]["drop"] == 8


@pytest.mark.parametrize("sets,message", [
    (["train.max_stepz=3"], "max_stepz"),
    (["upscale.drop=many"], "upscale.drop"),
    (["train"], "is not KEY=VALUE"),
    (["train..x=1"], "is not KEY=VALUE"),
    (["launch.config_file=nope.yaml"], "field launch.config_file: nope.yaml does not exist"),
])
def test_dus_run_set_errors_are_one_line(tmp_path, sets, message):
    args = ["run", "-q"] + [x for s in sets for x in ("--set", s)] + ["--set", f"output_dir={tmp_path / 'o'}"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_the_papers_run_recipe_validates_with_its_training_file():
    from dus_plugin.pipeline import load_run_recipe, package_path, train_config

    r = load_run_recipe(REPO / "configs" / "recipe_solar.yml", {"launch": {"num_processes": 4}})
    cfg = train_config(r, "recipe_solar.yml")
    assert r.upscale.drop == 8 and r.base == "mistralai/Mistral-7B-v0.1"
    assert cfg.data.seq_len == 4096 and cfg.model == "out/solar-dus-run/upscaled"  # from cpt_solar.yml, then the run's
    assert r.launch.num_processes == 4 and r.launch.config_file == str(package_path("train/fsdp.yaml"))
    assert yaml.safe_load(Path(r.launch.config_file).read_text())["distributed_type"] == "FSDP"


def test_dus_run_trains_under_a_two_process_accelerate_launch(tmp_path, monkeypatch, capfd):
    """The training stage as a real `accelerate launch` (2 CPU ranks, gloo); the rest of the run in-process."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    recipe = yaml.safe_load((REPO / "configs" / "quickstart.yml").read_text())
    recipe.update(output_dir=str(tmp_path / "qs"), launch={
        "num_processes": 2, "args": ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
                                     "--dynamo_backend", "no", "--main_process_port", free_port()]})
    recipe["train"].update(max_steps=4, global_batch_size=16, micro_batch_size=8, eval_every=2, log_every=1)
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    capfd.readouterr()
    # fails inside the training processes: one line from the process, one from the launcher, no traceback
    bad = CliRunner().invoke(main, ["run", str(tmp_path / "r.yml"), "-q", "--set", "train.memory_limit_gb=0.001"])
    assert bad.exit_code == 1 and "accelerate launch exited with status 1" in bad.output, bad.output
    err = capfd.readouterr().err
    assert err.count("training needs about") == 1 and "Traceback" not in err, err
    assert re.search(r"error: training process \d exited with status 1", err), err
    assert not (tmp_path / "qs" / "train" / "final").exists()
    r = CliRunner().invoke(main, ["run", str(tmp_path / "r.yml"), "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.output.count("from the same inputs, skipped") == 4  # plan, upscale, both evals: only training reruns
    summary = json.loads((tmp_path / "qs" / "train" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["distributed_type"] == "MULTI_CPU" and summary["steps"] == 4
    assert (tmp_path / "qs" / "train" / "final" / "eval" / "trained.json").is_file()




def test_ctrl_c_during_dus_run_keeps_the_checkpoint_and_names_the_command(tmp_path):
    from helpers import ctrl_c_after_checkpoint

    recipe = yaml.safe_load((REPO / "configs" / "quickstart.yml").read_text())
    recipe["output_dir"] = str(tmp_path / "qs")
    recipe["train"].update(max_steps=5000, save_every=2, eval_every=0, eval_on_start=False)
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    ckpts = tmp_path / "qs" / "train" / "checkpoints"
    lines = ctrl_c_after_checkpoint(["run", str(tmp_path / "r.yml"), "-q", "--set", "train.log_every=3"], ckpts)
    assert len(lines) == 1 and lines[0].startswith("interrupted: interrupted during stage train"), lines
    assert f"training checkpoint {ckpts}" in lines[0] and f"dus run {tmp_path / 'r.yml'}" in lines[0], lines[0]
    # the command to continue repeats every override (issue 30: it dropped them and started a fresh default run)
    assert lines[0].endswith(f"Continue with: dus run {tmp_path / 'r.yml'} --set train.log_every=3"), lines[0]
    assert list(ckpts.glob("step-*")) and (tmp_path / "qs" / "upscaled" / "dus_manifest.json").is_file()
