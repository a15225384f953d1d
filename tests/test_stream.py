"""The streaming writer produces exactly what mergekit produces for the same YAML."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dus_plugin.fixtures import FAMILIES
from dus_plugin.stream import streamable
from dus_plugin.tensors import read_header

from helpers import assert_one_line_error, dus, dus_ok


def raw_tensors(folder: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes), read straight from the safetensors files."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            for name, t in read_header(f).items():
                fh.seek(t.start)
                out[name] = (t.dtype, t.shape, fh.read(t.nbytes))
    return out


def both_engines(recipe: Path, tmp: Path, *extra: str) -> tuple[Path, Path]:
    for engine in ("stream", "mergekit"):
        r = dus("upscale", recipe, tmp / engine, "-q", "--no-forward", "--engine", engine, *extra)
        assert r.exit_code == 0, r.output
        assert json.loads((tmp / engine / "dus_manifest.json").read_text())["engine"] == engine
    return tmp / "stream", tmp / "mergekit"


def assert_same_output(a: Path, b: Path) -> None:
    ta, tb = raw_tensors(a), raw_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name] == tb[name], name  # dtype, shape and every byte
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    ma = json.loads((a / "dus_manifest.json").read_text())["tensors"]
    mb = json.loads((b / "dus_manifest.json").read_text())["tensors"]
    assert ma == mb  # same sources, dtypes, shapes and hashes
    assert (a / "tokenizer.json").is_file() and (a / "mergekit_config.yml").is_file()


@pytest.mark.parametrize("method", ["solar", "identity"])
@pytest.mark.parametrize("family", FAMILIES)
def test_stream_equals_mergekit(family, method, tiny_models, tmp_path):
    recipe = tmp_path / "r.yml"
    assert dus("plan", tiny_models[family], "--drop", 2, "--method", method, "-o", recipe).exit_code == 0
    assert_same_output(*both_engines(recipe, tmp_path))


def test_stream_casts_and_shards_like_mergekit(tiny_models, tmp_path):
    recipe = tmp_path / "r.yml"
    dus_ok("plan", tiny_models["qwen2"], "--drop", 2, "--method", "identity", "--dtype", "bfloat16", "-o", recipe)
    a, b = both_engines(recipe, tmp_path, "--shard-size", "40K")
    assert_same_output(a, b)
    assert {t[0] for t in raw_tensors(a).values()} == {"BF16"}
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert dus("verify", a, "-q").exit_code == 0


def test_non_passthrough_falls_back_to_mergekit(tiny_llama, tmp_path):
    recipe = tmp_path / "r.yml"
    dus_ok("plan", tiny_llama, "--drop", 2, "-o", recipe)
    from dus_plugin.recipe import load_recipe

    text = recipe.read_text().replace("    layer_range: [2, 8]", "    layer_range: [2, 8]\n    parameters:\n      scale: 0.5")
    recipe.write_text(text)
    assert streamable(load_recipe(recipe)) is not None
    r = dus("upscale", recipe, tmp_path / "out", "-q", "--no-verify")
    assert r.exit_code == 0 and "mergekit engine" in r.output
    assert_one_line_error(dus("upscale", recipe, tmp_path / "o2", "--engine", "stream"), "cannot run this recipe")


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_disk_full_leaves_no_half_folder(tiny_llama, tmp_path):
    recipe = tmp_path / "r.yml"
    dus_ok("plan", tiny_llama, "--drop", 2, "-o", recipe)
    exe = Path(sys.executable).with_name("dus")
    proc = subprocess.run([str(exe), "upscale", str(recipe), str(tmp_path / "out"), "-q"], capture_output=True,
                          text=True, preexec_fn=_limit_file_size, env=dict(os.environ), timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not write") and "disk full" in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml"]


def test_leftovers_of_a_killed_run_are_removed(tiny_llama, tmp_path):
    recipe = tmp_path / "r.yml"
    dus_ok("plan", tiny_llama, "--drop", 2, "-o", recipe)
    stale = tmp_path / ".out.dus-tmp-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert dus("upscale", recipe, tmp_path / "out", "-q", "--no-forward").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yml"]
