"""`dus upscale` (streaming engine; unverified, verified without and with the forward pass, the default) vs
stock `mergekit-yaml` vs `cp -r` of the same output, side by side.

A random Llama checkpoint (hidden 2048, intermediate 5632, 32 layers, vocab 32000: 1.54B params,
3.1 GB bf16 in two shards) is upscaled with m = 8 to 48 layers (4.5 GB). Every timing includes a
final `sync`, so it measures the disk, not the page cache. Peak RSS is each child's own (wait4).

  python benchmarks/upscale.py --out benchmarks/results/upscale.json [--small]
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
import tempfile
import time
from pathlib import Path

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=32000, num_hidden_layers=32)


def make_base(folder: Path, shape: dict) -> int:
    """Random bf16 weights in two shards, written tensor by tensor (no model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from dus_plugin.fixtures import make_tokenizer

    cfg = LlamaConfig(**shape, tie_word_embeddings=False, torch_dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    folder.mkdir(parents=True)
    names = sorted(shapes)
    half = len(names) // 2
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for k, part in enumerate((names[:half], names[half:])):
        file = f"model-{k + 1:05d}-of-00002.safetensors"
        sd = {n: torch.randn(shapes[n], generator=g, dtype=torch.float32).to(torch.bfloat16) for n in part}
        save_file(sd, folder / file, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in sd.values())
        weight_map.update({n: file for n in part})
        del sd
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    cfg.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return total


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds including a final sync, peak RSS in MB of the command itself)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err[-1500:]}")
    os.sync()
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="a 4-layer shape, to check the script itself")
    ap.add_argument("--make-base", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = dict(SHAPE, num_hidden_layers=4, vocab_size=4000) if args.small else SHAPE
    if args.make_base:
        print(make_base(Path(args.make_base), shape))
        return
    work = Path(tempfile.mkdtemp(prefix="dus-bench-", dir=args.workdir))
    bindir = Path(sys.executable).parent
    try:
        # in a child: a fork copies the parent's RSS into every child's ru_maxrss, so the parent stays lean
        made = subprocess.run([sys.executable, __file__, "--make-base", str(work / "base")] +
                              (["--small"] if args.small else []), check=True, capture_output=True, text=True)
        base_bytes = int(made.stdout.strip().splitlines()[-1])
        n = shape["num_hidden_layers"]
        subprocess.run([str(bindir / "dus"), "plan", str(work / "base"), "-o", str(work / "r.yml")], check=True,
                       capture_output=True)
        os.sync()
        runs: dict[str, list[tuple[float, float]]] = {"dus": [], "dus_verified": [], "dus_default": [], "mergekit": [],
                                                      "cp": []}
        out_bytes = 0
        for _ in range(args.repeats):  # interleaved, so drift on the machine hits every contender alike
            runs["dus"].append(timed([str(bindir / "dus"), "upscale", str(work / "r.yml"), str(work / "o_dus"), "-q",
                                      "--no-verify"]))
            out_bytes = folder_bytes(work / "o_dus")
            runs["cp"].append(timed(["cp", "-r", str(work / "o_dus"), str(work / "o_cp")]))
            runs["mergekit"].append(timed([str(bindir / "mergekit-yaml"), str(work / "r.yml"), str(work / "o_mk"),
                                           "--quiet"]))
            for d in ("o_cp", "o_mk"):
                shutil.rmtree(work / d)
            shutil.rmtree(work / "o_dus")
            runs["dus_verified"].append(timed([str(bindir / "dus"), "upscale", str(work / "r.yml"), str(work / "o_dus"),
                                               "-q", "--no-forward"]))
            shutil.rmtree(work / "o_dus")
            # what a user runs: verified against the base and a forward pass, one module in memory at a time
            runs["dus_default"].append(timed([str(bindir / "dus"), "upscale", str(work / "r.yml"), str(work / "o_dus"),
                                              "-q"]))
            shutil.rmtree(work / "o_dus")
        best = {k: min(v) for k, v in runs.items()}
        report = {
            "dus_s": best["dus"][0], "dus_verified_s": best["dus_verified"][0], "mergekit_s": best["mergekit"][0],
            "cp_s": best["cp"][0], "bytes": out_bytes, "base_bytes": base_bytes,
            "peak_rss_mb": max(r for _, r in runs["dus"]), "mergekit_peak_rss_mb": max(r for _, r in runs["mergekit"]),
            "dus_verified_peak_rss_mb": max(r for _, r in runs["dus_verified"]),
            "dus_default_s": best["dus_default"][0], "dus_default_peak_rss_mb": max(r for _, r in runs["dus_default"]),
            "dus_default_over_cp": best["dus_default"][0] / best["cp"][0],
            "dus_over_cp": best["dus"][0] / best["cp"][0], "mergekit_over_cp": best["mergekit"][0] / best["cp"][0],
            "mergekit_over_dus": best["mergekit"][0] / best["dus"][0],
            "layers": f"{n} -> {2 * (n - n // 4)}", "repeats": args.repeats, "all_runs": runs,
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
            "date": dt.date.today().isoformat(),
        }
        print(json.dumps(report, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
