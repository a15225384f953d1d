"""Training throughput of the DUS trainer against a plain transformers loop, measured side by side.

Shape (issue 3): the 48-layer DUS shape of a Llama with hidden 2048, intermediate 5632, 32 heads,
4 KV heads, vocab 32000 (2.25B params), seq 2048, bf16 autocast. Each variant runs in its own
process (clean CUDA memory); the baseline is a plain loop: transformers model, bf16 autocast, SDPA,
torch AdamW, no compile. MFU = tokens/s x (6N + 12 L d seq) / peak.

  python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json
  python benchmarks/train_throughput.py --tiny      # CPU smoke run of the same code
  # one run split over calls of a time-limited machine: the same --work and --out skip what is measured
  python benchmarks/train_throughput.py --work /tmp/tt --out /tmp/tt/r.json --variants compile+fused+parity+keep
  python benchmarks/train_throughput.py --work /tmp/tt --out /tmp/tt/r.json \
      --variants compile+fused+parity+fromtrained,compile+fused+fp8+parity+fromtrained
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

H100_BF16_PEAK = 989e12
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=32000, num_hidden_layers=48, max_position_embeddings=4096)
# real text for the loss comparison of two precisions (stdlib docstrings, shipped with the quickstart)
PARITY_TEXT = Path(__file__).resolve().parents[1] / "dus_plugin" / "quickstart_data" / "train.txt"
# Llama 3 8B's layer (hidden 4096, intermediate 14336, 8 KV heads) at 12 layers, so that fp32 master weights and AdamW
# fit one 80 GB GPU: where float8 stands at the hidden size of torchtitan's 1.28x
WIDE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
            vocab_size=32000, num_hidden_layers=12, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, num_hidden_layers=4, max_position_embeddings=256)


def flops_per_token(params: int, layers: int, hidden: int, seq: int) -> float:
    return 6 * params + 12 * layers * hidden * seq


def build_model(folder: Path, shape: dict) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dus_plugin.fixtures import make_tokenizer

    cfg = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def baseline(folder: Path, seq: int, micro: int, steps: int) -> dict:
    """Plain loop: fp32 weights, bf16 autocast, SDPA, torch AdamW (foreach), no compile."""
    import torch
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").to(dev)
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=False)
    vocab = model.config.vocab_size
    warm, t0 = 3, None
    for step in range(steps):
        if step == warm:
            _sync(dev)
            t0 = time.perf_counter()
        ids = torch.randint(0, vocab, (micro, seq), device=dev)
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(dev)
    return {"tok_s": (steps - warm) * micro * seq / (time.perf_counter() - t0), **_mem(dev)}


def ours(folder: Path, seq: int, micro: int, steps: int, flags: set[str], data: Path, work: Path,
         parity: bool = False) -> dict:
    """The real trainer (dus_plugin.train) on packed text; rate of the last logging window.

    Flags: compile (each decoder layer; with wholemodel: the whole model as one graph), fused, ac, gaN (global batch
    = N micro-batches), fp8 / fp8row (precision fp8, tensorwise / rowwise scaling), cast1 (with fp8: weights cast
    once per optimizer step), fp32 (precision fp32), flash / cudnn / efficient (the SDPA kernel), profile
    (torch.profiler over 3 steps near the end), keep (export the trained model to WORK/trained/final), fromtrained
    (start from the model a keep variant trained), seedN (the data order and seed; default 0).
    ``parity``: a real LR schedule and a validation loss at the end, for comparing the loss of two precisions on the
    same text and seed."""
    from dus_plugin.train.config import TrainConfig
    from dus_plugin.train.loop import train

    accum = _flag_number(flags, "ga", 1)
    precision = "fp8" if flags & {"fp8", "fp8row"} else "fp32" if "fp32" in flags else "bf16"
    cfg = TrainConfig.model_validate({
        "model": str(folder), "output_dir": str(work),
        "data": {"sources": [{"path": str(data)}], "seq_len": seq, "val_fraction": 0.05 if parity else 0.0},
        "micro_batch_size": micro, "global_batch_size": micro * accum, "max_steps": steps,
        "seed": _flag_number(flags, "seed", 0),
        "optimizer": {"lr": 3e-4 if parity else 1e-5},
        "schedule": {"kind": "cosine", "warmup_steps": 20 if parity else 0},
        "precision": precision, "fp8_recipe": "rowwise" if "fp8row" in flags else "tensorwise",
        "fp8_weight_cast": "per_step" if "cast1" in flags else "per_matmul",
        "compile": "compile" in flags, "compile_scope": "model" if "wholemodel" in flags else "layers",
        "fused_projections": "fused" in flags, "activation_checkpointing": "ac" in flags,
        "attention_backend": next((f for f in ("flash", "cudnn", "efficient") if f in flags), "auto"),
        "log_every": steps // 2 if not parity else 10, "eval_every": 0, "val_batches": 16,
        "profile": {"start": max(steps - 5, 1), "steps": 3} if "profile" in flags else None,
        "save_every": 0, "save_final": False, "export": "keep" in flags, "tensorboard": False,
        # the planner's eager estimate (88 GB at micro-batch 4) would refuse the eager variants that measure 77 GB;
        # this benchmark records the measured peaks
        "memory_limit_gb": 1000,
    })
    result = train(cfg, quiet=True)
    import torch

    out = {"tok_s": result.tokens_per_second, **_mem("cuda" if torch.cuda.is_available() else "cpu")}
    if parity:
        rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
        out.update(val_loss=result.val_loss, loss=result.loss, steps=steps,
                   curve=[[r["step"], round(r["loss"], 4)] for r in rows if "loss" in r])
    if (work / "profile.json").is_file():
        out["profile"] = json.loads((work / "profile.json").read_text())
    return out


def _flag_number(flags: set[str], prefix: str, default: int) -> int:
    """N of a flag PREFIXN (ga4, mb5, seed1), or the default."""
    return next((int(f[len(prefix):]) for f in flags if f.startswith(prefix)), default)


def _sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def _mem(dev: str) -> dict:
    import torch

    return {"peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9} if dev == "cuda" else {}


def _child(args: argparse.Namespace) -> None:
    if args.variant == "build":  # in a child, so the parent holds no GPU memory
        print("RESULT " + json.dumps({"params": build_model(Path(args.model_dir), _shape(args))}))
        return
    folder, flags = Path(args.model_dir), set(args.variant.split("+"))
    micro = _flag_number(flags, "mb", args.micro)
    # "keep" leaves its trained model where "fromtrained" variants start: continued training, as after an upscale
    trained = folder.parent / "trained"
    if "fromtrained" in flags:
        folder = trained / "final"
    if "baseline" in flags:
        res = baseline(folder, args.seq, micro, args.steps)
    else:
        work = trained if "keep" in flags else Path(tempfile.mkdtemp())
        parity = "parity" in flags
        try:
            res = ours(folder, args.seq, micro, args.parity_steps if parity else args.steps, flags,
                       PARITY_TEXT if parity else Path(args.data), work, parity)
        finally:
            import shutil

            if "keep" not in flags:
                shutil.rmtree(work, ignore_errors=True)
    res["micro_batch"] = micro
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at a tiny shape")
    ap.add_argument("--wide", action="store_true", help="12 layers of hidden 4096 instead of the DUS shape")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variants", default="baseline,eager,compile,compile+fused",
                    help="comma list; each is 'baseline' or trainer flags joined by '+': compile, fused (projections), "
                         "ac (activation checkpointing), mbN (micro-batch)")
    ap.add_argument("--parity-steps", type=int, default=200, help="steps of each 'parity' variant")
    ap.add_argument("--out", default=None)
    ap.add_argument("--work", default=None,
                    help="keep the model and the results here: a later call with the same --work and --out runs only "
                         "the variants not yet measured, on the same model (one run split over several calls)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    shape = _shape(args)
    if args.tiny:
        args.seq, args.steps = 64, 6
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp())
    params, data = _prepare(args, work)
    fpt = flops_per_token(params, shape["num_hidden_layers"], shape["hidden_size"], args.seq)
    results = _earlier_results(args)
    for variant in args.variants.split(","):
        if "tok_s" in results.get(variant, {}):
            print(variant, "measured earlier in this run", flush=True)
            continue
        r = _run_child(args, variant, work, data)
        if "tok_s" in r:
            r["mfu"] = r["tok_s"] * fpt / H100_BF16_PEAK
        results[variant] = r
        print(variant, json.dumps(results[variant])[:400], flush=True)
        if args.out:
            _write(args, results, params, shape)
    _write(args, results, params, shape, final=True)


def _shape(args: argparse.Namespace) -> dict:
    return TINY if args.tiny else WIDE if args.wide else SHAPE


def _prepare(args: argparse.Namespace, work: Path) -> tuple[int, Path]:
    """The random model and the synthetic text, built once per --work folder."""
    from dus_plugin.fixtures import tiny_corpus

    built = work / "params.json"
    if not built.is_file():
        work.mkdir(parents=True, exist_ok=True)
        params = _run_child(args, "build", work, None)["params"]
        built.write_text(json.dumps(params))
    data = work / "text.txt"
    if not data.is_file():
        data.write_text("\n\n".join(tiny_corpus(3000, seed=1)))
    return json.loads(built.read_text()), data


def _earlier_results(args: argparse.Namespace) -> dict:
    if not (args.work and args.out and Path(args.out).is_file()):
        return {}
    return json.loads(Path(args.out).read_text()).get("variants", {})


def _run_child(args: argparse.Namespace, variant: str, work: Path, data: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--model-dir", str(work / "model"),
           "--data", str(data), "--seq", str(args.seq), "--micro", str(args.micro), "--steps", str(args.steps),
           "--parity-steps", str(args.parity_steps)]
    proc = subprocess.run(cmd + (["--tiny"] if args.tiny else []) + (["--wide"] if args.wide else []),
                          capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"error": proc.stderr[-1500:]}


def _write(args: argparse.Namespace, results: dict, params: int, shape: dict, final: bool = False) -> None:
    timed = {k: v for k, v in results.items() if k != "baseline" and "parity" not in k and "tok_s" in v}
    bf16 = {k: v for k, v in timed.items() if "fp8" not in k}
    fp8 = {k: v for k, v in timed.items() if "fp8" in k}
    best = max(bf16.values(), key=lambda v: v["tok_s"], default={})
    best_fp8 = max(fp8.values(), key=lambda v: v["tok_s"], default={})
    base = results.get("baseline", {})
    parity = {(("fp8" if "fp8" in k else "bf16"), "fromtrained" in k): v
              for k, v in results.items() if "parity" in k and "val_loss" in v}
    # the pair from a trained model is what continued pretraining does; the random-init pair is kept beside it
    from_trained = any(trained for _, trained in parity)
    pair = {prec: v for (prec, trained), v in parity.items() if trained == from_trained}
    report = {
        "tok_s": best.get("tok_s"), "mfu": best.get("mfu"),
        "baseline_tok_s": base.get("tok_s"), "baseline_mfu": base.get("mfu"),
        "params": params, "shape": shape, "seq": args.seq, "micro_batch": best.get("micro_batch", args.micro),
        "best_variant": next((k for k, v in bf16.items() if v is best), None), "variants": results,
        "device": _device_name(), "date": dt.date.today().isoformat(),
    }
    if best_fp8 or parity:
        report["fp8"] = {"tok_s": best_fp8.get("tok_s"), "variant": next((k for k, v in fp8.items() if v is best_fp8), None),
                         "bf16_tok_s": best.get("tok_s"),
                         "speedup": best_fp8["tok_s"] / best["tok_s"] if best_fp8 and best else None,
                         "loss": pair.get("fp8", {}).get("val_loss"), "bf16_loss": pair.get("bf16", {}).get("val_loss"),
                         "steps": pair.get("fp8", {}).get("steps"), "loss_from": "fromtrained" if from_trained else "random init",
                         "loss_pairs": {("from a trained model" if trained else "from random init") + f" ({prec})":
                                        v.get("val_loss") for (prec, trained), v in sorted(parity.items())}}
    if final:
        print(json.dumps({k: v for k, v in report.items() if k != "variants"}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
