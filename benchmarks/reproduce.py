"""The paper's claims at small scale, on one GPU: does DUS recover fast, beat the base, and is m = 8 good?

One pretrained 32-layer base, then the same extra token budget T for every arm:
  (a) the base trained on for T          (b) DUS m=8 -> 48 layers, then T
  (c) identity (function-preserving) m=8 (d) DUS with m = 4 and m = 12
  (e) a 48-layer model from scratch for the base's tokens + T
  (f) all 32 layers repeated in order (32 -> 64, the paper's foil for the seam argument)
Corpus: docstrings of the installed packages' Python sources (transformers, torch, numpy, jax:
Apache-2.0 / BSD-3-Clause), extracted with `ast` (no imports), split 98/2 by document.
Results go to OUT/reproduce.json after every arm (curves from each run's metrics.jsonl).

  python benchmarks/reproduce.py --out DIR            # on the GPU machine
  python benchmarks/reproduce.py --out DIR --tiny     # CPU smoke run of the same code
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
from multiprocessing import Pool
from pathlib import Path

PACKAGES = ("transformers", "torch", "numpy", "jax", "scipy", "sympy")


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


def train_run(model: Path, out: Path, data: Path, steps: int, s: dict, seed: int = 0):
    from dus_plugin.train.config import TrainConfig
    from dus_plugin.train.loop import train

    cfg = TrainConfig.model_validate({
        "model": str(model), "output_dir": str(out),
        "data": {"sources": [{"path": str(data)}], "seq_len": s["seq"], "val_fraction": 0.01,
                 "cache_dir": str(out.parent / "token_cache")},
        "micro_batch_size": s["micro"], "global_batch_size": s["micro"], "max_steps": steps, "seed": seed,
        "optimizer": {"lr": s["lr"], "weight_decay": 0.1}, "schedule": {"kind": "cosine", "warmup_steps": s["warmup"]},
        "precision": s["precision"], "log_every": s["eval_every"], "eval_every": s["eval_every"],
        "val_batches": s["val_batches"], "save_every": 0, "save_final": False, "tensorboard": False,
    })
    t0 = time.perf_counter()
    result = train(cfg, quiet=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    return result, curve, time.perf_counter() - t0


def heldout_loss(model_dir: Path, text: str, max_length: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dus_plugin.eval.perplexity import perplexity

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)
    r = perplexity(model, AutoTokenizer.from_pretrained(model_dir), [text], max_length=max_length,
                   batch_size=32, progress=False)
    del model
    return r.loss


def make_model(folder: Path, layers: int, s: dict, tokenizer, seed: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=3 * s["hidden"],
                      num_hidden_layers=layers, num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                      max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def upscale_arm(base: Path, work: Path, name: str, plan_args: list[str], method: str = "solar") -> Path:
    import json as _json

    from dus_plugin.plan import layer_list_plan, parse_layers, solar_plan
    from dus_plugin.recipe import build_recipe, render_recipe
    from dus_plugin.upscale import UpscaleOptions, upscale

    cfg = _json.loads((base / "config.json").read_text())
    p = layer_list_plan(cfg, parse_layers(plan_args[1])) if plan_args[0] == "layers" else solar_plan(cfg, int(plan_args[1]))
    recipe = work / f"{name}.yml"
    recipe.write_text(render_recipe(build_recipe(str(base), p, method=method), p, method=method))
    upscale(recipe, work / name, UpscaleOptions(quiet=True, forward=False))
    return work / name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/dus-reproduce")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    s = dict(hidden=256, heads=4, seq=256, micro=64, lr=2e-3, warmup=50, precision="bf16", eval_every=50,
             val_batches=8, base_steps=1000, extra_steps=300, corpus_bytes=30_000_000, n=32)
    if args.tiny:
        s.update(hidden=32, seq=64, micro=4, base_steps=12, extra_steps=6, eval_every=3, val_batches=2,
                 corpus_bytes=400_000, precision="fp32", warmup=2)
    out, work = Path(args.out), Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"settings": s, "date": dt.date.today().isoformat(), "arms": {}}

    def save() -> None:
        (out / "reproduce.json").write_text(json.dumps(report, indent=2))

    import torch

    from dus_plugin.quickstart import build_tokenizer

    report["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    report["corpus"] = build_corpus(work / "corpus", s["corpus_bytes"])
    tok = build_tokenizer(work / "corpus" / "train.txt", vocab=2048)
    heldout = (work / "corpus" / "heldout.txt").read_text()[: 400_000 if not args.tiny else 20_000]
    report["corpus"]["seconds"] = time.perf_counter() - t0
    train_txt = work / "corpus" / "train.txt"
    save()

    init = make_model(work / "init32", s["n"], s, tok, seed=0)
    base_res, base_curve, secs = train_run(init, work / "pretrain", train_txt, s["base_steps"], s)
    base = Path(base_res.export_dir)
    tokens_per_step = s["micro"] * s["seq"]
    report["base"] = {"tokens": base_res.tokens, "val_loss": base_res.val_loss, "curve": base_curve, "seconds": secs,
                      "params": sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM
                                    .from_pretrained(base).parameters()),
                      "heldout_loss": heldout_loss(base, heldout, s["seq"])}
    save()
    arms = [("a_base_continued", None), ("b_dus_m8", ("drop", s["n"] // 4)), ("c_identity_m8", ("drop", s["n"] // 4)),
            ("d_dus_m4", ("drop", s["n"] // 8)), ("d_dus_m12", ("drop", 3 * s["n"] // 8)),
            ("f_repeat_all", ("layers", f"0:{s['n']},0:{s['n']}")), ("e_scratch48", "scratch")]
    for name, how in arms:
        t0 = time.perf_counter()
        if how is None:
            model, steps = base, s["extra_steps"]
        elif how == "scratch":
            model, steps = make_model(work / "init48", 48 if not args.tiny else 6, s, tok, seed=1), \
                s["base_steps"] + s["extra_steps"]
        else:
            model = upscale_arm(base, work, name, list(how), method="identity" if name.startswith("c_") else "solar")
            steps = s["extra_steps"]
        start_loss = heldout_loss(model, heldout, s["seq"])
        res, curve, secs = train_run(model, work / f"run_{name}", train_txt, steps, s)
        final = Path(res.export_dir)
        report["arms"][name] = {
            "layers": __import__("json").loads((model / "config.json").read_text())["num_hidden_layers"],
            "heldout_loss_start": start_loss, "heldout_loss_end": heldout_loss(final, heldout, s["seq"]),
            "val_loss_end": res.val_loss, "tokens": res.tokens, "curve": curve, "seconds": time.perf_counter() - t0,
            "tok_s": res.tokens_per_second}
        shutil.rmtree(work / f"run_{name}" / "final", ignore_errors=True)
        save()
        print(name, json.dumps({k: v for k, v in report["arms"][name].items() if k != "curve"}), flush=True)
    report["total_seconds"] = time.perf_counter() - t0
    save()


if __name__ == "__main__":
    main()
