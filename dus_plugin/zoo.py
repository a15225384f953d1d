"""Tiny random models of every causal-LM family the installed transformers ships (the zoo test's fixtures).

Each family's own config class is built at test size (hidden 64, 8 layers) from its defaults with
a handful of size keys overridden, so per-layer patterns (sliding/full attention, dense/MoE layers,
attention/SSM layers) come out as the family defines them. Families out of DUS's scope (encoders,
encoder-decoders, multimodal wrappers) are listed with the reason dus gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


LAYERS = 8
SIZES: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=256, n_embd=64, n_head=4, n_inner=128, d_model=64, ffn_dim=128,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_local_experts=4,
    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=32,
    qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, n_positions=256, n_ctx=256, sliding_window=16,
    rotary_dim=8, n_group=1, topk_group=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    # sized for the real model in some families' defaults (a test model of thousands-wide layers takes minutes)
    ffn_hidden_size=128, expert_ffn_hidden_size=32, zero_expert_num=2, shared_intermediate_size=64,
    shared_experts_intermediate_size=32, mamba_n_heads=8, mamba_d_state=16, mamba_chunk_size=32,
    linear_key_head_dim=16, linear_value_head_dim=16, index_head_dim=16, index_topk=32, index_n_heads=4,
)
# Per-family settings on top of SIZES: what the defaults get wrong at test size, and non-uniform
# per-layer patterns that the layer map must carry.
OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen2": dict(use_sliding_window=True, max_window_layers=3),
    "qwen2_moe": dict(decoder_sparse_step=2, mlp_only_layers=[]),
    "qwen3_moe": dict(decoder_sparse_step=2, mlp_only_layers=[]),
    "deepseek_v2": dict(first_k_dense_replace=1),
    "deepseek_v3": dict(first_k_dense_replace=1),
    "gpt_neo": dict(attention_types=[[["global", "local"], LAYERS // 2]], window_size=16),
    "mamba2": dict(num_heads=8, head_dim=16, n_groups=1, expand=2, state_size=16),
    # its sliding-window layers' own attention sizes (per_layer_config) default to the real model's
    "dots3_note_text": dict(num_key_value_heads=4, per_layer_config={
        str(i): dict(head_dim=16, kv_lora_rank=8, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
                     qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8) for i in (2, 3, 4, 6, 7)}),
    "zaya": dict(num_experts_per_tok=1),
    "longcat_flash": dict(moe_topk=2),
    # attention every 2nd layer, MoE every 2nd: DUS with n - 2m even keeps the pattern
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    # RWKV rescales each layer's output weights by 2^(depth // rescale_every) at inference: a copy at a new
    # depth computes the same up to rounding, not bit for bit; 0 turns the rescaling off
    "rwkv": dict(rescale_every=0),
    # defaults sized for the real model: expert counts, linear-attention heads and per-layer lists shrunk to 8 layers
    "kimi_linear": dict(num_experts_per_token=2, linear_head_dim=16, linear_num_heads=4, num_expert_group=1,
                        mlp_layer_types=["dense"] + ["sparse"] * (LAYERS - 1)),
    "bailing_hybrid": dict(num_experts_per_token=2, linear_head_dim=16, linear_num_heads=4, num_expert_group=1,
                           first_k_dense_replace=1, mlp_layer_types=["dense"] + ["sparse"] * (LAYERS - 1),
                           layer_group_size=4),
    "cohere_compass_text": dict(layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * (LAYERS // 4),
                                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                 "full_attention": None}),
    "dbrx": dict(d_model=64, n_heads=4, max_seq_len=256, attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 1e4},
                 ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}),
    "gemma3n_text": dict(num_kv_shared_layers=2, intermediate_size=[128] * LAYERS, activation_sparsity_pattern=[0.0] * LAYERS,
                         hidden_size_per_layer_input=16, laurel_rank=8),
    "lfm2_moe": dict(layer_types=["conv", "conv", "full_attention", "conv"] * (LAYERS // 4), num_dense_layers=2),
    "qwen4_exp_text": dict(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                           linear_num_value_heads=4, hc_lowrank=8, ple_embed_dim=64, ngram_vocab_size_base=1024,
                           split_ngram_parts=4, heads_per_ngram=2, indexer_n_heads=2, indexer_kv_heads=1,
                           indexer_head_dim=16, indexer_budget=16, indexer_compress_ratio=4),
    # its rotary part is head_dim x partial_rotary_factor (0.5), which must be qk_rope_head_dim
    "mistral4": dict(head_dim=32),
    # multimodal text towers: rotary sections sized for the real head (their default, [16, 24, 24], fills 128)
    "qwen2_vl_text": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
    "qwen2_5_vl_text": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
    "paddleocr_vl_text": dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": [2, 3, 3]}),
    "glm4v_text": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}),
    "glm_ocr_text": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}),
    "kosmos_2_5_text_model": dict(embed_dim=64, attention_heads=4),
    "kosmos_2_text_model": dict(embed_dim=64, attention_heads=4),
    # rotary sections the modeling code defaults to when the config names none ([8, 12, 12], [16, 24, 24])
    "glm4v_moe_text": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                            "mrope_section": [2, 1, 1]}),
    "deepseek_ocr2_text": dict(mlp_layer_types=["dense"] + ["sparse"] * (LAYERS - 1)),  # unset in its defaults
    # its experts are on in the defaults, their top-k unset; its last layer must be a full-attention one
    # (with its wider full-attention heads, per layer)
    "diffusion_gemma_text": dict(top_k_experts=2, layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 2,
                                 per_layer_config={"3": {"head_dim": 32}, "7": {"head_dim": 32}}),
    # its sparse (DSA) attention layers have no rotary part; its linear-attention heads default to the real width
    "glm5_next_text": dict(qk_rope_head_dim=0, linear_head_dim=16, linear_num_heads=4),
    "hunyuan_vl_text": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2, 2, 2]}),
    "ernie4_5_vl_moe_text": dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": [3, 3, 2]},
                                 moe_num_experts=4, moe_k=2),
    "qwen2_5_omni_text": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
}
for _t in ("axk1", "axk2", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "youtu", "glm_moe_dsa",
           "minicpm3", "longcat_flash", "kimi_linear", "bailing_hybrid", "mistral4", "mistral_large4_text", "glm5_next_text"):
    OVERRIDES.setdefault(_t, {})["num_key_value_heads"] = 4  # multi-head latent attention: as many KV heads as heads


def causal_lm_types() -> dict[str, str]:
    """model_type -> causal-LM class name, as the installed transformers maps them."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    # a few text models are mapped to image-text-to-text only (Mistral 4): a causal LM all the same
    text_only = {t: c for t, c in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items() if c.endswith("ForCausalLM")}
    return {**text_only, **MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}


def tiny_config(model_type: str, vocab: int, layers: int = LAYERS):
    """The family's own config class at test size."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    defaults = cls().to_dict()
    kw = _sized(defaults, SIZES)
    kw.update(OVERRIDES.get(model_type, {}))
    kw[getattr(cls, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")] = layers
    kw["vocab_size"] = vocab
    if "vocab_size_per_layer_input" in defaults:  # Gemma 3n's per-layer embeddings: the same small vocabulary
        kw["vocab_size_per_layer_input"] = vocab
    kw.update(_per_layer_at(defaults, kw, layers, keys=("layer_types", "layers_block_type", "hybrid_override_pattern")))
    for key in ("rope_parameters", "rope_scaling"):
        if key not in kw and isinstance(defaults.get(key), dict) and "mrope_section" in defaults[key]:
            kw[key] = _rotary_sections(dict(defaults[key]), {**defaults, **kw})
    cfg = cls(**kw)
    if model_type in causal_lm_types():  # a multimodal model's text config may have no causal-LM class of its own
        cfg.architectures = [causal_lm_types()[model_type]]
    return cfg


def _sized(defaults: dict[str, Any], sizes: dict[str, Any]) -> dict[str, Any]:
    """The test sizes of the settings a config has; a size given per item (an image's height and width, Ernie's
    per-modality expert widths) keeps its length."""
    return {k: [v] * len(defaults[k]) if isinstance(defaults[k], list) and isinstance(v, int) else v
            for k, v in sizes.items() if k in defaults}


def _per_layer_at(defaults: dict[str, Any], kw: dict[str, Any], layers: int,
                  keys=("layer_types", "mlp_layer_types")) -> dict[str, Any]:
    """Per-layer patterns cycled to the test's layer count."""
    return {key: [defaults[key][i % len(defaults[key])] for i in range(layers)] for key in keys
            if isinstance(defaults.get(key), list) and key not in kw and len(defaults[key]) != layers}


def _rotary_sections(rope: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal rotary sections (temporal, height, width) that fill the small head's rotated half."""
    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    half = int(head * rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) // 2
    rope["mrope_section"] = [half - 2 * (half // 3)] + [half // 3] * 2
    return rope


def make_zoo_model(model_type: str, path: str | Path, tokenizer, seed: int = 0) -> Path:
    """Write a random-init tiny model of ``model_type`` with ``tokenizer`` to ``path``."""
    import torch
    import transformers

    path = Path(path)
    cfg = tiny_config(model_type, vocab=len(tokenizer))
    torch.manual_seed(seed)
    model = getattr(transformers, causal_lm_types()[model_type])(cfg).eval()
    with torch.no_grad():  # random norms and biases, so a copy is distinguishable from a fresh init
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name and not name.endswith("bias") else 0.0, 0.1)
    with torch.no_grad():  # a fixture that cannot run its own forward pass would test nothing
        model(input_ids=torch.arange(3, 27).unsqueeze(0) % cfg.vocab_size, use_cache=False)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- multimodal (image-text-to-text) families -------------------------------------------------------------

VISION_SIZES: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
    head_dim=16, image_size=28, patch_size=14, depth=2, embed_dim=32, num_heads=2, out_hidden_size=64,
    projection_dim=64,
    initializer_range=0.02,  # SAM-style towers default to 1e-10: their tiny weights would hide the image
)
# Vision settings where a family's released checkpoints differ from its config class's defaults
VISION_OVERRIDES: dict[str, dict[str, Any]] = {
    # Gemma 3's SigLIP tower has no pooling head (its config.json says so); ShieldGemma 2 is Gemma 3 4B
    **{t: dict(vision_use_head=False) for t in ("gemma3", "shieldgemma2")},
    # 4 x 4 patches merge to 4 image tokens; at one token transformers' Mistral 3 squeezes the token axis away
    "mistral3": dict(image_size=56),
    # Llama 4's pixel shuffle (ratio 0.5) feeds 4 x hidden into its adapter, whose width the projector takes
    "llama4": dict(intermediate_size=128, projector_input_dim=64, projector_output_dim=64, vision_output_dim=64),
    "mistral_large4": dict(image_size=56),  # Pixtral, as Mistral 3
    # the cross-attention reads the hidden states of some layers, concatenated with the last one's
    "mllama": dict(num_global_layers=1, attention_heads=2, intermediate_layers_indices=[0, 1],
                   vision_output_dim=3 * VISION_SIZES["hidden_size"]),
    "molmo2": dict(num_position_embeddings=4),  # one per patch of the tiny image
    # projector widths sized for the real model
    "inkling2": dict(projection_hidden_dim=64),
    "glm5_next": dict(projection_intermediate_size=64),
    # its connector shuffles 4 x 4 patches into one token; its deepstack reads 3 of its 12 layers
    "granite_docling": dict(image_size=56, deepstack_visual_indexes=[0, 1]),
    # FastViT (timm) at 104K parameters: one block a stage, narrow stages; the tower is as wide as its output (twice
    # its last stage), and it downsamples 64 x, so the image is 128 pixels
    "fast_vlm": dict(model_args=dict(inference_mode=True, layers=[1, 1, 1, 1, 1], embed_dims=[8, 16, 32, 32, 64]),
                     hidden_size=128, image_size=128),
    # Gemma 3n's MobileNetV5 (timm) at 1/16 of its channels: its fusion adapter still writes 2048 channels at
    # 16 x 16, whatever the image's size (64 pixels here)
    "gemma3n": dict(model_args=dict(channel_multiplier=0.0625), hidden_size=2048, image_size=64),
    # PerceptionLM's Perception Encoder, as its config.json names it (a ViT with a class token and 2-D rotary)
    "perception_lm": dict(architecture="vit_pe_core_large_patch14_336", image_size=28,
                          model_args=dict(embed_dim=32, depth=2, num_heads=2, img_size=[28, 28], ref_feat_shape=[2, 2],
                                          global_pool="", init_values=0.1)),
    # settings that index the tower's own layers: the deepstack reads 3 layers, as released (into text layers 0-2;
    # stock mergekit's Qwen3-VL definition names 3 mergers), so the tower has 3; at the tiny depth of 2,
    # windowed attention in layer 0 and full (or global) attention in layer 1
    **{t: dict(depth=3, deepstack_visual_indexes=[0, 1, 2]) for t in ("qwen3_vl", "qwen3_vl_moe",
                                                                      "qwen3_omni_moe_thinker", "cohere_compass",
                                                                      "cosmos3_omni")},
    **{t: dict(fullatt_block_indexes=[1]) for t in ("qwen2_5_vl", "qwen2_5_omni_thinker", "exaone4_5",
                                                    "hyperclovax_vision_v2")},
    **{t: dict(global_attn_indexes=[1]) for t in ("got_ocr2", "pp_chart2table")},
    # its Q-Former projectors take one attention head per 64 channels of the vision tower
    "granite4_vision": dict(hidden_size=64),
    # an encoder-free embedder of 3 x 3 merged patches, as wide as the text model
    "gemma4_unified": dict(mm_embed_dim=SIZES["hidden_size"], mm_posemb_size=16, output_proj_dims=SIZES["hidden_size"]),
}
# Towers beside the vision one (audio, a second vision encoder), and vision towers made of nested encoders, shrunk
# like the vision tower; "TEXT" stands for the text model's width where the tower's output feeds it
_OMNI_AUDIO = dict(encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32, output_dim="TEXT")
# SAM towers (DeepSeek-VL-Hybrid's high-res view, the OCR models' first stage); their initializer_range defaults to
# 1e-10, whose weights would hide the image
_SAM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, global_attn_indexes=[1],
            initializer_range=0.02)
EXTRA_TOWERS: dict[str, dict[str, dict[str, Any]]] = {
    "qwen3_omni_moe_thinker": {"audio_config": dict(_OMNI_AUDIO, downsample_hidden_size=32)},
    "qwen2_5_omni_thinker": {"audio_config": _OMNI_AUDIO},
    # (its SAM tower reads a 1024-pixel image by default; features are interpolated to the low-res grid anyway)
    "deepseek_vl_hybrid": {"high_res_vision_config": dict(_SAM, image_size=64, window_size=2)},
    "janus": {"vq_config": dict(base_channels=32, latent_channels=32, num_embeddings=256, projection_dim="TEXT",
                                image_token_embed_dim="TEXT")},
    **{t: {"qformer_config": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  encoder_hidden_size=VISION_SIZES["hidden_size"])}
       for t in ("blip-2", "instructblip", "instructblipvideo")},
    "molmo2": {"adapter_config": dict(vision_feature_layer=[1, 0], hidden_size=32, num_attention_heads=2,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=64, text_hidden_size="TEXT")},
    "dots3_note": {"vision_config": dict(adapter_in_dim=VISION_SIZES["hidden_size"], adapter_out_dim="TEXT",
                                         moe_intermediate_size=32, num_local_experts=4),
                   "audio_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, head_dim=16, downsample_hidden_size=32,
                                        adapter_input_size=32, adapter_out_dim="TEXT", conv_output_size=512)},
    "gemma3n": {"audio_config": dict(hidden_size=32, conf_num_attention_heads=2, conf_num_hidden_layers=2,
                                     sscp_conv_channel_size=[8, 8])},
    "muse_spark": {"audio_config": dict(hidden_sizes=[16, 16, 32, 32], depths=[1, 1, 1, 1], out_hidden_size="TEXT")},
    # Emu3 reads an image as VQ codes, each a token of the text vocabulary (its vocabulary_map names them)
    "emu3": {"vq_config": dict(codebook_size=8, base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1,
                               hidden_size=32, attn_resolutions=[])},
    "unlimited_ocr": {"vision_config.sam_config": dict(_SAM, downsample_channels=[32, 32]),  # the encoder's width
                      "vision_config.encoder_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=2)},
    # its vision encoder is a language model (Qwen2) over SAM's features
    "deepseek_ocr2": {"vision_config.sam_config": dict(_SAM, downsample_channels=[32, 32]),
                      "vision_config.encoder_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=2, num_key_value_heads=2,
                                                           vocab_size=64, layer_types=["full_attention"] * 2)},
    "inkling_mm_model": {"vision_config": dict(n_layers=2, text_hidden_size="TEXT"),
                         "audio_config": dict(text_hidden_size="TEXT")},
}
# Settings that equal the text model's width in a family's released checkpoints; the config classes' defaults keep
# the released width, which a tiny text model does not have
WIDTH_KEYS: dict[str, tuple[str, ...]] = {
    "paligemma": ("hidden_size", "projection_dim", "vision_config.projection_dim"),
    "ovis2": ("hidden_size",),
    "qwen2_vl": ("vision_config.hidden_size",),  # the patch merger's output, fed to the text model
    "inkling2": ("vision_config.text_hidden_size",),
}
# Gemma 3 pools each image to mm_tokens_per_image (256 of 64 x 64 patches); the tiny tower has 2 x 2 patches
# VipLlava reads 5 layers of its 24-layer CLIP tower; the tiny tower has 2
# "TOKEN": a special image token the family's defaults leave unset, placed at the top of the small vocabulary too
TOP_OVERRIDES: dict[str, dict[str, Any]] = {"gemma3": dict(mm_tokens_per_image=4),
                                            # ShieldGemma 2 answers with the logits of its Yes and No tokens
                                            "shieldgemma2": dict(mm_tokens_per_image=4, yes_token_index=10,
                                                                 no_token_index=11),
                                            # Aria's projector maps a patch count to its query count (1225 -> 128)
                                            "aria": dict(projector_patch_to_query_dict={4: 2, 16: 4}),
                                            # Muse's projector reads 2 x 2 merged patches of its vision tower
                                            **{t: dict(out_hidden_size=4 * VISION_SIZES["hidden_size"],
                                                       projector_hidden_size=64) for t in ("muse_glimmer",
                                                                                          "muse_spark")},
                                            # Kimi's projector is as wide as its vision tower
                                            "kimi_k25": dict(projection_hidden_size=VISION_SIZES["hidden_size"]),
                                            **{t: dict(image_token_id="TOKEN") for t in
                                               ("minicpm_ocr", "minicpmv4_6", "minicpmv4_7")},
                                            # BLIP-2's Q-Former reads 32 learned queries into 32 image tokens
                                            **{t: dict(num_query_tokens=4, image_token_index="TOKEN") for t in
                                               ("blip-2", "instructblip")},
                                            "instructblipvideo": dict(num_query_tokens=4, video_token_index="TOKEN"),
                                            **{t: dict(latent_query_num=4) for t in ("kosmos-2", "kosmos-2.5")},
                                            "vipllava": dict(vision_feature_layer=[-2, -1]),
                                            # Granite 4 Vision's projectors pool 2 x 2 windows of patches into one
                                            # query each and feed them into text layers below the seam (its
                                            # released map reads 4 vision layers into layers 0-21 of 40)
                                            "granite4_vision": dict(downsample_rate="1/2",
                                                                    deepstack_layer_map=[[-2, 1], [-1, 0]],
                                                                    spatial_target_layers=[2, 3, 4, 5],
                                                                    image_grid_pinpoints=[[28, 28], [28, 56]]),
                                            # LLaVA-NeXT tiles an image on a grid of multiples of the tower's size
                                            **{t: dict(image_grid_pinpoints=[[28, 28], [28, 56], [56, 28]]) for t in
                                               ("llava_next", "llava_next_video", "llava_onevision")}}
TEXT_KEYS = ("text_config", "language_config", "llm_config")
IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index", "boi_token_index", "eoi_token_index", "boi_token_id",
                    "eoi_token_id", "video_token_id", "video_token_index", "vision_start_token_id",
                    "vision_end_token_id", "image_patch_id", "image_seq_length")


def image_text_types() -> dict[str, str]:
    """model_type -> image-text-to-text class name, as the installed transformers maps them."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return dict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


# Families whose released checkpoints name another class than the mapping's: transformers maps ShieldGemma 2 to
# Gemma3ForConditionalGeneration, which does not load the folder it saves under ShieldGemma 2's config
RELEASED_CLASSES = {"shieldgemma2": "ShieldGemma2ForImageClassification"}


def multimodal_class(model_type: str) -> str:
    """The class name a family's checkpoints name in ``architectures``."""
    return RELEASED_CLASSES.get(model_type) or image_text_types()[model_type]


def tiny_multimodal_config(model_type: str, vocab: int, layers: int = LAYERS):
    """The family's own config at test size: its text config as ``tiny_config`` makes it, its vision config
    shrunk, and every special image token inside the small vocabulary."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    defaults = cls().to_dict()
    text_key = next(k for k in TEXT_KEYS if isinstance(defaults.get(k), dict))
    text = tiny_config(defaults[text_key]["model_type"], vocab, layers).to_dict()
    kw: dict[str, Any] = {text_key: text}
    vision = defaults.get("vision_config")
    if vision is None and "vision_config" in cls.sub_configs:  # Gemma 4: optional, set in released checkpoints
        vision = cls.sub_configs["vision_config"]().to_dict()
    if isinstance(vision, dict):
        tower = {**vision, **_sized(vision, VISION_SIZES), **VISION_OVERRIDES.get(model_type, {})}
        depth = tower.get("num_hidden_layers") or tower.get("depth") or VISION_SIZES["num_hidden_layers"]
        tower.update(_per_layer_at(vision, VISION_OVERRIDES.get(model_type, {}), depth))
        if isinstance(tower.get("per_layer_config"), dict):  # settings of some layers, keyed by index (dots.ocr 3)
            tower["per_layer_config"] = {k: v for k, v in tower["per_layer_config"].items() if int(k) < depth}
        kw["vision_config"] = tower
    for key, sizes in EXTRA_TOWERS.get(model_type, {}).items():
        top, _, inner = key.partition(".")
        tower = kw.setdefault(top, dict(defaults[top]))
        if inner:
            tower = tower.setdefault(inner, dict(defaults[top][inner]))
        tower.update({k: text["hidden_size"] if v == "TEXT" else v for k, v in sizes.items()})
    for key in WIDTH_KEYS.get(model_type, ()):
        *parent, leaf = key.split(".")
        (kw[parent[0]] if parent else kw)[leaf] = text["hidden_size"]
    top = TOP_OVERRIDES.get(model_type, {})
    kw.update({k: v for k, v in top.items() if v != "TOKEN"})
    if model_type == "emu3":  # the image marker, the end of an image row, and one token per VQ code, at the top
        codes = kw["vq_config"]["codebook_size"]
        kw["vocabulary_map"] = {"<image>": vocab - 1, "<|extra_200|>": vocab - 2,
                                **{f"<|visual token {i:06d}|>": vocab - 3 - i for i in range(codes)}}
    special = [k for k in IMAGE_TOKEN_KEYS if (isinstance(defaults.get(k), int) or top.get(k) == "TOKEN")
               and k != "image_seq_length"]
    kw.update({k: vocab - 1 - i for i, k in enumerate(special)})
    if "image_seq_length" in defaults:
        kw["image_seq_length"] = (VISION_SIZES["image_size"] // VISION_SIZES["patch_size"]) ** 2
    cfg = cls(**kw)
    cfg.architectures = [multimodal_class(model_type)]
    return cfg


def make_multimodal_model(model_type: str, path: str | Path, tokenizer, seed: int = 0) -> Path:
    """Write a random-init tiny image-text-to-text model of ``model_type`` with ``tokenizer`` to ``path``."""
    import torch
    import transformers

    path = Path(path)
    cfg = tiny_multimodal_config(model_type, vocab=len(tokenizer))
    torch.manual_seed(seed)
    model = getattr(transformers, multimodal_class(model_type))(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name and not name.endswith("bias") else 0.0, 0.1)
            elif p.is_floating_point() and not p.any():  # weights that start at zero (Gemma 3's projector,
                p.normal_(0.0, 1.0 if p.numel() == 1 else 0.02)  # Mllama's tanh gates): else the image reaches nothing
        # timm's towers start with small weights, under which the image fades stage by stage beneath the random
        # biases (FastViT): their convolutions are drawn to keep their input's variance
        towers = [m for m in model.modules() if type(m).__module__.startswith("timm.")]
        for conv in dict.fromkeys(c for tower in towers for c in tower.modules() if isinstance(c, torch.nn.Conv2d)):
            conv.weight.normal_(0.0, conv.weight[0].numel() ** -0.5)
        model(**(smoke_inputs(model, len(tokenizer))), use_cache=False)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def smoke_inputs(model, vocab: int) -> dict[str, Any]:
    """Text, or for a family whose forward takes no prompt without an image (BLIP-2, Kosmos-2), an image prompt."""
    import torch

    from dus_plugin.vision_inputs import image_prompt, needs_image

    if needs_image(model):
        prompt = image_prompt(model)
        assert prompt is not None, f"{type(model).__name__} needs an image, and no image input fits it"
        return prompt
    return {"input_ids": torch.arange(3, 27).unsqueeze(0) % vocab}
