"""The paper's shape at its real size, through every stage on one GPU: Mistral 7B's shape (random bf16
weights) -> plan --drop 8 -> upscale (default: verified, forward pass) -> verify -> eval (perplexity) ->
train (full-parameter with 8-bit AdamW on bf16 weights; train_only duplicated) -> export -> card -> push to
a local Hub server -> the FSDP2 path at world size 1 (sharded checkpoint, resume, export).

Every stage is a real `dus` command in its own process; peak RSS is the child's own (wait4). Each stage's
output is checked independently before it is called ok. State lives in WORK/state.json, so a call that
runs out of time, or a later call on the same machine, resumes where the last one stopped; the base is
made once per machine. Results: --out (solar_scale.json), rewritten after every stage.

  python benchmarks/solar_scale.py --work /tmp/solar --out $OUT/solar_scale.json [--stages a,b] [--small]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from measure import run_measured  # noqa: E402

BF16_PEAK = {"H100": 989e12, "H200": 989e12}
MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  num_hidden_layers=32, vocab_size=32000, max_position_embeddings=32768, sliding_window=4096,
                  rope_theta=10000.0)
SMALL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=8, vocab_size=32000, max_position_embeddings=4096, sliding_window=4096)
STAGES = ["base", "upscale", "verify", "eval", "drop_base", "full_lowmem", "freeze", "card", "push", "drop_export",
          "fsdp_resume"]
SEQ, MICRO, GLOBAL = 2048, 1, 4


class Bench:
    def __init__(self, work: Path, out: Path | None, small: bool):
        self.work, self.out, self.small = work, out, small
        self.shape = SMALL if small else MISTRAL_7B
        self.drop = 2 if small else 8
        self.state_path = work / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.state.setdefault("stages", {})
        self.state.setdefault("train", {})

    # --- bookkeeping -----------------------------------------------------------------------------

    def save(self) -> None:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        self.state.update(device=f"{gpu}, {os.cpu_count()} CPU cores, {_ram_gb():.0f} GB RAM, {platform.node()}",
                          date=dt.date.today().isoformat(), shape="small (script check)" if self.small else "Mistral-7B")
        self.state_path.write_text(json.dumps(self.state, indent=2))
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.state, indent=2))

    def done(self, stage: str) -> bool:
        entry = self.state["stages"].get(stage) or self.state["train"].get(stage)
        return bool(entry and entry.get("ok"))

    def record(self, stage: str, seconds: float, ok: bool, **extra) -> None:
        where = "train" if stage in ("full_lowmem", "freeze") else "stages"
        self.state[where][stage] = {"ok": ok, "seconds": round(seconds, 1), **extra}
        self.save()
        print(f"[{stage}] {'ok' if ok else 'FAILED'} in {seconds:.0f}s {extra}", flush=True)

    # --- paths ------------------------------------------------------------------------------------

    @property
    def base(self) -> Path:
        return self.work / "base"

    @property
    def upscaled(self) -> Path:
        return self.work / "dus"

    @property
    def final(self) -> Path:
        return self.work / "full_lowmem" / "final"


def dus(*args, env: dict | None = None, launch: list[str] | None = None) -> tuple[float, float, str]:
    """`dus ARGS` (or a launch command) in its own process: (seconds, peak RSS GB, output)."""
    return run_measured([sys.executable, "-m", "dus_plugin.cli", *map(str, args)] if launch is None else launch, env)


def _ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


# --- stages -----------------------------------------------------------------------------------------

def make_base(b: Bench) -> None:
    """Random bf16 weights of the base's exact shape, one tensor at a time, in ~5 GB shards."""
    import torch
    from safetensors.torch import save_file
    from transformers import MistralConfig, MistralForCausalLM

    from dus_plugin.fixtures import make_tokenizer

    t0 = time.perf_counter()
    tmp = b.work / ".tmp-base"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = MistralConfig(**b.shape, tie_word_embeddings=False, dtype="bfloat16")
    cfg.architectures = ["MistralForCausalLM"]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MistralForCausalLM(cfg).state_dict().items()}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    weight_map, shard, shard_bytes, total, k = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, k
        k += 1
        name = f"model-{k:05d}.safetensors"
        save_file(shard, tmp / name, metadata={"format": "pt"})
        weight_map.update({n: name for n in shard})
        shard, shard_bytes = {}, 0

    for name in sorted(shapes, key=_layer_order):
        t = (torch.ones(shapes[name], dtype=torch.bfloat16) if "norm" in name else
             (torch.randn(shapes[name], generator=g, device=dev) * 0.02).to(torch.bfloat16).cpu())
        shard[name] = t
        shard_bytes += t.numel() * 2
        total += t.numel() * 2
        if shard_bytes >= 5e9:
            flush()
    if shard:
        flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    cfg.save_pretrained(tmp)
    make_tokenizer().save_pretrained(tmp)
    shutil.rmtree(b.base, ignore_errors=True)
    os.replace(tmp, b.base)
    b.record("base", time.perf_counter() - t0, True, params=sum(_numel(s) for s in shapes.values()),
             gb=round(total / 1e9, 2))


def _layer_order(name: str):
    parts = name.split(".")
    return (int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else -1, name)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def upscale(b: Bench) -> None:
    recipe = b.work / "recipe.yml"
    dus("plan", b.base, "--drop", b.drop, "-o", recipe)
    shutil.rmtree(b.upscaled, ignore_errors=True)
    seconds, rss, out = dus("upscale", recipe, b.upscaled)  # the default path: verified, forward pass
    from dus_plugin.tensors import tensor_headers

    config = json.loads((b.upscaled / "config.json").read_text())
    ok = config["num_hidden_layers"] == 2 * (b.shape["num_hidden_layers"] - b.drop) and "verified" in out
    b.state["params_out"] = sum(_numel(t.shape) for t in tensor_headers(b.upscaled).values())
    b.state["upscale_peak_rss_gb"] = round(rss, 2)
    b.record("upscale", seconds, ok, peak_rss_gb=round(rss, 2), out_gb=round(_folder_gb(b.upscaled), 2))


def verify(b: Bench) -> None:
    seconds, rss, out = dus("verify", b.upscaled)
    b.state["verify_peak_rss_gb"] = round(rss, 2)
    b.record("verify", seconds, out.strip().splitlines()[-1].startswith("ok:") and "forward pass ok" in out,
             peak_rss_gb=round(rss, 2), said=out.strip().splitlines()[-1][:200])


def evaluate(b: Bench) -> None:
    import math

    result = b.work / "eval.json"
    seconds, _, _ = dus("eval", b.upscaled, "--text", REPO / "dus_plugin" / "quickstart_data" / "heldout.txt",
                        "-o", result, "-q")
    ppl = json.loads(result.read_text())["perplexity"]["perplexity"]
    b.record("eval", seconds, math.isfinite(ppl), perplexity=round(ppl, 1))


def drop(folder: Path, stage: str, b: Bench) -> None:
    """The disk holds 64 GB: what later stages do not read goes."""
    shutil.rmtree(folder, ignore_errors=True)
    b.record(stage, 0.0, not folder.exists())


def corpus(b: Bench) -> Path:
    """Enough plain text for every run (the model is random: only the token count matters)."""
    path = b.work / "corpus.txt"
    if not path.is_file():
        words = (REPO / "dus_plugin" / "quickstart_data" / "heldout.txt").read_text().split()
        import random

        rng = random.Random(0)
        docs = [" ".join(rng.choice(words) for _ in range(400)) for _ in range(3000)]
        path.write_text("\n\n".join(docs))
    return path


def train_config(b: Bench, name: str, **over) -> Path:
    import yaml

    cfg = {"model": str(b.upscaled), "output_dir": str(b.work / name),
           "data": {"sources": [{"path": str(corpus(b))}], "seq_len": SEQ, "val_fraction": 0.01,
                    "cache_dir": str(b.work / "token_cache")},
           "micro_batch_size": MICRO, "global_batch_size": GLOBAL, "max_steps": 30,
           "optimizer": {"name": "adamw8bit", "lr": 1e-5}, "master_weights": "bf16", "precision": "bf16",
           "activation_checkpointing": True, "log_every": 5, "eval_every": 0, "val_batches": 2, "save_every": 0,
           "save_final": False, "tensorboard": False, "export": False, **over}
    path = b.work / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_flops_per_token(b: Bench, trainable_layers: int | None) -> float:
    """Model FLOPs per token (recompute not counted): forward 2N; backward 4N for a full run; with frozen
    layers, 2N for the activation gradients above the lowest trained layer plus 2N for the trained weights."""
    s = 2 * (b.shape["num_hidden_layers"] - b.drop)
    h, i, kv = b.shape["hidden_size"], b.shape["intermediate_size"], b.shape["num_key_value_heads"] * 128
    layer = 2 * h * h + 2 * h * kv + 3 * h * i
    head = b.shape["vocab_size"] * h
    attn = 4 * h * SEQ / 2  # causal attention scores and values, per token and layer (forward)
    fwd = 2 * (s * layer + head) + s * attn
    if trainable_layers is None:
        return 3 * fwd
    lowest = b.shape["num_hidden_layers"] - b.drop  # the second copies of the duplicated layers start at n - m
    above = (s - lowest) * (2 * layer + attn) + 2 * head
    return fwd + above + 2 * trainable_layers * layer


def train(b: Bench, name: str, **over) -> None:
    import torch

    cfg = train_config(b, name, **over)
    shutil.rmtree(b.work / name, ignore_errors=True)
    seconds, _, _ = dus("train", cfg, "-q")
    summary = json.loads((b.work / name / "train_summary.json").read_text())
    trainable = b.drop * 2 if "train_only" in over else None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    peak = next((v for k, v in BF16_PEAK.items() if k in gpu), None)
    tok_s = summary["tokens_per_second"]
    mfu = tok_s * train_flops_per_token(b, trainable) / peak if peak and tok_s else None
    est, got = summary["estimate_gb"], summary["peak_gpu_gb"]
    ok = summary["steps"] == 30 and summary["loss"] is not None and (not over.get("export") or
                                                                    (b.work / name / "final").is_dir())
    b.record(name, seconds, ok, gpus=1, tok_s=round(tok_s), mfu=round(mfu, 4) if mfu else None, peak_gpu_gb=got,
             estimate_gpu_gb=est, estimate_error=round(est / got - 1, 3) if got else None,
             loss_first_last=_first_last(b.work / name))
    if over.get("export"):
        verified = dus("verify", b.final)
        b.record("export", verified[0], "ok:" in verified[2], said=verified[2].strip().splitlines()[-1][:160])


def _first_last(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return [round(losses[0], 3), round(losses[-1], 3)] if losses else []


def card(b: Bench) -> None:
    seconds, _, _ = dus("card", b.final, "--base-model", "mistralai/Mistral-7B-v0.1")
    text = (b.final / "README.md").read_text()
    b.record("card", seconds, "base_model: mistralai/Mistral-7B-v0.1" in text and str(b.work) not in text)


def push(b: Bench) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from hub_server import HubServer  # the same Hub-compatible server the tests use, on 127.0.0.1
    from huggingface_hub import HfApi

    with HubServer() as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_benchSecretToken1234567890", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
        seconds, _, _ = dus("push", b.final, "--repo-id", "bench/solar-dus-10.7b", env=env)
        files = {f.rfilename: f.size for f in HfApi(endpoint=hub.url, token="hf_benchSecretToken1234567890").model_info(
            "bench/solar-dus-10.7b", files_metadata=True).siblings}
    local = {p.name: p.stat().st_size for p in b.final.iterdir() if p.is_file()}
    b.record("push", seconds, all(files.get(k) == v for k, v in local.items() if k.endswith(".safetensors")),
             files=len(files))


def fsdp(b: Bench) -> None:
    """accelerate launch with train/fsdp.yaml at one process: stop at step 10 with a sharded checkpoint,
    resume to 20, export; the export must verify. torch AdamW with float32 master weights for the two layers
    at the seam (torchao's 8-bit states fail under FSDP2 in torchao 0.18 + torch 2.11); the frozen rest stays
    bf16. The checkpoint and the export (~48 GB) go to /dev/shm when the disk lacks room beside the model."""
    name = "fsdp"
    out = Path("/dev/shm/dus-fsdp") if _free_gb(b.work) < 60 else b.work / name
    cfg = train_config(b, name, output_dir=str(out), max_steps=20, save_every=10, save_final=True, export=True,
                       optimizer={"name": "adamw", "lr": 1e-5}, master_weights="fp32",
                       train_only={"layers": "seam_window", "window": 1})
    shutil.rmtree(out, ignore_errors=True)
    launch = [sys.executable, "-m", "dus_plugin.train.launch", "--config_file", str(REPO / "train" / "fsdp.yaml"),
              "--num_processes", "1", "-m", "dus_plugin.train", str(cfg), "-q"]
    t0 = time.perf_counter()
    dus(launch=launch + ["--stop-after", "10"])
    sharded = sorted((out / "checkpoints").glob("step-*"))
    dus(launch=launch + ["--resume"])
    verified = dus("verify", out / "final", "--no-forward")
    summary = json.loads((out / "train_summary.json").read_text())
    ok = [p.name for p in sharded] == ["step-0000010"] and summary["steps"] == 20 and "ok:" in verified[2]
    b.record("fsdp_resume", time.perf_counter() - t0, ok, checkpoint_files=len(list(sharded[0].rglob("*"))) if sharded
             else 0, where=str(out))
    shutil.rmtree(out, ignore_errors=True)


def _free_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / 1e9


def _folder_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/dus-solar-scale"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--small", action="store_true", help="a tiny shape, to check the script itself")
    ap.add_argument("--redo", action="store_true", help="run the named stages even if they are done")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    b = Bench(args.work, args.out, args.small)
    runners = {"base": make_base, "upscale": upscale, "verify": verify, "eval": evaluate,
               "drop_base": lambda b: drop(b.base, "drop_base", b),
               "full_lowmem": lambda b: train(b, "full_lowmem", export=True),
               "freeze": lambda b: train(b, "freeze", train_only={"layers": "duplicated"}),
               "card": card, "push": push, "drop_export": lambda b: drop(b.final.parent, "drop_export", b),
               "fsdp_resume": fsdp}
    for stage in args.stages.split(","):
        if b.done(stage) and not args.redo:
            print(f"[{stage}] done before", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            runners[stage](b)
        except Exception as e:  # record it and go on: later stages may not need this one
            b.record(stage, time.perf_counter() - t0, False, error=f"{type(e).__name__}: {str(e)[-600:]}")
    b.save()


if __name__ == "__main__":
    main()
