import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dus_plugin.errors import PlanError
from dus_plugin.fixtures import FAMILIES
from dus_plugin.architecture import num_layers
from dus_plugin.plan import count_params, layer_list_plan, parse_layers, solar_plan

from conftest import REPO

BASES = REPO / "tests" / "data" / "base_configs"


def base(name: str) -> dict:
    return json.loads((BASES / name / "config.json").read_text())


def test_solar_arithmetic_on_mistral_7b():
    cfg = base("mistralai--Mistral-7B-v0.1")
    p = solar_plan(num_layers(cfg)).with_params(count_params(cfg))
    assert (p.n, p.m, p.s) == (32, 8, 48)
    assert [s.as_list() for s in p.slices] == [[0, 24], [8, 32]]
    assert p.layer_map == list(range(24)) + list(range(8, 32))
    assert p.seam == [24]
    assert p.duplicated_outputs == list(range(24, 40))
    assert round(p.params_before.total / 1e9, 2) == 7.24
    assert round(p.params_after.total / 1e9, 1) == 10.7  # SOLAR 10.7B comes out of the arithmetic


@pytest.mark.parametrize("name,n,m,s", [("meta-llama--Meta-Llama-3-8B", 32, 8, 48), ("Qwen--Qwen2.5-7B", 28, 7, 42),
                                        ("google--gemma-2-9b", 42, 10, 64)])
def test_default_overlap_is_a_quarter(name, n, m, s):
    p = solar_plan(num_layers(base(name)))
    assert (p.n, p.m, p.s) == (n, m, s)


@pytest.mark.parametrize("m,needle", [(0, "at least 1"), (-3, "at least 1"), (16, "m < n/2"), (20, "m < n/2")])
def test_impossible_overlaps_are_rejected(m, needle):
    with pytest.raises(PlanError, match=needle.replace("/", ".")):
        solar_plan(num_layers(base("mistralai--Mistral-7B-v0.1")), m)


def test_unknown_layer_count_is_rejected():
    with pytest.raises(PlanError, match="num_hidden_layers"):
        num_layers({"hidden_size": 8})


def test_layer_list_becomes_slices():
    cfg = base("mistralai--Mistral-7B-v0.1")
    assert parse_layers("0:24,8:32") == list(range(24)) + list(range(8, 32))
    p = layer_list_plan(num_layers(cfg), parse_layers("0,1,2,2,3,30:32"))
    assert [s.as_list() for s in p.slices] == [[0, 3], [2, 4], [30, 32]]
    assert p.layer_map == [0, 1, 2, 2, 3, 30, 31] and p.m is None
    with pytest.raises(PlanError, match="outside"):
        layer_list_plan(num_layers(cfg), [0, 32])
    with pytest.raises(PlanError, match="reversed"):
        parse_layers("24:8")
    with pytest.raises(PlanError, match="not an index"):
        parse_layers("0:x")


@pytest.mark.parametrize("family", FAMILIES)
def test_param_count_matches_transformers(family, tiny_models):
    folder = tiny_models[family]
    cfg = json.loads((folder / "config.json").read_text())
    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).parameters())
    assert count_params(cfg).total == real


def test_plan_names_every_copy_and_says_when_it_rounds_m(tmp_path):
    """Interpose pairs rows unevenly, so each row says which outputs are copies; n/4 = 2.5 is rounded aloud."""
    from dus_plugin.fixtures import make_tiny_model
    from helpers import dus

    base = make_tiny_model("llama", tmp_path / "base", layers=10)
    r = dus("plan", base, "--layout", "interpose")
    assert r.exit_code == 0, r.output
    assert "m = n/4 = 10/4 = 2.5, rounded down to m = 2" in r.stderr
    rows = [line for line in r.stdout.splitlines() if line.strip().startswith("out")]
    assert rows[1].split() == ["out", "3..4", "<-", "base", "2..3", "copies:", "out", "3", "=", "base", "2"]
    assert rows[-1].split() == ["out", "13..15", "<-", "base", "7..9", "copies:", "out", "13", "=", "base", "7"]
    solar = dus("plan", base, "--drop", 2)
    assert "rounded" not in solar.stderr and "copies: out 8..13 = base 2..7" in solar.stdout
