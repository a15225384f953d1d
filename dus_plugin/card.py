"""The model card: manifest + configs + eval results -> README.md with Hub metadata.

Built with huggingface_hub's ModelCard/ModelCardData; the title is written into the body
because ModelCardData stops passing `model_name` to the template once eval results are set.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from dus_plugin.errors import DusError
from dus_plugin.manifest import read_manifest

LOG = logging.getLogger(__name__)

CITATION = """@inproceedings{kim-etal-2024-solar,
  title     = {{SOLAR} 10.7{B}: Scaling Large Language Models with Simple yet Effective Depth Up-Scaling},
  author    = {Kim, Sanghoon and Kim, Dahyun and Park, Chanjun and Lee, Wonho and Song, Wonsung and Kim, Yunsu and
               Kim, Hyeonwoo and Kim, Yungi and Lee, Hyeonju and Kim, Jihoo and Ahn, Changbae and Yang, Seonghoon and
               Lee, Sukyung and Park, Hyunbyung and Gim, Gyoungjin and Cha, Mikyoung and Lee, Hwalsuk and Kim, Sunghun},
  booktitle = {Proceedings of NAACL 2024 (Industry Track)},
  year      = {2024},
  note      = {arXiv:2312.15166}
}"""

# lm-eval task -> (Hub dataset id, config, split) for model-index entries the Hub can link
TASK_DATASETS = {
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "mmlu": ("cais/mmlu", "all", "test"),
    "truthfulqa_mc2": ("truthfulqa/truthful_qa", "multiple_choice", "validation"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
    "gsm8k": ("openai/gsm8k", "main", "test"),
}
STAGE_ORDER = {"base": 0, "upscaled": 1, "trained": 2}


class CardError(DusError, ValueError):
    """The card cannot be written (no manifest, unreadable result file)."""


def _results(folder: Path, extra: list[Path]) -> list[dict[str, Any]]:
    from dus_plugin.eval.results import load_result

    eval_dir = folder / "eval"
    for f in extra:  # carry the given results inside the folder, so a push publishes them
        eval_dir.mkdir(exist_ok=True)
        if Path(f).absolute() != (eval_dir / Path(f).name).absolute():
            shutil.copy(f, eval_dir / Path(f).name)
    files = sorted(eval_dir.glob("*.json")) if eval_dir.is_dir() else []
    results = [load_result(f) for f in files if not f.name.startswith("step-")]
    return sorted(results, key=lambda r: (STAGE_ORDER.get(r.get("stage"), 9), r.get("step") or 0))


def _own_result(results: list[dict[str, Any]], folder: Path, stage: str) -> dict[str, Any] | None:
    import hashlib

    manifest = folder / "dus_manifest.json"
    sha = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return next((r for r in results if r.get("manifest_sha256") == sha), None) or \
        next((r for r in results if r.get("stage") == stage), None)


def eval_results(result: dict[str, Any] | None, model_name: str):
    from huggingface_hub import EvalResult

    if not result:
        return None
    out = []
    for task, entry in (result.get("tasks") or {}).items():
        if task == "h6":
            continue
        ds, config, split = TASK_DATASETS.get(task, (task, None, None))
        out.append(EvalResult(task_type="text-generation", dataset_type=ds, dataset_name=task, dataset_config=config,
                              dataset_split=split, metric_type=entry["metric"].split(",")[0],
                              metric_value=round(entry["score"] * 100, 2),
                              metric_name=f"{entry['metric']} ({entry.get('num_fewshot')}-shot)"))
    ppl = result.get("perplexity")
    if ppl:
        files = ", ".join(Path(f).name for f in ppl.get("files", [])) or "held-out text"
        out.append(EvalResult(task_type="text-generation", dataset_type="text", dataset_name=files,
                              metric_type="perplexity", metric_value=round(ppl["perplexity"], 4)))
    return out or None


def _base_license(manifest: dict[str, Any]) -> str | None:
    from huggingface_hub import ModelCard

    readme = Path(manifest["base"].get("local_path") or "/nonexistent") / "README.md"
    if not readme.is_file():
        return None
    try:
        return ModelCard.load(readme).data.license
    except Exception:  # a base card we cannot parse: no license to inherit
        return None


def build_card(folder: str | Path, base_model: str | None = None, license: str | None = None,
               datasets: list[str] | None = None, title: str | None = None, results: list[Path] = ()):
    """The ModelCard for ``folder`` (an upscaled or trained folder with dus_manifest.json)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except DusError as e:
        raise CardError(str(e)) from None
    train = next((s for s in reversed(manifest.get("stages", [])) if s["stage"] == "train"), None)
    stage = "trained" if train else "upscaled"
    base_id = base_model or manifest["base"].get("hub_id")
    if base_id is None:
        LOG.warning("base %s is a local folder, so the card cannot link it: pass --base-model HUB_ID to dus card, "
                    "or set base_model_id in a dus run recipe", manifest["base"]["ref"])
    plan = manifest["plan"]
    title = title or f"{(base_id or manifest['base']['ref']).split('/')[-1]} DUS {plan['s']} layers"
    all_results = _results(folder, list(results))
    if datasets is None and train:
        datasets = [s["path"][3:] for s in train["config"]["data"]["sources"] if s["path"].startswith("hf:")] or None
    data = ModelCardData(
        base_model=base_id, license=license or _base_license(manifest), datasets=datasets,
        library_name="transformers", pipeline_tag="text-generation", model_name=title,
        tags=["mergekit", "merge", "depth-up-scaling"] + (["continued-pretraining"] if train else []),
        eval_results=eval_results(_own_result(all_results, folder, stage), title),
        base_model_relation="finetune" if train else "merge",
    )
    body = _body(title, manifest, plan, base_id, train, all_results, folder)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _body(title: str, manifest: dict, plan: dict, base_id: str | None, train: dict | None,
          results: list[dict], folder: Path) -> str:
    from dus_plugin.eval.results import compare_table
    from dus_plugin.plan import human_count

    base_link = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{manifest['base']['ref']}`"
    lines = [f"# {title}", "",
             f"A depth up-scaled (DUS) version of {base_link}, made as SOLAR 10.7B was made from Mistral 7B "
             f"(Kim et al., arXiv:2312.15166): the {plan['n']}-layer base stacked on itself into {plan['s']} layers"
             + (f", dropping m = {plan['m']} layers at the seam of each copy" if plan.get("m") else "")
             + (", then continued pretraining." if train else ". **Not trained after the merge**: the seam costs "
                "quality until continued pretraining heals it."), "",
             "## Depth up-scaling", "",
             f"- base layers n = {plan['n']}, overlap m = {plan.get('m') or '—'}, output layers s = {plan['s']}",
             f"- method: `{manifest.get('method', 'solar')}`"
             + (" (output projections of the duplicated copies zeroed: the stack starts as the base's function)"
                if manifest.get("method") == "identity" else ""),
             f"- seam after output layer {plan['seam'][0] - 1}" if plan.get("seam") else "- no seam",
             ]
    if "params_before" in plan:
        lines.append(f"- parameters: {human_count(plan['params_before'])} → {human_count(plan['params_after'])}")
    lines += ["", "| output layers | copied from base layers |", "|---|---|"]
    out = 0
    for a, b in plan["slices"]:
        lines.append(f"| {out}–{out + b - a - 1} | {a}–{b - 1} |")
        out += b - a
    lines += ["", "## Reproduce", "", "The mergekit recipe (stock `passthrough`):", "", "```yaml",
              manifest.get("recipe_yaml", "").strip(), "```", "", "```bash", "pip install dus-plugin",
              f"dus upscale {manifest.get('recipe_file', 'recipe.yml')} out/   # mergekit + per-layer config fix + verification"]
    if train:
        lines.append("dus train cpt.yml                 # the training config summarised below")
    lines += ["```", ""]
    if train:
        lines += _train_section(train, folder)
    if results:
        lines += ["## Evaluation", "", compare_table(results), ""]
        if any("mmlu" in r.get("tasks", {}) for r in results):
            lines += ["MMLU is the equal-weight average over its 57 subjects, as the Open LLM Leaderboard v1 "
                      "reported it; H6 is the mean of the six task scores.", ""]
    v = manifest.get("versions", {})
    lines += ["## Provenance", "",
              f"Made with dus-plugin {v.get('dus_plugin', '?')}, mergekit {v.get('mergekit', '?')}, "
              f"transformers {v.get('transformers', '?')} on {manifest.get('created', '?')[:10]}"
              + (f"; base revision `{manifest['base']['revision']}`" if manifest["base"].get("revision") else "") + ".",
              "", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def _train_section(train: dict, folder: Path) -> list[str]:
    c = train["config"]
    sched = c.get("schedule", {})
    seam = c.get("seam", {})
    sources = ", ".join(f"`{s['path']}` (weight {s.get('weight', 1)})" for s in c["data"]["sources"])
    lines = ["## Continued pretraining", "",
             f"- tokens seen: {train['tokens']:,} in {train['steps']:,} steps "
             f"(global batch {c['global_batch_size']} × {c['data']['seq_len']} tokens)",
             f"- optimizer: AdamW, peak LR {c['optimizer']['lr']}, weight decay {c['optimizer']['weight_decay']}, "
             f"{sched.get('kind', 'cosine')} schedule with {sched.get('warmup_steps', 0)} warmup steps; "
             f"precision {c.get('precision')}",
             f"- data: {sources}" + ("; documents masked from each other" if c["data"].get("document_mask") else ""),
             ]
    if seam.get("focus", "none") != "none":
        lines.append(f"- seam: only the `{seam['focus']}` layers trained for the first {seam['focus_steps']} steps")
    if train.get("val_loss") is not None:
        lines.append(f"- final train loss {train['loss']:.4f}, validation loss {train['val_loss']:.4f}")
    if (folder / "loss_curve.png").is_file():
        lines += ["", "![loss curve](loss_curve.png)"]
    return lines + [""]


def write_card(folder: str | Path, **kwargs) -> Path:
    from dus_plugin.io import atomic_write_text

    card = build_card(folder, **kwargs)
    return atomic_write_text(Path(folder) / "README.md", str(card))
