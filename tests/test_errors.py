"""Every bad input ends with one clear line, exit != 0, no traceback and nothing half written."""

import json
import shutil
from pathlib import Path

import pytest

from helpers import assert_one_line_error, dus, dus_ok


def no_leftovers(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if ".dus-tmp-" in p.name]


@pytest.fixture
def recipe(tiny_llama, tmp_path) -> Path:
    path = tmp_path / "r.yml"
    assert dus("plan", tiny_llama, "--drop", 2, "-o", path).exit_code == 0
    return path


@pytest.mark.parametrize("drop,needle", [("0", "at least 1"), ("-1", "at least 1"), ("4", "choose m < n/2"),
                                         ("6", "choose m < n/2")])
def test_plan_bad_overlap(tiny_llama, drop, needle):
    assert_one_line_error(dus("plan", tiny_llama, "--drop", drop), needle)


def test_plan_missing_folder(tmp_path):
    assert_one_line_error(dus("plan", tmp_path / "nope"), "does not exist")


def test_plan_unknown_layer_count(tiny_llama, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    cfg = json.loads((base / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (base / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(dus("plan", base), "num_hidden_layers")


def test_plan_not_a_decoder_lm(tmp_path):
    base = tmp_path / "bert"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "num_hidden_layers": 12}))
    assert_one_line_error(dus("plan", base), "BertModel", "not a decoder LM")


def test_plan_hub_id_offline():
    assert_one_line_error(dus("plan", "nobody/no-such-model"), "could not be fetched")


def test_upscale_refuses_non_empty_output(recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(dus("upscale", recipe, out, "-q"), "not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    r = dus("upscale", recipe, out, "-q", "--overwrite")
    assert r.exit_code == 0 and not (out / "keep.txt").exists() and (out / "dus_manifest.json").is_file()
    no_leftovers(tmp_path)


def test_upscale_into_empty_existing_folder(recipe, tmp_path):
    (tmp_path / "out").mkdir()
    assert dus("upscale", recipe, tmp_path / "out", "-q", "--no-forward").exit_code == 0


def test_upscale_corrupt_safetensors(tiny_llama, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[: len(data) // 2])
    path = tmp_path / "r.yml"
    # plan reads the checkpoint's tensor names, so the damage shows before any recipe is written
    assert_one_line_error(dus("plan", base, "--drop", 2, "-o", path), "model.safetensors", "not a readable")
    assert not path.exists()
    dus_ok("plan", tiny_llama, "--drop", 2, "-o", path)
    path.write_text(path.read_text().replace(str(tiny_llama), str(base)))
    assert_one_line_error(dus("upscale", path, tmp_path / "out", "-q"), "model.safetensors", "not a readable")
    assert not (tmp_path / "out").exists()
    no_leftovers(tmp_path)


def test_upscale_range_past_the_base(recipe, tmp_path):
    recipe.write_text(recipe.read_text().replace("[2, 8]", "[2, 9]"))
    assert_one_line_error(dus("upscale", recipe, tmp_path / "out"), "slices[1].sources[0].layer_range", "<= 8")


def test_upscale_misspelled_key(recipe, tmp_path):
    recipe.write_text(recipe.read_text().replace("dtype:", "dtyp:"))
    assert_one_line_error(dus("upscale", recipe, tmp_path / "out"), "field dtyp: unknown key")


def test_upscale_missing_recipe(tmp_path):
    assert_one_line_error(dus("upscale", tmp_path / "none.yml", tmp_path / "out"), "does not exist")


def test_upscale_missing_base_folder(recipe, tiny_llama, tmp_path):
    recipe.write_text(recipe.read_text().replace(str(tiny_llama), str(tmp_path / "gone")))
    assert_one_line_error(dus("upscale", recipe, tmp_path / "out"), "does not exist")


def test_upscale_base_without_tokenizer(recipe, tiny_llama, tmp_path):
    base = tmp_path / "notok"
    shutil.copytree(tiny_llama, base)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (base / f).unlink()
    recipe.write_text(recipe.read_text().replace(str(tiny_llama), str(base)))
    assert_one_line_error(dus("upscale", recipe, tmp_path / "out", "-q"), "has no tokenizer")
    assert not (tmp_path / "out").exists()
    no_leftovers(tmp_path)


def test_upscale_failing_merge_leaves_nothing(recipe, tmp_path):
    """mergekit rejects a bad chat template only after writing the weights: nothing may remain."""
    recipe.write_text(recipe.read_text() + "chat_template: nope\n")
    assert_one_line_error(dus("upscale", recipe, tmp_path / "out", "-q"), "mergekit failed", "chat template")
    assert not (tmp_path / "out").exists()
    no_leftovers(tmp_path)


def test_verify_names_the_first_mismatch(recipe, tmp_path):
    out = tmp_path / "out"
    assert dus("upscale", recipe, out, "-q").exit_code == 0
    r = dus("verify", out, "-q")
    assert r.exit_code == 0 and "bitwise equal" in r.output
    from safetensors.torch import load_file, save_file

    sd = load_file(out / "model.safetensors")
    sd["model.layers.7.mlp.up_proj.weight"][0, 0] += 1.0
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(dus("verify", out, "-q"), "model.layers.7.mlp.up_proj.weight")


def test_verify_layer_count_and_missing_manifest(recipe, tmp_path):
    out = tmp_path / "out"
    assert dus("upscale", recipe, out, "-q").exit_code == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["num_hidden_layers"] = 8
    (out / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(dus("verify", out, "-q"), "num_hidden_layers is 8", "implies 12")
    (out / "dus_manifest.json").unlink()
    assert_one_line_error(dus("verify", out), "dus_manifest.json")


def test_padded_vocabulary_keeps_embeddings_whole(tmp_path):
    """A base whose embeddings have more rows than its tokenizer has tokens (Qwen2.5: 152064 vs
    151665): `tokenizer_source: base` would make mergekit cut the rows, so plan omits it and
    upscale refuses a recipe that has it."""
    import torch
    from transformers import AutoModelForCausalLM

    from dus_plugin.fixtures import family_config, make_tokenizer
    from helpers import tensors

    tok = make_tokenizer()
    model = AutoModelForCausalLM.from_config(family_config("qwen2", vocab=len(tok) + 61))
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    dus("plan", tmp_path / "base", "--drop", 2, "-o", tmp_path / "r.yml")
    text = (tmp_path / "r.yml").read_text()
    assert "tokenizer_source:" not in text.split("merge_method")[1] and "pads its vocabulary to 320 rows" in text
    assert dus("upscale", tmp_path / "r.yml", tmp_path / "out", "-q").exit_code == 0
    assert torch.equal(tensors(tmp_path / "out")["lm_head.weight"], tensors(tmp_path / "base")["lm_head.weight"])
    (tmp_path / "r2.yml").write_text(text + "tokenizer_source: base\n")
    assert_one_line_error(dus("upscale", tmp_path / "r2.yml", tmp_path / "out2"), "field tokenizer_source",
                          "320 rows for 259 tokens")
