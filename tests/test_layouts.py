"""Growth operators: the layouts (solar, interpose, stack) × the methods (solar, identity, average).

Each combination is planned and upscaled through the CLI, then checked independently with
safetensors and transformers: the layer map, every tensor against its source (or the mean that
defines it), and, for identity and average, logits equal to the base's in fp32.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from dus_plugin.plan import count_params, interpose_plan, layout_plan, recognise, solar_plan, stack_plan
from helpers import assert_one_line_error, dus, dus_ok, tensors

LAYOUTS = {"solar": ["--drop", "2"], "interpose": ["--drop", "2"], "stack": ["--repeat", "3"]}
METHODS = ("solar", "identity", "average")
WRITERS = ("o_proj", "down_proj")


def test_layer_maps_are_exact() -> None:
    n = 8
    assert solar_plan(n, 2).layer_map == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    assert interpose_plan(n, 2).layer_map == [0, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7]
    assert stack_plan(n, 3).layer_map == list(range(8)) * 3
    for plan in (solar_plan(n, 2), interpose_plan(n, 3), stack_plan(n, 2), solar_plan(n, 1), interpose_plan(n, 1)):
        assert recognise(n, plan.layer_map) == plan  # what upscale records for a recipe's layer map
        assert recognise(n, plan.layer_map).layout == plan.layout
    assert recognise(n, [0, 1, 1, 2, 3, 4, 5, 6, 7]).layout == "layers"  # odd s: no named layout


def test_interpose_has_solars_depth_and_parameters_on_mistral() -> None:
    mistral = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False}
    params = count_params(mistral)
    solar, inter = solar_plan(32, 8).with_params(params), interpose_plan(32, 8).with_params(params)
    assert inter.s == solar.s == 48 and inter.params_after == solar.params_after
    assert sorted(inter.layer_map) == sorted(solar.layer_map)  # the same layers duplicated
    assert inter.duplicated_outputs == [9 + 2 * k for k in range(16)]  # each copy right after its source
    assert count_params(mistral).total == 7_241_732_096


@pytest.mark.parametrize("layout, method", list(itertools.product(LAYOUTS, METHODS)))
def test_every_layout_and_method(layout: str, method: str, tiny_llama: Path, tmp_path: Path) -> None:
    recipe, out = tmp_path / "r.yml", tmp_path / "out"
    dus_ok("plan", tiny_llama, "--layout", layout, *LAYOUTS[layout], "--method", method, "-o", recipe)
    dus_ok("upscale", recipe, out, "-q")
    doc = yaml.safe_load(recipe.read_text())
    assert doc["merge_method"] == ("dus_average" if method == "average" else "passthrough")
    plan = layout_plan(8, layout, *((2, None) if layout != "stack" else (None, 3)))
    base, up = tensors(tiny_llama), tensors(out)
    assert len(up) == len([k for k in base if ".layers." not in k]) + plan.s * 9
    seen: set[int] = set()
    for i, src in enumerate(plan.layer_map):
        later = src in seen
        seen.add(src)
        for name in [k for k in base if k.startswith(f"model.layers.{src}.")]:
            got = up[name.replace(f"layers.{src}.", f"layers.{i}.")]
            want = base[name]
            if later and method == "average" and src + 1 < 8:
                want = (base[name] + base[name.replace(f"layers.{src}.", f"layers.{src + 1}.")]) / 2
            if later and method != "solar" and name.endswith(tuple(f"{w}.weight" for w in WRITERS)):
                want = torch.zeros_like(want)
            assert torch.equal(got, want), (layout, method, i, name)
    assert all(torch.equal(up[k], base[k]) for k in base if ".layers." not in k)
    if method != "solar":
        assert_same_logits(tiny_llama, out)


def assert_same_logits(base_dir: Path, out: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    up = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(3, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(up(input_ids=ids).logits, base(input_ids=ids).logits)


def test_average_on_a_family_with_per_layer_settings(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Gemma 3: layer i+1 may be a global layer averaged into a sliding one; the config follows layer i."""
    recipe, out = tmp_path / "r.yml", tmp_path / "out"
    dus_ok("plan", tiny_models["gemma3"], "--layout", "interpose", "--drop", "3", "--method", "average", "-o", recipe)
    dus_ok("upscale", recipe, out, "-q")
    assert_same_logits(tiny_models["gemma3"], out)


def test_verify_catches_a_wrong_mean(tiny_llama: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    recipe, out = tmp_path / "r.yml", tmp_path / "out"
    dus_ok("plan", tiny_llama, "--layout", "interpose", "--drop", "2", "--method", "average", "-o", recipe)
    dus_ok("upscale", recipe, out, "-q")
    dus_ok("verify", out, "--no-forward")
    sd = tensors(out)
    # the defect: output layer 3 (the copy of base layer 2) holds the mean of layers 2 and 4, not 2 and 3
    wrong = "model.layers.3.self_attn.q_proj.weight"
    base = tensors(tiny_llama)
    sd[wrong] = (base["model.layers.2.self_attn.q_proj.weight"] + base["model.layers.4.self_attn.q_proj.weight"]) / 2
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(dus("verify", out, "--no-forward", "-q"), wrong,
                          "is not the mean of model.layers.2.self_attn.q_proj.weight and "
                          "model.layers.3.self_attn.q_proj.weight")


@pytest.mark.parametrize("layout", ["interpose", "stack"])
def test_mergekit_engine_writes_the_same_layouts(layout: str, tiny_llama: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yml"
    dus_ok("plan", tiny_llama, "--layout", layout, "--method", "identity", "-o", recipe)
    dus_ok("upscale", recipe, tmp_path / "stream", "-q")
    dus_ok("upscale", recipe, tmp_path / "mergekit", "-q", "--engine", "mergekit")
    a, b = tensors(tmp_path / "stream"), tensors(tmp_path / "mergekit")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_manifest_and_card_name_layout_and_method(tiny_llama: Path, tmp_path: Path) -> None:
    from dus_plugin.manifest import Manifest

    recipe, out = tmp_path / "r.yml", tmp_path / "out"
    dus_ok("plan", tiny_llama, "--layout", "stack", "--method", "average", "-o", recipe)
    dus_ok("upscale", recipe, out, "-q")
    m = Manifest.read(out)
    assert (m.plan.layout, m.plan.repeat, m.method, m.plan.s) == ("stack", 2, "average", 16)
    record = m.tensors["model.layers.8.self_attn.q_proj.weight"]
    assert (record.source, record.mean_with) == ("model.layers.0.self_attn.q_proj.weight",
                                                 "model.layers.1.self_attn.q_proj.weight")
    dus_ok("card", out)
    card = (out / "README.md").read_text()
    assert "layout: `stack`" in card and "method: `average`" in card


@pytest.mark.parametrize("args, needles", [
    (["--layout", "solar", "--repeat", "3"], ["--repeat", "stack layout only"]),
    (["--layout", "stack", "--drop", "2"], ["--drop", "does not apply to the stack layout"]),
    (["--layout", "stack", "--repeat", "1"], ["--repeat", "at least 2"]),
    (["--layout", "interpose", "--layers", "0:4"], ["--layers", "alternative to"]),
])
def test_bad_layout_options_are_one_line(args: list[str], needles: list[str], tiny_llama: Path) -> None:
    assert_one_line_error(dus("plan", tiny_llama, *args), *needles)


def test_an_unknown_layout_lists_the_choices(tiny_llama: Path) -> None:
    r = dus("plan", tiny_llama, "--layout", "sideways")
    assert r.exit_code == 2 and "'sideways' is not one of 'solar', 'interpose', 'stack'" in r.output


def test_mergekit_yaml_refuses_an_average_recipe(tiny_llama: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yml"
    dus_ok("plan", tiny_llama, "--method", "average", "-o", recipe)
    assert_one_line_error(dus("mergekit-yaml", recipe, tmp_path / "out"), "dus upscale")
    assert not (tmp_path / "out").exists()


def test_run_recipes_take_layout_and_method() -> None:
    from dus_plugin.errors import RecipeError
    from dus_plugin.pipeline import default_recipe, load_run_recipe

    r = load_run_recipe(default_recipe(), {"upscale": {"layout": "interpose", "method": "average"}})
    assert (r.upscale.layout, r.upscale.method) == ("interpose", "average")
    with pytest.raises(RecipeError, match="upscale.layout"):
        load_run_recipe(default_recipe(), {"upscale": {"layout": "sideways"}})
