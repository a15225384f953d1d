"""Tiny random models of the real families, with a tiny local tokenizer.

Used by the tests and benchmarks: nothing is downloaded. Each model has the family's real
config shape (biases, extra norms, fused projections, per-layer attention types) at hidden
size 32-64, so mergekit and transformers treat it exactly as they treat the full-size model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

FAMILIES = ("llama", "mistral", "qwen2", "qwen2_tied", "qwen3", "gemma2", "gemma3", "phi3")

_WORDS = (
    "the model layer depth scale seam train token data merge slice copy stack base weight "
    "loss step batch attention window norm head query key value gate up down project"
).split()


def tiny_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences, enough to train a tokenizer and to run a few steps on."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 16))) + "." for _ in range(n_lines)]


def make_tokenizer(vocab_size: int = 128):
    """A byte-level BPE tokenizer trained here, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _common(vocab: int, layers: int, hidden: int = 32) -> dict[str, Any]:
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def family_config(family: str, vocab: int, layers: int | None = None):
    """A transformers config of ``family`` at test size. Layer counts default to 8 (12 for Gemma 3,
    whose 5-sliding-1-global pattern needs two periods to show)."""
    import transformers as tf

    n = layers if layers is not None else (12 if family == "gemma3" else 8)
    c = _common(vocab, n)
    builders: dict[str, Callable[[], Any]] = {
        "llama": lambda: tf.LlamaConfig(**c, tie_word_embeddings=False),
        "mistral": lambda: tf.MistralConfig(**c, sliding_window=64, tie_word_embeddings=False),
        # sliding attention from layer 3 on makes layer_types non-uniform
        "qwen2": lambda: tf.Qwen2Config(
            **c, use_sliding_window=True, sliding_window=16, max_window_layers=3, tie_word_embeddings=False
        ),
        "qwen2_tied": lambda: tf.Qwen2Config(**c, tie_word_embeddings=True),
        "qwen3": lambda: tf.Qwen3Config(**c, head_dim=8, tie_word_embeddings=False),
        "gemma2": lambda: tf.Gemma2Config(
            **c, head_dim=8, sliding_window=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0
        ),
        "gemma3": lambda: tf.Gemma3TextConfig(**c, head_dim=8, sliding_window=16, final_logit_softcapping=30.0),
        "phi3": lambda: tf.Phi3Config(**c, tie_word_embeddings=False),
    }
    if family not in builders:
        raise KeyError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    cfg = builders[family]()
    cfg.architectures = [_ARCH[family]]
    return cfg


_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2_tied": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def make_tiny_model(family: str, path: str | Path, layers: int | None = None, seed: int = 0,
                    dtype: str = "float32") -> Path:
    """Write a random-init model of ``family`` with a tokenizer to ``path``; return the path."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tok = make_tokenizer()
    cfg = family_config(family, vocab=len(tok), layers=layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    with torch.no_grad():  # random norms, so a layer's copy is distinguishable from a fresh init
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
