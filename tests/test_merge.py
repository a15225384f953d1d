"""`dus merge` (issue 29, part 3): tuned variants merged by stock mergekit, every tensor checked against the
parents; the expected tensors here are computed by this test's own arithmetic, not by dus_plugin.merge."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import assert_one_line_error, dus, dus_ok, tensors


@pytest.fixture(scope="module")
def variants(tiny_llama: Path, tmp_path_factory) -> list[Path]:
    """Three 'tuned variants' of one model: the base moved by different random steps."""
    root = tmp_path_factory.mktemp("variants")
    out = []
    for k in range(3):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        folder = root / f"v{k}"
        model.save_pretrained(folder)
        for f in tiny_llama.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy(f, folder / f.name)
        out.append(folder)
    return out


def slerp_whole(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Classic SLERP of two tensors, each taken as one vector (numpy, float64), linear when nearly parallel."""
    x, y = a.double().numpy().ravel(), b.double().numpy().ravel()
    cos = float(np.clip(np.dot(x / np.linalg.norm(x), y / np.linalg.norm(y)), -1, 1))
    if abs(cos) > 0.9995:
        out = (1 - t) * x + t * y
    else:
        theta = np.arccos(cos)
        out = (np.sin((1 - t) * theta) * x + np.sin(t * theta) * y) / np.sin(theta)
    return torch.from_numpy(out.reshape(a.shape))


def test_linear_merge_is_the_weighted_mean_of_the_parents(variants, tmp_path):
    out = tmp_path / "merged"
    r = dus_ok("merge", variants[0], variants[1], "--weights", "0.7,0.3", "-o", out, "-q")
    assert "tensors checked against the parents" in r.output
    a, b, got = tensors(variants[0]), tensors(variants[1]), tensors(out)
    assert got.keys() == a.keys()
    for name in a:
        want = ((0.7 * a[name].double() + 0.3 * b[name].double()) / 1.0).float()
        assert torch.allclose(got[name], want, rtol=1e-6, atol=1e-7), name
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    manifest = json.loads((out / "dus_manifest.json").read_text())
    stage = manifest["stages"][-1]
    assert stage["stage"] == "merge" and [p["weight"] for p in stage["parents"]] == [0.7, 0.3]
    assert (out / "tokenizer_config.json").is_file() and (out / "mergekit_config.yml").is_file()
    from dus_plugin.verify import verify

    assert verify(out, forward=False, quiet=True).against_parents


def test_slerp_merge_follows_the_great_circle(variants, tmp_path):
    out = tmp_path / "slerp"
    dus_ok("merge", variants[0], variants[2], "--method", "slerp", "--t", "0.3", "-o", out, "-q")
    a, b, got = tensors(variants[0]), tensors(variants[2]), tensors(out)
    for name in a:
        want = slerp_whole(0.3, a[name], b[name]).float()
        assert torch.allclose(got[name], want, rtol=1e-5, atol=1e-6), name
        if a[name].ndim == 2:  # not the linear mean: the arc bulges out
            lerp = 0.7 * a[name] + 0.3 * b[name]
            assert got[name].norm() > lerp.norm()


def test_stock_mergekit_runs_the_written_recipe_to_the_same_tensors(variants, tmp_path):
    recipe = tmp_path / "merge.yml"
    dus_ok("merge", *variants, "--weights", "1,2,1", "--recipe", recipe)
    assert not (tmp_path / "merged").exists()
    exe = Path(sys.executable).with_name("mergekit-yaml")
    done = subprocess.run([str(exe), str(recipe), str(tmp_path / "stock")], capture_output=True, text=True,
                          cwd="/", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    dus_ok("merge", *variants, "--weights", "1,2,1", "-o", tmp_path / "dus", "-q")
    stock, ours = tensors(tmp_path / "stock"), tensors(tmp_path / "dus")
    assert stock.keys() == ours.keys() and all(torch.equal(stock[k], ours[k]) for k in stock)


def test_the_check_catches_a_wrong_tensor(variants, tmp_path):
    """The planted defect: one tensor of a merge swapped for the first parent's."""
    import yaml

    from dus_plugin.errors import MergeError
    from dus_plugin.merge import check_merge
    from safetensors.torch import load_file, save_file

    out = tmp_path / "merged"
    dus_ok("merge", variants[0], variants[1], "-o", out, "-q")
    doc = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert check_merge(out, doc, quiet=True) > 0
    file = next(out.glob("*.safetensors"))
    state = load_file(file)
    name = next(k for k in state if "o_proj" in k)
    state[name] = tensors(variants[0])[name]
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(MergeError, match=f"tensor {name} .* is not the linear merge of its parents"):
        check_merge(out, doc, quiet=True)
    assert_one_line_error(dus("verify", out, "-q"), f"tensor {name}", "is not the linear merge")  # verify too


def test_bad_merges_are_one_line(variants, tiny_models, tmp_path):
    assert_one_line_error(dus("merge", *variants, "--method", "slerp", "-o", tmp_path / "o"), "two models")
    assert_one_line_error(dus("merge", variants[0], variants[1], "--weights", "1,2,3", "-o", tmp_path / "o"),
                          "--weights", "3 weights for 2 models")
    assert_one_line_error(dus("merge", variants[0], tiny_models["qwen2"], "-o", tmp_path / "o"),
                          "another architecture")
    assert_one_line_error(dus("merge", variants[0], tmp_path / "nope", "-o", tmp_path / "o"), "does not exist")
    assert not (tmp_path / "o").exists()


def test_the_card_shows_the_family_tree(variants, tmp_path):
    from dus_plugin.card import build_card

    out = tmp_path / "merged"
    dus_ok("merge", variants[0], variants[1], "--weights", "0.25,0.75", "-o", out, "-q")
    card = str(build_card(out))
    assert "## Family tree" in card and "merge (linear) of:" in card
    assert "v0 × 0.25" in card and "v1 × 0.75" in card
