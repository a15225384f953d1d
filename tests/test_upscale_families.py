"""plan -> mergekit -> verify -> transformers forward, on tiny models of every family."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dus_plugin.fixtures import FAMILIES
from dus_plugin.architecture import LayerStack

from helpers import config, dus, tensors

STOCK_OK = ("llama", "mistral", "phi3")  # stock mergekit-yaml handles these (no per-layer lists)


@pytest.fixture(scope="module")
def upscaled(tiny_models, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (recipe, dus upscale output), m = 2."""
    root = tmp_path_factory.mktemp("upscaled")
    out = {}
    for family in FAMILIES:
        recipe = root / f"{family}.yml"
        r = dus("plan", tiny_models[family], "--drop", 2, "-o", recipe)
        assert r.exit_code == 0, r.output
        r = dus("upscale", recipe, root / family, "-q")
        assert r.exit_code == 0, r.output
        out[family] = (recipe, root / family)
    return out


def layer_map(folder: Path) -> list[int]:
    import json

    return json.loads((folder / "dus_manifest.json").read_text())["plan"]["layer_map"]


STACK = LayerStack("model.layers.", "num_hidden_layers")
layer_index, with_layer = STACK.index, STACK.rename


def assert_follows_plan(out: Path, base: Path, lmap: list[int]) -> None:
    got, src = tensors(out), tensors(base)
    for name, t in got.items():
        i = layer_index(name)
        expected = src[name] if i is None else src[with_layer(name, lmap[i])]
        assert t.dtype == expected.dtype and torch.equal(t, expected), name
    expected_names = {n for n in src if layer_index(n) is None} | {
        with_layer(n, i) for i, s in enumerate(lmap) for n in src if layer_index(n) == s
    }
    assert set(got) == expected_names
    cfg, base_cfg = config(out), config(base)
    assert cfg["num_hidden_layers"] == len(lmap)
    for key in ("layer_types",):
        if key in base_cfg:
            assert cfg[key] == [base_cfg[key][s] for s in lmap], key


@pytest.mark.parametrize("family", FAMILIES)
def test_dus_upscale_follows_the_plan(family, upscaled, tiny_models):
    _, out = upscaled[family]
    lmap = layer_map(out)
    assert lmap == list(range(6 if family != "gemma3" else 10)) + list(range(2, 8 if family != "gemma3" else 12))
    assert_follows_plan(out, tiny_models[family], lmap)
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_the_stacked_base_layers(family, upscaled, tiny_models):
    """The upscaled folder computes what the base's own layer modules, stacked by the layer map,
    compute: each module keeps its source layer's attention type (sliding vs global), so a
    per-layer list extended by index instead of by source would change these logits."""
    _, out = upscaled[family]
    lmap = layer_map(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    ref = copy.deepcopy(base)
    ref.model.layers = torch.nn.ModuleList([copy.deepcopy(base.model.layers[s]) for s in lmap])
    ref.config.num_hidden_layers = len(lmap)
    if getattr(ref.config, "layer_types", None) is not None:
        ref.config.__dict__["layer_types"] = [layer.self_attn.layer_type for layer in ref.model.layers]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(3, base.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, ref(input_ids=ids, use_cache=False).logits)


def test_gemma3_layer_types_follow_source_not_index(upscaled, tiny_models):
    _, out = upscaled["gemma3"]
    types = config(out)["layer_types"]
    base_types = config(tiny_models["gemma3"])["layer_types"]
    lmap = layer_map(out)
    by_index = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(lmap))]
    assert types == [base_types[s] for s in lmap]
    assert types != by_index  # output 11 copies layer 3 (sliding), though index 11 would be global


@pytest.mark.parametrize("family", FAMILIES)
def test_dus_mergekit_yaml_matches_dus_upscale(family, upscaled, tmp_path):
    recipe, out = upscaled[family]
    r = dus("mergekit-yaml", recipe, tmp_path / "out", "--clone-tensors", "--quiet")
    assert r.exit_code == 0, r.output
    a, b = tensors(out), tensors(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert config(tmp_path / "out") == {k: v for k, v in config(out).items()}


def _stock_mergekit(recipe: Path, out: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mergekit-yaml")
    return subprocess.run([str(exe), str(recipe), str(out), "--quiet"], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)


@pytest.mark.parametrize("family", STOCK_OK)
def test_stock_mergekit_yaml_runs_our_yaml_unchanged(family, upscaled, tiny_models, tmp_path):
    recipe, _ = upscaled[family]
    proc = _stock_mergekit(recipe, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_follows_plan(tmp_path / "out", tiny_models[family], layer_map(upscaled[family][1]))


def test_stock_mergekit_still_breaks_qwen2_layer_types(upscaled, tmp_path):
    """Canary for the README's family table: if mergekit fixes this, the table must change."""
    recipe, _ = upscaled["qwen2"]
    proc = _stock_mergekit(recipe, tmp_path / "out")
    assert proc.returncode != 0 and "layer_types" in proc.stderr


def test_dus_mergekit_yaml_with_a_relative_path_offline_and_never_half_written(tiny_models, tmp_path, monkeypatch):
    """mergekit's card step asks the Hub whether a relative path is a repo; dus makes local paths absolute first,
    and a failed run leaves no OUT behind."""
    import shutil

    from helpers import assert_one_line_error

    shutil.copytree(tiny_models["llama"], tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dus("plan", "models/base", "--drop", 2, "-o", "r.yml").exit_code == 0
    r = dus("mergekit-yaml", "r.yml", "out", "--quiet")
    assert r.exit_code == 0, r.output
    assert config(tmp_path / "out")["num_hidden_layers"] == 12 and (tmp_path / "out" / "README.md").is_file()
    assert not list(tmp_path.glob(".tmp-*"))

    # plant a corrupt shard in a copy (mergekit keeps the first base's file mapped within this process)
    shutil.copytree(tmp_path / "models" / "base", tmp_path / "models" / "bad")
    (tmp_path / "models" / "bad" / "model.safetensors").write_bytes(b"\0" * 64)
    (tmp_path / "bad.yml").write_text((tmp_path / "r.yml").read_text().replace("models/base", "models/bad"))
    assert_one_line_error(dus("mergekit-yaml", "bad.yml", "again", "--quiet"), "mergekit failed", "SafetensorError")
    assert not (tmp_path / "again").exists() and not list(tmp_path.glob(".tmp-*"))
    assert_one_line_error(dus("mergekit-yaml", "r.yml", "out"), "out is not empty")
