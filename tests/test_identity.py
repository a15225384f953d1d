"""--method identity: the upscaled model computes exactly the base's function at step 0."""

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from helpers import dus, dus_ok, tensors


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3"])
def test_identity_upscale_keeps_the_base_logits(family, tiny_models, tmp_path):
    recipe = tmp_path / "id.yml"
    assert dus("plan", tiny_models[family], "--drop", 2, "--method", "identity", "-o", recipe).exit_code == 0
    doc = yaml.safe_load(recipe.read_text())
    assert [s["sources"][0]["layer_range"] for s in doc["slices"]][1] == [2, 6 if family != "gemma3" else 10]
    r = dus("upscale", recipe, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    base = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    up = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert up.config.num_hidden_layers == 2 * (base.config.num_hidden_layers - 2)
    ids = torch.randint(3, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(up(input_ids=ids).logits, base(input_ids=ids).logits)
    zeroed = [k for k, t in tensors(tmp_path / "out").items() if not t.any() and not k.endswith("bias")]
    n_dup = base.config.num_hidden_layers - 4
    assert len(zeroed) == 2 * n_dup  # o_proj and down_proj of each duplicated copy (biases start at 0)


def test_identity_filter_that_matches_nothing_is_refused(tiny_models, tmp_path):
    recipe = tmp_path / "id.yml"
    dus_ok("plan", tiny_models["llama"], "--drop", 2, "--method", "identity", "-o", recipe)
    recipe.write_text(recipe.read_text().replace("o_proj", "out_proj"))
    r = dus("upscale", recipe, tmp_path / "out", "-q")
    assert r.exit_code != 0 and "out_proj" in r.stderr and not (tmp_path / "out").exists()
