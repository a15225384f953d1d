"""`dus eval`: result files per checkpoint, the compare table, and the trainer's eval hook."""

import json

from helpers import assert_one_line_error, dus, dus_ok, free_port

from conftest import REPO

HELD_OUT = REPO / "data" / "tiny_corpus.txt"


def test_eval_writes_results_and_compares(tiny_llama, tmp_path):
    from click.testing import CliRunner

    from dus_plugin.cli import main

    recipe = tmp_path / "r.yml"
    dus_ok("plan", tiny_llama, "--drop", 2, "-o", recipe)
    assert dus("upscale", recipe, tmp_path / "up", "-q", "--no-forward").exit_code == 0
    text = tmp_path / "held.txt"
    text.write_text(HELD_OUT.read_text()[:3000])
    r1 = dus("eval", tiny_llama, "--text", text, "--max-length", 64, "-o", tmp_path / "base.json", "-q")
    r2 = dus("eval", tmp_path / "up", "--text", text, "--max-length", 64, "--tasks", "dus_tiny_mc:0",
             "--no-default-tasks", "-q")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    base = json.loads((tmp_path / "base.json").read_text())
    up = json.loads((tmp_path / "up" / "eval" / "upscaled.json").read_text())
    assert base["stage"] == "base" and base["manifest_sha256"] is None
    assert up["stage"] == "upscaled" and len(up["manifest_sha256"]) == 64 and up["step"] == 0
    assert up["perplexity"]["tokens"] > 100 and 0 < up["tasks"]["dus_tiny_mc"]["score"] <= 1
    assert {"torch", "transformers"} <= up["versions"].keys()
    table = CliRunner().invoke(main, ["eval", "--compare", str(tmp_path / "base.json"),
                                      str(tmp_path / "up" / "eval" / "upscaled.json")]).output
    assert "| metric | base | upscaled |" in table
    ppl_row = next(line for line in table.splitlines() if line.startswith("| perplexity"))
    assert f"{base['perplexity']['perplexity']:.3f}" in ppl_row and f"{up['perplexity']['perplexity']:.3f}" in ppl_row
    assert "| dus_tiny_mc (%) | — |" in table
    assert "Perplexity: windows of 64 tokens, stride 32" in table

    # issue 16: a result made with another window is marked, never silently side by side; labels stay distinct
    wide = dus("eval", tiny_llama, "--text", text, "--max-length", 128, "-o", tmp_path / "wide.json", "-q")
    assert wide.exit_code == 0, wide.output
    mixed = CliRunner().invoke(main, ["eval", "--compare", str(tmp_path / "base.json"), str(tmp_path / "wide.json")])
    assert "| metric | base (window 64/32) | base #2 (window 128/64) |" in mixed.output, mixed.output
    assert "not comparable" in mixed.output


def test_eval_never_writes_into_the_installed_package(tmp_path, monkeypatch):
    from dus_plugin.pipeline import PKG

    monkeypatch.chdir(tmp_path)
    shipped = PKG / "quickstart_data" / "base"
    before = sorted(shipped.rglob("*"))
    r = dus("eval", shipped, "--text", PKG / "quickstart_data" / "heldout.txt", "--max-length", 32, "-q")
    assert r.exit_code == 0, r.output
    assert sorted(shipped.rglob("*")) == before and (tmp_path / "eval" / "base.json").is_file()


def test_eval_with_an_unreachable_dataset_host_keeps_the_perplexity(tiny_llama, tmp_path):
    """lm-eval needs a dataset from the Hub, and nothing listens there: one line, and the perplexity is on disk."""
    import os
    import subprocess
    import sys

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_task.yaml").write_text(
        "task: hub_only_task\ndataset_path: some-org/some-dataset\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{q}}'\ndoc_to_target: 0\ndoc_to_choice: [a, b]\nmetric_list:\n  - metric: acc\n")
    port = free_port()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf")}
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "dus_plugin.cli", "eval", str(tiny_llama), "--text", str(HELD_OUT),
                        "--max-length", "32", "--tasks", "hub_only_task:0", "--include-path", str(tasks),
                        "--no-default-tasks", "-o", str(out), "-q"], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[-1].startswith("error: could not reach the dataset host while loading the data of lm-eval tasks")
    assert "--include-path" in lines[-1] and f"the perplexity is saved in {out}" in lines[-1], lines[-1]
    assert json.loads(out.read_text())["perplexity"]["tokens"] > 100


def test_eval_errors(tiny_llama, tmp_path):
    assert_one_line_error(dus("eval", tiny_llama, "--text", tmp_path / "none.txt"), "does not exist")
    assert_one_line_error(dus("eval", tmp_path, "--text", HELD_OUT), "not a model folder")
    assert_one_line_error(dus("eval", "--compare", tmp_path / "x.json"), "does not exist")
    assert dus("eval", tmp_path).exit_code == 2  # usage: nothing to evaluate


def test_trainer_calls_the_eval_hook(tiny_llama, tmp_path):
    import yaml

    from dus_plugin.train.config import load_train_config
    from dus_plugin.train.loop import train

    cfg = yaml.safe_load((REPO / "configs" / "cpt_tiny.yml").read_text())
    cfg.update(model=str(tiny_llama), output_dir=str(tmp_path / "run"), max_steps=4, save_every=0, seam={},
               eval={"every": 2, "text_files": [str(HELD_OUT)], "max_tokens": 500})
    cfg["data"].update(sources=[{"path": str(HELD_OUT)}], cache_dir=str(tmp_path / "c"))
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    train(load_train_config(tmp_path / "c.yml"), quiet=True)
    files = sorted((tmp_path / "run" / "eval").glob("step-*.json"))
    assert [f.name for f in files] == ["step-0000002.json", "step-0000004.json"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_perplexity" in r] == [2, 4]
    last = json.loads(files[-1].read_text())
    assert last["step"] == 4 and last["perplexity"]["perplexity"] == rows[-1]["val_perplexity"]
