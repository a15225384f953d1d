"""Every shipped recipe loads strictly and equals what `dus plan` writes for its base."""

from pathlib import Path

import pytest
import yaml

from dus_plugin.errors import RecipeError
from dus_plugin.recipe import load_recipe, parse_recipe

from conftest import REPO
from helpers import dus

RECIPES = sorted((REPO / "configs").glob("dus_*.yml"))


def test_there_are_recipes_for_the_named_families():
    names = {p.name for p in RECIPES}
    assert {"dus_solar.yml", "dus_llama3_8b.yml", "dus_qwen2.5_7b.yml", "dus_gemma2_9b.yml"} <= names


def test_solar_recipe_is_the_papers():
    r = load_recipe(REPO / "configs" / "dus_solar.yml")
    assert r.model == "mistralai/Mistral-7B-v0.1"
    assert r.layer_ranges == [(0, 24), (8, 32)] and r.dtype == "bfloat16" and r.tokenizer_source == "base"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_equals_dus_plan_output(path: Path, tmp_path: Path):
    """Re-run the exact `made by:` command of the header (on the base's stored config.json)."""
    import shlex

    recipe = load_recipe(path)
    base = REPO / "tests" / "data" / "base_configs" / recipe.model.replace("/", "--")
    made_by = next(line for line in path.read_text().splitlines() if line.startswith("# made by: "))
    args = shlex.split(made_by.removeprefix("# made by: "))
    assert args[:3] == ["dus", "plan", recipe.model]
    out = tmp_path / "plan.yml"
    args = [str(base)] + args[3:]
    args[args.index("-o") + 1] = str(out)
    r = dus("plan", *args)
    assert r.exit_code == 0, r.output
    planned = yaml.safe_load(out.read_text().replace(str(base), recipe.model))
    assert planned == yaml.safe_load(path.read_text())
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"s = {sum(b - a for a, b in recipe.layer_ranges)} layers" in h for h in header)


@pytest.mark.parametrize("doc,field", [
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "x", "layer_range": [0, 2]}]}], "dtyp": "x"},
     "field dtyp: unknown key"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "x", "layer_range": [24, 8]}]}]},
     "field slices[0].sources[0].layer_range"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "x", "layer_range": [0, 2]}]}]}, "field merge_method"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "x", "layer_range": [0, 2]}]},
                                               {"sources": [{"model": "y", "layer_range": [0, 2]}]}]},
     "same model"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "x", "layer_range": [0, 2]}]}],
      "dtype": "float8"}, "field dtype"),
])
def test_strict_validation_names_the_field(doc, field):
    with pytest.raises(RecipeError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_recipe(doc)
