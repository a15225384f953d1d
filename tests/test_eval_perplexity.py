"""Perplexity matches a plain transformers reference computation."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dus_plugin.eval.perplexity import EvalError, perplexity, windows

from conftest import REPO

TEXT = (REPO / "data" / "tiny_corpus.txt").read_text()[:6000]


def reference(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The sliding-window loop of the transformers perplexity guide, one window at a time."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + max_length, ids.size(1))
        target = ids[:, begin:end].clone()
        target[:, : max(0, prev_end - begin)] = -100
        with torch.no_grad():
            loss = model(input_ids=ids[:, begin:end], labels=target, use_cache=False).loss
        valid = int((target[:, 1:] != -100).sum())
        nll += loss.item() * valid
        count += valid
        prev_end = end
        if end == ids.size(1):
            break
    return nll, count


@pytest.mark.parametrize("max_length,stride", [(64, 64), (64, 16), (100, 37)])
def test_matches_transformers_reference(tiny_llama, max_length, stride):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ref_nll, ref_count = reference(model, ids, max_length, stride)
    got = perplexity(model, tok, [TEXT], max_length=max_length, stride=stride, batch_size=3, progress=False)
    assert got.tokens == ref_count
    n_windows = len(windows(ids.size(1), max_length, stride))
    assert got.tokens == (ids.size(1) - 1 if stride < max_length else ids.size(1) - n_windows)
    assert math.isclose(got.nll, ref_nll, rel_tol=1e-4)
    assert math.isclose(got.perplexity, math.exp(ref_nll / ref_count), rel_tol=1e-4)
    assert math.isclose(got.bits_per_byte, ref_nll / math.log(2) / len(TEXT.encode()), rel_tol=1e-4)


def test_windows_cover_every_token_once():
    for n, L, s in [(10, 4, 3), (10, 4, 1), (257, 64, 50), (3, 8, 8)]:
        scored = [t for b, e, first in windows(n, L, s) for t in range(first, e)]
        assert scored == list(range(1, n))
    disjoint = [t for b, e, first in windows(10, 4, 4) for t in range(first, e)]
    assert disjoint == [1, 2, 3, 5, 6, 7, 9]
    with pytest.raises(EvalError, match="stride"):
        windows(10, 4, 5)


def test_scoring_holds_one_chunk_of_log_probabilities_at_a_time(tiny_llama, monkeypatch):
    """The float32 log-softmax never spans a whole batch of windows (issue 25: 3.2 GB on a 135M model)."""
    import dus_plugin.eval.perplexity as ppl

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    whole = perplexity(model, tok, [TEXT], max_length=64, stride=32, batch_size=4, progress=False)
    widest, real_log_softmax = [], torch.log_softmax

    def spy(x, *a, **k):
        widest.append(x.numel())
        return real_log_softmax(x, *a, **k)

    monkeypatch.setattr(ppl, "SCORE_CHUNK", 5)
    monkeypatch.setattr(torch, "log_softmax", spy)
    chunked = perplexity(model, tok, [TEXT], max_length=64, stride=32, batch_size=4, progress=False)
    assert max(widest) <= 5 * model.config.vocab_size
    assert chunked.tokens == whole.tokens and chunked.nll == pytest.approx(whole.nll, rel=1e-12)


def test_a_large_vocabulary_scores_fewer_windows_at_a_time():
    from dus_plugin.eval.perplexity import windows_per_batch

    assert windows_per_batch(8, 512, 49152) == 2  # SmolLM2: 2.8 GB -> 1.5 GB peak RSS, the same loss
    assert windows_per_batch(8, 512, 151936) == 1  # Qwen2.5's vocabulary
    assert windows_per_batch(8, 64, 128) == 8  # small models keep the batch asked for
