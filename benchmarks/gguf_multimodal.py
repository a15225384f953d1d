"""Does a grown multimodal model convert with llama.cpp, and compute there what it computes in transformers? (issue 26)

For each family below: a tiny random image-text-to-text base (dus_plugin.zoo's fixture, with a SentencePiece
tokenizer.model and an image processor config for the converter), `dus plan` + `dus upscale` (solar and identity),
then llama.cpp's own convert_hf_to_gguf.py twice per folder: the text model (f32) and its vision projector
(`--mmproj`). Checked for each output:
- the text GGUF has the grown block count, and its logits in llama.cpp equal the multimodal model's text-only
  logits in transformers (fp32) within gguf_compat's tolerance; identity's equal the base's exactly in llama.cpp;
- the mmproj GGUF holds the base's tensors bit for bit, under the same names: only the language tower grew.

    python benchmarks/gguf_multimodal.py [--work /tmp/gguf_compat] [--out benchmarks/results/gguf_multimodal.json]

Shares llama.cpp's build (and its --work folder) with benchmarks/gguf_compat.py.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_compat import (DUS, LLAMA_CPP_PYTHON, TOKENS, TOLERANCE, build_llama_cpp, compare,  # noqa: E402
                         llama_cpp_logits, sentencepiece_model, sh)

# (LFM2-VL and Gemma 4 are left out: llama.cpp's converter reads their vocabulary from a BPE tokenizer it
# recognises by hash, which the zoo's tiny tokenizer is not)
FAMILIES = ["gemma3", "qwen2_5_vl", "qwen3_vl", "smolvlm"]
# Tensor names as the family's checkpoints on the Hub have them, where transformers 5 saves others (llama.cpp's
# converter maps the Hub's): Gemma 3's SigLIP tower sits under vision_tower.vision_model.
HUB_NAMES = {"gemma3": [("vision_tower.", "vision_tower.vision_model.")]}
# Text settings as the family's released sizes have them, where llama.cpp assumes them: Gemma 3 4B/12B scale
# attention by head_dim (query_pre_attn_scalar = head_dim; 27B differs, and `dus plan` warns); Qwen3-VL's config.json
# names its rotary sections (24/20/20 of 64 frequencies, here 4/2/2 of 8), which llama.cpp reads
TEXT_SETTINGS = {"gemma3": {"query_pre_attn_scalar": 16},
                 "qwen3_vl": {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [4, 2, 2],
                                                  "mrope_interleaved": True}}}
M = 2  # of the zoo's 8 text layers: 8 -> 12


# llama.cpp's converter maps block-numbered names only up to the tower's depth: Qwen2.5-VL's merger names its second
# linear mlp.2, so the tower needs 3 layers
VISION_DEPTH = {"qwen2_5_vl": 3}


def make_base(folder: Path, model_type: str) -> None:
    from dus_plugin import zoo
    from dus_plugin.fixtures import make_tokenizer

    if model_type in VISION_DEPTH:
        zoo.VISION_OVERRIDES[model_type] = {**zoo.VISION_OVERRIDES.get(model_type, {}),
                                            "depth": VISION_DEPTH[model_type]}
    zoo.make_multimodal_model(model_type, folder, make_tokenizer())
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(TEXT_SETTINGS.get(model_type, {}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    vision = json.loads((folder / "config.json").read_text()).get("vision_config", {})
    size = vision.get("image_size", 28)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "size": {"height": size, "width": size}, "patch_size": vision.get("patch_size", 14),
        "image_seq_length": json.loads((folder / "config.json").read_text()).get("mm_tokens_per_image", 4)}))
    sentencepiece_model(folder / "tokenizer.model", 64)
    hub_tensors(folder, HUB_NAMES.get(model_type, []), model_type.startswith("gemma"))


def hub_tensors(folder: Path, renames: list[tuple[str, str]], gemma: bool) -> None:
    """Rename the saved tensors to the Hub's names (transformers loads either: checked, no missing key). Gemma's
    text norms scale by (1 + weight): the zoo's weights, drawn around 1, are moved to around 0, as gguf_compat's are,
    so that activations keep a trained model's scale rather than doubling at every norm."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    path = folder / "model.safetensors"
    tensors = load_file(path)
    if gemma:
        tensors = {k: v - 1 if "language_model" in k and "norm" in k else v for k, v in tensors.items()}
    for old, new in renames:
        tensors = {new + k[len(old):] if k.startswith(old) else k: v for k, v in tensors.items()}
    save_file(tensors, path, metadata={"format": "pt"})
    _, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
    assert not any(v for k, v in info.items() if k != "error_msgs"), info


def upscale(base: Path, out: Path, method: str) -> None:
    recipe = out.with_suffix(".yml")
    sh([*DUS, "plan", str(base), "-m", str(M), "--method", method, "-o", str(recipe)])
    sh([*DUS, "upscale", str(recipe), str(out), "-q"])
    shutil.copy(base / "tokenizer.model", out / "tokenizer.model")


def convert(src: Path, folder: Path, gguf: Path, mmproj: bool) -> None:
    sh([sys.executable, "convert_hf_to_gguf.py", str(folder), "--outfile", str(gguf), "--outtype", "f32",
        *(["--mmproj"] if mmproj else [])], cwd=src / "vendor" / "llama.cpp")


def gguf_tensors(path: Path) -> dict:
    """name -> (type, shape, bytes) of every tensor of a GGUF file, read with the gguf package."""
    from gguf import GGUFReader

    return {t.name: (int(t.tensor_type), tuple(int(d) for d in t.shape), bytes(t.data.tobytes()))
            for t in GGUFReader(path).tensors}


def block_count(path: Path) -> int:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    key = next(k for k in reader.fields if k.endswith(".block_count"))
    return int(reader.fields[key].contents())


def transformers_text_logits(folder: Path, tokens: list[int]):
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].numpy()


def mmproj_file(folder: Path, gguf: Path) -> Path:
    """convert_hf_to_gguf.py --mmproj adds an 'mmproj-' prefix to the output file name."""
    found = sorted(folder.glob(f"mmproj-{gguf.name}")) + sorted(gguf.parent.glob(f"mmproj-{gguf.name}"))
    return found[0] if found else gguf


def run_family(model_type: str, work: Path, src: Path, lib: Path) -> dict:
    import numpy as np

    case = work / "multimodal" / model_type
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    base = case / "base"
    make_base(base, model_type)
    vocab = json.loads((base / "config.json").read_text())["text_config"]["vocab_size"]
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, vocab - 40, TOKENS)]  # no image tokens
    folders = {"base": base}
    for method in ("solar", "identity"):
        folders[method] = case / method
        upscale(base, folders[method], method)
    result: dict = {"model_type": model_type, "outputs": {}}
    llama, projectors = {}, {}
    for label, folder in folders.items():
        text, proj = case / f"{label}.gguf", case / f"{label}.mmproj.gguf"
        convert(src, folder, text, mmproj=False)
        if model_type == "gemma3":  # its sliding-window layers, which llama.cpp derives from a period
            sh([*DUS, "gguf-patch", str(text), str(folder), "-q"])
        convert(src, folder, proj, mmproj=True)
        proj = mmproj_file(folder, proj)
        llama[label] = llama_cpp_logits(text, tokens, src, lib)
        projectors[label] = gguf_tensors(proj)
        result["outputs"][label] = {"block_count": block_count(text), "mmproj_tensors": len(projectors[label]),
                                    "text_vs_transformers": compare(llama[label],
                                                                    transformers_text_logits(folder, tokens))}
    for label in ("solar", "identity"):
        result["outputs"][label]["mmproj_equals_base"] = projectors[label] == projectors["base"]
    result["identity_equals_base_in_llama_cpp"] = bool(np.array_equal(llama["identity"], llama["base"]))
    return result


def table(results: dict) -> str:
    rows = ["| family | output | text blocks | llama.cpp vs transformers, text (rel. error, argmax differs) | "
            "mmproj tensors | mmproj = base's, bit for bit |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | — | — | {r['error'][:120]} | — | — |")
            continue
        for label, o in r["outputs"].items():
            t = o["text_vs_transformers"]
            same = "—" if label == "base" else "yes" if o["mmproj_equals_base"] else "**no**"
            rows.append(f"| {name} | {label} | {o['block_count']} | {t['rel']:.1e}, {t['argmax_differs']}/{TOKENS} | "
                        f"{o['mmproj_tensors']} | {same} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf_compat"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gguf_multimodal.json"))
    ap.add_argument("--only", nargs="*", help="model types to run")
    args = ap.parse_args()
    src, lib, build_s = build_llama_cpp(args.work)
    results = {}
    for model_type in FAMILIES:
        if args.only and model_type not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            results[model_type] = run_family(model_type, args.work, src, lib)
        except SystemExit as failed:  # sh() says which command failed and its output
            results[model_type] = {"error": str(failed).strip().splitlines()[-1]}
        print(f"{model_type}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(table(results))
    doc = {"benchmark": "gguf_multimodal", "date": dt.date.today().isoformat(),
           "machine": f"{platform.node()} ({os.cpu_count()} CPU cores, {platform.machine()})",
           "llama_cpp_python": LLAMA_CPP_PYTHON, "tokens": TOKENS, "tolerance_rel": TOLERANCE, "m": M,
           "families": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
