"""Does 8-bit AdamW on bf16 weights learn like the default AdamW, and is the memory planner right for each mode?

One random Llama base (24 layers, hidden 1024, vocab 32000: ~0.37B parameters), trained on the same text
with the same schedule in three modes, each a real `dus train` in its own process:
  default   fp32 master weights, bf16 autocast, torch AdamW (what a config gets unless it asks otherwise)
  adamw8bit fp32 master weights, torchao AdamW8bit
  lowmem    bf16 master weights, torchao AdamW8bit with stochastic rounding (what fits 10.7B on one GPU)
Reports the validation-loss curves, the final gap to the default, and peak GPU memory against the
planner's estimate.

  python benchmarks/lowmem_parity.py --work /tmp/parity --out benchmarks/results/lowmem_parity.json [--small]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from measure import run_measured  # noqa: E402

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
             num_hidden_layers=24, vocab_size=32000, max_position_embeddings=2048)
SMALL = dict(SHAPE, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=4, max_position_embeddings=256)
MODES = {
    "default": {},
    "adamw8bit": {"optimizer": {"name": "adamw8bit"}},
    "lowmem": {"optimizer": {"name": "adamw8bit"}, "master_weights": "bf16"},
}


def make_base(folder: Path, shape: dict) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dus_plugin.fixtures import make_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, tie_word_embeddings=False, dtype="bfloat16")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)


def config(work: Path, base: Path, mode: str, small: bool) -> Path:
    corpus = REPO / "dus_plugin" / "quickstart_data" / "train.txt"
    cfg = {"model": str(base), "output_dir": str(work / mode),
           "data": {"sources": [{"path": str(corpus)}], "seq_len": 128 if small else 512, "val_fraction": 0.02,
                    "cache_dir": str(work / "token_cache")},
           "micro_batch_size": 8, "global_batch_size": 8, "max_steps": 20 if small else 200,
           "optimizer": {"lr": 3e-4, "weight_decay": 0.1},
           "schedule": {"kind": "cosine", "warmup_steps": 2 if small else 30},
           "precision": "bf16", "log_every": 5 if small else 25, "eval_every": 5 if small else 25,
           "eval_on_start": True, "val_batches": 8, "save_every": 0, "save_final": False, "export": False,
           "tensorboard": False}
    for key, value in MODES[mode].items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    path = work / f"{mode}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/dus-parity"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = args.work / "base"
    if not base.is_dir():
        make_base(base, SMALL if args.small else SHAPE)
    runs = {}
    for mode in MODES:
        seconds, _, _ = run_measured([sys.executable, "-m", "dus_plugin.cli", "train",
                                      str(config(args.work, base, mode, args.small)), "-q"], echo=False)
        summary = json.loads((args.work / mode / "train_summary.json").read_text())
        rows = [json.loads(x) for x in (args.work / mode / "metrics.jsonl").read_text().splitlines()]
        runs[mode] = {"seconds": round(seconds, 1), "val_loss": summary["val_loss"],
                      "val_curve": [[r["step"], round(r["val_loss"], 4)] for r in rows if "val_loss" in r],
                      "tok_s": summary["tokens_per_second"], "peak_gpu_gb": summary["peak_gpu_gb"],
                      "estimate_gpu_gb": summary["estimate_gb"],
                      "estimate_error": (round(summary["estimate_gb"] / summary["peak_gpu_gb"] - 1, 3)
                                         if summary["peak_gpu_gb"] else None)}
        print(mode, {k: v for k, v in runs[mode].items() if k != "val_curve"}, flush=True)
    ref = runs["default"]["val_loss"]
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "date": dt.date.today().isoformat(), "shape": "small (script check)" if args.small else SHAPE,
              "runs": runs, "final_val_loss_minus_default": {m: round(r["val_loss"] - ref, 4) for m, r in runs.items()}}
    print(json.dumps(report["final_val_loss_minus_default"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
