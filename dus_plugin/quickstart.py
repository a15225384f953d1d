"""The embedded default of `dus run`: a small pretrained 32-layer base and the text it learned from.

Everything here is rebuilt reproducibly by ``python -m dus_plugin.quickstart build``:
  1. corpus: the docstrings of Python's standard library (PSF License, which permits
     redistribution with its notice; see LICENSE-corpus.txt), split 95/5 into train/held-out;
  2. a byte-level BPE tokenizer (vocab 1024) trained on the train split;
  3. a 32-layer Llama (hidden 64, 4 heads, 2 KV heads) pretrained from random init with the
     project's own trainer on the train split, seed 0, saved in bfloat16 (a few MB).
The result lives in dus_plugin/quickstart_data/ and ships inside the package.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import random
import shutil
import sys
from pathlib import Path

DATA = Path(__file__).parent / "quickstart_data"
SKIP = ("test", "idlelib", "tkinter", "turtle", "lib2to3", "ensurepip", "antigravity", "this", "pydoc_data",
        "__main__", "_")


def stdlib_docstrings(limit_bytes: int = 2_500_000) -> list[str]:
    """Module, class and function docstrings of the standard library, one document each."""
    docs: list[str] = []
    names = sorted(m.name for m in pkgutil.iter_modules() if m.module_finder and "site-packages" not in str(
        getattr(m.module_finder, "path", "")) and not m.name.startswith(SKIP))
    size = 0
    for name in names:
        try:
            mod = importlib.import_module(name)
        except Exception:  # modules that need a display, a platform or a C library
            continue
        objs = [mod] + [v for k, v in sorted(vars(mod).items()) if not k.startswith("_")
                        and (inspect.isclass(v) or inspect.isfunction(v)) and getattr(v, "__module__", "") == name]
        objs += [m for c in objs if inspect.isclass(c) for k, m in sorted(vars(c).items())
                 if not k.startswith("_") and inspect.isfunction(m)]
        for obj in objs:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                docs.append(doc.strip())
                size += len(doc)
        if size > limit_bytes:
            break
    return docs


def build_corpus(out: Path, seed: int = 0) -> tuple[Path, Path]:
    docs = stdlib_docstrings()
    random.Random(seed).shuffle(docs)
    cut = int(len(docs) * 0.95)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("\n\n".join(docs[:cut]) + "\n")
    (out / "heldout.txt").write_text("\n\n".join(docs[cut:]) + "\n")
    license_src = Path(inspect.getfile(inspect)).parent / "LICENSE.txt"
    shutil.copy(license_src, out / "LICENSE-corpus.txt")
    return out / "train.txt", out / "heldout.txt"


def build_tokenizer(train: Path, vocab: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(train)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_base(out: Path, steps: int, seed: int = 0) -> Path:
    """Random-init 32-layer model + tokenizer, then pretraining with dus_plugin.train."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dus_plugin.train.config import TrainConfig
    from dus_plugin.train.loop import train

    import tempfile

    work = Path(tempfile.mkdtemp(prefix="dus-quickstart-build-"))  # never inside the package
    train_txt, _ = build_corpus(out)
    tok = build_tokenizer(train_txt)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=32,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(work / "init")
    tok.save_pretrained(work / "init")
    tc = TrainConfig.model_validate({
        "model": str(work / "init"), "output_dir": str(work / "run"),
        "data": {"sources": [{"path": str(train_txt)}], "seq_len": 128, "val_fraction": 0.02,
                 "cache_dir": str(work / "cache")},
        "micro_batch_size": 16, "global_batch_size": 16, "max_steps": steps, "seed": seed,
        "optimizer": {"lr": 3e-3, "weight_decay": 0.05}, "schedule": {"kind": "cosine", "warmup_steps": 50},
        "precision": "fp32", "log_every": 50, "eval_every": 250, "save_every": 0, "save_final": False,
        "tensorboard": False,
    })
    result = train(tc)
    shutil.rmtree(out / "base", ignore_errors=True)
    shutil.copytree(result.export_dir, out / "base", ignore=shutil.ignore_patterns("dus_manifest.json", "loss_curve.png"))
    shutil.copy(work / "run" / "loss_curve.png", out / "base_pretraining_loss.png")
    shutil.rmtree(work, ignore_errors=True)
    print(f"pretrained base: {steps} steps, final loss {result.loss:.3f}, validation loss {result.val_loss:.3f}")
    return out / "base"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dus_plugin.quickstart")
    ap.add_argument("command", choices=["build"])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default=str(DATA))
    args = ap.parse_args(argv)
    build_base(Path(args.out), args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
