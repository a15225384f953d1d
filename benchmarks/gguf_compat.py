"""Does an upscaled model compute in llama.cpp what it computes in transformers?

Builds llama.cpp's library from the llama-cpp-python source distribution on the package index
(CMake, CPU only), then for each case: a tiny random base with a SentencePiece tokenizer, `dus plan`
+ `dus upscale` (solar and identity), llama.cpp's own convert_hf_to_gguf.py (f32), `dus gguf-patch`,
and the logits of llama.cpp (through the source distribution's ctypes bindings) against transformers
(fp32) on the same tokens, before and after the patch.

    python benchmarks/gguf_compat.py [--work /tmp/gguf_compat] [--out benchmarks/results/gguf_compat.json]

Needs cmake, a C++ compiler, and pip access to the package index (sdist, diskcache, jinja2).
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
import tarfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
TOKENS = 24
DUS = [sys.executable, "-c", "from dus_plugin.cli import main; main()"]  # the dus of this checkout
TOLERANCE = 2e-3  # max |llama.cpp - transformers| / max |transformers|, f32 on both sides

# name, family, layers n, overlap m, config overrides; gemma3 at 26 layers is Gemma 3 1B's depth with dus's default m
CASES = [
    ("llama", "llama", 8, 2, {}),
    ("mistral", "mistral", 8, 2, {}),
    ("qwen2", "qwen2", 8, 2, {"use_sliding_window": False, "layer_types": None}),
    ("qwen3", "qwen3", 8, 2, {}),
    ("gemma2", "gemma2", 26, 6, {"query_pre_attn_scalar": 8}),
    ("gemma2-odd-m", "gemma2", 26, 5, {"query_pre_attn_scalar": 8}),
    ("gemma3-1b-depth", "gemma3", 26, 6, {"query_pre_attn_scalar": 8}),
    ("gemma3-n-2m-6", "gemma3", 12, 3, {"query_pre_attn_scalar": 8}),
    # Gemma 3 27B's scale rule: query_pre_attn_scalar = hidden/heads != head_dim, 62 layers
    ("gemma3-27b-depth", "gemma3", 62, 15, {"head_dim": 16, "query_pre_attn_scalar": 8}),
]


def sh(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def build_llama_cpp(work: Path) -> tuple[Path, Path, float]:
    """The extracted source distribution and the folder with libllama.so; seconds spent building."""
    src = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if not src.is_dir():
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "-d", str(work),
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}"])
        with tarfile.open(work / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
            tar.extractall(work, filter="data")
    sh([sys.executable, "-m", "pip", "install", "-q", "diskcache", "jinja2"])  # the bindings import them
    build, lib = work / "build", work / "build" / "bin"
    t0 = time.perf_counter()
    if not (lib / "libllama.so").is_file():
        sh(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF", "-DGGML_OPENMP=OFF"])
        sh(["cmake", "--build", str(build), "--target", "llama", f"-j{os.cpu_count()}"])
    return src, lib, time.perf_counter() - t0


def sentencepiece_model(path: Path, vocab: int) -> None:
    import io

    import sentencepiece as spm

    from dus_plugin.fixtures import tiny_corpus

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(tiny_corpus()), model_writer=buf, vocab_size=vocab,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
                                   hard_vocab_limit=False)
    path.write_bytes(buf.getvalue())


def make_base(folder: Path, family: str, n: int, overrides: dict) -> None:
    """A tiny random base of ``family`` with a transformers tokenizer (for mergekit) and a tokenizer.model
    (for llama.cpp's converter): the comparison feeds token ids, so only the vocabulary size matters."""
    import torch
    from transformers import AutoModelForCausalLM

    from dus_plugin.fixtures import family_config, make_tokenizer

    tok = make_tokenizer()
    cfg = family_config(family, vocab=len(tok), layers=n)
    cfg = type(cfg)(**{**cfg.to_dict(), **overrides})  # through __init__, which derives layer_types
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    one = 0.0 if family.startswith("gemma") else 1.0  # Gemma's norms scale by (1 + weight)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(one, 0.1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    sentencepiece_model(folder / "tokenizer.model", 64)


def upscale(base: Path, out: Path, m: int, method: str) -> list[str]:
    """`dus plan` + `dus upscale`; the plan's notes (what it says about llama.cpp) are returned."""
    recipe = out.with_suffix(".yml")
    said = sh([*DUS, "plan", str(base), "-m", str(m), "--method", method, "-o", str(recipe)])
    sh([*DUS, "upscale", str(recipe), str(out), "-q"])
    shutil.copy(base / "tokenizer.model", out / "tokenizer.model")
    return [line for line in said.splitlines() if line.startswith(("note:", "warning:"))]


def convert(src: Path, folder: Path, gguf: Path) -> None:
    sh([sys.executable, "convert_hf_to_gguf.py", str(folder), "--outfile", str(gguf), "--outtype", "f32"],
       cwd=src / "vendor" / "llama.cpp")


def llama_cpp_logits(gguf: Path, tokens: list[int], src: Path, lib: Path):
    """Logits of every position in llama.cpp, in a child process (one model per process, no shared state)."""
    import numpy as np

    code = ("import json, sys, numpy as np; from llama_cpp import Llama; "
            "llm = Llama(sys.argv[1], logits_all=True, n_ctx=64, n_batch=64, n_threads=2, type_k=0, type_v=0, verbose=False); "
            "toks = json.loads(sys.argv[2]); llm.eval(toks); "
            "np.save(sys.argv[3], np.array(llm.scores[:len(toks)], dtype=np.float32))")
    out = gguf.with_suffix(".npy")
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib), PYTHONPATH=str(src))
    sh([sys.executable, "-c", code, str(gguf), json.dumps(tokens), str(out)], env=env)
    return np.load(out)


def transformers_logits(folder: Path, tokens: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def compare(ours, theirs) -> dict:
    import numpy as np

    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    return {"rel": rel, "argmax_differs": int((ours.argmax(-1) != theirs.argmax(-1)).sum()), "match": rel <= TOLERANCE}


def run_case(name: str, family: str, n: int, m: int, overrides: dict, work: Path, src: Path, lib: Path) -> dict:
    import numpy as np

    case = work / "models" / name
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    base = case / "base"
    make_base(base, family, n, overrides)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, vocab, TOKENS)]
    folders = {"base": (base, [])}
    for method in ("solar", "identity"):
        out = case / method
        folders[method] = (out, upscale(base, out, m, method))
    result: dict = {"family": family, "n": n, "m": m, "config": overrides, "outputs": {}}
    llama = {}
    for label, (folder, notes) in folders.items():
        gguf = case / f"{label}.gguf"
        convert(src, folder, gguf)
        hf = transformers_logits(folder, tokens)
        before = llama_cpp_logits(gguf, tokens, src, lib)
        patch = subprocess.run([*DUS, "gguf-patch", str(gguf), str(folder), "-q"], capture_output=True, text=True)
        after = llama_cpp_logits(gguf, tokens, src, lib)
        llama[label] = after
        result["outputs"][label] = {
            "layers": json.loads((folder / "config.json").read_text())["num_hidden_layers"],
            "plan_says": notes, "before_patch": compare(before, hf),
            "patch_rc": patch.returncode, "patch_says": (patch.stdout + patch.stderr).strip(),
            "after_patch": compare(after, hf)}
    result["identity_equals_base_in_llama_cpp"] = bool(np.array_equal(llama["identity"], llama["base"]))
    return result


def table(results: list[tuple[str, dict]]) -> str:
    rows = ["| case | n → s | output | llama.cpp vs transformers, as converted (rel. error, argmax differs) | "
            "`dus gguf-patch` | after the patch | dus warned at plan time |", "|---|---|---|---|---|---|---|"]
    for name, r in results:
        for label, o in r["outputs"].items():
            b, a, says = o["before_patch"], o["after_patch"], o["patch_says"]
            patch = ("patched" if "\npatched" in f"\n{says}" else "not needed") + (
                ", warns" if "warning:" in says else "")
            warned = "yes" if any("llama.cpp will compute" in s for s in o["plan_says"]) else "—"
            rows.append(f"| {name} | {r['n']} → {o['layers']} | {label} | {b['rel']:.1e}, {b['argmax_differs']}/{TOKENS} | "
                        f"{patch} | **{a['rel']:.1e}**, {a['argmax_differs']}/{TOKENS} | {warned} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf_compat"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gguf_compat.json"))
    ap.add_argument("--only", nargs="*", help="case names to run")
    ap.add_argument("--render", type=Path, help="print the table of a results file and stop")
    args = ap.parse_args()
    if args.render:
        print(table(list(json.loads(args.render.read_text())["cases"].items())))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    src, lib, build_s = build_llama_cpp(args.work)
    print(f"llama.cpp library: {lib} (built in {build_s:.0f} s)", flush=True)
    results = []
    for name, family, n, m, overrides in CASES:
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        results.append((name, run_case(name, family, n, m, overrides, args.work, src, lib)))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(table(results))
    doc = {"benchmark": "gguf_compat", "date": dt.date.today().isoformat(),
           "machine": f"{platform.node()} ({os.cpu_count()} CPU cores, {platform.machine()})",
           "llama_cpp_python": LLAMA_CPP_PYTHON, "build_seconds": round(build_s, 1), "tokens": TOKENS,
           "tolerance_rel": TOLERANCE, "cases": dict(results)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
