"""Multimodal (image-text-to-text) families: only the language tower grows. Checked independently with plain
transformers and safetensors: the folder loads with its own class with no missing/unexpected/mismatched key,
every text-layer tensor equals its source by the layer map (zero where identity zeroes it), every other tensor
(vision tower, projector, embeddings, head) is the base's bit for bit, the text config's per-layer lists follow
the map, solar-copy logits equal the base's own text layers stacked by the map, and identity logits equal the
base's exactly (fp32, text input)."""

from __future__ import annotations

import json

import pytest
import torch

import zoo_checks as zc
from dus_plugin import zoo
from dus_plugin.io import atomic_write_text
from dus_plugin.planner import PlanOptions, make_recipe
from dus_plugin.upscale import UpscaleOptions, upscale

from helpers import assert_one_line_error, dus, dus_ok

# Families whose tiny fixture the zoo can build and that pass; README's multimodal table lists the rest of
# transformers' image-text-to-text types, with why they are not covered yet.
FAMILIES = (
    "aria", "aya_vision", "cohere2_vision", "cohere_compass", "cosmos3_omni", "deepseek_vl", "exaone4_5", "gemma3",
    "gemma4", "glm46v", "glm4v", "glm_ocr", "glmga", "paddleocr_vl",
    "gemma4_unified", "got_ocr2", "granite_docling", "hyperclovax_vision_v2", "idefics2", "idefics3", "internvl",
    "kimi_k25", "lfm2_vl", "lighton_ocr", "llama4", "llava", "llava_next", "llava_next_video", "llava_onevision",
    "minicpm_ocr", "minicpmv4_6", "minicpmv4_7", "minimax_m3_vl", "mistral3", "mllama", "ovis2", "paligemma",
    "pp_chart2table", "qianfan_ocr", "qwen2_5_vl", "qwen2_vl", "qwen3_5", "qwen3_5_moe", "qwen3_vl", "qwen3_vl_moe",
    "qwen4_exp", "smolvlm", "step3p7", "video_llama_3", "video_llava", "vipllava",
)


@pytest.fixture(scope="module")
def tokenizer():
    from dus_plugin.fixtures import make_tokenizer

    return make_tokenizer()


def _upscale(base, root, method):
    planned = make_recipe(str(base), PlanOptions(method=method, drop=2))
    recipe = root / f"{method}.yml"
    atomic_write_text(recipe, planned.render(method))
    out = root / method
    return out, upscale(recipe, out, UpscaleOptions(quiet=True))


def _text_stack(model) -> str:
    """The module path of the language tower's layer list, found with transformers' own get_decoder()."""
    decoder = model.get_decoder()
    tower = next(name for name, mod in model.named_modules() if mod is decoder)
    n = model.config.get_text_config().num_hidden_layers
    inner = next(name for name, mod in decoder.named_modules() if isinstance(mod, torch.nn.ModuleList) and len(mod) == n)
    return f"{tower}.{inner}."


@pytest.mark.parametrize("model_type", FAMILIES)
def test_multimodal_family(model_type, tokenizer, tmp_path):
    from transformers import AutoModelForImageTextToText

    base = zoo.make_multimodal_model(model_type, tmp_path / "base", tokenizer)
    (base / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "SiglipImageProcessor"}))
    base_model = zc.load_clean(base, AutoModelForImageTextToText)
    for method in ("solar", "identity"):
        out, manifest = _upscale(base, tmp_path, method)
        layer_map, prefix = manifest.plan.layer_map, manifest.layers.prefix
        zeroed = {k for k, v in manifest.tensors.items() if v.zeroed}
        assert bool(zeroed) == (method == "identity")
        zc.tensors_follow_map(out, base, prefix, layer_map, zeroed)  # non-text tensors: equal to the base's
        text_key = next(k for k in zoo.TEXT_KEYS if k in json.loads((base / "config.json").read_text()))
        zc.per_layer_lists_follow_map(out, base, layer_map, sub=text_key)
        assert (out / "preprocessor_config.json").read_bytes() == (base / "preprocessor_config.json").read_bytes()
        model = zc.load_clean(out, AutoModelForImageTextToText)
        assert type(model) is type(base_model) and model.config.get_text_config().num_hidden_layers == len(layer_map)
        got = zc.logits(model)
        if method == "identity":
            assert torch.equal(got, zc.logits(base_model))
        else:
            ref = zc.stacked_reference(base_model, model.config, _text_stack(base_model), layer_map, model)
            assert torch.equal(got, zc.logits(ref))


def test_the_card_and_plan_say_which_tower_grew(tokenizer, tmp_path):
    base = zoo.make_multimodal_model("gemma3", tmp_path / "base", tokenizer)
    said = dus_ok("plan", base, "--drop", 2, "-o", tmp_path / "r.yml").output
    assert "is multimodal: only its language tower (language_model.model.layers.N) grows" in said
    dus_ok("upscale", tmp_path / "r.yml", tmp_path / "out", "-q")
    dus_ok("card", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "only the language tower grew" in card


@pytest.mark.parametrize("model_type,words", [
    ("t5gemma2", "encoder-decoder multimodal model"),
])
def test_out_of_scope_multimodal_families_are_refused_in_one_line(model_type, words, tmp_path):
    from transformers import AutoConfig

    folder = tmp_path / "base"
    cfg = AutoConfig.for_model(model_type)
    cfg.architectures = [zoo.image_text_types()[model_type]]
    cfg.save_pretrained(folder)
    assert_one_line_error(dus("plan", folder), words, "DUS grows decoder-only LMs")
