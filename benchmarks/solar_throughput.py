"""The paper's size at full speed on one GPU (issue 27): `dus train` on the 10.7B SOLAR shape (Mistral 7B's layer x 48,
random bf16 weights), seq 4096, 4 sequences per step, every row side by side in one run, each in its own process:

- anchor: what users write instead: plain transformers, gradient checkpointing, torchao AdamW8bit on bf16 weights;
- before: the 1-GPU recipe as shipped until 2026-12-03 (every layer checkpointed, no compile, no fused projections);
- shipped: configs/cpt_solar_1gpu.yml as it ships now (activation_checkpointing, compile, fused_projections: auto);
- limit80: the same with memory_limit_gb: 80 (the limit is enforced on the GPU, so an 80 GB card is emulated);
- fp8: the shipped recipe with precision fp8 (bf16 master weights, adamw8bit, auto checkpointing and attention);
- fp8_fp32: the same with float32 master weights (what fp8 needed until 2026-12-04);
- fp8_adamw: fp8 alone, with torch's AdamW (float32 weights and states): 16 bytes a parameter, refused at 10.7B;
- fp8_limit80: fp8 with memory_limit_gb: 80;
- shipped_sdpa: the shipped recipe with attention_backend: sdpa (what auto chose before flex, 2026-12-04);
- shipped_ga16: 16 sequences per step, so the optimizer step is spread over 4x the tokens;
- shipped_mb2, fp8_mb2, fp8_mb4: 2 or 4 sequences per micro-batch (of the 4 a step): fp8's tensorwise scaling casts
  every weight once per micro-batch, so fewer micro-batches cast less (auto checkpointing keeps what fits);
- fp8_once, fp8_once_mb2, fp8_once_limit80: fp8 with fp8_weight_cast: per_step (each weight cast once per optimizer
  step and kept, 1 byte per decoder weight; the same numbers as torchao's per-matmul casts).

The shipped data settings stay (document_mask: true; the corpus has ~2,500-token documents, so a 4,096-token row
holds parts of two or three), so attention is masked per document as in a user's run. Rows from before 2026-12-04
ran without the mask (their `document_mask` is false).

Only the model, data, run length and output folder of the shipped config are replaced (and seam.focus: none, so
every row measures the steady state). MFU = tokens/s x (6N + 12 L h seq) / 989 TFLOP/s (H100/H200 dense BF16).
State lives in WORK/state.json: a call that runs out of time continues where it stopped.

  bash benchmarks/solar_throughput.sh --work /tmp/sthr --out $OUT/solar_throughput.json [--rows shipped,limit80]
  python benchmarks/solar_throughput.py --work /tmp/sthr --small      # the same code on a CPU, a tiny shape
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from solar_scale import MISTRAL_7B, SMALL, Bench, corpus, make_base  # noqa: E402

PEAK_BF16 = 989e12
SEQ, GLOBAL, STEPS, LOG_EVERY = 4096, 4, 12, 4
PROFILE = {"profile": {"start": 5, "steps": 2}}  # steps 5-6: after compile's warm-up, before the timed window
ROWS = {
    "anchor": None,
    "before": {"activation_checkpointing": "full", "compile": False, "fused_projections": False},
    "shipped": PROFILE,
    "shipped_sdpa": {"attention_backend": "sdpa", **PROFILE},
    "shipped_nomask": {"data": {"document_mask": False}},
    "limit80": {"memory_limit_gb": 80},
    "fp8": {"precision": "fp8", **PROFILE},
    "fp8_fp32": {"precision": "fp8", "master_weights": "fp32"},
    "fp8_adamw": {"precision": "fp8", "master_weights": "fp32", "optimizer": {"name": "adamw", "lr": 3.0e-5}},
    "fp8_limit80": {"precision": "fp8", "memory_limit_gb": 80},
    "shipped_ga16": {"global_batch_size": 16, "max_steps": 6},
    "shipped_mb2": {"micro_batch_size": 2},
    "fp8_mb2": {"precision": "fp8", "micro_batch_size": 2, **PROFILE},
    "fp8_mb4": {"precision": "fp8", "micro_batch_size": 4},
    "fp8_once": {"precision": "fp8", "fp8_weight_cast": "per_step", **PROFILE},
    "fp8_once_mb2": {"precision": "fp8", "fp8_weight_cast": "per_step", "micro_batch_size": 2},
    "fp8_once_limit80": {"precision": "fp8", "fp8_weight_cast": "per_step", "memory_limit_gb": 80},
}


def shape(small: bool) -> dict:
    return dict(SMALL if small else MISTRAL_7B, num_hidden_layers=8 if small else 48)


def model_folder(work: Path, small: bool) -> Path:
    """The 48-layer model, made once per machine (random bf16 weights, ~5 GB shards)."""
    bench = Bench(work, None, small)
    bench.shape = shape(small)
    if not (bench.base / "config.json").is_file():
        make_base(bench)
    return bench.base


def train_config(work: Path, model: Path, name: str, over: dict, small: bool) -> Path:
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "cpt_solar_1gpu.yml").read_text())
    cfg.pop("max_tokens", None)
    cfg.update(model=str(model), output_dir=str(work / name), max_steps=STEPS, global_batch_size=GLOBAL,
               log_every=LOG_EVERY, eval_every=0, eval_on_start=False, val_batches=1, save_every=0, save_final=False,
               export=False, tensorboard=False)
    cfg.update(over)
    # the shipped data settings stay (document_mask: true), so attention runs as users' runs do
    cfg["data"] = {"sources": [{"path": str(corpus(Bench(work, None, small)))}], "seq_len": 256 if small else SEQ,
                   "val_fraction": 0.01, "cache_dir": str(work / "token_cache"),
                   "document_mask": cfg["data"].get("document_mask", False)}
    cfg["seam"] = {"focus": "none"}
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_dus(work: Path, model: Path, name: str, over: dict, small: bool) -> dict:
    cfg = train_config(work, model, name, over, small)
    shutil.rmtree(work / name, ignore_errors=True)
    t0 = time.perf_counter()
    # cwd: not the repo root, whose dus_plugin/ lacks train/ until installed (on the GPU machine it comes from a shim)
    proc = subprocess.run([sys.executable, "-m", "dus_plugin.cli", "train", str(cfg)], capture_output=True, text=True,
                          cwd=work)
    said = [line.strip() for line in proc.stdout.splitlines() if "(auto" in line or "memory estimate" in line]
    if proc.returncode:
        return {"ok": False, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:400], "said": said}
    summary = json.loads((work / name / "train_summary.json").read_text())
    import yaml

    masked = yaml.safe_load(cfg.read_text())["data"]["document_mask"]
    profile = work / name / "profile.json"
    return {"ok": summary["steps"] == over.get("max_steps", STEPS), "document_mask": masked,
            "profile": json.loads(profile.read_text()) if profile.is_file() else None,
            "losses": [r["loss"] for r in map(json.loads, (work / name / "metrics.jsonl").read_text().splitlines())
                       if "loss" in r], "seconds": round(time.perf_counter() - t0, 1), "settings":
            {**summary["settings"], **{k: v for k, v in over.items() if k not in summary["settings"]}},
            "tok_s": summary["tokens_per_second"], "peak_gb": summary["peak_gpu_gb"],
            "estimate_gb": summary["estimate_gb"], "said": said}


def anchor(model: Path, seq: int, steps: int) -> dict:
    """The plain loop: bf16 weights, gradient checkpointing, SDPA, torchao AdamW8bit, 4 accumulated sequences."""
    import torch
    from torchao.optim import AdamW8bit
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev)
    net.config.use_cache = False
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.train()
    opt = AdamW8bit(net.parameters(), lr=1e-5, bf16_stochastic_round=True)
    warm, t0 = 3, 0.0
    for step in range(steps):
        if step == warm:
            _sync(dev)
            t0 = time.perf_counter()
        for _ in range(GLOBAL):
            ids = torch.randint(0, net.config.vocab_size, (1, seq), device=dev)
            (net(input_ids=ids, labels=ids).loss / GLOBAL).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(dev)
    peak = torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else None
    return {"ok": True, "settings": {"activation_checkpointing": "full", "compile": False, "fused_projections": False},
            "tok_s": (steps - warm) * GLOBAL * seq / (time.perf_counter() - t0), "peak_gb": peak}


def _sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def run_anchor(work: Path, model: Path, small: bool) -> dict:
    out = work / "anchor.json"
    proc = subprocess.run([sys.executable, __file__, "--child-anchor", str(model), "--seq", str(256 if small else SEQ),
                           "--child-out", str(out)], capture_output=True, text=True)
    if proc.returncode:
        return {"ok": False, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:400]}
    return json.loads(out.read_text())


def mfu(row: dict, params: int, cfg_shape: dict, seq: int) -> float | None:
    import torch

    if not row.get("tok_s") or not torch.cuda.is_available():
        return None
    flops = 6 * params + 12 * cfg_shape["num_hidden_layers"] * cfg_shape["hidden_size"] * seq
    return round(row["tok_s"] * flops / PEAK_BF16, 4)


def summarize(state: dict) -> dict:
    rows = state["rows"]

    def best(pred) -> float | None:
        rates = [r["tok_s"] for r in rows.values() if r.get("ok") and r.get("tok_s") and pred(r)]
        return max(rates) if rates else None

    # fp8 against bf16 only where attention ran alike (the same document mask and attention kernel)
    kinds = {(r.get("document_mask"), r["settings"].get("attention_backend")) for r in rows.values()
             if r.get("ok") and r["settings"].get("precision") == "fp8"}
    pairs = []
    for kind in kinds:
        alike = lambda r, k=kind: (r.get("document_mask"), r["settings"].get("attention_backend")) == k  # noqa: E731
        fp8 = best(lambda r: alike(r) and r["settings"].get("precision") == "fp8")
        bf16 = best(lambda r: alike(r) and r["settings"].get("precision") != "fp8")
        if fp8 and bf16:
            pairs.append((round(fp8 / bf16, 3), f"document_mask {kind[0]}, attention {kind[1]}"))
    top = max(pairs, default=(None, None))
    state.update(anchor_mfu=rows.get("anchor", {}).get("mfu"), shipped_mfu=rows.get("shipped", {}).get("mfu"),
                 limit80_mfu=rows.get("limit80", {}).get("mfu"), fp8_speedup=top[0], fp8_compared=top[1])
    return state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/dus-solar-throughput"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--child-anchor", type=Path, default=None)
    ap.add_argument("--child-out", type=Path, default=None)
    ap.add_argument("--seq", type=int, default=SEQ)
    args = ap.parse_args()
    if args.child_anchor:
        args.child_out.write_text(json.dumps(anchor(args.child_anchor, args.seq, STEPS)))
        return
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    state_path = args.work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"rows": {}}
    model = model_folder(args.work, args.small)
    params = json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    state.update(device=f"{gpu}, {os.cpu_count()} CPU cores, {platform.node()}", date=dt.date.today().isoformat(),
                 shape="tiny (script check)" if args.small else "Mistral 7B layer x 48 (10.7B)", params=params,
                 seq=256 if args.small else SEQ, sequences_per_step=GLOBAL, steps=STEPS, torch=torch.__version__)
    for name in args.rows.split(","):
        if state["rows"].get(name, {}).get("ok") and not args.redo:
            continue
        print(f"[{name}] running", flush=True)
        row = run_anchor(args.work, model, args.small) if ROWS[name] is None else \
            run_dus(args.work, model, name, ROWS[name], args.small)
        row["mfu"] = mfu(row, params, shape(args.small), state["seq"])
        state["rows"][name] = row
        print(f"[{name}] {json.dumps(row)[:600]}", flush=True)
        summarize(state)
        state_path.write_text(json.dumps(state, indent=2))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(state, indent=2))


if __name__ == "__main__":
    main()
