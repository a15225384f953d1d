"""The continued-pretraining trainer on a tiny upscaled model: real transformers, real accelerate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from dus_plugin.train.config import TrainConfigError, load_train_config
from dus_plugin.train.data import PackedData, document_position_ids, tokenize_source
from dus_plugin.train.loop import TrainingDiverged, train
from dus_plugin.upscale import UpscaleOptions, upscale

from conftest import REPO
from helpers import free_port, tensors

CORPUS = REPO / "data" / "tiny_corpus.txt"


@pytest.fixture(scope="module")
def tiny_dus(tiny_llama, tmp_path_factory) -> Path:
    from click.testing import CliRunner

    from dus_plugin.cli import main

    root = tmp_path_factory.mktemp("dus")
    assert CliRunner().invoke(main, ["plan", str(tiny_llama), "--drop", "2", "-o", str(root / "r.yml")]).exit_code == 0
    upscale(root / "r.yml", root / "model", UpscaleOptions(quiet=True, forward=False))
    return root / "model"


def make_config(tmp_path: Path, model: Path, **over) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "cpt_tiny.yml").read_text())
    cfg.update(model=str(model), output_dir=str(tmp_path / "run"))
    cfg["data"]["sources"] = [{"path": str(CORPUS)}]
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("cpt_*.yml")), ids=lambda p: p.name)
def test_shipped_training_configs_validate(path):
    cfg = load_train_config(path)
    assert cfg.grad_accum(1) >= 1 and cfg.total_steps() > 0


@pytest.mark.parametrize("change,field", [
    ({"learning_rate": 1}, "field learning_rate: unknown key"),
    ({"max_steps": None}, "exactly one of max_steps and max_tokens"),
    ({"global_batch_size": 6}, "not a multiple of micro_batch_size"),
    ({"precision": "fp4"}, "field precision"),
    ({"data": {"sources": [{"path": "x.txt", "streaming": True}], "seq_len": 8}}, "field data.sources[0]"),
    ({"seam": {"focus": "duplicated", "focus_steps": 0}}, "field seam"),
])
def test_config_errors_name_the_field(tmp_path, tiny_llama, change, field):
    with pytest.raises(TrainConfigError) as e:
        load_train_config(make_config(tmp_path, tiny_llama, **change))
    assert field in str(e.value)


# --- data -------------------------------------------------------------------------------------

def _docs() -> list[str]:
    return [d for d in CORPUS.read_text().split("\n\n") if d.strip()][:40]


def test_every_source_kind_gives_the_same_tokens(tmp_path, tiny_llama):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from dus_plugin.train.config import DataSource

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    docs = [d.strip() for d in _docs()]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "ds"))
    streams = [tokenize_source(DataSource(path=str(tmp_path / name), text_field="body"), tok, tmp_path / "c", False)
               for name in ("a.txt", "a.jsonl", "a.parquet", "ds")]
    for s in streams[1:]:
        assert np.array_equal(streams[0], s)
    assert int((np.asarray(streams[0]) == tok.eos_token_id).sum()) == len(docs)  # EOS after every document
    again = tokenize_source(DataSource(path=str(tmp_path / "a.txt"), text_field="body"), tok, tmp_path / "c", False)
    assert isinstance(again, np.memmap)  # second read comes from the on-disk cache


def test_packing_mixture_and_validation(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    other = tmp_path / "b.txt"
    from dus_plugin.fixtures import tiny_corpus

    other.write_text("\n\n".join(tiny_corpus(300, seed=99)))
    cfg = load_train_config(make_config(tmp_path, tiny_llama, data={
        "sources": [{"path": str(CORPUS), "weight": 3}, {"path": str(other), "weight": 1}],
        "seq_len": 32, "val_fraction": 0.1, "cache_dir": str(tmp_path / "c")}))
    data = PackedData(cfg.data, tok, tmp_path / "c", seed=0, total_samples=4000, show_progress=False)
    assert 0.72 < (data.source_of == 0).mean() < 0.78
    b = data.batch(0, 8)
    assert b["input_ids"].shape == (8, 32) and (b["input_ids"] != tok.pad_token_id).all()  # no padding
    train_rows = {tuple(data.sample(i)) for i in range(2000)}
    val_rows = {tuple(r) for r in data.val_rows()}
    assert val_rows and not (train_rows & val_rows)
    # one epoch of source 1 visits each of its training rows exactly once
    s1 = [tuple(data.sample(i)) for i in np.flatnonzero(data.source_of == 1)[: data.splits[1].n_train]]
    assert len(set(s1)) == data.splits[1].n_train


def test_document_mask_stops_attention_across_documents(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    a, b = torch.randint(3, 200, (1, 10)), torch.randint(3, 200, (1, 12))
    packed = torch.cat([a, torch.tensor([[eos]]), b], dim=1)
    pos = document_position_ids(packed, eos)
    assert pos[0, 11].item() == 0 and pos[0, -1].item() == 11
    with torch.no_grad():
        alone = model(input_ids=b, use_cache=False).logits
        masked = model(input_ids=packed, position_ids=pos, use_cache=False).logits[:, 11:]
        unmasked = model(input_ids=packed, use_cache=False).logits[:, 11:]
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked, alone, atol=1e-3)


# --- training ---------------------------------------------------------------------------------

def test_loss_falls_and_export_loads(tmp_path, tiny_dus):
    cfg = load_train_config(make_config(tmp_path, tiny_dus, max_steps=30, tensorboard=True))
    result = train(cfg, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert result.val_loss is not None and rows[-1]["val_loss"] == result.val_loss
    final = Path(result.export_dir)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.num_hidden_layers == 12 and (final / "tokenizer.json").is_file()
    manifest = json.loads((final / "dus_manifest.json").read_text())
    assert [s["stage"] for s in manifest["stages"]] == ["upscale", "train"]
    assert manifest["stages"][-1]["tokens"] == 30 * 8 * 64
    assert (tmp_path / "run" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "run" / "tensorboard").glob("events.*"))
    assert set(result.phases) == {"focus", "all"}


def test_focus_phase_trains_only_duplicated_layers(tmp_path, tiny_dus):
    cfg = load_train_config(make_config(tmp_path, tiny_dus, max_steps=3, save_every=0, export=True,
                                        seam={"focus": "duplicated", "focus_steps": 3}))
    before = tensors(tiny_dus)
    after = tensors(Path(train(cfg, quiet=True).export_dir))
    dup = {6, 7, 8, 9}  # m = 2 on 8 layers: outputs 6..9 repeat base layers 2..5
    for name, t in after.items():
        layer = int(name.split(".")[2]) if ".layers." in name else None
        assert torch.equal(t, before[name]) == (layer not in dup), name


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, tiny_dus):
    full = load_train_config(make_config(tmp_path / "a", tiny_dus, max_steps=8, save_every=4))
    ref = tensors(Path(train(full, quiet=True).export_dir))
    cfg = load_train_config(make_config(tmp_path / "b", tiny_dus, max_steps=8, save_every=2))
    train(cfg, quiet=True, stop_after=4)
    ckpts = tmp_path / "b" / "run" / "checkpoints"
    assert (ckpts / "step-0000004").is_dir() and not (tmp_path / "b" / "run" / "final").exists()
    # a run killed while saving step 6: a temporary folder, and a folder without its state file
    (ckpts / ".tmp-step-0000006").mkdir()
    shutil.copytree(ckpts / "step-0000004", ckpts / "step-0000006")
    (ckpts / "step-0000006" / "trainer_state.json").unlink()
    result = train(cfg, quiet=True, resume=True)
    got = tensors(Path(result.export_dir))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8


def test_resume_refuses_a_checkpoint_made_under_other_run_settings(tmp_path, tiny_dus):
    """The checkpoint manager records the settings that fix what a run computes, and names the one that changed;
    the cadence (save_every, log_every) may change between jobs."""
    from dus_plugin.errors import CheckpointError

    train(load_train_config(make_config(tmp_path, tiny_dus, max_steps=4, save_every=2)), quiet=True, stop_after=2)
    changed = load_train_config(make_config(tmp_path, tiny_dus, max_steps=4, save_every=2, optimizer={"lr": 0.01}))
    with pytest.raises(CheckpointError, match=r"step-0000002 was made with optimizer.lr = 0.003, and this config "
                                              r"says 0.01") as e:
        train(changed, quiet=True, resume=True)
    assert e.value.setting == "optimizer"
    cadence = load_train_config(make_config(tmp_path, tiny_dus, max_steps=4, save_every=1, log_every=1))
    assert train(cadence, quiet=True, resume=True).steps == 4


def test_the_base_loss_is_measured_on_the_same_rows_and_drawn(tmp_path, tiny_llama, tiny_dus):
    """An identity upscale starts exactly at its base: step 0's validation loss equals the baseline's, measured
    by loading the base on the same rows. A solar upscale starts elsewhere (the seam's cost)."""
    from click.testing import CliRunner

    from dus_plugin.cli import main

    recipe = tmp_path / "identity.yml"
    assert CliRunner().invoke(main, ["plan", str(tiny_llama), "--drop", "2", "--method", "identity",
                                     "-o", str(recipe)]).exit_code == 0
    upscale(recipe, tmp_path / "identity", UpscaleOptions(quiet=True, forward=False))
    for name, model in (("identity", tmp_path / "identity"), ("solar", tiny_dus)):
        cfg = load_train_config(make_config(tmp_path / name, model, max_steps=2, eval_on_start=True,
                                            baseline_model=str(tiny_llama), seam={"focus": "none"}))
        train(cfg, quiet=True)
        row0 = json.loads((tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()[0])
        assert row0["step"] == 0 and row0["baseline_val_loss"] > 0
        if name == "identity":
            assert row0["val_loss"] == row0["baseline_val_loss"]
        else:  # a random tiny base: the seam moves the loss, in either direction
            assert abs(row0["val_loss"] - row0["baseline_val_loss"]) > 1e-3
        assert (tmp_path / name / "run" / "loss_curve.png").stat().st_size > 10_000
    missing = load_train_config(make_config(tmp_path / "bad", tiny_dus, baseline_model=str(tmp_path / "nope")))
    with pytest.raises(TrainConfigError, match="baseline model folder .* does not exist; set `baseline_model`"):
        train(missing, quiet=True)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, tiny_dus):
    cfg = load_train_config(make_config(tmp_path, tiny_dus, max_steps=40, save_every=1, grad_clip=None,
                                        optimizer={"lr": 1e12}, schedule={"warmup_steps": 0}, seam={"focus": "none"}))
    with pytest.raises(TrainingDiverged, match="loss became") as e:
        train(cfg, quiet=True)
    assert "step-" in str(e.value)
    last = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    assert (last / "trainer_state.json").is_file()


def test_two_process_accelerate_launch(tmp_path, tiny_dus):
    """A real `accelerate launch` with 2 CPU processes (gloo): finishes, loses no step, loss falls.

    `accelerate launch --cpu` starts one process unless mpirun is used; the torchrun-based
    launcher with ACCELERATE_USE_CPU=true gives two ranks on gloo (DistributedType.MULTI_CPU).
    """
    cfg = make_config(tmp_path, tiny_dus, max_steps=12, log_every=1, save_every=6, tensorboard=False)
    exe = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    proc = subprocess.run([str(exe), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
                           "-m", "dus_plugin.train",
                           str(cfg), "-q"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["distributed_type"] == "MULTI_CPU"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["tokens"] == 12 * 8 * 64
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").config.num_hidden_layers == 12


@pytest.mark.parametrize("name,kind", [("ddp.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP"),
                                       ("deepspeed_zero3.yaml", "DEEPSPEED")])
def test_accelerate_config_files_load(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(REPO / "train" / name))
    assert cfg.distributed_type.value == kind
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2


def test_dus_train_cli_reports_config_errors(tmp_path, tiny_llama):
    from helpers import assert_one_line_error, dus

    assert_one_line_error(dus("train", make_config(tmp_path, tiny_llama, lr=1)), "field lr: unknown key")
    assert_one_line_error(dus("train", tmp_path / "none.yml"), "does not exist")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_fused_projections_compute_the_same_function(family, tiny_models):
    from dus_plugin.train.fused import fuse_projections, unfuse_state_dict

    ref = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    fused = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    assert fuse_projections(fused) == ref.config.num_hidden_layers
    assert not any(".q_proj." in n or ".gate_proj." in n for n, _ in fused.named_parameters())
    ids = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids, use_cache=False).logits,
                                   ref(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    back = unfuse_state_dict(fused.state_dict(), fused.config)
    original = ref.state_dict()
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


def test_training_with_fused_projections_exports_a_loadable_model(tmp_path, tiny_dus):
    plain = train(load_train_config(make_config(tmp_path / "p", tiny_dus, max_steps=6, save_every=0)), quiet=True)
    fused = train(load_train_config(make_config(tmp_path / "f", tiny_dus, max_steps=6, save_every=0,
                                                fused_projections=True)), quiet=True)
    assert abs(plain.loss - fused.loss) < 1e-3  # same function, GEMMs merged: float noise only
    a, b = tensors(Path(plain.export_dir)), tensors(Path(fused.export_dir))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    AutoModelForCausalLM.from_pretrained(fused.export_dir)


def test_streaming_datasets_source_stops_at_max_tokens(tmp_path, tiny_llama):
    """`hf:` sources go through datasets.load_dataset; with streaming the stream is cut at max_tokens."""
    from transformers import AutoTokenizer

    from dus_plugin.train.config import DataSource

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs()))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    full = tokenize_source(DataSource(path=f"hf:{folder}"), tok, tmp_path / "c", False)
    cut = tokenize_source(DataSource(path=f"hf:{folder}", streaming=True, max_tokens=300), tok, tmp_path / "c", False)
    assert len(cut) == 300 and np.array_equal(np.asarray(cut), np.asarray(full[:300]))


def test_seam_lr_multiplier_groups(tiny_dus):
    from dus_plugin.train.config import SeamConfig
    from dus_plugin.train.seam import param_groups, read_layout

    model = AutoModelForCausalLM.from_pretrained(tiny_dus)
    layout = read_layout(tiny_dus)
    assert layout.seam == [6] and layout.duplicated == [6, 7, 8, 9]
    groups = param_groups(model, SeamConfig(seam_lr_multiplier=3.0, window=2), layout, lr=1e-3, weight_decay=0.1)
    for g in groups:
        layers = {int(n.split(".")[2]) for n in g["names"] if ".layers." in n}
        assert g["lr"] == pytest.approx(3e-3 if layers and layers <= {4, 5, 6, 7} else 1e-3)
        assert g["weight_decay"] == (0.1 if all(p.ndim >= 2 for p in g["params"]) else 0.0)
    boosted = {n for g in groups if g["lr_mult"] == 3.0 for n in g["names"]}
    assert {int(n.split(".")[2]) for n in boosted} == {4, 5, 6, 7}


def test_training_an_export_of_a_plain_base_again(tmp_path, tiny_llama):
    """An export of a base that was never upscaled has a manifest without a plan; it trains again."""
    plain = {"focus": "none", "seam_lr_multiplier": 1.0}
    first = train(load_train_config(make_config(tmp_path / "1", tiny_llama, max_steps=2, save_every=0, seam=plain)),
                  quiet=True)
    again = train(load_train_config(make_config(tmp_path / "2", Path(first.export_dir), max_steps=2, save_every=0,
                                                seam=plain)), quiet=True)
    stages = json.loads((Path(again.export_dir) / "dus_manifest.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["train", "train"]


def test_eval_on_start_measures_the_seam_before_any_update(tmp_path, tiny_llama, tiny_dus):
    """Step 0's validation loss: an identity upscale scores exactly the base; a SOLAR upscale does not."""
    from click.testing import CliRunner

    from dus_plugin.cli import main

    CliRunner().invoke(main, ["plan", str(tiny_llama), "--drop", "2", "--method", "identity",
                              "-o", str(tmp_path / "id.yml")])
    upscale(tmp_path / "id.yml", tmp_path / "identity", UpscaleOptions(quiet=True, forward=False))
    plain = {"focus": "none", "seam_lr_multiplier": 1.0}
    start = {}
    for name, model in [("base", tiny_llama), ("identity", tmp_path / "identity"), ("solar", tiny_dus)]:
        cfg = load_train_config(make_config(tmp_path / name, model, max_steps=2, save_every=0, export=False,
                                            precision="fp32", eval_on_start=True, seam=plain))
        train(cfg, quiet=True)
        rows = [json.loads(x) for x in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
        assert rows[0]["step"] == 0 and rows[0]["tokens"] == 0 and "loss" not in rows[0]
        assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
        start[name] = rows[0]["val_loss"]
    assert start["identity"] == pytest.approx(start["base"], abs=1e-5)
    assert abs(start["solar"] - start["base"]) > 1e-3


# --- interrupted and repeated runs (issue 16) ---------------------------------------------------

def test_ctrl_c_keeps_the_checkpoints_and_says_how_to_continue(tmp_path, tiny_dus):
    from helpers import assert_one_line_error, ctrl_c_after_checkpoint, dus

    cfg = make_config(tmp_path, tiny_dus, max_steps=3000, save_every=2, log_every=1, eval_every=0)
    run = tmp_path / "run"
    lines = ctrl_c_after_checkpoint(["train", str(cfg), "-q"], run / "checkpoints", wait_s=180)
    assert len(lines) == 1 and lines[0].startswith("interrupted: training interrupted in step "), lines
    assert "checkpoint " + str(run / "checkpoints" / "step-") in lines[0] and "with --resume" in lines[0]
    assert not any("nothing was left" in line for line in lines) and list((run / "checkpoints").glob("step-*"))
    assert (run / "metrics.jsonl").is_file()

    # the same command again, without --resume, neither restarts silently nor loses the checkpoints
    line = assert_one_line_error(dus("train", cfg, "-q"), "--resume", "--overwrite", "already has training checkpoint")
    assert list((run / "checkpoints").glob("step-*")), line


def test_resume_on_a_finished_run_says_so_and_overwrite_starts_over(tmp_path, tiny_dus):
    from helpers import dus

    cfg = make_config(tmp_path, tiny_dus, max_steps=4, save_every=0, eval_every=0, seam={"focus": "none"})
    first = dus("train", cfg, "-q")
    assert first.exit_code == 0, first.output
    again = dus("train", cfg, "-q", "--resume")
    assert again.exit_code == 0 and again.output.startswith("already finished: 4 steps"), again.output
    fresh = dus("train", cfg, "-q", "--overwrite")
    assert fresh.exit_code == 0 and fresh.output.startswith("trained 4 steps"), fresh.output
    assert (tmp_path / "cache").is_dir()  # the tokenized data was not thrown away with the run


def test_profile_says_where_the_step_time_goes(tmp_path, tiny_dus):
    import gzip

    from dus_plugin.train.profile import category

    cfg = load_train_config(make_config(tmp_path, tiny_dus, max_steps=4, profile={"start": 1, "steps": 2},
                                        export=False, save_final=False, tensorboard=False))
    train(cfg, quiet=True)
    summary = json.loads((tmp_path / "run" / "profile.json").read_text())
    cats = summary["categories"]
    assert summary["steps"] == 2 and summary["step_ms"] > 0
    assert 0.9 < sum(c["ms"] for c in cats.values()) / summary["step_ms"] < 1.1  # the step's time, accounted for
    assert "optimizer" in cats and cats["optimizer"]["ms"] > 0  # AdamW's kernels are found by name
    assert json.loads(gzip.open(tmp_path / "run" / "profile_trace.json.gz").read())["traceEvents"]
    assert [category(k) for k in ("flash_fwd_kernel", "triton_per_fused__log_softmax_2", "sm90_xmma_gemm_bf16",
                                  "triton_red_fused_mean_pow_rsqrt_1", "multi_tensor_apply_kernel",
                                  "triton_poi_fused_add_mul_0")] == [
        "attention", "loss", "GEMM", "norms", "optimizer", "elementwise and casts"]
    # names from an fp8 profile on the H100: float8 GEMMs are GEMMs; amax reductions and scaled casts are not
    assert [category(k) for k in ("nvjet_sm90_qqtst_192x192_128x4_2x1_v_bz_coopB_TNN",
                                  "triton_red_fused_abs_cat_max_mul_silu_silu_backward_split_view_8",
                                  "triton_poi_fused__scaled_mm__to_copy_clamp_clone_mul_reciprocal_t_view_9",
                                  "triton_red_fused__to_copy_abs_add_max_mean_mul_pow_rsqrt_view_14")] == [
        "GEMM"] + ["float8 scaling (amax and casts)"] * 3


def test_fp8_refuses_a_machine_without_float8_tensor_cores(tmp_path, tiny_dus):
    cfg = load_train_config(make_config(tmp_path, tiny_dus, max_steps=2, precision="fp8"))
    with pytest.raises(TrainConfigError, match="precision fp8 needs a CUDA GPU"):
        train(cfg, quiet=True)
    assert not list((tmp_path / "run").glob("checkpoints/*"))
    # bf16 master weights compose with fp8 (float8 layers cast either dtype); the adamw8bit rule still holds
    cfg = load_train_config(make_config(tmp_path / "b", tiny_dus, max_steps=2, precision="fp8", master_weights="bf16",
                                        optimizer={"name": "adamw8bit"}))
    assert (cfg.precision, cfg.master_weights) == ("fp8", "bf16")
    with pytest.raises(TrainConfigError, match="master_weights"):
        load_train_config(make_config(tmp_path / "c", tiny_dus, max_steps=2, precision="fp8", master_weights="bf16"))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_layer_compile_computes_the_same_and_leaves_the_causal_mask_to_sdpa(family, tiny_models):
    """Compiled per layer, the mask is built eagerly: None where nothing needs it (Llama), so SDPA's causal kernel
    runs; Gemma 3's sliding layers still get theirs. Logits and gradients match the eager model."""
    from dus_plugin.train.compiled import compile_model, decoder_layers

    ref = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32, attn_implementation="sdpa")
    masks = []
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    layers[0].register_forward_pre_hook(lambda m, a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True)
    assert compile_model(model, "layers") is model
    ids = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    got, want = model(input_ids=ids, labels=ids, use_cache=False), ref(input_ids=ids, labels=ids, use_cache=False)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    got.loss.backward(), want.loss.backward()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)
    if family == "llama":
        assert masks == [None]
    assert list(model.state_dict()) == list(ref.state_dict())  # in place: the export's names do not change


def test_layer_compile_refuses_a_model_without_named_layers():
    from dus_plugin.train.compiled import compile_model

    with pytest.raises(TrainConfigError, match="compile_scope"):
        compile_model(torch.nn.Linear(2, 2), "layers")


def test_compiled_training_matches_eager(tmp_path, tiny_dus):
    # the second step's loss follows the first update; no validation set, so inductor compiles the layer and the
    # loss for training only (every no-grad graph and each batch without a document mask is one more compile)
    short = dict(max_steps=2, save_every=0, data={"val_fraction": 0.0})
    eager = train(load_train_config(make_config(tmp_path / "e", tiny_dus, **short)), quiet=True)
    compiled = train(load_train_config(make_config(tmp_path / "c", tiny_dus, compile=True, **short)), quiet=True)
    assert abs(eager.loss - compiled.loss) < 1e-3
    AutoModelForCausalLM.from_pretrained(compiled.export_dir)


@pytest.mark.parametrize("flag,refused", [("False", False), ("0", False), ("true", True), ("1", True)])
def test_fp8_reads_accelerate_use_cpu_as_a_flag(monkeypatch, flag, refused):
    """accelerate launch exports ACCELERATE_USE_CPU=False on GPU launches; that must not refuse fp8 (it did)."""
    from dus_plugin.train.fp8 import require_float8

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the H100 this check guards
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setenv("ACCELERATE_USE_CPU", flag)
    if refused:
        with pytest.raises(TrainConfigError, match="precision fp8"):
            require_float8()
    else:
        require_float8()


# --- what the real base showed (issue 25) ------------------------------------------------------------

def test_export_of_a_tied_bf16_model_stays_tied_and_says_bf16(tmp_path):
    from dus_plugin.fixtures import make_tiny_model
    from safetensors import safe_open

    model = make_tiny_model("qwen2_tied", tmp_path / "tied", dtype="bfloat16")
    result = train(load_train_config(make_config(tmp_path, model, max_steps=2,
                                                   seam={"focus": "none", "seam_lr_multiplier": 1.0})), quiet=True)
    final = Path(result.export_dir)
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(final / "model.safetensors", "pt") as f:
        names = list(f.keys())
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    loaded, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_metrics_log_the_rate_each_step_used(tmp_path, tiny_dus):
    cfg = make_config(tmp_path, tiny_dus, max_steps=3, log_every=1, optimizer={"lr": 1e-3},
                      schedule={"kind": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.1},
                      seam={"focus": "none", "seam_lr_multiplier": 1.0})
    train(load_train_config(cfg), quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[0] == pytest.approx(1e-3)  # the first step runs at the peak; the next rate is logged with the next step
    assert lrs[0] > lrs[1] > lrs[2]


def test_an_unusable_data_source_is_refused_before_the_model_loads(tmp_path, tiny_dus):
    bad = tmp_path / "notes.md"
    bad.write_text("some text\n")
    cfg = make_config(tmp_path, tmp_path / "no-such-model", data={"sources": [{"path": str(bad)}]})
    with pytest.raises(TrainConfigError, match=r"unknown kind '\.md'"):
        train(load_train_config(cfg), quiet=True)


class _WeightAmaxes(TorchDispatchMode):
    """Counts torch.abs over a weight's storage: each float8 cast of a weight starts with one (its amax)."""

    def __init__(self, model):
        super().__init__()
        self.weights = {p.data_ptr() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.abs.default and args[0].data_ptr() in self.weights:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _float8_run(folder, weight_cast: str, stale: bool = False) -> tuple[list[float], list[torch.Tensor], int, int]:
    """Two SGD steps (in-place updates, as every optimizer's) of two micro-batches each through the float8 layers;
    the losses, the final weights, the weight casts made and the float8 layers."""
    from dus_plugin.train.fp8 import float8_layers

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    layers = float8_layers(model, "tensorwise", weight_cast)
    if stale:  # the defect the version check exists to catch: a cast made once and never renewed
        for m in model.modules():
            if hasattr(m, "refresh_cast"):
                m.refresh_cast()
                m.refresh_cast = lambda: None
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    with _WeightAmaxes(model) as casts:
        for step in range(2):
            for k in range(2):
                ids = torch.randint(0, model.config.vocab_size, (2, 32),
                                    generator=torch.Generator().manual_seed(2 * step + k))
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                losses.append(loss.item())
            opt.step()
            opt.zero_grad()
    return losses, [p.detach().clone() for p in model.parameters()], casts.count, layers


def test_fp8_weights_cast_once_per_step_train_bit_for_bit_as_torchao(tiny_dus):
    """fp8_weight_cast: per_step reuses each weight's tensorwise cast across micro-batches; torch runs float8
    matmuls on the CPU too, so the claim is checked here exactly: the same losses, the same weights after two steps,
    and a quarter of the casts (torchao casts each weight in forward and in backward, in both micro-batches).
    (Checked by hand on 2026-12-08: the same holds compiled per layer, and torchao's compiled AdamW8bit step bumps
    ``Tensor._version`` as SGD does; both cost 20-60 s of compiling here.)"""
    ref_losses, ref_weights, ref_casts, layers = _float8_run(tiny_dus, "per_matmul")
    losses, weights, casts, _ = _float8_run(tiny_dus, "per_step")
    assert layers >= 4 and (ref_casts, casts) == (2 * 2 * 2 * layers, 2 * layers)
    assert losses == ref_losses
    assert all(torch.equal(a, b) for a, b in zip(weights, ref_weights))
    stale_losses, _, stale_casts, _ = _float8_run(tiny_dus, "per_step", stale=True)
    assert stale_casts == 0  # made before the counter started, never renewed
    assert stale_losses[:2] == ref_losses[:2] and stale_losses[2:] != ref_losses[2:]


def _compiled_weight_work(weight_cast: str) -> dict[str, tuple[int, int]]:
    """Forward and backward graphs of a two-linear block as torch.compile makes them (AOTAutograd with inductor's
    min-cut partition): how many weight amaxes and weight casts to float8 each holds."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from dus_plugin.train.fp8 import float8_layers

    graphs = {}

    def keep(name):
        def compiler(gm, _inputs):
            graphs[name] = gm.graph
            return make_boxed_func(gm.forward)
        return compiler

    block = torch.nn.Module()
    block.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False), torch.nn.SiLU(),
                                                            torch.nn.Linear(512, 256, bias=False))])
    block = block.to(torch.bfloat16)
    float8_layers(block, "tensorwise", weight_cast)
    for layer in block.modules():
        getattr(layer, "refresh_cast", lambda: None)()  # as the whole model's pre-hook does
    torch._dynamo.reset()
    compiled = torch.compile(block.layers[0], backend=aot_autograd(
        fw_compiler=keep("forward"), bw_compiler=keep("backward"), partition_fn=min_cut_rematerialization_partition))
    compiled(torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)).sum().backward()
    weights = {(512, 256), (256, 512)}  # 64 tokens: no activation has a weight's shape

    def val(node):
        return node.meta.get("val") if isinstance(node, torch.fx.Node) else None

    def counts(graph):
        amaxes = casts = 0
        for node in graph.nodes:
            source = node.args[0] if node.op == "call_function" and node.args else None
            if val(source) is None or tuple(val(source).shape) not in weights:
                continue
            amaxes += node.target is torch.ops.aten.abs.default
            casts += val(node) is not None and val(node).dtype == torch.float8_e4m3fn != val(source).dtype
        return amaxes, casts

    return {name: counts(graph) for name, graph in graphs.items()}


def test_fp8_compiled_per_step_graphs_hold_no_weight_cast():
    """What compile leaves of torchao's weight casts: forward computes each weight's amax and cast, saves the amax,
    and backward casts the weight again. With per_step neither graph touches a weight."""
    assert _compiled_weight_work("per_matmul") == {"forward": (2, 2), "backward": (0, 2)}
    assert _compiled_weight_work("per_step") == {"forward": (0, 0), "backward": (0, 0)}


def test_fp8_weights_cast_once_per_step_under_ddp_match_torchao_on_every_rank(tiny_dus):
    """2 CPU ranks (gloo): DDP's broadcast renews casts made before it; accumulation under no_sync is exact."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(REPO / "tests" / "fp8_ddp_check.py"), str(tiny_dus)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert proc.returncode == 0 and [line.split()[2] for line in lines] == ["equal", "equal"], proc.stderr[-3000:]
    assert lines[0].split(" ", 3)[3] != lines[1].split(" ", 3)[3]  # the ranks saw different data


def test_fp8_weight_cast_per_step_is_planned_and_refused_where_it_cannot_work(tmp_path, tiny_dus):
    from dus_plugin.train import auto, memory

    settings = dict(max_steps=2, precision="fp8", optimizer={"name": "adamw8bit"}, master_weights="bf16")
    plain = load_train_config(make_config(tmp_path / "a", tiny_dus, **settings))
    once = load_train_config(make_config(tmp_path / "b", tiny_dus, fp8_weight_cast="per_step", **settings))
    shape = memory.model_shape(once)
    extra = memory.estimate(once, shape).weights - memory.estimate(plain, shape).weights
    assert extra == shape.layers * shape.layer_params  # one byte per decoder-layer weight
    assert "fp8_weight_cast: per_step" in auto.resolve(once, 1, "NO", "cpu").report()
    with pytest.raises(TrainConfigError, match="fp8_weight_cast: per_step.*FSDP.*per_matmul"):
        auto.resolve(once, 2, "FSDP", "cpu")
    from dus_plugin.train.fp8 import float8_layers

    with pytest.raises(TrainConfigError, match="fp8_weight_cast: per_step needs fp8_recipe: tensorwise"):
        float8_layers(torch.nn.Linear(16, 16), "rowwise", "per_step")
    with pytest.raises(TrainConfigError, match="field fp8_weight_cast.*tensorwise"):
        load_train_config(make_config(tmp_path / "c", tiny_dus, fp8_weight_cast="per_step", **{
            **settings, "fp8_recipe": "rowwise"}))
