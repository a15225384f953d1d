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
from dus_plugin.errors import PlanError
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
    "deepseek_vl_hybrid", "janus", "kosmos-2.5", "qwen3_omni_moe_thinker", "unlimited_ocr", "glm4v_moe",
    "qwen2_5_omni_thinker", "blip-2", "instructblip", "instructblipvideo", "mistral_large4", "kosmos-2",
    "cosmos3_edge", "dots3_note", "ernie4_5_vl_moe", "glm5_next", "hunyuan_vl", "lfm3_vl",
    "molmo2", "muse_glimmer", "muse_spark", "emu3", "inkling_mm_model", "deepseek_ocr2", "granite4_vision",
    "shieldgemma2",
)
# Families checked with text only: no image input dus_plugin.vision_inputs builds fits them (README says why)
TEXT_ONLY = ()
# Families whose text tower refuses identity, as the text zoo's does (its layers mix the residual stream)
SOLAR_ONLY = {"glm5_next": "hc_attn_", "muse_spark": "residual_gate"}


@pytest.fixture(scope="module")
def tokenizer():
    from dus_plugin.fixtures import make_tokenizer

    return make_tokenizer()


def _upscale(base, root, method):
    planned = make_recipe(str(base), PlanOptions(method=method, drop=2))
    recipe = root / f"{method}.yml"
    atomic_write_text(recipe, planned.render(method))
    out = root / method
    # verify's forward pass runs once, at the end of the test (with the image where there is one); the logits of
    # both methods are checked independently in the test
    return out, upscale(recipe, out, UpscaleOptions(quiet=True, forward=False))


def _text_stack(model) -> str:
    """The module path of the language tower's layer list, found with transformers' own get_decoder()."""
    decoder = model.get_decoder()
    tower = next(name for name, mod in model.named_modules() if mod is decoder)
    n = model.config.get_text_config().num_hidden_layers
    inner = next(name for name, mod in decoder.named_modules() if isinstance(mod, torch.nn.ModuleList) and len(mod) == n)
    return f"{tower}.{inner}."


def _loader(model_type):
    """AutoModelForImageTextToText, or the class a family's checkpoints name where the mapping's does not load them."""
    import transformers

    if model_type in zoo.RELEASED_CLASSES:
        return getattr(transformers, zoo.RELEASED_CLASSES[model_type])
    return transformers.AutoModelForImageTextToText


@pytest.mark.parametrize("model_type", FAMILIES)
def test_multimodal_family(model_type, tokenizer, tmp_path):
    from dus_plugin.verify import verify
    from dus_plugin.vision_inputs import image_prompt, needs_image, other_image

    base = zoo.make_multimodal_model(model_type, tmp_path / "base", tokenizer)
    (base / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "SiglipImageProcessor"}))
    loader = _loader(model_type)
    base_model = zc.load_clean(base, loader)
    prompt = image_prompt(base_model)  # built from the model alone
    assert (prompt is None) == (model_type in TEXT_ONLY)
    if prompt is not None:  # else the checks with the image below would hold whatever the tower computed
        with torch.no_grad():
            assert not torch.equal(base_model(**prompt).logits, base_model(**other_image(prompt)).logits), \
                "the image changes nothing"
    if model_type in SOLAR_ONLY:
        with pytest.raises(PlanError, match=SOLAR_ONLY[model_type]):
            make_recipe(str(base), PlanOptions(method="identity", drop=2))
    for method in ("solar",) if model_type in SOLAR_ONLY else ("solar", "identity"):
        out, manifest = _upscale(base, tmp_path, method)
        layer_map, prefix = manifest.plan.layer_map, manifest.layers.prefix
        zeroed = {k for k, v in manifest.tensors.items() if v.zeroed}
        assert bool(zeroed) == (method == "identity")
        zc.tensors_follow_map(out, base, prefix, layer_map, zeroed)  # non-text tensors: equal to the base's
        text_key = next(k for k in zoo.TEXT_KEYS if k in json.loads((base / "config.json").read_text()))
        zc.per_layer_lists_follow_map(out, base, layer_map, sub=text_key)
        assert (out / "preprocessor_config.json").read_bytes() == (base / "preprocessor_config.json").read_bytes()
        model = zc.load_clean(out, loader)
        assert type(model) is type(base_model) and model.config.get_text_config().num_hidden_layers == len(layer_map)
        ref = base_model if method == "identity" else \
            zc.stacked_reference(base_model, model.config, _text_stack(base_model), layer_map, model)
        if not needs_image(model):  # BLIP-2, InstructBLIP and Kosmos-2 take no prompt without an image
            assert torch.equal(zc.logits(model), zc.logits(ref))
        if prompt is not None:  # the same with an image in the prompt: the vision tower feeds the grown tower
            with torch.no_grad():
                assert torch.equal(model(**prompt).logits, ref(**prompt).logits)
    assert verify(out, quiet=True).image == (prompt is not None)  # dus verify's own forward pass had the image


# Families whose vision tower is a timm model. timm imports torchvision, and the package index has no torchvision
# that loads beside CI's CPU torch (0.28.0 links CUDA's libc10_cuda.so), so these run where torchvision imports:
# checked in a venv with torch 2.14.1 (its CUDA build, on CPU), torchvision 0.29.1 and timm 1.0.31. Elsewhere (CI)
# `dus plan` refuses them in one line that names timm.
TIMM_FAMILIES = ("fast_vlm", "perception_lm")
TIMM_REFUSED = {"gemma3n": "store_full_length_kv"}  # as its text model in the text zoo: KV sharing by layer index


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or a CUDA build beside a CPU torch ("operator torchvision::nms does not exist")
        return False
    return True


TIMM_HERE = _torchvision_imports()


@pytest.mark.skipif(not TIMM_HERE, reason="timm towers need torchvision, which does not import here")
@pytest.mark.parametrize("model_type", TIMM_FAMILIES)
def test_multimodal_family_with_a_timm_tower(model_type, tokenizer, tmp_path):
    test_multimodal_family(model_type, tokenizer, tmp_path)


@pytest.mark.skipif(not TIMM_HERE, reason="timm towers need torchvision, which does not import here")
@pytest.mark.parametrize("model_type,words", TIMM_REFUSED.items())
def test_a_timm_tower_family_whose_tower_cannot_grow_is_refused_in_one_line(model_type, words, tokenizer, tmp_path):
    base = zoo.make_multimodal_model(model_type, tmp_path / "base", tokenizer)
    assert_one_line_error(dus("plan", base, "--drop", 2), words)


@pytest.mark.skipif(TIMM_HERE, reason="checks the refusal where timm is absent, and it is present here")
@pytest.mark.parametrize("model_type", [*TIMM_FAMILIES, *TIMM_REFUSED])
def test_a_timm_tower_family_without_timm_is_refused_in_one_line(model_type, tokenizer, tmp_path):
    cfg = zoo.tiny_multimodal_config(model_type, vocab=len(tokenizer))
    cfg.save_pretrained(tmp_path / "base")
    assert_one_line_error(dus("plan", tmp_path / "base", "--drop", 2), "requires the timm library")


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


@pytest.mark.parametrize("model_type,words", [
    # its encoder runs the decoder's layers again, with per-layer buffers of its own: grown, the output would miss
    # the encoder's buffers of every new layer (transformers reports them missing at load)
    ("diffusion_gemma", "model.encoder.language_model.layers run the language tower's layers a second time"),
    # as its text model in the text zoo: a layer's config flag marks the end of a block of layers
    ("inkling2", "is_block_boundary"),
])
def test_multimodal_families_whose_tower_cannot_grow_are_refused_in_one_line(model_type, words, tokenizer,
                                                                             tmp_path):
    base = zoo.make_multimodal_model(model_type, tmp_path / "base", tokenizer)
    assert_one_line_error(dus("plan", base, "--drop", 2), words)


# Out of scope for the same reasons, checked in-process (the one-line CLI rendering is the test above): their
# refusal names the reason, and the README's multimodal table lists them as refused
REFUSED = {
    "encoder-decoder multimodal model": ("florence2", "pix2struct", "pp_formulanet", "udop", "vision-encoder-decoder",
                                         "blip"),
    "no separate text config": ("chameleon", "evolla", "idefics", "nemotron_h_omni", "pi0"),
    "a multimodal wrapper": ("fuyu", "git"),
}


@pytest.mark.parametrize("model_type,words", [(t, w) for w, types in REFUSED.items() for t in types])
def test_every_out_of_scope_image_text_family_is_refused_with_its_reason(model_type, words, tmp_path):
    from transformers import AutoConfig

    from dus_plugin.errors import BaseModelError

    cfg = AutoConfig.for_model(model_type)
    cfg.architectures = [zoo.image_text_types()[model_type]]
    cfg.save_pretrained(tmp_path)
    with pytest.raises(BaseModelError, match=words) as caught:
        make_recipe(str(tmp_path), PlanOptions(method="solar", drop=2))
    assert "\n" not in str(caught.value) and "DUS grows decoder-only" in str(caught.value)


# --- the real configs users download (config files only, written here; no download) -------------------------

GEMMA3_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     image_size=896, patch_size=14)
REAL = {
    "gemma-3-4b": ("gemma3", dict(text_config=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                                   num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                                   sliding_window=1024, query_pre_attn_scalar=256),
                                  vision_config=GEMMA3_VISION, mm_tokens_per_image=256)),
    "gemma-3-12b": ("gemma3", dict(text_config=dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                                                    num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                                    sliding_window=1024, query_pre_attn_scalar=256),
                                   vision_config=GEMMA3_VISION, mm_tokens_per_image=256)),
    "gemma-3-27b": ("gemma3", dict(text_config=dict(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                                                    num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                                                    sliding_window=1024, query_pre_attn_scalar=168),
                                   vision_config=GEMMA3_VISION, mm_tokens_per_image=256)),
    "qwen2.5-vl-7b": ("qwen2_5_vl", dict(text_config=dict(hidden_size=3584, intermediate_size=18944,
                                                          num_hidden_layers=28, num_attention_heads=28,
                                                          num_key_value_heads=4, vocab_size=152064),
                                         vision_config=dict(depth=32, hidden_size=1280, out_hidden_size=3584))),
    "qwen3-vl-8b": ("qwen3_vl", dict(text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                                      num_attention_heads=32, num_key_value_heads=8, head_dim=128),
                                     vision_config=dict(depth=27, hidden_size=1152, out_hidden_size=4096,
                                                        deepstack_visual_indexes=[8, 16, 24]))),
    "llama-4-scout": ("llama4", dict(text_config=dict(hidden_size=5120, intermediate_size=8192,
                                                      intermediate_size_mlp=16384, num_hidden_layers=48,
                                                      num_attention_heads=40, num_key_value_heads=8,
                                                      num_local_experts=16, num_experts_per_tok=1,
                                                      interleave_moe_layer_step=1))),
    "mistral-small-3.1-24b": ("mistral3", dict(text_config=dict(model_type="mistral", hidden_size=5120,
                                                                intermediate_size=32768, num_hidden_layers=40,
                                                                num_attention_heads=32, num_key_value_heads=8,
                                                                head_dim=128, vocab_size=131072))),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_plan_on_the_real_config(name, tmp_path):
    """`dus plan` on the config of a model users pick today: the layer map at the default m, the text config's
    per-layer lists by that map, the multimodal note, and what llama.cpp will do with Gemma 3's text model."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from dus_plugin.architecture import Architecture, upscaled_config
    from dus_plugin.plan import layout_plan

    model_type, over = REAL[name]
    cfg = CONFIG_MAPPING[model_type](**over)
    cfg.architectures = [zoo.image_text_types()[model_type]]
    cfg.save_pretrained(tmp_path / name)
    said = dus_ok("plan", tmp_path / name, "-o", tmp_path / "r.yml").output
    n = over["text_config"]["num_hidden_layers"]
    m = n // 4
    assert f"layout solar: n={n}  m={m}  s={2 * (n - m)}" in said
    assert "is multimodal: only its language tower" in said
    base = json.loads((tmp_path / name / "config.json").read_text())
    layer_map = layout_plan(n, "solar", None, None).layer_map
    out = upscaled_config(base, layer_map)["text_config"]
    Architecture(base).check_layers(layer_map)  # every grown text layer built as its source
    from dus_plugin.families import LAYER_INDEX_KEYS

    for key, value in base["text_config"].items():
        if key in LAYER_INDEX_KEYS and isinstance(value, list):  # indices of layers: those whose source is listed
            assert out[key] == [i for i, s in enumerate(layer_map) if s in set(value)], key
        elif isinstance(value, list) and len(value) == n:
            assert out[key] == [value[s] for s in layer_map], key
    if name.startswith("gemma"):
        # 27B: llama.cpp scales attention by hidden/heads = 168 only at exactly 62 layers; grown, it would use 128
        assert ("query_pre_attn_scalar is 168" in said) == (name == "gemma-3-27b")
        assert ("gguf-patch" in said) == ((n - 2 * m) % 6 != 0)


def test_layers_that_share_a_kv_cache_read_the_nearest_earlier_copy():
    """Mistral Large 4's kv_source_layers: layers 1 and 3 reuse the caches of 0 and 2. Grown, each copy reads the
    nearest earlier copy of its source's KV layer that owns a cache, and transformers accepts the config; a map whose
    copy would read a layer that comes after it is refused, naming the setting."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from dus_plugin.architecture import config_object, upscaled_config
    from dus_plugin.errors import PlanError

    base = {**CONFIG_MAPPING["mistral_large4_text"](num_hidden_layers=4, kv_source_layers=[0, 0, 2, 2]).to_dict(),
            "model_type": "mistral_large4_text"}
    grown = upscaled_config(base, [0, 1, 2, 1, 2, 3])
    assert grown["kv_source_layers"] == [0, 0, 2, 0, 4, 4]
    assert config_object(grown).kv_source_layers == [0, 0, 2, 0, 4, 4]  # transformers validates the sharing
    with pytest.raises(PlanError, match="kv_source_layers: output layer 0 copies layer 1"):
        upscaled_config(base, [1, 0, 2, 3])


def test_a_layer_map_that_moves_qwen3_vl_deepstack_layers_is_refused(tmp_path):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type, over = REAL["qwen3-vl-8b"]
    cfg = CONFIG_MAPPING[model_type](**over)
    cfg.architectures = [zoo.image_text_types()[model_type]]
    cfg.save_pretrained(tmp_path / "q")
    assert_one_line_error(dus("plan", tmp_path / "q", "--layers", "1:36,0:1"), "deepstack_visual_indexes",
                          "text layers 0..2")


@pytest.mark.parametrize("layers,words", [
    ("1:32,0:1", "deepstack_layer_map feeds image features into text layers [0, 3, 6, 9] by index"),
    (None, "spatial_target_layers feeds image features into text layers [12, 15, 18, 21] by index"),
])
def test_a_layer_map_that_moves_granite4_vision_target_layers_is_refused(layers, words, tmp_path):
    """Granite 4 Vision adds image features into the text layers it names, as (vision layer, text layer) pairs and
    a list of spatial targets (its defaults, 32 text layers, with a deepstack map as its checkpoints set one)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = CONFIG_MAPPING["granite4_vision"](deepstack_layer_map=[[-19, 9], [-13, 6], [-7, 3], [-1, 0]],
                                           downsample_rate="4/8")
    cfg.architectures = [zoo.image_text_types()["granite4_vision"]]
    cfg.save_pretrained(tmp_path / "g")
    args = ("--layers", layers) if layers else ("--drop", 12)  # drop 12 puts base layer 13 at 21
    assert_one_line_error(dus("plan", tmp_path / "g", *args), words)
    dus_ok("plan", tmp_path / "g", "-o", tmp_path / "r.yml")  # the solar layout (drop 8) keeps 0..23 in place


def test_training_a_grown_multimodal_model_trains_its_language_tower_only(tokenizer, tmp_path):
    """`dus train` on a grown Gemma 3: the loss goes down, every non-text tensor stays the base's, the text
    layers move, and the export loads as the whole multimodal model again, with its processor file."""
    import yaml
    from transformers import AutoModelForImageTextToText

    base = zoo.make_multimodal_model("gemma3", tmp_path / "base", tokenizer)
    (base / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "SiglipImageProcessor"}))
    out, manifest = _upscale(base, tmp_path, "identity")
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(" ".join(f"word{(i * 7 + j) % 50}" for j in range(60)) for i in range(200)))
    cfg = {"model": str(out), "output_dir": str(tmp_path / "run"), "micro_batch_size": 4, "global_batch_size": 4,
           "data": {"sources": [{"path": str(corpus)}], "seq_len": 64, "val_fraction": 0.05},
           "max_steps": 12, "optimizer": {"lr": 3e-3}, "log_every": 1, "tensorboard": False}
    (tmp_path / "t.yml").write_text(yaml.safe_dump(cfg))
    import subprocess
    import sys

    # its own process: an Accelerator made earlier in this one fixes accelerate's state for good
    run = subprocess.run([sys.executable, "-m", "dus_plugin.cli", "train", str(tmp_path / "t.yml")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    said = run.stdout + run.stderr
    assert "the vision tower and projector stay frozen" in said
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    final = tmp_path / "run" / "final"
    model = zc.load_clean(final, AutoModelForImageTextToText)
    grown = zc.load_clean(out, AutoModelForImageTextToText)
    tower = _text_stack(model).split(".layers.")[0] + "."
    before, after = grown.state_dict(), model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and all(k.startswith(tower) or k.startswith("lm_head.") for k in moved), sorted(moved)[:3]
    assert any(".layers." in k for k in moved)
    assert (final / "preprocessor_config.json").is_file()


def test_training_a_family_that_needs_an_image_in_every_prompt_is_one_line(tokenizer, tmp_path):
    """BLIP-2 takes no text-only prompt, and dus train feeds text: refused before the model loads, naming `model`."""
    import yaml

    base = zoo.make_multimodal_model("blip-2", tmp_path / "base", tokenizer)
    out, _ = _upscale(base, tmp_path, "solar")
    corpus = tmp_path / "text.txt"
    corpus.write_text("some words\n\n" * 50)
    cfg = {"model": str(out), "output_dir": str(tmp_path / "run"), "data": {"sources": [{"path": str(corpus)}],
           "seq_len": 16}, "micro_batch_size": 1, "global_batch_size": 1, "max_steps": 1, "optimizer": {"lr": 1e-3},
           "tensorboard": False}
    (tmp_path / "t.yml").write_text(yaml.safe_dump(cfg))
    assert_one_line_error(dus("train", tmp_path / "t.yml", "-q"), "Blip2ForConditionalGeneration takes no prompt "
                          "without an image", "trains on text only")
    assert not (tmp_path / "run" / "final").exists()


# --- stock mergekit's modular form (issue 26) -------------------------------------------------------------------

MODULAR = ("qwen2_5_vl", "qwen3_vl", "mistral3", "llama4", "gemma3")


def _as_released(folder) -> None:
    """Gemma 3 as its checkpoints on the Hub name the vision tower (`vision_tower.vision_model.`), which
    transformers 5 reads and saves as `vision_tower.`; the renamed folder loads to the same weights."""
    from safetensors.torch import load_file, save_file

    for f in folder.glob("*.safetensors"):
        t = load_file(f)
        save_file({"vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k: v
                   for k, v in t.items()}, f, metadata={"format": "pt"})


def _stock_mergekit(recipe, out):
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("mergekit-yaml")
    return subprocess.run([str(exe), str(recipe), str(out), "--quiet"], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)


@pytest.mark.parametrize("model_type", MODULAR)
def test_stock_mergekit_runs_the_modular_recipe_to_the_same_tensors(model_type, tokenizer, tmp_path):
    """Where stock mergekit defines the model in modules and its definition names exactly the checkpoint's tensors,
    `dus plan` writes the modular form (text_decoder grows, the rest is copied whole): stock `mergekit-yaml` runs
    it to dus upscale's tensors bit for bit, and `dus mergekit-yaml` to dus upscale's config too, where stock
    mergekit leaves text_config's per-layer lists at the base's length."""
    import yaml

    from helpers import config, tensors

    base = zoo.make_multimodal_model(model_type, tmp_path / "base", tokenizer)
    if model_type == "gemma3":
        _as_released(base)
    said = dus_ok("plan", base, "--drop", 2, "-o", tmp_path / "r.yml").output
    assert "mergekit's modular form" in said and "stock mergekit runs it" in said, said
    doc = yaml.safe_load((tmp_path / "r.yml").read_text())
    assert "slices" not in doc and "text_decoder" in doc["modules"] and len(doc["modules"]) >= 2
    dus_ok("upscale", tmp_path / "r.yml", tmp_path / "dus", "-q")
    proc = _stock_mergekit(tmp_path / "r.yml", tmp_path / "stock")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = tensors(tmp_path / "dus"), tensors(tmp_path / "stock")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    dus_ok("mergekit-yaml", tmp_path / "r.yml", tmp_path / "fixed", "--quiet")
    assert config(tmp_path / "fixed")["text_config"] == config(tmp_path / "dus")["text_config"]
    stock_types = config(tmp_path / "stock")["text_config"].get("layer_types")
    if stock_types is not None:  # the bug `dus mergekit-yaml` exists for: 8 entries for 12 layers
        assert len(stock_types) == 8 and config(tmp_path / "stock")["text_config"]["num_hidden_layers"] == 12


@pytest.mark.parametrize("model_type,why", [
    ("gemma3", "reads vision_tower.vision_model."),  # as transformers 5 saves it
    ("qwen2_vl", "cannot count its layers"),  # mergekit 0.1.5 reads num_hidden_layers at the top of the config
])
def test_where_stock_mergekit_would_lose_tensors_the_plan_says_why(model_type, why, tokenizer, tmp_path):
    import yaml

    base = zoo.make_multimodal_model(model_type, tmp_path / "base", tokenizer)
    said = dus_ok("plan", base, "--drop", 2, "-o", tmp_path / "r.yml").output
    assert "only `dus upscale` runs this recipe" in said and why in said, said
    assert "slices" in yaml.safe_load((tmp_path / "r.yml").read_text())


def test_a_modular_recipe_that_would_grow_another_module_is_one_line():
    from dus_plugin.errors import RecipeError
    from dus_plugin.recipe import parse_recipe

    text = {"slices": [{"sources": [{"model": "m", "layer_range": [0, 6]}]},
                       {"sources": [{"model": "m", "layer_range": [2, 8]}]}]}
    ok = parse_recipe({"merge_method": "passthrough", "modules": {
        "text_decoder": text, "vision_tower": {"slices": [{"sources": [{"model": "m", "layer_range": [0, 2]}]}]}}})
    assert ok.layer_map == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    grown_vision = {"text_decoder": text, "vision_tower": text}
    with pytest.raises(RecipeError, match="dus grows only text_decoder"):
        parse_recipe({"merge_method": "passthrough", "modules": grown_vision})
    with pytest.raises(RecipeError, match="one of them"):
        parse_recipe({"merge_method": "passthrough", "modules": {"text_decoder": text}, **text})
    with pytest.raises(RecipeError, match="same model"):
        parse_recipe({"merge_method": "passthrough", "modules": {
            "text_decoder": text, "vision_tower": {"slices": [{"sources": [{"model": "x", "layer_range": [0, 2]}]}]}}})
