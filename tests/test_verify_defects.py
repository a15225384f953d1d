"""Plant the defects verify exists to catch; each must fail with one line naming it. The expected
tensors come from the base, the plan and the model class, so rewriting the manifest cannot hide them."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from helpers import assert_one_line_error, dus


@pytest.fixture
def upscaled(tiny_models, tmp_path_factory):
    """family, method -> a fresh copy of a verified upscale (m = 2)."""
    root = tmp_path_factory.mktemp("defects")

    def make(family: str, method: str = "solar"):
        recipe = root / f"{family}-{method}.yml"
        out = root / f"{family}-{method}"
        if not out.exists():
            assert dus("plan", tiny_models[family], "--drop", 2, "--method", method, "-o", recipe).exit_code == 0
            assert dus("upscale", recipe, out, "-q").exit_code == 0
        copy = root / f"{family}-{method}-{len(list(root.iterdir()))}"
        shutil.copytree(out, copy)
        return copy

    return make


def _rewrite(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_missing_layer_fails(upscaled):
    out = upscaled("llama")
    _rewrite(out, lambda t: [t.pop(k) for k in [k for k in t if k.startswith("model.layers.9.")]])
    assert_one_line_error(dus("verify", out, "-q", "--no-forward"), "model.layers.9.", "missing")


def test_two_swapped_layers_fail(upscaled):
    out = upscaled("llama")

    def swap(t):
        for k in [k for k in t if k.startswith("model.layers.2.")]:
            other = k.replace("layers.2.", "layers.3.")
            t[k], t[other] = t[other].clone(), t[k].clone()

    _rewrite(out, swap)
    # the manifest's hashes are rewritten to match, as a buggy engine would write them
    from dus_plugin.stream import hash_file_tensors

    man = json.loads((out / "dus_manifest.json").read_text())
    hashes = {k: v for f in out.glob("*.safetensors") for k, v in hash_file_tensors(f).items()}
    for name, entry in man["tensors"].items():
        entry["sha256"] = hashes[name]
    (out / "dus_manifest.json").write_text(json.dumps(man))
    assert_one_line_error(dus("verify", out, "-q", "--no-forward"), "model.layers.2.", "not the copy of")


def test_a_per_layer_list_extended_by_index_fails(upscaled):
    out = upscaled("gemma3")
    cfg = json.loads((out / "config.json").read_text())
    s = cfg["num_hidden_layers"]
    cfg["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(s)]
    (out / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(dus("verify", out, "-q", "--no-forward"), "layer_types")


def test_an_unzeroed_projection_fails(upscaled, tiny_models):
    out = upscaled("llama", "identity")
    base = load_file(tiny_models["llama"] / "model.safetensors")
    # output layer 6 is the second copy of base layer 2 (layers [0,6) + [2,8)): identity zeroes its o_proj
    _rewrite(out, lambda t: t.update({"model.layers.6.self_attn.o_proj.weight":
                                      base["model.layers.2.self_attn.o_proj.weight"].clone()}))
    assert_one_line_error(dus("verify", out, "-q", "--no-forward"), "model.layers.6.self_attn.o_proj.weight",
                          "zeroed copy")


def test_a_random_filled_layer_fails_the_load(upscaled):
    """Falcon's bug: a config with more layers than the weights hold loads with random weights."""
    out = upscaled("llama")
    cfg = json.loads((out / "config.json").read_text())
    cfg["num_hidden_layers"] += 2
    (out / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(dus("verify", out, "-q"), "num_hidden_layers")


def test_manifest_rewrite_cannot_hide_a_wrong_source(upscaled):
    out = upscaled("llama")
    man = json.loads((out / "dus_manifest.json").read_text())
    man["tensors"]["model.layers.6.self_attn.q_proj.weight"]["source"] = "model.layers.3.self_attn.q_proj.weight"
    (out / "dus_manifest.json").write_text(json.dumps(man))
    assert dus("verify", out, "-q", "--no-forward").exit_code == 0  # the bytes are right: the manifest does not decide


def test_per_layer_embeddings_regrouped_by_index_fail(tmp_path):
    """Gemma 4's per-layer embeddings pack one block per layer: the output's blocks follow the layer map. A
    tensor whose blocks follow the output index instead (block i from base block i mod n) has the right shape and
    loads; verify must name it."""
    import torch

    from dus_plugin import zoo
    from dus_plugin.fixtures import make_tokenizer

    base = zoo.make_zoo_model("gemma4_text", tmp_path / "base", make_tokenizer())
    assert dus("plan", base, "--drop", 2, "-o", tmp_path / "r.yml").exit_code == 0
    assert dus("upscale", tmp_path / "r.yml", tmp_path / "out", "-q").exit_code == 0
    name = "model.embed_tokens_per_layer.weight"
    src = load_file(base / "model.safetensors")[name]
    block = src.shape[1] // 8
    layer_map = [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    right = torch.cat([src[:, j * block:(j + 1) * block] for j in layer_map], 1)
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")[name], right)

    def by_index(t):
        t[name] = torch.cat([src[:, (i % 8) * block:(i % 8 + 1) * block] for i in range(12)], 1)

    _rewrite(tmp_path / "out", by_index)
    assert_one_line_error(dus("verify", tmp_path / "out", "-q", "--no-forward"), name, "per-layer blocks")


def test_one_wrong_entry_of_a_per_layer_list_is_named_by_index(upscaled):
    out = upscaled("gemma3")
    cfg = json.loads((out / "config.json").read_text())
    i = len(cfg["layer_types"]) - 3
    was = cfg["layer_types"][i]
    cfg["layer_types"][i] = "full_attention" if was == "sliding_attention" else "sliding_attention"
    (out / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(dus("verify", out, "-q", "--no-forward"),
                          f'layer_types[{i}] is "{cfg["layer_types"][i]}", the layer map implies "{was}"')
