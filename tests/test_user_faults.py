"""Ordinary mistakes and I/O faults of the machine (issue 30): one line, exit != 0, nothing half-written, nothing lost.

Faults are planted for real where a test can make them (latin-1 bytes, a missing folder); here a read-only
location and a full disk are injected at the write itself, so they run on any machine. tests/test_real_faults.py
plants both for real, on tmpfs mounts, where the machine allows a mount.
"""

import errno
import json
import os
from pathlib import Path

import yaml

from conftest import REPO
from helpers import assert_one_line_error, dus, dus_ok

CORPUS = REPO / "data" / "tiny_corpus.txt"


def train_config(tmp_path: Path, model: Path, **over) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "cpt_tiny.yml").read_text())
    cfg.update({"model": str(model), "output_dir": str(tmp_path / "run"), "seam": {"focus": "none"}, **over})
    cfg["data"]["sources"] = [{"path": str(CORPUS)}]
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_with_a_model_folder_that_does_not_exist(tmp_path):
    cfg = train_config(tmp_path, tmp_path / "out" / "tiny-dus")
    for extra in ([], ["--estimate"]):
        line = assert_one_line_error(dus("train", cfg, *extra), "tiny-dus does not exist", "dus upscale")
        assert "huggingface" not in line.lower()


def test_train_with_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes").mkdir()
    assert_one_line_error(dus("train", train_config(tmp_path, tmp_path / "notes")), "no config.json")


def test_latin1_text_is_named_in_eval_and_train(tiny_llama, tmp_path):
    bad = tmp_path / "held.txt"
    bad.write_bytes("Café société, façade: ".encode("latin-1") * 20)
    assert_one_line_error(dus("eval", tiny_llama, "--text", bad, "-q", "-o", tmp_path / "r.json"),
                          "held.txt is not UTF-8", "0xe9", "iconv")
    assert not (tmp_path / "r.json").exists()
    cfg = yaml.safe_load(train_config(tmp_path, tiny_llama).read_text())
    cfg["data"]["sources"] = [{"path": str(bad)}]
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    assert_one_line_error(dus("train", tmp_path / "cfg.yml", "-q"), "held.txt is not UTF-8")


def _fail_replace_into(folder: Path, code: int, monkeypatch) -> None:
    """Every rename into ``folder`` fails with ``code``, as on a read-only or full filesystem."""
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).parent == folder:
            raise OSError(code, os.strerror(code), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


def test_plan_into_a_read_only_folder(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    _fail_replace_into(out, errno.EROFS, monkeypatch)
    line = assert_one_line_error(dus("plan", tiny_llama, "--drop", 2, "-o", out / "r.yml"), "read-only")
    assert str(out / "r.yml") in line and not list(out.iterdir())  # no temporary file left behind


def test_full_disk_at_a_checkpoint_leaves_no_partial_checkpoint(tiny_llama, tmp_path, monkeypatch):
    import accelerate

    def save_state(self, output_dir, **k):
        (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 1000)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(output_dir))

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    cfg = train_config(tmp_path, tiny_llama, max_steps=4, save_every=2)
    assert_one_line_error(dus("train", cfg, "-q"), "could not write checkpoint step-0000002",
                          "No space left on device", "the last complete checkpoint is none")
    ckpts = tmp_path / "run" / "checkpoints"
    assert ckpts.is_dir() and not list(ckpts.iterdir())  # the partial checkpoint is gone


def test_a_layer_spec_with_a_gap_is_refused_unless_asked_for(tmp_path):
    from dus_plugin.fixtures import make_tiny_model

    base = make_tiny_model("llama", tmp_path / "base", layers=10)
    assert_one_line_error(dus("plan", base, "--layers", "0:4,6:10", "-o", tmp_path / "r.yml"),
                          "leaves out base layers [4, 5]", "--allow-gaps")
    assert not (tmp_path / "r.yml").exists()
    ok = dus_ok("plan", base, "--layers", "0:4,6:10", "--allow-gaps")
    assert "s=8" in ok.stdout


def test_plan_writes_a_relative_base_as_an_absolute_path(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(tiny_llama).parent)
    dus_ok("plan", Path(tiny_llama).name, "--drop", 2, "-o", tmp_path / "r.yml")
    models = {s["sources"][0]["model"] for s in yaml.safe_load((tmp_path / "r.yml").read_text())["slices"]}
    assert models == {str(Path(tiny_llama).resolve())}


def test_an_argument_error_loads_no_heavy_library():
    """`dus plan BASE --drop 0` is refused before torch, transformers or mergekit are imported (issue 30: each
    command spent 8-9 CPU seconds starting; measured after the fix: 0.4 s)."""
    import subprocess
    import sys

    code = ("import sys\nfrom click.testing import CliRunner\nfrom dus_plugin.cli import main\n"
            "r = CliRunner().invoke(main, ['plan', 'some/base', '--drop', '0'])\n"
            "assert r.exit_code != 0 and '--drop' in r.output, r.output\n"
            "print(sorted({'torch', 'transformers', 'mergekit'} & {m.split('.')[0] for m in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_dus_processes_let_idle_threads_sleep_on_a_busy_machine(monkeypatch):
    """OpenMP threads that spin when idle starve a shared machine (issue 30); on an idle one spinning is faster,
    so the choice follows the load; a user's own setting is kept."""
    import dus_plugin.threads as threads

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(threads, "other_runnable", lambda: 0)
    dus("plan", "some/base", "--drop", "0")
    assert "OMP_WAIT_POLICY" not in os.environ and os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setattr(threads, "other_runnable", lambda: 2 * (os.cpu_count() or 1))
    dus("plan", "some/base", "--drop", "0")
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.share_cpus_politely()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_runnable_count_sees_busy_processes():
    import multiprocessing as mp

    from dus_plugin.threads import other_runnable

    workers = [mp.Process(target=_spin, daemon=True) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        assert other_runnable() >= 2
    finally:
        for w in workers:
            w.terminate()


def _spin() -> None:
    while True:
        pass


def test_the_estimate_reads_in_one_unit_with_a_readable_count(tiny_llama, tmp_path):
    out = dus_ok("train", train_config(tmp_path, tiny_llama), "--estimate").output
    head, *rows = [line for line in out.splitlines() if line.strip()][:6]
    assert "0.00B" not in head and "K parameters" in head, head
    assert len({row.split()[-1] for row in rows}) == 1, rows  # weights .. total, all MB (or all GB)


def test_a_config_with_more_layers_than_tensors_says_how_many_the_tensors_cover(tmp_path):
    from dus_plugin.fixtures import make_tiny_model

    base = make_tiny_model("llama", tmp_path / "base", layers=5)
    cfg = json.loads((base / "config.json").read_text())
    cfg["num_hidden_layers"] = 8
    (base / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(dus("plan", base, "--drop", 2), "cover 5 layers (0..4), not the 8 layers")


def test_eval_into_a_read_only_location_fails_before_it_computes(tiny_llama, tmp_path, monkeypatch):
    import tempfile

    import dus_plugin.eval.run as run

    ro = tmp_path / "ro"
    real = tempfile.NamedTemporaryFile

    def probe(*a, dir=None, **k):
        if dir is not None and Path(dir) == ro:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", probe)
    monkeypatch.setattr(run, "evaluate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("evaluated")))
    held = tmp_path / "held.txt"
    held.write_text(CORPUS.read_text()[:2000])
    assert_one_line_error(dus("eval", tiny_llama, "--text", held, "-q", "-o", ro / "r.json"), "read-only", str(ro))


def test_a_misspelled_set_key_is_blamed_on_the_set_not_the_recipe(tmp_path):
    recipe = yaml.safe_load((REPO / "configs" / "quickstart.yml").read_text())
    recipe["output_dir"] = str(tmp_path / "qs")
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    for key in ("train.max_step=5", "upscale.dropp=4"):
        line = assert_one_line_error(dus("run", tmp_path / "r.yml", "--set", key), f"--set {key.split('=')[0]}",
                                     "unknown key")
        assert str(tmp_path / "r.yml") not in line
    assert not (tmp_path / "qs").exists()


def test_eval_and_analyze_say_a_folder_does_not_exist(tmp_path):
    held = tmp_path / "held.txt"
    held.write_text(CORPUS.read_text()[:2000])
    for cmd in (["eval", tmp_path / "nope", "--text", held], ["analyze", tmp_path / "nope", "--text", held]):
        assert_one_line_error(dus(*cmd), f"{tmp_path / 'nope'} does not exist")


def test_mergekit_yaml_refuses_slices_of_two_models(tiny_models, tmp_path):
    dus_ok("plan", tiny_models["llama"], "--drop", 2, "-o", tmp_path / "r.yml")
    doc = yaml.safe_load((tmp_path / "r.yml").read_text())
    doc["slices"][1]["sources"][0]["model"] = str(tiny_models["mistral"])
    (tmp_path / "two.yml").write_text(yaml.safe_dump(doc))
    assert_one_line_error(dus("mergekit-yaml", tmp_path / "two.yml", tmp_path / "out"), "stacks slices of 2 models",
                          "stock `mergekit-yaml`")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_plan_says_when_it_replaces_a_file(tiny_llama, tmp_path):
    assert "replaced" not in dus_ok("plan", tiny_llama, "--drop", 2, "-o", tmp_path / "r.yml").stderr
    assert "it replaced the file that was there" in dus_ok("plan", tiny_llama, "--drop", 2, "-o", tmp_path / "r.yml").stderr
