"""What dus knows about model families, in one place: every family-specific rule the stages apply.

The stages learn a family's structure from transformers itself (``architecture.Architecture``); what cannot be
read from the model classes is listed here:
- which families are out of scope, and why (``OUT_OF_SCOPE``);
- which module attributes name a layer's own position (``POSITION_ATTRS``), left out when layers are compared;
- which projections write into the residual stream (``WRITER_LEAVES``, ``ATTENTION_WRITER_LEAVES``), zeroed by
  the identity method, and which families no zeroing can silence (``RESIDUAL_MIXERS``, ``PASS_THROUGH_SETTINGS``,
  ``POST_NORM``);
- which config lists follow the layer map (``PER_LAYER_KEYS``, ``LAYER_INDEX_KEYS``).
llama.cpp's per-architecture conversion rules live with the GGUF notes (``llamacpp.RULES``); the tiny test
fixtures' size overrides with the zoo (``zoo.OVERRIDES``).
"""

from __future__ import annotations

# Families outside the scope of DUS, with the reason a user is told (model_type -> reason).
NOT_DECODER_ONLY = "an encoder (BERT-style) or encoder-decoder model, not a decoder-only LM"
MULTIMODAL = "a multimodal wrapper; upscale its text model (the *ForCausalLM of its text config) instead"

# model_type -> why dus refuses it (out of scope for depth up-scaling).
OUT_OF_SCOPE: dict[str, str] = {
    **{t: NOT_DECODER_ONLY for t in (
        "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus", "plbart",
        "prophetnet", "trocr", "whisper", "musicgen", "musicgen_melody", "bert", "bert-generation", "big_bird",
        "camembert", "data2vec-text", "electra", "ernie", "megatron-bert", "rembert", "roc_bert", "roformer",
        "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "xmod", "xlm", "xlnet", "reformer")},
    **{t: MULTIMODAL for t in (
        "blt", "fuyu", "gemma3", "gemma3n", "gemma4", "gemma4_unified", "git", "got_ocr2", "emu3", "mllama",
        "phi4_multimodal", "qwen3_5", "qwen3_5_moe", "qwen4_exp", "dots3_note", "moss_transcribe_diarize", "moshi",
        "llama4", "gemma4_assistant", "gemma4_unified_assistant")},
}


# Attributes a layer module keeps that name its own position; they differ between a copy and its
# source by design (the KV-cache slot), so they are left out when layers are compared.
POSITION_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "layer_num", "idx",
                            "block_idx", "block_id"})
# Leaf names of projections that add into the residual stream, across the families of transformers.
WRITER_LEAVES = frozenset({"o_proj", "down_proj", "out_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "wo", "Wo",
                           "wo_b", "linear_out", "fc_out", "output_proj", "output_linear", "attention_out", "w_out",
                           "o_proj_bias", "down_proj_bias", "per_layer_projection",
                           "attn_out", "ff_out",  # Molmo 2
                           "wo_ud", "w2_weight", "shared_w2_weight"})  # Inkling's checkpoints (SGLang's names)
# Tensor names that show a layer scaling or mixing the residual stream itself (learned residual scales,
# hyper-connections): zeroing its output projections does not make such a layer the identity.
RESIDUAL_MIXERS = ("residual_scale", "residual_bias", "hc_attn_", "hc_ffn_",
                   "residual_gate")  # Muse Spark: alpha * residual + beta * output, alpha from a learned gate
# Config settings whose layers pass their input into the residual stream through no weight (LongCat-Flash's
# zero-computation experts return the token they are routed): no zeroed projection silences them.
PASS_THROUGH_SETTINGS = {"zero_expert_num": "its MoE routes tokens to zero-computation experts that return their "
                                            "input (zero_expert_num), which no weight can silence"}
# Families whose layers normalise the residual stream after adding to it (post-LayerNorm).
POST_NORM = {"openai-gpt": "each layer applies LayerNorm to the residual stream after adding to it (post-LN)"}
# Leaf names that are residual writers only inside an attention or recurrent-mixing block.
ATTENTION_WRITER_LEAVES = frozenset({"dense", "output", "to_out"})  # to_out: Cosmos 3 Omni's attention

# Per-layer lists known in transformers configs; any other list of length n whose name
# mentions "layer" is remapped too (and logged), since it can only be indexed by layer.
PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "attention_chunk_sizes", "sliding_window_layers", "indexer_types",
                  "intermediate_size", "activation_sparsity_pattern")  # the last two: Gemma 3n
# Lists of layer *indices* (not per-layer values): remapped to the output indices they cover.
LAYER_INDEX_KEYS = ("mlp_only_layers", "moe_layers", "hybrid_layer_ids", "full_attn_layers", "linear_attn_layers",
                    "swa_layers", "global_attn_layers", "sliding_window_layers_idx",
                    "cross_attention_layers",  # Llama 3.2 Vision (mllama): the text layers that attend to the image
                    "rope_scaling_layers")  # Molmo 2: the layers whose rotary positions are scaled
# Lists that give each layer the index of the layer whose KV cache it reads (itself, or an earlier one): each copy
# reads from the nearest earlier copy of its source's KV layer.
KV_SOURCE_KEYS = ("kv_source_layers",)  # Mistral Large 4

# The module of mergekit's modular form (multimodal models) that holds the language tower: the one dus grows.
TEXT_MODULE = "text_decoder"
