"""Memory modes of the trainer (train_only, 8-bit AdamW on bf16 weights) and the memory planner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dus_plugin.errors import TrainConfigError
from dus_plugin.train import memory
from dus_plugin.train.config import TrainConfig, load_train_config
from dus_plugin.train.loop import train
from dus_plugin.upscale import UpscaleOptions, upscale

from helpers import assert_one_line_error, dus, dus_ok, tensors
from test_train import make_config


@pytest.fixture(scope="module")
def identity_dus(tiny_llama, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("identity")
    dus_ok("plan", tiny_llama, "--drop", 2, "--method", "identity", "-o", root / "r.yml")
    upscale(root / "r.yml", root / "model", UpscaleOptions(quiet=True, forward=False))
    return root / "model"


@pytest.fixture(scope="module")
def wide_dus(tmp_path_factory) -> Path:
    """Hidden 64: the matrices have >= 4096 values, so torchao really keeps them in 8 bits. Every layer matrix is
    64 x 64 (as many KV heads as heads, intermediate 64): torchao compiles its step once per tensor shape and dtype,
    so three shapes (embeddings, layer matrices, norms) compile half as often as six."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dus_plugin.fixtures import make_tokenizer

    root = tmp_path_factory.mktemp("wide")
    tok = make_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
                                 num_hidden_layers=4, vocab_size=len(tok))).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    dus_ok("plan", root / "base", "--drop", 1, "-o", root / "r.yml")
    upscale(root / "r.yml", root / "model", UpscaleOptions(quiet=True, forward=False))
    return root / "model"


def _optimizer_state(run: Path) -> dict:
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    return torch.load(ckpt / "optimizer.bin", weights_only=False)


def test_train_only_duplicated_freezes_the_rest_with_no_gradient_or_state(tmp_path, identity_dus):
    cfg = load_train_config(make_config(tmp_path, identity_dus, max_steps=3, save_every=0, seam={"focus": "none"},
                                        train_only={"layers": "duplicated"}))
    before = tensors(identity_dus)
    after = tensors(Path(train(cfg, quiet=True).export_dir))
    dup = {6, 7, 8, 9}  # m = 2 on 8 layers: outputs 6..9 are the second copies of base layers 2..5
    for name, t in after.items():
        layer = int(name.split(".")[2]) if ".layers." in name else None
        assert torch.equal(t, before[name]) == (layer not in dup), name
    per_layer = sum(1 for n in before if n.startswith("model.layers.0."))
    assert len(_optimizer_state(tmp_path / "run")["state"]) == len(dup) * per_layer


def test_train_only_errors_name_the_field(tmp_path, tiny_llama, identity_dus):
    with pytest.raises(TrainConfigError, match="train_only.layers names layer 40"):
        train(load_train_config(make_config(tmp_path / "a", identity_dus, train_only={"layers": [1, 40]})), quiet=True)
    with pytest.raises(TrainConfigError, match="train_only.layers: duplicated needs dus_manifest.json"):
        train(load_train_config(make_config(tmp_path / "b", tiny_llama, seam={"focus": "none"},
                                            train_only={"layers": "duplicated"})), quiet=True)
    with pytest.raises(TrainConfigError, match="master_weights: bf16 needs optimizer.name: adamw8bit"):
        load_train_config(make_config(tmp_path / "c", tiny_llama, master_weights="bf16"))


def _curve(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_adamw8bit_on_bf16_weights_tracks_adamw(tmp_path, wide_dus):
    common = dict(max_steps=30, save_every=0, eval_every=0, seam={"focus": "none", "seam_lr_multiplier": 1.0})
    runs = {"adamw": {}, "adamw8bit": {"optimizer": {"name": "adamw8bit"}},
            "bf16": {"optimizer": {"name": "adamw8bit"}, "master_weights": "bf16", "precision": "bf16"}}
    finals = {}
    for name, over in runs.items():
        result = train(load_train_config(make_config(tmp_path / name, wide_dus, **common, **over)), quiet=True)
        curve = _curve(tmp_path / name / "run")
        assert curve[-1] < curve[0] - 1.0, (name, curve)
        finals[name] = result.loss
    assert abs(finals["adamw8bit"] - finals["adamw"]) < 0.05, finals
    assert abs(finals["bf16"] - finals["adamw"]) < 0.1, finals
    states = [s["exp_avg"] for s in _optimizer_state(tmp_path / "bf16" / "run")["state"].values()]
    assert sum(type(s).__name__ == "OptimState8bit" for s in states) >= 4 * 7  # every matrix of every layer
    exported = tensors(tmp_path / "bf16" / "run" / "final")
    assert {t.dtype for t in exported.values()} == {torch.float32}  # saved in the model's own dtype


def test_adamw8bit_resumes_where_it_stopped(tmp_path, wide_dus):
    over = dict(max_steps=6, save_every=3, eval_every=0, seam={"focus": "none", "seam_lr_multiplier": 1.0},
                optimizer={"name": "adamw8bit"}, master_weights="bf16", precision="bf16")
    ref = tensors(Path(train(load_train_config(make_config(tmp_path / "a", wide_dus, **over)), quiet=True).export_dir))
    cfg = load_train_config(make_config(tmp_path / "b", wide_dus, **over))
    train(cfg, quiet=True, stop_after=3)
    got = tensors(Path(train(cfg, quiet=True, resume=True).export_dir))
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# --- the planner --------------------------------------------------------------------------------

def test_estimate_terms_follow_the_modes(tmp_path, identity_dus):
    def need(processes=1, kind="NO", **over):
        cfg = load_train_config(make_config(tmp_path, identity_dus, seam={"focus": "none"}, **over))
        return memory.estimate(cfg, memory.model_shape(cfg), processes, kind)

    full = need()
    params = full.params
    assert full.weights == 4 * params and full.gradients == 4 * params and full.optimizer == 8 * params
    low = need(optimizer={"name": "adamw8bit"}, master_weights="bf16", precision="bf16")
    assert low.weights == 2 * params and low.gradients == 2 * params and low.optimizer < full.optimizer
    frozen = need(train_only={"layers": "duplicated"})
    assert frozen.trainable < params / 2 and frozen.gradients == 4 * frozen.trainable
    assert need(activation_checkpointing="full").activations < full.activations
    compiled = need(compile=True)  # its fused kernels keep less for backward (calibrated on the H100)
    assert full.activations > compiled.activations > memory.COMPILED_ACTIVATIONS * full.activations
    sharded = need(processes=4, kind="FSDP")
    assert sharded.weights == full.weights / 4 and sharded.optimizer == full.optimizer / 4
    assert need(processes=2, kind="MULTI_GPU").gradients == 2 * full.gradients  # DDP's buckets


def test_a_run_that_cannot_fit_is_refused_with_what_would_fit(tmp_path, identity_dus):
    cfg = load_train_config(make_config(tmp_path, identity_dus, seam={"focus": "none"}))
    full = memory.estimate(cfg, memory.model_shape(cfg))
    low_cfg = cfg.model_copy(update={"master_weights": "bf16", "precision": "bf16", "activation_checkpointing": "full",
                                     "micro_batch_size": 1,
                                     "optimizer": cfg.optimizer.model_copy(update={"name": "adamw8bit"})})
    low = memory.estimate(low_cfg, memory.model_shape(low_cfg))
    mid_cfg = cfg.model_copy(update={"activation_checkpointing": "full", "micro_batch_size": 1})
    mid = memory.estimate(mid_cfg, memory.model_shape(mid_cfg))
    assert low.total < mid.total < full.total
    limit = (low.total + mid.total) / 2 / memory.GB
    path = make_config(tmp_path, identity_dus, seam={"focus": "none"}, memory_limit_gb=limit)
    line = assert_one_line_error(dus("train", path, "-q"), "training needs about", "memory_limit_gb",
                                 "it would fit with activation_checkpointing: full, micro_batch_size: 1, "
                                 "optimizer.name: adamw8bit and master_weights: bf16")
    assert not (tmp_path / "run" / "checkpoints").exists(), line

    estimate = dus_ok("train", path, "--estimate").output
    assert "memory estimate per device" in estimate and "does not fit in memory_limit_gb" in estimate
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_frozen_weights_of_a_bf16_model_stay_bf16_under_bf16_compute(tmp_path, tiny_llama):
    """In its own process (bf16 autocast): the frozen layers come back bit for bit, and are counted at 2 bytes."""
    import subprocess
    import sys

    from dus_plugin.fixtures import make_tiny_model

    base = make_tiny_model("llama", tmp_path / "base", dtype="bfloat16")
    dus_ok("plan", base, "--drop", 2, "--method", "identity", "-o", tmp_path / "r.yml")
    upscale(tmp_path / "r.yml", tmp_path / "model", UpscaleOptions(quiet=True, forward=False))
    path = make_config(tmp_path, tmp_path / "model", max_steps=3, save_every=0, precision="bf16",
                       seam={"focus": "none"}, train_only={"layers": "duplicated"})
    cfg = load_train_config(path)
    shape = memory.model_shape(cfg)
    assert shape.frozen_bytes == 2
    assert memory.estimate(cfg, shape).weights == 4 * shape.trainable + 2 * (shape.params - shape.trainable)
    run = subprocess.run([sys.executable, "-m", "dus_plugin.cli", "train", str(path), "-q"], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    before, after = tensors(tmp_path / "model"), tensors(tmp_path / "run" / "final")
    changed = {int(n.split(".")[2]) for n in after if ".layers." in n and not torch.equal(after[n], before[n])}
    assert changed == {6, 7, 8, 9} and all(t.dtype == torch.bfloat16 for t in after.values())


def _measured_peaks() -> list[tuple[dict, str, float]]:
    """(model shape, variant, peak GB) of every accumulated-batch run recorded on the H100."""
    folder = Path(__file__).parents[1] / "benchmarks/results"
    results = json.loads((folder / "train_throughput.json").read_text())
    rerun = json.loads((folder / "train_throughput_h100_2026-12-07.json").read_text())
    runs = [(results["shape"], results["variants"]), (results["fp8"]["at_hidden_4096"]["shape"],
                                                      results["fp8"]["at_hidden_4096"]["variants"]),
            (rerun["shape"], rerun["variants"])]
    return [(shape, name, v["peak_mem_gb"]) for shape, variants in runs for name, v in variants.items()
            if "+ga" in name and "peak_mem_gb" in v]


def test_the_estimate_stays_just_above_every_gpu_peak_recorded(tmp_path):
    """bf16 and fp8, micro-batch 4 to 8, at two shapes: never under the measured peak, and at most 10% over."""
    from transformers import LlamaConfig

    peaks = _measured_peaks()
    assert sum("fp8" in name for _, name, _ in peaks) >= 6 and len(peaks) >= 10
    (tmp_path / "text.txt").write_text("x")
    for shape, name, peak in peaks:
        folder = tmp_path / str(shape["hidden_size"])
        if not folder.is_dir():
            LlamaConfig(**shape, tie_word_embeddings=False, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
        flags = name.split("+")
        micro = next((int(f[2:]) for f in flags if f.startswith("mb")), 4)
        cfg = TrainConfig.model_validate({
            "model": str(folder), "output_dir": str(tmp_path / "run"), "optimizer": {"lr": 1e-5},
            "data": {"sources": [{"path": str(tmp_path / "text.txt")}], "seq_len": 2048},
            "micro_batch_size": micro, "global_batch_size": micro * 4, "max_steps": 1, "compile": True,
            "fused_projections": True, "precision": "fp8" if "fp8" in flags else "bf16"})
        estimate = memory.estimate(cfg, memory.model_shape(cfg)).total / memory.GB
        assert peak <= estimate <= 1.1 * peak, (shape["hidden_size"], name, peak, estimate)


# --- activation_checkpointing: auto -----------------------------------------------------------------

def _needs(cfg: TrainConfig) -> dict:
    shape = memory.model_shape(cfg)
    return {value: memory.estimate(cfg.model_copy(update={"activation_checkpointing": value}), shape).total
            for value in ["none", *range(1, shape.layers), "full"]}, shape


def test_auto_checkpointing_picks_the_least_recomputation_that_fits(tmp_path, identity_dus):
    """none when it fits; the smallest first-K that fits under a tighter limit; full below that; refused below
    full with what would fit. The limit is enforced with the planner's headroom."""
    from dus_plugin.train import auto

    cfg = load_train_config(make_config(tmp_path, identity_dus, seam={"focus": "none"}))
    assert cfg.activation_checkpointing == "auto" and cfg.compile is None and cfg.fused_projections is None
    needs, shape = _needs(cfg)
    assert needs["none"] > needs[shape.layers // 2] > needs["full"]  # each recomputed layer saves memory here

    def chosen(limit_bytes: float):
        limited = cfg.model_copy(update={"memory_limit_gb": limit_bytes / memory.GB})
        return auto.resolve(limited, 1, "NO", "cpu", refuse=False)

    roomy = chosen(needs["none"] / (1 - auto.HEADROOM) * 1.01)
    assert roomy.cfg.activation_checkpointing == "none" and "activation_checkpointing: none (auto" in roomy.report()
    assert roomy.cfg.compile is False and "compile: no (auto: no CUDA GPU)" in roomy.report()
    half = chosen(needs[shape.layers // 2] / (1 - auto.HEADROOM) * 1.001)
    k = half.cfg.activation_checkpointing
    assert isinstance(k, int) and 0 < k <= shape.layers // 2, k
    assert needs[k] <= half.capacity * (1 - auto.HEADROOM) < needs[k - 1 if k > 1 else "none"]
    assert f"the first {k} of {shape.layers} decoder layers" in half.report()
    tight = chosen(needs["full"] / (1 - auto.HEADROOM) * 1.001)  # keeping the last layer whole costs no more
    assert tight.cfg.activation_checkpointing in (shape.layers - 1, "full")
    with pytest.raises(TrainConfigError, match="activation_checkpointing: full, micro_batch_size: 1"):
        auto.resolve(cfg.model_copy(update={"memory_limit_gb": needs["full"] * 0.8 / memory.GB}), 1, "NO", "cpu")


def test_checkpointing_the_first_k_layers_recomputes_exactly_those(tmp_path, identity_dus):
    """Forward calls per decoder layer in one training step: the first K run twice (once more in backward), the
    rest once; and the loss and gradients are the ones without checkpointing."""
    from transformers import AutoModelForCausalLM

    from dus_plugin.architecture import Architecture
    from dus_plugin.train.loop import _checkpoint_layers

    def step(value):
        model = AutoModelForCausalLM.from_pretrained(identity_dus, dtype=torch.float32)
        model.train()
        cfg = load_train_config(make_config(tmp_path, identity_dus, activation_checkpointing=value))
        _checkpoint_layers(cfg, model, Architecture.from_folder(identity_dus))
        calls = [0] * len(model.model.layers)
        for i, layer in enumerate(model.model.layers):  # module hooks do not fire in the replay: wrap forward
            def counted(x, forward=layer.mlp.forward, i=i):
                calls[i] += 1
                return forward(x)
            layer.mlp.forward = counted
        ids = torch.arange(2, 34).reshape(2, 16)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return calls, loss.detach(), [p.grad.clone() for p in model.parameters()]

    layers = len(step("none")[0])
    k = layers // 2
    plain, partial, full = step("none"), step(k), step("full")
    assert plain[0] == [1] * layers and full[0] == [2] * layers
    assert partial[0] == [2] * k + [1] * (layers - k)  # a planted "every layer" or "none" fails here
    assert torch.equal(plain[1], partial[1]) and all(torch.equal(a, b) for a, b in zip(plain[2], partial[2]))
    with pytest.raises(TrainConfigError, match="activation_checkpointing"):
        step(layers + 1)


def test_estimate_prints_the_auto_choices(tmp_path, identity_dus):
    out = dus_ok("train", make_config(tmp_path, identity_dus), "--estimate").output
    assert "activation_checkpointing: none (auto" in out and "compile: no (auto: no CUDA GPU)" in out
    assert "fused_projections: no (auto: no CUDA GPU)" in out
    for old, word in ((True, "full"), (False, "none")):  # configs written before auto keep their meaning
        cfg = load_train_config(make_config(tmp_path, identity_dus, activation_checkpointing=old))
        assert cfg.activation_checkpointing == word


@pytest.mark.parametrize("name", ["solar_throughput.json", "solar_throughput_h100.json"])
def test_the_estimate_stays_just_above_every_10_7b_peak_recorded(tmp_path, name):
    """The 10.7B rows of benchmarks/results/solar_throughput.json (one H200: no checkpointing, the first 37 of 48
    layers, every layer; bf16 and fp8) and solar_throughput_h100.json (one H100 80 GB: 22 to 41 layers, micro-batch 1
    and 2): the planner, given the settings each run resolved to, is never under the measured peak and at most 10%
    over it."""
    import yaml
    from transformers import MistralConfig

    results = json.loads((Path(__file__).parents[1] / "benchmarks/results" / name).read_text())
    rows = {row_name: row for row_name, row in results["rows"].items() if row.get("ok") and "estimate_gb" in row}
    named = {"shipped", "limit80", "fp8", "before"} if name == "solar_throughput.json" else \
        {"shipped", "fp8", "shipped_mb2", "fp8_mb2"}
    assert named <= set(rows)
    kinds = {str(row["settings"]["activation_checkpointing"]) for row in rows.values()}
    assert ({"none", "full"} < kinds) if name == "solar_throughput.json" else len(kinds) == 4  # and partial counts
    folder = tmp_path / "solar"
    layer = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=32000, max_position_embeddings=32768)
    MistralConfig(**layer, num_hidden_layers=48, tie_word_embeddings=False,
                  architectures=["MistralForCausalLM"]).save_pretrained(folder)
    (tmp_path / "text.txt").write_text("x")
    shipped = yaml.safe_load((Path(__file__).parents[1] / "configs/cpt_solar_1gpu.yml").read_text())
    shipped.pop("max_tokens")
    for row_name, row in rows.items():
        cfg = TrainConfig.model_validate({
            **shipped, **row["settings"], "model": str(folder), "output_dir": str(tmp_path / "run"),
            "max_steps": results["steps"], "global_batch_size": results["sequences_per_step"],
            "data": {"sources": [{"path": str(tmp_path / "text.txt")}], "seq_len": results["seq"]}})
        estimate = memory.estimate(cfg, memory.model_shape(cfg)).total / memory.GB
        assert row["peak_gb"] <= estimate <= 1.1 * row["peak_gb"], (row_name, row["peak_gb"], estimate)


# --- attention_backend: auto --------------------------------------------------------------------

def test_auto_attention_is_flex_on_a_gpu_with_a_document_mask_and_flex_is_refused_on_a_cpu(tmp_path, identity_dus):
    """FlexAttention skips the blocks a document mask hides, where SDPA gets a dense mask and leaves its flash kernel
    (on one H200 at 10.7B: 7,474 against 6,301 tokens/s, benchmarks/results/solar_throughput.json). It has no
    backward on a CPU, so asking for it there is one line naming the setting."""
    from dus_plugin.train import auto

    def chosen(device: str, mask: bool, backend: str = "auto"):
        path = make_config(tmp_path / f"{device}{mask}{backend}", identity_dus, seam={"focus": "none"},
                           data={"document_mask": mask}, attention_backend=backend, memory_limit_gb=1000)
        return auto.resolve(load_train_config(path), 1, "NO", device, refuse=False)

    gpu = chosen("cuda", True)
    assert gpu.cfg.attention_backend == "flex"
    assert "attention_backend: flex (auto: data.document_mask on a CUDA GPU)" in gpu.report()
    assert chosen("cuda", False).cfg.attention_backend == "sdpa"
    assert chosen("cpu", True).cfg.attention_backend == "sdpa"
    assert chosen("cuda", True, "efficient").cfg.attention_backend == "efficient"  # an explicit choice stays
    with pytest.raises(TrainConfigError, match="attention_backend: flex needs a CUDA GPU"):
        chosen("cpu", True, "flex")
    path = make_config(tmp_path / "cli", identity_dus, attention_backend="flex")
    assert_one_line_error(dus("train", path), "attention_backend: flex needs a CUDA GPU", "attention_backend: auto")
