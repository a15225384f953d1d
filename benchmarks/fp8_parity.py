"""FP8 against BF16 from a real trained model (issue 27): does float8 training keep the loss within 1%?

Starts: SmolLM2-135M (trained on ~2T tokens), and the same model grown by dus (solar layout, m = 7, identity: 46
layers that compute what the base computes, as continued pretraining after growing starts). Each start trains
STEPS steps twice, `precision: bf16` and `precision: fp8`, with everything else equal (seed, data order, bf16 master
weights and adamw8bit as the shipped 1-GPU recipe has them), through `dus train` as a user runs it. The validation
loss on the same held-out rows is compared at the end.

  python benchmarks/fp8_parity.py --base DIR --corpus DIR --out benchmarks/results/fp8_parity.json
  python benchmarks/fp8_parity.py ... --tiny        # CPU smoke run of the same code (fp8 is then refused: bf16 only)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_growth import ARMS, dus, grow  # noqa: E402

STEPS, SEQ, BATCH, LR = 200, 1024, 32, 2e-4
STARTS = ("base", "c_solar_identity_m7")


def config(model: Path, run_dir: Path, corpus: Path, precision: str, tiny: bool) -> dict:
    steps = 6 if tiny else STEPS
    return {"model": str(model), "output_dir": str(run_dir),
            "data": {"sources": [{"path": str(corpus / "train.jsonl")}], "seq_len": 64 if tiny else SEQ,
                     "val_fraction": 0.01, "cache_dir": str(run_dir.parent / "token_cache")},
            "micro_batch_size": 4 if tiny else 16, "global_batch_size": 4 if tiny else BATCH, "max_steps": steps,
            "seed": 0, "optimizer": {"name": "adamw8bit", "lr": LR, "weight_decay": 0.1},
            "master_weights": "bf16", "schedule": {"kind": "cosine", "warmup_steps": 2 if tiny else 20,
                                                   "min_lr_ratio": 0.1},
            "precision": precision, "log_every": steps // 10 or 1, "eval_every": steps // 4 or 1,
            "eval_on_start": True, "val_batches": 2 if tiny else 16, "save_every": 0, "save_final": False,
            "export": False, "tensorboard": False}


def run(start: str, precision: str, base: Path, corpus: Path, work: Path, tiny: bool) -> dict:
    name = f"{start}_{precision}"
    log = work / f"{name}.log"
    model = base if start == "base" else work / f"{start}_model"
    run_dir = work / f"run_{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    path = work / f"{name}.train.json"
    path.write_text(json.dumps(config(model, run_dir, corpus, precision, tiny), indent=2))
    t0 = time.perf_counter()
    try:
        dus("train", str(path), "-q", log=log)
    except RuntimeError as err:
        return {"ok": False, "error": str(err)[-400:]}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [[r["step"], round(r["val_loss"], 5)] for r in rows if "val_loss" in r]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    return {"ok": True, "val_curve": val, "val_loss": val[-1][1], "start_val_loss": val[0][1],
            "train_curve": [[r["step"], round(r["loss"], 4)] for r in rows if "loss" in r],
            "tokens_per_s": summary.get("tokens_per_second"), "seconds": round(time.perf_counter() - t0, 1)}


def compare(runs: dict) -> dict:
    out = {}
    for start in STARTS:
        bf16, fp8 = runs.get(f"{start}_bf16", {}), runs.get(f"{start}_fp8", {})
        if bf16.get("ok") and fp8.get("ok"):
            gap = fp8["val_loss"] / bf16["val_loss"] - 1
            out[start] = {"bf16": bf16["val_loss"], "fp8": fp8["val_loss"], "fp8_vs_bf16": round(gap, 5),
                          "within_1pct": abs(gap) <= 0.01}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dus-fp8-parity"))
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for start in STARTS[1:]:
        spec = dict(ARMS[start], drop=2) if args.tiny else ARMS[start]  # the tiny base has 8 layers
        grow(args.base, args.work, start, spec, args.work / f"{start}_grow.log")
    jobs = [(s, p) for s in STARTS for p in ("bf16", "fp8")]
    with ThreadPoolExecutor(len(jobs)) as pool:  # small models: the four runs share the GPU, one process each
        done = dict(zip([f"{s}_{p}" for s, p in jobs],
                        pool.map(lambda j: run(*j, args.base, args.corpus, args.work, args.tiny), jobs)))
    import torch

    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "date": dt.date.today().isoformat(), "steps": 6 if args.tiny else STEPS, "seq": SEQ,
              "sequences_per_step": BATCH, "lr": LR, "base": str(args.base), "runs": done, "parity": compare(done)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["parity"], indent=2))


if __name__ == "__main__":
    main()
