"""lm-eval on a loaded model, offline, with the tiny task the repo ships."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dus_plugin.eval.harness import H6, SHIPPED_TASKS, parse_tasks, run_tasks
from dus_plugin.eval.perplexity import EvalError


def test_tiny_task_accuracy_equals_a_hand_computed_argmax(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    scores = run_tasks(model, tok, parse_tasks("dus_tiny_mc:0"), use_default_tasks=False, batch_size=4)
    rows = [json.loads(x) for x in (SHIPPED_TASKS / "dus_tiny_mc.jsonl").read_text().splitlines()]
    correct = 0
    for r in rows:
        context = f"Question: {r['question']}\nAnswer:"
        ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
        lls = []
        for choice in r["choices"]:
            ids = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            cont = ids[len(ctx_ids):]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            lls.append(sum(logp[len(ids) - len(cont) - 1 + j, t].item() for j, t in enumerate(cont)))
        correct += int(max(range(len(lls)), key=lls.__getitem__) == r["answer"])
    entry = scores["dus_tiny_mc"]
    assert entry["samples"] == len(rows)
    assert entry["score"] == pytest.approx(correct / len(rows))
    assert "h6" not in scores


def test_h6_preset_lists_the_six_tasks_explicitly():
    assert [(t.name, t.num_fewshot, t.metric) for t in parse_tasks("h6")] == [
        ("arc_challenge", 25, "acc_norm"), ("hellaswag", 10, "acc_norm"), ("mmlu", 5, "acc"),
        ("truthfulqa_mc2", 0, "acc"), ("winogrande", 5, "acc"), ("gsm8k", 5, "exact_match,strict-match")]
    assert len(H6) == 6
    with pytest.raises(EvalError, match="shots must be a number"):
        parse_tasks("arc_challenge:x")


def test_unknown_task_is_a_clear_error(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    with pytest.raises(EvalError, match="unknown"):
        run_tasks(model, tok, parse_tasks("no_such_task"), use_default_tasks=False)


def test_tasks_without_lm_eval_say_how_to_install(monkeypatch, tiny_llama):
    import sys

    from helpers import assert_one_line_error, dus

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    assert_one_line_error(dus("eval", tiny_llama, "--tasks", "h6"), "pip install 'dus-plugin[eval]'")
