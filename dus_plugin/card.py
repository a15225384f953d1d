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

import yaml

from dus_plugin.errors import CardError, DusError
from dus_plugin.manifest import Manifest, TrainStage, manifest_sha256, stage_name

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
LAYOUT_WORDS = {
    "solar": " (SOLAR: the base twice, the last m layers of one copy and the first m of the other dropped)",
    "interpose": " (each of the layers [m, n−m) followed by its copy: SOLAR's depth and parameters, no seam)",
    "stack": " (the whole base repeated, G_stack)",
}
METHOD_WORDS = {
    "identity": " (output projections of the later copy of each duplicated layer zeroed: the stack starts as the "
                "base's function)",
    "average": " (the later copy of base layer i is the mean of base layers i and i+1, its output projections "
               "zeroed: the stack starts as the base's function)",
}


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
    sha = manifest_sha256(folder)
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


def _base_license(manifest: Manifest) -> str | None:
    from huggingface_hub import ModelCard

    readme = Path(manifest.base.local_path or "/nonexistent") / "README.md" if manifest.base else None
    if readme is None or not readme.is_file():
        return None
    try:
        return ModelCard.load(readme).data.license
    except Exception:  # a base card we cannot parse: no license to inherit
        return None


def default_title(manifest: Manifest, base_id: str | None) -> str:
    """'Mistral-7B-v0.1 depth up-scaled to 48 layers (10.73B)': what the model is, for a Hub reader."""
    from dus_plugin.plan import human_count

    if base_id:
        name = base_id.split("/")[-1]
    else:
        model_type = (manifest.base.config.get("model_type") if manifest.base else None) or "model"
        n = manifest.plan.n if manifest.plan else (manifest.base.config.get("num_hidden_layers") if manifest.base else "")
        name = f"A {n}-layer {model_type}".replace("A -layer", "A")
    if manifest.plan is None:
        return f"{name}, continued pretraining"
    size = f" ({human_count(manifest.plan.params_after)})" if manifest.plan.params_after else ""
    return f"{name} depth up-scaled to {manifest.plan.s} layers{size}"


def build_card(folder: str | Path, base_model: str | None = None, license: str | None = None,
               datasets: list[str] | None = None, title: str | None = None, results: list[Path] = ()):
    """The ModelCard for ``folder`` (an upscaled or trained folder with dus_manifest.json).

    The recipe files the card's commands name are written beside it, so they work from the pushed folder.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    try:
        manifest = Manifest.read(folder)
    except DusError as e:
        raise CardError(str(e)) from None
    train = manifest.last_train
    base_id = base_model or (manifest.base.hub_id if manifest.base else None)
    if base_id is None and not _shipped_base(manifest):  # the quickstart's own base has no Hub id to give
        LOG.warning("the base is a local folder, so the card cannot link it: set `base_model` (its Hub id)")
    title = title or default_title(manifest, base_id)
    all_results = _results(folder, list(results))
    if datasets is None and train:
        datasets = [s["path"][3:] for s in train.config["data"]["sources"] if s["path"].startswith("hf:")] or None
    data = ModelCardData(
        base_model=base_id, license=license or _base_license(manifest), datasets=datasets,
        library_name="transformers", pipeline_tag="image-text-to-text" if _multimodal(manifest) else "text-generation",
        model_name=title,
        tags=(["mergekit", "merge", "depth-up-scaling"] if manifest.plan else []) +
             (["continued-pretraining"] if train else []),
        eval_results=eval_results(_own_result(all_results, folder, "trained" if train else "upscaled"), title),
        base_model_relation="finetune" if train else "merge",
    )
    files = _recipe_files(folder, manifest, base_id)
    body = _body(title, manifest, base_id, all_results, folder, files)
    return ModelCard(_redact(f"---\n{data.to_yaml()}\n---\n\n{body}", _local_paths(folder, manifest)))


RECIPE_FILE = "dus_recipe.yml"
TRAIN_FILE = "dus_train.yml"
BASE_PLACEHOLDER = "BASE_MODEL_HUB_ID"


def _recipe_files(folder: Path, manifest: Manifest, base_id: str | None) -> dict[str, str]:
    """The mergekit recipe and training config as a reader can run them: the base named by its Hub id, the
    model and output folders relative to where the commands run. {file name: text}, also written to ``folder``."""
    from dus_plugin.io import atomic_write_text

    files: dict[str, str] = {}
    if manifest.recipe_yaml and manifest.base:
        text = manifest.recipe_yaml
        for local in {manifest.base.ref, manifest.base.local_path} - {None, base_id}:
            text = text.replace(str(local), base_id or BASE_PLACEHOLDER)
        files[RECIPE_FILE] = text
    if manifest.last_train:
        config = dict(manifest.last_train.config)
        config.update(model="upscaled" if manifest.plan else (base_id or BASE_PLACEHOLDER), output_dir="trained")
        config["data"] = {**config["data"], "sources": [
            {**src, "path": src["path"] if src["path"].startswith("hf:") else Path(src["path"]).name}
            for src in config["data"]["sources"]]}
        config["data"].pop("cache_dir", None)
        if config.get("eval", {}).get("text_files"):
            config["eval"] = {**config["eval"], "text_files": [Path(f).name for f in config["eval"]["text_files"]]}
        local = [s["path"] for s in config["data"]["sources"] if not s["path"].startswith("hf:")]
        local += config.get("eval", {}).get("text_files", [])
        header = "".join(["# This config reads files that are not published with the model:\n"]
                         + [f"#   {name}\n" for name in local]
                         + ["# Put them beside this file, or point the paths at your own copies.\n"]) if local else ""
        files[TRAIN_FILE] = header + yaml.safe_dump(config, sort_keys=False)
    for name, text in files.items():
        atomic_write_text(folder / name, text)
    return files


def _shipped_base(manifest: Manifest) -> bool:
    """The base is a folder inside the installed package (the quickstart's)."""
    import dus_plugin

    local = manifest.base.local_path if manifest.base else None
    return bool(local) and Path(local).resolve().is_relative_to(Path(dus_plugin.__file__).resolve().parent)


def _local_paths(folder: Path, manifest: Manifest) -> list[str]:
    """Paths of the machine the card is written on; none of them may reach a Hub reader."""
    paths = {str(folder.absolute()), str(Path.cwd()), str(Path.home())}
    if manifest.base:
        paths |= {manifest.base.local_path or "", manifest.base.ref if Path(manifest.base.ref).is_absolute() else ""}
    train = manifest.last_train
    if train:
        paths.add(train.from_ or "")
        paths |= {str(Path(s["path"]).parent) for s in train.config["data"]["sources"] if "/" in s["path"]}
    return sorted((p for p in paths if len(p) > 1), key=len, reverse=True)


def _redact(text: str, paths: list[str]) -> str:
    """Each local path becomes its last part (longest first, so a parent never splits a child)."""
    for p in paths:
        text = text.replace(p + "/", "").replace(p, Path(p).name)
    return text


def install_line() -> str:
    """How to install this dus-plugin, truthfully: from its repository until it is on the package index."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        urls = metadata("dus-plugin").get_all("Project-URL") or []
    except PackageNotFoundError:
        urls = []
    repo = next((u.split(",", 1)[1].strip() for u in urls if u.lower().startswith(("repository", "source"))), None)
    if repo:
        return f"pip install 'dus-plugin @ git+{repo}'"
    return "# dus-plugin is not on PyPI yet: clone its repository, then: pip install -c constraints.txt ."


def _body(title: str, manifest: Manifest, base_id: str | None, results: list[dict], folder: Path,
          files: dict[str, str]) -> str:
    from dus_plugin.eval.results import compare_table

    train = manifest.last_train
    lines = [f"# {title}", ""] + _summary(manifest, base_id) + [""]
    if manifest.plan:
        lines += _dus_section(manifest)
    lines += ["## Reproduce", "", "```bash", install_line()]
    if RECIPE_FILE in files:
        lines.append(f"dus upscale {RECIPE_FILE} upscaled/   # the merge, checked tensor by tensor")
    if TRAIN_FILE in files:
        lines.append(f"dus train {TRAIN_FILE}              # continued pretraining, as summarised below")
    lines += ["```", ""]
    if BASE_PLACEHOLDER in "".join(files.values()):
        lines += [f"Replace `{BASE_PLACEHOLDER}` with the base's Hub id: this model was made from a local copy.", ""]
    for name, text in files.items():
        lines += [f"`{name}` (in this repository):", "", "```yaml", text.strip(), "```", ""]
    if train:
        lines += _train_section(train, folder)
    lines += _family_tree(manifest)
    lines += _llama_cpp_section(folder)
    if results:
        lines += ["## Evaluation", "", compare_table(results), ""]
        if any("mmlu" in r.get("tasks", {}) for r in results):
            lines += ["MMLU is the equal-weight average over its 57 subjects, as the Open LLM Leaderboard v1 "
                      "reported it; H6 is the mean of the six task scores.", ""]
    v = manifest.versions
    lines += ["## Provenance", "",
              f"Made with dus-plugin {v.get('dus_plugin', '?')}, mergekit {v.get('mergekit', '?')}, "
              f"transformers {v.get('transformers', '?')} on {(manifest.created or '?')[:10]}"
              + (f"; base revision `{manifest.base.revision}`" if manifest.base and manifest.base.revision else "")
              + ".", "", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def _family_tree(manifest: Manifest) -> list[str]:
    """Where a merged model comes from: the base, each stage, and the parents each merge averaged."""
    from dus_plugin.manifest import MergeStage

    merges = [s for s in manifest.stages if isinstance(s, MergeStage)]
    if not merges:
        return []
    lines = ["## Family tree", "", "```", manifest.base_name()]
    for stage in manifest.stages:
        if not isinstance(stage, MergeStage):
            lines.append(f"└─ {stage_name(stage)}")
            continue
        how = f"slerp, t = {stage.t}" if stage.method == "slerp" else "linear"
        lines.append(f"└─ merge ({how}) of:")
        for p in stage.parents:
            weight = f" × {p.weight:g}" if p.weight is not None else ""
            lines.append(f"   ├─ {p.ref}{weight}" + (f"  ({' → '.join(p.stages)})" if p.stages else ""))
    return lines + ["```", ""]


def _summary(manifest: Manifest, base_id: str | None) -> list[str]:
    base_link = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else "a local base model"
    train = manifest.last_train
    plan = manifest.plan
    if plan is None:
        return [f"Continued pretraining of {base_link} (no depth up-scaling)."]
    return [f"A depth up-scaled (DUS) version of {base_link}, made as SOLAR 10.7B was made from Mistral 7B "
            f"(Kim et al., arXiv:2312.15166): the {plan.n}-layer base stacked on itself into {plan.s} layers"
            + (f", dropping m = {plan.m} layers at the seam of each copy" if plan.m else "")
            + (", then continued pretraining." if train else ". **Not trained after the merge**: the seam costs "
               "quality until continued pretraining heals it.")]


def _multimodal(manifest: Manifest) -> bool:
    from dus_plugin.architecture import is_multimodal

    return bool(manifest.base and manifest.base.config and is_multimodal(manifest.base.config))


def _dus_section(manifest: Manifest) -> list[str]:
    from dus_plugin.plan import human_count

    plan = manifest.plan
    layout = plan.layout or ("solar" if plan.m else "layers")
    lines = ["## Depth up-scaling", "",
             f"- layout: `{layout}`" + LAYOUT_WORDS.get(layout, ""),
             f"- base layers n = {plan.n}, " + (f"copies g = {plan.repeat}" if plan.repeat else
                                                f"overlap m = {plan.m or '—'}") + f", output layers s = {plan.s}",
             f"- method: `{manifest.method}`" + METHOD_WORDS.get(manifest.method, "")]
    if layout == "solar" or layout == "layers":
        lines.append(f"- seam after output layer {plan.seam[0] - 1}" if plan.seam else "- no seam")
    if plan.params_before is not None and plan.params_after is not None:
        lines.append(f"- parameters: {human_count(plan.params_before)} → {human_count(plan.params_after)}")
    if _multimodal(manifest):
        lines.append("- only the language tower grew (the layers its text config counts); the vision tower, the "
                     "projector, the embeddings and the head are the base's, bit for bit")
    lines += ["", "| output layers | copied from base layers |", "|---|---|"]
    out = 0
    for a, b in plan.slices:
        lines.append(f"| {out}–{out + b - a - 1} | {a}–{b - 1} |")
        out += b - a
    return lines + [""]


def _llama_cpp_section(folder: Path) -> list[str]:
    """How to run the model in llama.cpp, with the patch and the warning where this family needs them."""
    from dus_plugin.llamacpp import CONVERT_COMMAND, compat

    found = compat(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    lines = ["## Run in llama.cpp", "", "```bash",
             CONVERT_COMMAND.format(folder="MODEL_DIR", gguf="model.gguf") + "   # llama.cpp's own converter"]
    if found.needs_patch:
        lines.append("dus gguf-patch model.gguf MODEL_DIR   # adds the per-layer sliding-window pattern llama.cpp "
                     "would otherwise take from the layer index")
    lines += ["```", ""]
    if found.mismatch:
        lines += [f"**Warning:** llama.cpp computes this model differently from transformers: {found.mismatch}.", ""]
    elif not found.checked:
        lines += ["dus-plugin has not compared this family's logits in llama.cpp with transformers; check them "
                  "before relying on a GGUF.", ""]
    else:
        lines += ["With these steps llama.cpp computes what transformers computes for this family "
                  "(logits compared by dus-plugin's `benchmarks/gguf_compat.py`).", ""]
    return lines


def _train_section(train: TrainStage, folder: Path) -> list[str]:
    c = train.config
    sched = c.get("schedule", {})
    seam = c.get("seam", {})
    sources = ", ".join(f"`{s['path'] if s['path'].startswith('hf:') else Path(s['path']).name}` "
                        f"(weight {s.get('weight', 1)})" for s in c["data"]["sources"])
    lines = ["## Continued pretraining", "",
             f"- tokens seen: {train.tokens:,} in {train.steps:,} steps "
             f"(global batch {c['global_batch_size']} × {c['data']['seq_len']} tokens)",
             f"- optimizer: AdamW, peak LR {c['optimizer']['lr']}, weight decay {c['optimizer']['weight_decay']}, "
             f"{sched.get('kind', 'cosine')} schedule with {sched.get('warmup_steps', 0)} warmup steps; "
             f"precision {c.get('precision')}",
             f"- data: {sources}" + ("; documents masked from each other" if c["data"].get("document_mask") else ""),
             ]
    if seam.get("focus", "none") != "none":
        lines.append(f"- seam: only the `{seam['focus']}` layers trained for the first {seam['focus_steps']} steps")
    if train.val_loss is not None and train.loss is not None:
        lines.append(f"- final train loss {train.loss:.4f}, validation loss {train.val_loss:.4f}")
    if (folder / "loss_curve.png").is_file():
        lines += ["", "![loss curve](loss_curve.png)"]
    return lines + [""]


def write_card(folder: str | Path, **kwargs) -> Path:
    from dus_plugin.io import atomic_write_text

    card = build_card(folder, **kwargs)
    return atomic_write_text(Path(folder) / "README.md", str(card))
