"""Every causal-LM family of the installed transformers: upscaled correctly with both methods, or refused
with the one-line reason the README lists. Checked independently with plain transformers and safetensors:
the folder loads with no missing/unexpected/mismatched key, every tensor equals its source (or is zero
where identity zeroes it), per-layer config lists follow the layer map, solar-copy logits equal the base's
own layer modules stacked by the map, and identity logits equal the base's exactly (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

import zoo_checks as zc
from dus_plugin import zoo
from dus_plugin.families import OUT_OF_SCOPE
from dus_plugin.errors import DusError
from dus_plugin.io import atomic_write_text
from dus_plugin.planner import PlanOptions, make_recipe
from dus_plugin.upscale import UpscaleOptions, upscale

from helpers import assert_one_line_error, dus

# model_type -> (method that is refused, or None for both; words of the one-line reason). Listed in the README.
REFUSED = {
    "beam": (None, "attn_residual_add_idx"),
    "diffllama": (None, "lambda_init"),
    "minimax": (None, "num_hidden_layers"),
    "zamba2": (None, "layer_block_map"),
    "hrm_text": (None, "decoder layers"),
    "xlstm": (None, "decoder layers"),
    "nemotron_h": (None, "num_hidden_layers"),
    "inkling2_text": (None, "is_block_boundary"),
    "gemma3n_text": (None, "store_full_length_kv"),
    "openai-gpt": ("identity", "post-LN"),
    "zaya": ("identity", "residual_scale"),
    "deepseek_v4": ("identity", "hc_attn_"),
    "hy_v4": ("identity", "hc_attn_"),
    "longcat_flash": ("identity", "zero-computation experts"),
}


@pytest.fixture(scope="module")
def tokenizer():
    from dus_plugin.fixtures import make_tokenizer

    return make_tokenizer()


def _upscale(base, root, method):
    planned = make_recipe(str(base), PlanOptions(method=method))
    recipe = root / f"{method}.yml"
    atomic_write_text(recipe, planned.render(method))
    out = root / method
    # verify's forward pass runs once per family, on identity (its logits against the base's); the solar logits
    # are checked below independently, and the pass is 40% of this test's time
    return out, upscale(recipe, out, UpscaleOptions(quiet=True, forward=method == "identity"))


@pytest.mark.parametrize("model_type", sorted(zoo.causal_lm_types()))
def test_family(model_type, tokenizer, tmp_path):
    if model_type in OUT_OF_SCOPE:
        _assert_out_of_scope(model_type, tmp_path)
        return
    base = zoo.make_zoo_model(model_type, tmp_path / "base", tokenizer)
    refused_method, words = REFUSED.get(model_type, ("-", ""))
    base_model = zc.load_clean(base)
    for method in ("solar", "identity"):
        if refused_method in (None, method):
            with pytest.raises(DusError, match=words.replace("(", r"\(")):
                _upscale(base, tmp_path, method)
            continue
        out, manifest = _upscale(base, tmp_path, method)
        _assert_upscaled(base, base_model, out, manifest, method)


def _assert_upscaled(base, base_model, out, manifest, method):
    layer_map, prefix = manifest.plan.layer_map, manifest.layers.prefix
    zeroed = {k for k, v in manifest.tensors.items() if v.zeroed}
    if method == "identity":
        assert zeroed, "identity zeroed nothing"
    zc.tensors_follow_map(out, base, prefix, layer_map, zeroed)
    zc.per_layer_lists_follow_map(out, base, layer_map)
    model = zc.load_clean(out)
    # the plan's parameter counts are the models' own (MoE and dense layers differ; tied weights once)
    assert manifest.plan.params_before == sum(p.numel() for p in base_model.parameters())
    assert manifest.plan.params_after == sum(p.numel() for p in model.parameters())
    got = zc.logits(model)
    if method == "identity":
        assert torch.equal(got, zc.logits(base_model))
    else:
        assert torch.equal(got, zc.logits(zc.stacked_reference(base_model, model.config, prefix, layer_map, model)))


def _assert_out_of_scope(model_type, tmp_path):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    folder = tmp_path / "base"
    folder.mkdir()
    cfg = {"model_type": model_type, "architectures": [zoo.causal_lm_types()[model_type]], "num_hidden_layers": 8}
    (folder / "config.json").write_text(json.dumps(cfg))
    assert model_type in CONFIG_MAPPING
    assert_one_line_error(dus("plan", folder), "DUS grows decoder-only LMs")


def test_every_refusal_is_one_line(tokenizer, tmp_path):
    """The CLI's side of a refused family: one line naming why, no output written."""
    base = zoo.make_zoo_model("diffllama", tmp_path / "base", tokenizer)
    assert_one_line_error(dus("plan", base, "-o", tmp_path / "r.yml"), "lambda_init", "cannot express")
    assert not (tmp_path / "r.yml").exists()
