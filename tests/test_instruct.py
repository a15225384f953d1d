"""Instruction tuning (dus sft) and preference tuning (dus dpo) on the trainer (issue 29)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dus_plugin.fixtures import make_tiny_model, make_tokenizer, tiny_corpus
from helpers import assert_one_line_error, dus, dus_ok, free_port, tensors

TEMPLATE = Path(__file__).parent / "data" / "chatml_tiny.jinja"


def _short(line: str) -> str:
    return " ".join(line.split()[:3])


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> dict[str, Path]:
    """A copying task as chat rows in three layouts, and preference pairs: the copy is chosen, a refusal with the
    words reversed rejected."""
    root = tmp_path_factory.mktemp("instruct")
    lines = [_short(x) for x in tiny_corpus(300, seed=3)]
    chats = [{"messages": [{"role": "user", "content": f"repeat: {a}"}, {"role": "assistant", "content": a}]}
             for a in lines[:150]]
    chats += [{"instruction": "repeat", "input": a, "output": a} for a in lines[150:200]]
    chats += [{"conversations": [{"from": "human", "value": f"repeat: {a}"}, {"from": "gpt", "value": a}]}
              for a in lines[200:250]]
    pairs = [{"prompt": f"repeat: {a}", "chosen": a, "rejected": "no, " + " ".join(reversed(a.split()))}
             for a in lines[:200]]
    files = {"chat": root / "chat.jsonl", "pairs": root / "pairs.jsonl"}
    files["chat"].write_text("\n".join(json.dumps(r) for r in chats) + "\n")
    files["pairs"].write_text("\n".join(json.dumps(r) for r in pairs) + "\n")
    files["model"] = make_tiny_model("llama", root / "model", layers=2)
    return files


def _config(tmp_path: Path, files: dict[str, Path], source: str, **over) -> Path:
    cfg = {"model": str(files["model"]), "output_dir": str(tmp_path / "run"), "chat_template": str(TEMPLATE),
           "data": {"sources": [{"path": str(files[source])}], "seq_len": 160, "val_fraction": 0.1},
           "micro_batch_size": 4, "global_batch_size": 8, "max_steps": 30, "precision": "fp32",
           "optimizer": {"lr": 3e-3, "weight_decay": 0.0}, "schedule": {"kind": "constant"},
           "log_every": 5, "eval_every": 0, "eval_on_start": True, "save_every": 0}
    cfg.update(over)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_only_the_assistants_tokens_carry_loss(chat_files):
    """Counted: the labelled tokens decode to exactly the replies and their end-of-turn marks, in every layout."""
    from dus_plugin.train.config import DataConfig
    from dus_plugin.train.instruct_data import IGNORE, ChatData, ChatTemplate

    template = ChatTemplate(make_tokenizer(), str(TEMPLATE))
    data = ChatData(DataConfig(sources=[{"path": str(chat_files["chat"])}], seq_len=160, val_fraction=0.0),
                    template, seed=0, total_samples=8)
    rows = [json.loads(line) for line in chat_files["chat"].read_text().splitlines()]
    replies = [r["messages"][1]["content"] if "messages" in r else
               r["conversations"][1]["value"] if "conversations" in r else r["output"] for r in rows]
    tok = template.tokenizer
    want = sum(len(tok(f"{reply}</s>\n", add_special_tokens=False)["input_ids"]) for reply in replies)
    split = data.splits[0]
    labelled = [lab[lab != IGNORE] for _, lab, _ in split.rows]
    assert sum(len(x) for x in labelled) == want
    assert all((lab == ids)[lab != IGNORE].all() for ids, lab, _ in split.rows)
    assert len(split.rows) < len(rows)  # packed: more than one conversation per row
    # positions restart at every conversation of a packed row, so none attends to another
    ids, lab, pos = split.rows[0]
    starts = [k for k in range(len(pos)) if pos[k] == 0]
    assert len(starts) >= 2 and all(tok.decode(ids[k:k + 5]) == "<s>user" for k in starts)
    assert tok.decode(ids[lab != IGNORE]).count("</s>") == len(starts)


def test_sft_lowers_the_loss_on_the_replies_and_records_the_stage(tmp_path, chat_files):
    cfg = _config(tmp_path, chat_files, "chat")
    dus_ok("sft", cfg, "-q")
    rows = _metrics(tmp_path / "run")
    first, last = rows[0]["val_loss"], [r for r in rows if "val_loss" in r][-1]["val_loss"]
    assert last < first - 0.5, (first, last)
    final = tmp_path / "run" / "final"
    manifest = json.loads((final / "dus_manifest.json").read_text())
    assert manifest["stages"][-1]["objective"] == "sft"
    # the model now answers in the template it was tuned with, and its tokenizer says so
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(final).chat_template == TEMPLATE.read_text()
    _chat_eval_runs_through_the_template(final, chat_files["model"])


def _chat_eval_runs_through_the_template(tuned: Path, base: Path) -> None:
    """lm-eval with `chat`: the requests go through the tuned model's template (the score moves with it), the
    result records it, and a base without a template is refused in one line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dus_plugin.eval.harness import parse_tasks, run_tasks
    from dus_plugin.eval.perplexity import EvalError

    model = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tuned)
    chat = run_tasks(model, tok, parse_tasks("dus_tiny_mc:0"), use_default_tasks=False, batch_size=4, chat=True)
    plain = run_tasks(model, tok, parse_tasks("dus_tiny_mc:0"), use_default_tasks=False, batch_size=4)
    assert chat["dus_tiny_mc"]["chat"] is True and plain["dus_tiny_mc"]["chat"] is False
    assert chat["dus_tiny_mc"]["metrics"] != plain["dus_tiny_mc"]["metrics"]
    with pytest.raises(EvalError, match="`chat`.*has none"):
        run_tasks(model, AutoTokenizer.from_pretrained(base), parse_tasks("dus_tiny_mc:0"), use_default_tasks=False,
                  chat=True)


def _margins(model_dir: Path, pairs: list[dict], template: Path) -> list[float]:
    """log p(chosen) - log p(rejected) of each pair's answer, with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chat = template.read_text()

    def answer_logp(prompt: str, answer: str) -> float:
        head = tok.apply_chat_template([{"role": "user", "content": prompt}], chat_template=chat, tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(head + f"{answer}</s>\n", add_special_tokens=False, return_tensors="pt")["input_ids"]
        n_head = len(tok(head, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
        return float(logp[n_head - 1:].sum())

    return [answer_logp(p["prompt"], p["chosen"]) - answer_logp(p["prompt"], p["rejected"]) for p in pairs]


def test_dpo_raises_the_chosen_minus_rejected_margin(tmp_path, chat_files):
    cfg = _config(tmp_path, chat_files, "pairs", max_steps=20, optimizer={"lr": 1e-3, "weight_decay": 0.0})
    dus_ok("dpo", cfg, "-q")
    pairs = [json.loads(line) for line in chat_files["pairs"].read_text().splitlines()][:40]
    before = _margins(chat_files["model"], pairs, TEMPLATE)
    after = _margins(tmp_path / "run" / "final", pairs, TEMPLATE)
    gain = sum(a - b for a, b in zip(after, before)) / len(pairs)
    assert gain > 1.0 and sum(a > b for a, b in zip(after, before)) >= 0.9 * len(pairs), gain
    rows = _metrics(tmp_path / "run")
    assert abs(rows[0]["val_loss"] - 0.6931) < 1e-3  # before any step the model is its own reference: log 2
    assert json.loads((tmp_path / "run" / "final" / "dus_manifest.json").read_text())["stages"][-1]["objective"] \
        == "dpo"


def test_dpo_resume_is_bit_exact(tmp_path, chat_files):
    """The resumed half compares with the reference measured at the start, not with the half-trained model."""
    straight = _config(tmp_path / "a", chat_files, "pairs", max_steps=6, eval_on_start=False)
    dus_ok("dpo", straight, "-q")
    halves = _config(tmp_path / "b", chat_files, "pairs", max_steps=6, eval_on_start=False)
    dus_ok("dpo", halves, "-q", "--stop-after", "3")
    dus_ok("dpo", halves, "-q", "--resume")
    a, b = tensors(tmp_path / "a" / "run" / "final"), tensors(tmp_path / "b" / "run" / "final")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_instruct_data_mistakes_are_one_line(tmp_path, chat_files):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no chat here"}) + "\n")
    files = {**chat_files, "bad": bad}
    line = assert_one_line_error(dus("sft", _config(tmp_path, files, "bad"), "-q"), "is not a chat row", "messages")
    assert str(bad) in line
    assert_one_line_error(dus("dpo", _config(tmp_path, files, "chat"), "-q"), "is not a preference pair",
                          "chosen")
    assert_one_line_error(dus("sft", _config(tmp_path, files, "chat", chat_template=str(tmp_path / "none.jinja")),
                              "-q"), "chat_template", "does not exist")
    assert_one_line_error(dus("sft", _config(tmp_path, files, "chat", objective="dpo"), "-q"), "objective",
                          "trains objective sft")
    assert not (tmp_path / "run" / "final").exists()


def test_dus_run_chains_sft_dpo_and_merge_after_training(tmp_path, chat_files):
    """The instruct recipe in `dus run`: train -> sft -> dpo -> merge, each evaluated; a re-run skips all."""
    from helpers import config

    recipe = yaml.safe_load((Path(__file__).parents[1] / "configs" / "quickstart.yml").read_text())
    short = {"max_steps": 4, "eval_every": 0, "save_every": 0, "log_every": 2}
    recipe.update(output_dir=str(tmp_path / "qs"), eval={**recipe["eval"], "max_length": 32})
    recipe["train"].update(short)
    tuned = {"chat_template": str(TEMPLATE), "micro_batch_size": 4, "global_batch_size": 4, "precision": "fp32",
             "optimizer": {"lr": 1e-3}, **short}
    recipe["sft"] = {**tuned, "data": {"sources": [{"path": str(chat_files["chat"])}], "seq_len": 128}}
    recipe["dpo"] = {**tuned, "data": {"sources": [{"path": str(chat_files["pairs"])}], "seq_len": 128}}
    recipe["merge"] = {"of": ["sft", "dpo"], "method": "slerp", "t": 0.5}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    first = dus_ok("run", tmp_path / "r.yml", "-q")
    assert "| metric | base | upscaled | trained | sft | dpo | merged |" in first.output, first.output
    out = tmp_path / "qs"
    dpo = json.loads((out / "dpo" / "final" / "dus_manifest.json").read_text())
    assert [s.get("objective", s["stage"]) for s in dpo["stages"]] == ["upscale", "lm", "sft", "dpo"]
    merged = json.loads((out / "merged" / "dus_manifest.json").read_text())["stages"][-1]
    assert merged["method"] == "slerp" and [p["stages"] for p in merged["parents"]] == \
        [["upscale", "train", "sft"], ["upscale", "train", "sft", "dpo"]]
    card = (out / "merged" / "README.md").read_text()
    assert "## Family tree" in card and "(upscale → train → sft → dpo)" in card
    assert config(out / "merged")["num_hidden_layers"] == 48
    again = dus_ok("run", tmp_path / "r.yml", "-q")
    assert again.output.count("from the same inputs, skipped") == 12, again.output
    assert f"{'model:':<18}{out / 'merged'}" in again.output  # paths in one column after the longest name
    assert f"loss curve (dpo): {out / 'dpo' / 'final' / 'loss_curve.png'}" in again.output


def test_the_papers_instruct_recipe_validates_and_its_template_masks_the_answers():
    """configs/recipe_solar_instruct.yml: every stage's config validates; the shipped SOLAR chat template renders
    turns as prefixes, so only the assistant's text and its EOS carry loss; OpenOrca's columns map to a chat."""
    from dus_plugin.pipeline import final_model, load_run_recipe, merge_inputs, package_path, training_configs
    from dus_plugin.train.instruct_data import IGNORE, ChatTemplate, conversation, renamed

    repo = Path(__file__).parents[1]
    r = load_run_recipe(repo / "configs" / "recipe_solar_instruct.yml")
    configs = training_configs(r, "recipe_solar_instruct.yml")
    assert [c.objective for c in configs.values()] == ["lm", "sft", "dpo"]
    assert configs["sft"].model == "out/solar-instruct-run/train/final"
    assert configs["dpo"].model == "out/solar-instruct-run/sft/final"
    assert merge_inputs(r, "x") == [Path("out/solar-instruct-run/sft/final"), Path("out/solar-instruct-run/dpo/final")]
    assert final_model(r) == Path("out/solar-instruct-run/merged")
    assert configs["sft"].chat_template == str(package_path("chat_templates/solar.jinja"))

    orca = {"id": "x", "system_prompt": "Be brief.", "question": "repeat: a b", "response": "a b"}
    messages = conversation(renamed(orca, configs["sft"].data.sources[1].columns, "orca"), "orca")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    tok = make_tokenizer()
    template = ChatTemplate(tok, configs["sft"].chat_template)
    assert template.render(messages) == "### System:\nBe brief.\n\n### User:\nrepeat: a b\n\n### Assistant:\na b</s>\n\n"
    ids, mask = template.encode(messages + [{"role": "user", "content": "again"},
                                            {"role": "assistant", "content": "a b a"}], "x")
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "a b</s>\n\na b a</s>\n\n"
    assert IGNORE == -100


def test_a_template_whose_turns_are_not_prefixes_is_refused(tmp_path):
    """A template that renders the last turn differently (here: no trailing newline) cannot be masked by
    prefixes; the error names chat_template."""
    from dus_plugin.errors import TrainConfigError
    from dus_plugin.train.instruct_data import ChatTemplate

    odd = tmp_path / "odd.jinja"
    odd.write_text("{% for m in messages %}{{ m['content'] }}{% if not loop.last %}|{% endif %}{% endfor %}"
                   "{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(TrainConfigError, match="chat_template"):
        ChatTemplate(make_tokenizer(), str(odd)).encode([{"role": "user", "content": "a"},
                                                         {"role": "assistant", "content": "b"}], "row 1")


def test_dpo_under_a_two_process_accelerate_launch_matches_one_process(tmp_path, chat_files):
    """DPO as `accelerate launch -m dus_plugin.train` on 2 CPU ranks (gloo): each rank measures the reference of the
    rows the run will see, and the run follows the one-process run with the same global batch."""
    import os
    import subprocess
    import sys

    one = _config(tmp_path / "one", chat_files, "pairs", objective="dpo", max_steps=6, micro_batch_size=2,
                  eval_on_start=False, log_every=1)
    dus_ok("train", one, "-q")
    two = _config(tmp_path / "two", chat_files, "pairs", objective="dpo", max_steps=6, micro_batch_size=2,
                  eval_on_start=False, log_every=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    proc = subprocess.run([str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
                           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                           "--main_process_port", free_port(), "--dynamo_backend", "no", "-m", "dus_plugin.train",
                           str(two), "-q"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _metrics(tmp_path / "one" / "run"), _metrics(tmp_path / "two" / "run")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert all(abs(x["loss"] - y["loss"]) < 1e-4 for x, y in zip(a, b)), [(x["loss"], y["loss"]) for x, y in zip(a, b)]
    assert json.loads((tmp_path / "two" / "run" / "train_summary.json").read_text())["processes"] == 2
