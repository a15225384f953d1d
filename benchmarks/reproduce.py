"""The paper's claims at small scale, on one GPU: does DUS recover fast, beat the base, and is m = 8 good?

One pretrained 32-layer base, then the same extra token budget T for every arm:
  (a) the base trained on for T          (b) DUS m=8 -> 48 layers, then T
  (c) identity (function-preserving) m=8 (d) DUS with m = 4 and m = 12
  (e) a 48-layer model from scratch for the base's tokens + T (the base's pretraining recipe)
  (f) all 32 layers repeated in order (32 -> 64, the paper's foil for the seam argument)
  growth operators at m = 8 (48 layers): (g) interpose + plain copies, (h) interpose + identity,
  (i) solar layout + average; and (j) the base trained on for 1.5 T (the 48-layer arms' compute)
Corpus: docstrings of the installed packages' Python sources (transformers, torch, numpy, jax, scipy,
sympy: Apache-2.0 / BSD-3-Clause), extracted with `ast` (no imports), split 98/2 by document.
`dus analyze` runs on the base, so its recommended m can be checked against arm (d).

The runs are small enough that one process leaves the GPU mostly idle (Python-bound), so arms run
`--jobs` at a time in separate processes; their tokens/s are therefore not throughput numbers.
State lives in WORK: a second call on the same machine resumes (the base and finished arms are kept).
Results go to OUT/reproduce.json after every arm.

  python benchmarks/reproduce.py --out DIR                 # on the GPU machine
  python benchmarks/reproduce.py --out DIR --tiny --jobs 2 # CPU smoke run of the same code
  python benchmarks/reproduce.py --render benchmarks/results/reproduce.json --png docs/reproduction.png
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import importlib.util
import json
import random
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import Pool, get_context
from pathlib import Path

PACKAGES = ("transformers", "torch", "numpy", "jax", "scipy", "sympy")
SETTINGS = dict(hidden=256, heads=4, seq=256, micro=64, precision="bf16", val_batches=8, n=32, corpus_bytes=30_000_000,
                vocab=2048, lr=2e-3, warmup=50, eval_every=50, base_steps=1000,
                # continued pretraining: re-warm to 1.5x the LR the base's cosine ended at (2e-4), not to
                # its peak, so that the plain base does not spike and an early gap is the seam's own
                extra_steps=300, cont_lr=3e-4, cont_warmup=30, cont_eval_every=20)
TINY = dict(hidden=32, seq=64, micro=4, base_steps=12, extra_steps=6, eval_every=3, cont_eval_every=3, val_batches=2,
            corpus_bytes=400_000, precision="fp32", warmup=2, cont_warmup=2, vocab=512)
PRETRAIN_KEYS = ("hidden", "heads", "seq", "micro", "precision", "val_batches", "n", "corpus_bytes", "vocab", "lr",
                 "warmup", "eval_every", "base_steps")


def arm_specs(n: int) -> dict[str, dict]:
    return {"a_base_continued": {}, "b_dus_m8": {"drop": n // 4},
            "c_identity_m8": {"drop": n // 4, "method": "identity"},
            "d_dus_m4": {"drop": n // 8}, "d_dus_m12": {"drop": 3 * n // 8},
            "e_scratch48": {"scratch": 3 * n // 2}, "f_repeat_all": {"layers": f"0:{n},0:{n}"},
            "g_interpose_m8": {"layout": "interpose", "drop": n // 4},
            "h_interpose_identity_m8": {"layout": "interpose", "drop": n // 4, "method": "identity"},
            "i_average_m8": {"drop": n // 4, "method": "average"},
            "j_base_1.5T": {"extra_factor": 1.5}}


def train_flops(params: int, layers: int, s: dict, tokens: int) -> float:
    """Training FLOPs as the trainer counts them for MFU: (6 N + 12 L d seq) per token."""
    return (6 * params + 12 * layers * s["hidden"] * s["seq"]) * tokens


# --- corpus ---------------------------------------------------------------------------------------

def _docstrings(path: str) -> list[str]:
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8", errors="ignore"))
    except (SyntaxError, ValueError, RecursionError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 200:
                out.append(doc.strip())
    return out


def build_corpus(out: Path, max_bytes: int, seed: int = 0) -> dict:
    files, used = [], []
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec and spec.submodule_search_locations:
            used.append(pkg)
            for loc in spec.submodule_search_locations:
                files += sorted(str(p) for p in Path(loc).rglob("*.py"))
    with Pool() as pool:
        docs = [d for ds in pool.map(_docstrings, files, chunksize=64) for d in ds]
    docs = sorted(set(docs))
    random.Random(seed).shuffle(docs)
    kept, size = [], 0
    for d in docs:
        if size > max_bytes:
            break
        kept.append(d)
        size += len(d)
    cut = int(len(kept) * 0.98)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("\n\n".join(kept[:cut]))
    (out / "heldout.txt").write_text("\n\n".join(kept[cut:]))
    return {"packages": used, "documents": len(kept), "bytes": size, "files_scanned": len(files)}


# --- one run (each in its own process) --------------------------------------------------------------

def train_run(model: Path, out: Path, work: Path, steps: int, s: dict, lr: float, warmup: int, eval_every: int,
              seed: int = 0):
    from dus_plugin.train.config import TrainConfig
    from dus_plugin.train.loop import train

    cfg = TrainConfig.model_validate({
        "model": str(model), "output_dir": str(out),
        "data": {"sources": [{"path": str(work / "corpus" / "train.txt")}], "seq_len": s["seq"],
                 "val_fraction": 0.01, "cache_dir": str(work / "token_cache")},
        "micro_batch_size": s["micro"], "global_batch_size": s["micro"], "max_steps": steps, "seed": seed,
        "optimizer": {"lr": lr, "weight_decay": 0.1}, "schedule": {"kind": "cosine", "warmup_steps": warmup},
        "precision": s["precision"], "log_every": eval_every, "eval_every": eval_every, "eval_on_start": True,
        "val_batches": s["val_batches"], "save_every": 0, "save_final": False, "tensorboard": False,
    })
    result = train(cfg, quiet=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return result, [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]


def heldout_loss(model_dir: Path, work: Path, seq: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dus_plugin.eval.perplexity import perplexity

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    text = (work / "corpus" / "heldout.txt").read_text()[:400_000]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)
    r = perplexity(model, AutoTokenizer.from_pretrained(model_dir), [text], max_length=seq, batch_size=32,
                   progress=False)
    return r.loss


def make_model(folder: Path, layers: int, s: dict, tokenizer_dir: Path, seed: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=3 * s["hidden"],
                      num_hidden_layers=layers, num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                      max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def upscale_arm(base: Path, work: Path, name: str, spec: dict) -> Path:
    from dus_plugin.architecture import num_layers
    from dus_plugin.plan import layer_list_plan, layout_plan, parse_layers
    from dus_plugin.recipe import build_recipe, render_recipe
    from dus_plugin.upscale import UpscaleOptions, upscale

    n = num_layers(json.loads((base / "config.json").read_text()))
    p = layer_list_plan(n, parse_layers(spec["layers"])) if "layers" in spec else \
        layout_plan(n, spec.get("layout", "solar"), spec["drop"])
    method = spec.get("method", "solar")
    recipe = work / f"{name}.yml"
    recipe.write_text(render_recipe(build_recipe(str(base), p, method=method), p, method=method))
    shutil.rmtree(work / name, ignore_errors=True)
    upscale(recipe, work / name, UpscaleOptions(quiet=True, forward=False))
    return work / name


def pretrain_base(work: str, s: dict) -> dict:
    work_p = Path(work)
    t0 = time.perf_counter()
    init = make_model(work_p / "init32", s["n"], s, work_p / "tokenizer", seed=0)
    res, curve = train_run(init, work_p / "pretrain", work_p, s["base_steps"], s, s["lr"], s["warmup"],
                           s["eval_every"])
    import transformers

    base = Path(res.export_dir)
    params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(base).parameters())
    return {"dir": str(base), "tokens": res.tokens, "val_loss": res.val_loss, "curve": curve, "params": params,
            "heldout_loss": heldout_loss(base, work_p, s["seq"]), "seconds": time.perf_counter() - t0}


def run_arm(name: str, spec: dict, work: str, s: dict, base_dir: str | None, seed: int = 0) -> dict:
    """One arm; ``seed`` orders the continued-pretraining data (and initializes a from-scratch model)."""
    work_p = Path(work)
    t0 = time.perf_counter()
    if "scratch" in spec:
        model = make_model(work_p / f"init_{name}", spec["scratch"], s, work_p / "tokenizer", seed=1 + seed)
        steps, lr, warmup, every = s["base_steps"] + s["extra_steps"], s["lr"], s["warmup"], s["eval_every"]
    else:
        grows = any(k in spec for k in ("drop", "layers"))
        model = upscale_arm(Path(base_dir), work_p, f"{name}_s{seed}", spec) if grows else Path(base_dir)
        steps = round(s["extra_steps"] * spec.get("extra_factor", 1))
        lr, warmup, every = s["cont_lr"], s["cont_warmup"], s["cont_eval_every"]
    start = heldout_loss(model, work_p, s["seq"])
    res, curve = train_run(model, work_p / f"run_{name}_s{seed}", work_p, steps, s, lr, warmup, every, seed)
    final = Path(res.export_dir)
    import transformers

    params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(model).parameters())
    arm = {"layers": json.loads((model / "config.json").read_text())["num_hidden_layers"], "lr": lr, "params": params,
           "heldout_loss_start": start, "heldout_loss_end": heldout_loss(final, work_p, s["seq"]),
           "val_loss_end": res.val_loss, "tokens": res.tokens, "curve": curve,
           "seconds": time.perf_counter() - t0, "tok_s_shared_gpu": res.tokens_per_second}
    shutil.rmtree(final, ignore_errors=True)
    return arm


# --- the study --------------------------------------------------------------------------------------

def prepare(work: Path, s: dict, report: dict) -> None:
    """Corpus, tokenizer and the token cache, once, before any process trains."""
    from transformers import AutoTokenizer

    from dus_plugin.quickstart import build_tokenizer
    from dus_plugin.train.config import DataSource
    from dus_plugin.train.data import tokenize_source

    if "corpus" not in report:
        t0 = time.perf_counter()
        report["corpus"] = build_corpus(work / "corpus", s["corpus_bytes"])
        build_tokenizer(work / "corpus" / "train.txt", vocab=s["vocab"]).save_pretrained(work / "tokenizer")
        report["corpus"]["seconds"] = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    tokenize_source(DataSource(path=str(work / "corpus" / "train.txt")), tok, work / "token_cache", False)


def analyze_base(base: Path, work: Path, seq: int) -> dict:
    from dus_plugin.analyze import analyze

    a = analyze(base, [(work / "corpus" / "heldout.txt").read_text()[:200_000]], max_length=seq, max_windows=32,
                progress=False)
    return {"recommended_m": a.recommended_m, "reason": a.reason, "relative_cost": a.relative_cost,
            "seam_cost": a.seam_cost, "tokens": a.tokens}


def load_state(work: Path, s: dict, fresh: bool) -> dict:
    state = work / "reproduce.json"
    if not fresh and state.is_file():
        report = json.loads(state.read_text())
        if {k: report["settings"].get(k) for k in PRETRAIN_KEYS} == {k: s[k] for k in PRETRAIN_KEYS}:
            report["settings"] = s
            return report
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return {"settings": s, "arms": {}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--work", default="/tmp/dus-reproduce")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="start over instead of resuming WORK")
    ap.add_argument("--jobs", type=int, default=4, help="runs at a time, each its own process")
    ap.add_argument("--arms", default="all", help="comma-separated arm names (default: every arm)")
    ap.add_argument("--seeds", default="0", help="comma-separated data-order seeds (results: arms, arms_seedN)")
    ap.add_argument("--render", help="reproduce.json to turn into a plot and a Markdown table")
    ap.add_argument("--png", default="docs/reproduction.png")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text()), Path(args.png)))
        return
    if not args.out:
        ap.error("--out is required (or --render)")
    s = dict(SETTINGS, **(TINY if args.tiny else {}))
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    report = load_state(work, s, args.fresh)
    specs = arm_specs(s["n"])
    wanted = list(specs) if args.arms == "all" else args.arms.split(",")
    if unknown := set(wanted) - set(specs):
        ap.error(f"unknown arms {sorted(unknown)}; choose from {', '.join(specs)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    todo = [(a, k) for k in seeds for a in wanted if a not in report.setdefault(_key(k), {})]

    def save() -> None:
        text = json.dumps(report, indent=2)
        (work / "reproduce.json").write_text(text)
        (out / "reproduce.json").write_text(text)

    import torch

    report["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report["date"] = dt.date.today().isoformat()
    t_all = time.perf_counter()
    prepare(work, s, report)
    save()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        running = {}

        def submit(name: str, seed: int) -> None:
            base = None if "scratch" in specs[name] else report["base"]["dir"]
            running[pool.submit(run_arm, name, specs[name], str(work), s, base, seed)] = (name, seed)

        if "base" not in report or not Path(report["base"]["dir"]).is_dir():
            running[pool.submit(pretrain_base, str(work), s)] = ("base", None)
        for name, seed in [t for t in todo if "scratch" in specs[t[0]] or ("base", None) not in running.values()]:
            submit(name, seed)  # needs no base, or the base is there: start it now
            todo.remove((name, seed))
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                name, seed = running.pop(fut)
                if name == "base":
                    report["base"] = fut.result()
                    report["analysis"] = analyze_base(Path(report["base"]["dir"]), work, s["seq"])
                    for pending in todo:
                        submit(*pending)
                else:
                    report[_key(seed)][name] = fut.result()
                save()
                print(name, seed, f"{time.perf_counter() - t_all:.0f}s", flush=True)
    report["wall_seconds_this_call"] = time.perf_counter() - t_all
    save()


def _key(seed: int) -> str:
    return "arms" if seed == 0 else f"arms_seed{seed}"


# --- the report ---------------------------------------------------------------------------------------

def first_at_or_below(curve: list, target: float) -> int | None:
    return next((t for t, v in curve if v <= target), None)


def summarize(report: dict) -> dict[str, dict]:
    """Per arm: loss at the start, tokens back to the base's loss, tokens to catch up with arm (a), final."""
    base_val = report["base"]["val_loss"]
    a = dict(report["arms"].get("a_base_continued", {}).get("curve", []))
    rows = {}
    order = list(arm_specs(report["settings"]["n"]))
    for name, arm in sorted(report["arms"].items(), key=lambda kv: order.index(kv[0])):
        curve = arm["curve"]
        catch = None if "scratch" in name or not a else next(
            (t for t, v in curve if t > 0 and t in a and v <= a[t]), None)
        rows[name] = {"layers": arm["layers"], "pflops": arm_flops(report, arm, arm["tokens"]) / 1e15,
                      "val_start": curve[0][1] if curve and curve[0][0] == 0 else None,
                      "heldout_start": arm["heldout_loss_start"], "heldout_end": arm["heldout_loss_end"],
                      "val_end": arm["val_loss_end"], "tokens": arm["tokens"],
                      "tokens_to_base": first_at_or_below(curve, base_val), "tokens_to_catch_a": catch}
    return rows


def arm_flops(report: dict, arm: dict, tokens: int) -> float:
    """Training FLOPs of an arm after ``tokens``; arms recorded before params were stored get them from the shape."""
    s = report["settings"]
    per_layer = 13 * s["hidden"] ** 2 + 2 * s["hidden"]  # q, k, v, o (no GQA), SwiGLU at 3x, two norms
    params = arm.get("params") or report["base"]["params"] + (arm["layers"] - s["n"]) * per_layer
    return train_flops(params, arm["layers"], s, tokens)


def _m(tokens: int | None) -> str:
    return "never" if tokens is None else f"{tokens / 1e6:.2f}M"


def seed_runs(report: dict) -> dict[int, dict]:
    """seed -> that seed's arms (seed 0 is ``arms``; ``--seed N`` writes ``arms_seedN``)."""
    runs = {0: report["arms"]}
    runs.update({int(k.removeprefix("arms_seed")): v for k, v in report.items() if k.startswith("arms_seed")})
    return dict(sorted(runs.items()))


def seed_table(report: dict) -> str:
    """Final held-out loss per seed, and each arm minus arm (a) within a seed (the paired difference)."""
    import statistics

    runs = seed_runs(report)
    names = [n for n in arm_specs(report["settings"]["n"]) if all(n in r for r in runs.values())]
    lines = [f"| arm | {' | '.join(f'seed {k}' for k in runs)} | mean | minus (a), mean ± sd over seeds |",
             "|---|" + "---|" * (len(runs) + 2)]
    for n in names:
        ends = [r[n]["heldout_loss_end"] for r in runs.values()]
        diffs = [r[n]["heldout_loss_end"] - r["a_base_continued"]["heldout_loss_end"] for r in runs.values()]
        sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        lines.append(f"| {n} | {' | '.join(f'{v:.4f}' for v in ends)} | {statistics.mean(ends):.4f} | "
                     + ("—" if n.startswith("a_") else f"{statistics.mean(diffs):+.4f} ± {sd:.4f}") + " |")
    return "\n".join(lines)


def render(report: dict, png: Path) -> str:
    rows = summarize(report)
    lines = ["| arm | layers | training PFLOPs | val. loss at 0 tokens | held-out loss at start | tokens until val. ≤ base "
             f"({report['base']['val_loss']:.3f}) | tokens until ≤ arm (a) | val. loss at end | held-out loss at end |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        start = "—" if r["val_start"] is None else f"{r['val_start']:.3f}"
        lines.append(f"| {name} | {r['layers']} | {r['pflops']:.2f} | {start} | {r['heldout_start']:.3f} | "
                     f"{_m(r['tokens_to_base'])} | "
                     f"{'—' if 'scratch' in name or name.startswith('a_') else _m(r['tokens_to_catch_a'])} | "
                     f"{r['val_end']:.3f} | {r['heldout_end']:.3f} |")
    plot(report, png)
    return "\n".join(lines) + "\n\n" + seed_table(report)


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = report["base"]
    fig, (ax, ax4, ax2, ax3) = plt.subplots(1, 4, figsize=(24, 4.8), dpi=120)
    for name, arm in report["arms"].items():
        if "scratch" in name:
            continue
        ax.plot([t / 1e6 for t, _ in arm["curve"]], [v for _, v in arm["curve"]], "o-", ms=2.5, lw=1.2,
                label=f"{name} ({arm['layers']} layers)")
    ax.axhline(base["val_loss"], color="gray", ls="--", lw=1, label="base after pretraining")
    for name in ("a_base_continued", "j_base_1.5T", "b_dus_m8", "c_identity_m8", "g_interpose_m8",
                 "h_interpose_identity_m8", "i_average_m8"):
        if arm := report["arms"].get(name):
            ax4.plot([arm_flops(report, arm, t) / 1e15 for t, _ in arm["curve"]], [v for _, v in arm["curve"]], "-",
                     lw=1.2, label=f"{name} ({arm['layers']} layers)")
    ax4.set_xlabel("training FLOPs of the continuation (PFLOP)")
    ax4.set_ylabel("validation loss (nats/token)")
    ax4.set_title("Same curves against compute: 48 layers cost 1.5x per token")
    ax4.set_ylim(top=2.45)
    ax4.grid(alpha=0.3)
    ax4.legend(fontsize=8)
    ax.set_xlabel("extra tokens T (millions)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Continued pretraining from one 32-layer base (peak LR {report['settings']['cont_lr']:g})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    bt = [t / 1e6 for t, _ in base["curve"]]
    ax2.plot(bt, [v for _, v in base["curve"]], "-", color="gray", label="32-layer base pretraining")
    end = base["tokens"] / 1e6
    for name in ("a_base_continued", "b_dus_m8"):
        if name in report["arms"]:
            c = report["arms"][name]["curve"]
            ax2.plot([end + t / 1e6 for t, _ in c], [v for _, v in c], "-", label=f"then {name}")
    if e := report["arms"].get("e_scratch48"):
        ax2.plot([t / 1e6 for t, _ in e["curve"]], [v for _, v in e["curve"]], "-", label="48 layers from scratch")
    ax2.set_ylim(top=min(4.0, ax2.get_ylim()[1]))
    ax2.set_xlabel("total tokens (millions)")
    ax2.set_title("Same total tokens: DUS vs a deeper model from scratch")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    runs = seed_runs(report)
    names = [n for n in arm_specs(report["settings"]["n"]) if "scratch" not in n and all(n in r for r in runs.values())]
    for k, r in runs.items():
        ax3.plot(range(len(names)), [r[n]["heldout_loss_end"] for n in names], "o", label=f"seed {k}", alpha=0.8)
    ax3.set_xticks(range(len(names)), [n.split("_", 1)[1] for n in names], rotation=20)
    ax3.set_ylabel("held-out loss after T")
    ax3.set_title("Final held-out loss, every seed")
    ax3.grid(alpha=0.3)
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    main()
