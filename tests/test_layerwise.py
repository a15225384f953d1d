"""The bounded-memory forward pass verify uses: the same logits as a whole-model load, one part in memory."""

from __future__ import annotations

import pytest
import torch

import zoo_checks as zc
from dus_plugin import zoo
from dus_plugin.fixtures import make_tiny_model, make_tokenizer
from dus_plugin.errors import StreamUnsupported
from dus_plugin.layerwise import streamed_logits
from dus_plugin.tensors import read_tensor, tensor_headers
from dus_plugin.verify import verify

from helpers import dus_ok


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2", "llama4_text", "mamba2", "falcon"])
def test_streamed_logits_equal_a_whole_load(model_type, tmp_path):
    """mamba2's mixer reads its conv's weight without calling it: it runs a decoder layer at a time."""
    base = zoo.make_zoo_model(model_type, tmp_path / "base", make_tokenizer())
    assert torch.equal(streamed_logits(base, zc.IDS), zc.logits(zc.load_clean(base)))


def test_only_one_part_is_in_memory_at_a_time(tmp_path, monkeypatch):
    """Count the bytes of every weight read from disk while it is alive (freed when the last reference goes)."""
    import weakref

    from dus_plugin import layerwise

    base = make_tiny_model("llama", tmp_path / "base", layers=16)
    sizes = [t.nbytes for t in tensor_headers(base).values()]
    live, peak = [0], [0]

    def counted(src):
        t = read_tensor(src)
        live[0] += t.nbytes
        peak[0] = max(peak[0], live[0])
        weakref.finalize(t.untyped_storage(), lambda n=t.nbytes: live.__setitem__(0, live[0] - n))
        return t

    monkeypatch.setattr(layerwise, "read_tensor", counted)
    streamed_logits(base, zc.IDS)
    assert live[0] == 0 and 0 < peak[0] <= 2 * max(sizes) < sum(sizes) / 4, (peak, max(sizes), sum(sizes))


def test_a_weight_used_outside_its_module_is_noticed_not_used(tmp_path):
    """Plant a parent that reads a child's weight without calling the child: the placeholder (NaN) shows,
    and the pass falls back to whole layers, which gives the right logits."""
    from transformers.models.llama import modeling_llama

    base = make_tiny_model("llama", tmp_path / "base")
    want = zc.logits(zc.load_clean(base))
    original = modeling_llama.LlamaMLP.forward

    def reads_its_child(self, x):
        return torch.nn.functional.linear(self.act_fn(self.gate_proj(x)) * self.up_proj(x), self.down_proj.weight)

    modeling_llama.LlamaMLP.forward = reads_its_child
    try:
        got = streamed_logits(base, zc.IDS)
    finally:
        modeling_llama.LlamaMLP.forward = original
    assert torch.equal(got, want)


def test_converted_checkpoints_fall_back_to_a_whole_load(tmp_path):
    """transformers fuses Mixtral's per-expert tensors at load: only a whole load knows how."""
    base = zoo.make_zoo_model("mixtral", tmp_path / "base", make_tokenizer())
    with pytest.raises(StreamUnsupported, match="not in the model"):
        streamed_logits(base, zc.IDS)
    assert dus_ok("plan", base, "--drop", 2, "--method", "identity", "-o", tmp_path / "r.yml")
    assert dus_ok("upscale", tmp_path / "r.yml", tmp_path / "out", "--no-verify", "-q")
    assert verify(tmp_path / "out", quiet=True).held == "whole"


def test_verify_streams_an_identity_upscale_and_its_base(tiny_models, tmp_path):
    assert dus_ok("plan", tiny_models["qwen2"], "--drop", 2, "--method", "identity", "-o", tmp_path / "r.yml")
    assert dus_ok("upscale", tmp_path / "r.yml", tmp_path / "out", "--no-verify", "-q")
    report = verify(tmp_path / "out", quiet=True)
    assert report.forward and report.held == "streamed"
