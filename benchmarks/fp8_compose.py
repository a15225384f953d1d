"""precision: fp8 composed with the rest of the trainer on one GPU (issue 13): FSDP2, activation checkpointing,
fused projections, an interrupted run resumed, and the export.

Each case trains a small Llama for 8 steps in two launches (--stop-after 4, then --resume), then checks what
the export is: it loads in transformers with no missing or unexpected key, holds the base's tensor names
(unfused) in the base's dtype, and the loss fell. torchao's float8 needs a GPU of compute capability 8.9+.

  python benchmarks/fp8_compose.py --out $OUT/fp8_compose.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4,
             vocab_size=512, num_hidden_layers=4, max_position_embeddings=512)
CASES = {
    "fp8": {},
    "fp8+fsdp2": {"launcher": "fsdp"},
    "fp8+activation_checkpointing": {"activation_checkpointing": True},
    "fp8+fused_projections": {"fused_projections": True},
}


def build(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dus_plugin.fixtures import make_tokenizer

    cfg = LlamaConfig(**SHAPE, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    make_tokenizer(SHAPE["vocab_size"]).save_pretrained(folder)


def config(work: Path, model: Path, text: Path, over: dict) -> Path:
    cfg = {"model": str(model), "output_dir": str(work / "run"),
           "data": {"sources": [{"path": str(text)}], "seq_len": 256, "val_fraction": 0.05},
           "micro_batch_size": 4, "global_batch_size": 8, "max_steps": 8, "seed": 0,
           "optimizer": {"lr": 1e-3}, "schedule": {"kind": "cosine", "warmup_steps": 0},
           "precision": "fp8", "compile": True, "save_every": 4, "log_every": 1, "tensorboard": False,
           **{k: v for k, v in over.items() if k != "launcher"}}
    path = work / "train.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(cfg: Path, fsdp: bool, *extra: str) -> subprocess.CompletedProcess:
    head = ["accelerate", "launch", "--num_processes", "1"]
    head += ["--config_file", str(REPO / "train" / "fsdp.yaml")] if fsdp else ["--mixed_precision", "bf16"]
    return subprocess.run(head + ["-m", "dus_plugin.train", str(cfg), "-q", *extra], capture_output=True, text=True)


def check_export(run: Path, base: Path) -> dict:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    def names_dtypes(folder: Path) -> dict[str, str]:
        out = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(f, "pt") as h:
                out.update({k: str(h.get_slice(k).get_dtype()) for k in h.keys()})
        return out

    got, want = names_dtypes(run / "final"), names_dtypes(base)
    _, info = AutoModelForCausalLM.from_pretrained(run / "final", output_loading_info=True)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"same_names_and_dtypes": got == want, "load_info": {k: list(v) for k, v in info.items()},
            "steps": [r["step"] for r in rows], "first_loss": losses[0], "last_loss": losses[-1],
            "loss_fell": losses[-1] < losses[0] and all(map(torch.isfinite, torch.tensor(losses)))}


def run_case(name: str, over: dict, model: Path, text: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix=name.replace("+", "_")))
    cfg = config(work, model, text, over)
    fsdp = over.get("launcher") == "fsdp"
    first = launch(cfg, fsdp, "--stop-after", "4")
    if first.returncode:
        return {"ok": False, "error": first.stderr[-1500:]}
    second = launch(cfg, fsdp, "--resume")
    if second.returncode:
        return {"ok": False, "error": second.stderr[-1500:]}
    res = check_export(work / "run", model)
    res["resumed_from_4"] = "resumed from" in second.stderr and (work / "run" / "checkpoints" / "step-0000004").exists()
    res["ok"] = bool(res["same_names_and_dtypes"] and not any(res["load_info"].values()) and res["loss_fell"]
                     and res["resumed_from_4"] and res["steps"][-1] == 8)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    from dus_plugin.fixtures import tiny_corpus

    work = Path(tempfile.mkdtemp())
    build(work / "model")
    text = work / "text.txt"
    text.write_text("\n\n".join(tiny_corpus(3000, seed=1)))
    results = {}
    for name, over in CASES.items():
        results[name] = run_case(name, over, work / "model", text)
        print(name, json.dumps(results[name])[:600], flush=True)
    report = {"benchmark": "fp8_compose", "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "date": dt.date.today().isoformat(), "shape": SHAPE, "cases": results,
              "all_ok": all(r["ok"] for r in results.values())}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("all ok" if report["all_ok"] else "FAILED", file=sys.stderr)


if __name__ == "__main__":
    main()
