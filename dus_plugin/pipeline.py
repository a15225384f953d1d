"""`dus run RECIPE`: plan -> upscale -> eval (before) -> continued pretraining -> eval (after) -> card -> push.

Every stage writes files and records what it was made from (see run_state): re-running a recipe
resumes where it stopped (training from its last checkpoint), skips what is done from the same
inputs, and redoes what changed, or refuses before discarding training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dus_plugin.errors import DusError, Interrupted, RecipeError, TrainingLaunchError
from dus_plugin.eval.settings import RunEvalSettings
from dus_plugin.io import atomic_write_text, file_sha256, read_yaml_mapping
from dus_plugin.merge import MergeOptions
from dus_plugin.planner import PlanOptions
from dus_plugin.run_state import Stage, StageRunner
from dus_plugin.upscale import EngineOptions
from dus_plugin.validation import HubId, deep_merged, first_error

LOG = logging.getLogger(__name__)
PKG = Path(__file__).parent


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PushSpec(Strict):
    repo_id: Optional[HubId] = None
    private: bool = False
    revision: Optional[str] = None


class LaunchSpec(Strict):
    """Run the training stage under `accelerate launch` (several GPUs, FSDP, DeepSpeed) instead of in-process."""

    config_file: Optional[str] = None
    """An accelerate config, e.g. pkg:train/fsdp.yaml (also: ddp.yaml, deepspeed_zero3.yaml)."""
    num_processes: Optional[int] = Field(None, gt=0)
    """Processes (GPUs) to start; default: the config file's."""
    args: list[str] = []
    """Further `accelerate launch` flags, e.g. [--main_process_port, "29501"]."""


class UpscaleSection(PlanOptions, EngineOptions):
    """The `upscale:` section: how to grow the base (`dus plan`'s options) and how to write it (`dus upscale`'s)."""


class MergeSection(MergeOptions):
    """The `merge:` section: `dus merge`'s options, and which models."""

    of: list[str] = Field(default_factory=lambda: ["sft", "dpo"], min_length=2)
    """The models to merge: the run's own stages by name (train, sft, dpo) or model folders."""


TRAINING_STAGES = {"train": "continued pretraining", "sft": "instruction tuning (sft)",
                   "dpo": "preference tuning (dpo)"}


class RunRecipe(Strict):
    name: str = "dus-run"
    base: str
    """Base model folder or Hub id."""
    base_model_id: Optional[HubId] = None
    """Hub id the card links when ``base`` is a local folder."""
    output_dir: str
    upscale: UpscaleSection = UpscaleSection()
    eval: RunEvalSettings
    train: dict[str, Any]
    """A training config (see configs/cpt_tiny.yml), inline or as the path of its YAML file (relative to the
    recipe). The run sets its model and output_dir."""
    sft: Optional[dict[str, Any]] = None
    """Instruction tuning after continued pretraining (SOLAR-Instruct's first step): a training config with chat
    data, inline or as a file; the run sets its model, output_dir and objective."""
    dpo: Optional[dict[str, Any]] = None
    """Preference tuning (DPO) after sft (or after train without sft): a training config with preference pairs."""
    merge: Optional[MergeSection] = None
    """Merge the tuned models (SOLAR-Instruct's last step); the merged model is the run's result."""
    launch: Optional[LaunchSpec] = None
    push: PushSpec = PushSpec()


def package_path(relative: str) -> Path:
    """A file shipped in dus_plugin; train/ and eval/ are subpackages that live outside its folder in a checkout."""
    head, _, rest = relative.partition("/")
    if head in ("train", "eval") and rest:
        import importlib

        return Path(importlib.import_module(f"dus_plugin.{head}").__file__).parent / rest
    return PKG / relative


def _resolve_pkg(value: Any) -> Any:
    """'pkg:quickstart_data/x' -> the file inside the installed dus_plugin package."""
    if isinstance(value, str) and value.startswith("pkg:"):
        return str(package_path(value[4:]))
    if isinstance(value, dict):
        return {k: _resolve_pkg(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_pkg(v) for v in value]
    return value


def default_recipe() -> Path:
    """The quickstart recipe shipped inside the package (configs/quickstart.yml links to it)."""
    return PKG / "quickstart_data" / "quickstart.yml"


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["train.max_steps=20", "output_dir=out/x"]`` -> nested dict; values are read as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise RecipeError(f"--set {item!r} is not KEY=VALUE; write a dotted key, e.g. --set train.max_steps=20")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise RecipeError(f"--set {item!r}: the value is not valid YAML; quote it") from None
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item!r} conflicts with another --set of {part!r}")
        node[parts[-1]] = value
    return out


def load_run_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> RunRecipe:
    path = Path(path)
    data = read_yaml_mapping(path, RecipeError, "run recipe", "start from configs/quickstart.yml")
    for key in TRAINING_STAGES:
        if isinstance(data.get(key), str):
            data[key] = _train_file(path, data[key], key)
    data = deep_merged(data, overrides or {})
    try:
        r = RunRecipe.model_validate(_resolve_pkg(data))
    except ValidationError as e:
        raise RecipeError(first_error(e, str(path), overrides=overrides)) from None
    return r


def _train_file(recipe: Path, name: str, key: str) -> dict[str, Any]:
    file = package_path(name[4:]) if name.startswith("pkg:") else recipe.parent / name
    return read_yaml_mapping(file, RecipeError, f"{recipe}: field {key}: training config",
                             "give a training YAML beside the recipe or the training fields inline")


def train_config(r: RunRecipe, where: str, overrides: dict[str, Any] | None = None, key: str = "train"):
    """A training stage's config: the recipe's section, with model, output_dir (and objective) set by the run."""
    from dus_plugin.train.config import TrainConfig

    fields = {**getattr(r, key), "model": str(stage_input(r, key)), "output_dir": str(Path(r.output_dir) / key)}
    if key != "train" and fields.setdefault("objective", key) != key:
        raise RecipeError(f"{where}: field {key}.objective is {fields['objective']}; the {key} section trains "
                          f"objective {key}: remove the key")
    try:
        cfg = TrainConfig.model_validate(fields)
    except ValidationError as e:
        raise RecipeError(first_error(e, f"{where} ({key})", overrides=overrides, prefix=f"{key}.")) from None
    if r.launch:  # checked now, not after the stages before training
        cfg.grad_accum(launch_processes(r.launch, where))
    return cfg


def stage_input(r: RunRecipe, key: str) -> Path:
    """The model folder a training stage starts from: the upscale, then each tuned model in turn."""
    out = Path(r.output_dir)
    before = {"train": out / "upscaled", "sft": out / "train" / "final",
              "dpo": out / ("sft" if r.sft is not None else "train") / "final"}
    return before[key]


def training_configs(r: RunRecipe, where: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every training stage the recipe has, validated before anything runs."""
    return {key: train_config(r, where, overrides, key) for key in TRAINING_STAGES if getattr(r, key) is not None}


def merge_inputs(r: RunRecipe, where: str) -> list[Path]:
    """The folders `merge.of` names: the run's own stages by name, or folders."""
    out, names = Path(r.output_dir), [m for m in r.merge.of] if r.merge else []
    for name in names:
        if name in TRAINING_STAGES and getattr(r, name) is None:
            raise RecipeError(f"{where}: field merge.of names {name}, but the recipe has no {name} section; name "
                              "stages it runs (train, sft, dpo) or model folders")
    return [out / name / "final" if name in TRAINING_STAGES else Path(name) for name in names]


def final_model(r: RunRecipe) -> Path:
    """The run's result: the merged model, else the last tuned one."""
    out = Path(r.output_dir)
    if r.merge is not None:
        return out / "merged"
    last = next(key for key in ("dpo", "sft", "train") if getattr(r, key) is not None)
    return out / last / "final"


def launch_processes(launch: LaunchSpec, where: str) -> int:
    """Processes the launch starts; reading the config file also checks that it exists and parses."""
    config = {} if not launch.config_file else read_yaml_mapping(
        launch.config_file, RecipeError, f"{where}: field launch.config_file:",
        "name an accelerate config such as pkg:train/fsdp.yaml")
    return launch.num_processes or int(config.get("num_processes") or 1)


@dataclass
class RunResult:
    table: str
    """The before/after table (also in summary.md)."""
    outputs: dict[str, Path]
    """What the run made, by what a person looks for: model, card, summary, loss curve."""


def run(recipe_path: str | Path, push: bool = False, quiet: bool = False, echo: Callable[[str], None] = print,
        overrides: dict[str, Any] | None = None, restart: bool = False, command: str | None = None) -> RunResult:
    """Run every stage not already done from the same inputs; return the table and where everything is.

    ``command`` is the command line that continues this run (the CLI's, with every override), for the interrupt note.
    """
    from dus_plugin.eval.results import compare_table, load_result

    r = load_run_recipe(recipe_path, overrides)
    out = Path(r.output_dir)
    configs = training_configs(r, str(recipe_path), overrides)
    merge_inputs(r, str(recipe_path))
    runner = StageRunner(out, _stages(r, configs, out, push, quiet, str(recipe_path)), echo, restart)
    try:
        runner.run_all()
    except (KeyboardInterrupt, Interrupted):  # training raises Interrupted, naming its own resume flag
        raise Interrupted(_interrupt_note(runner.current, out, command or f"dus run {recipe_path}")) from None
    paths = _paths(r)
    table = compare_table([load_result(p) for p in paths["results"]])
    final = paths["final"]
    outputs = {"model": final, "card": final / "README.md", "summary": out / "summary.md"}
    for key in configs:
        label = "" if key == "train" else f" ({key})"
        outputs[f"loss curve{label}"] = out / key / "final" / "loss_curve.png"
        outputs[f"metrics{label}"] = out / key / "metrics.jsonl"
    atomic_write_text(out / "summary.md", _summary_text(r.name, table, out, outputs, paths["results"]))
    return RunResult(table, outputs)


def _summary_text(name: str, table: str, out: Path, outputs: dict[str, Path], results: list[Path]) -> str:
    """The table, then where each thing the run made lies (relative to the summary, so the folder can move)."""
    where = [f"- {what}: `{path.relative_to(out)}`" for what, path in outputs.items() if what != "summary"]
    where += [f"- result file: `{path.relative_to(out)}`" for path in results]
    return f"# {name}\n\n{table}\n\n## Where everything is\n\n" + "\n".join(where) + "\n"


RESULT_LABELS = {"train": "trained", "sft": "sft", "dpo": "dpo", "merge": "merged"}


def _models(r: RunRecipe) -> dict[str, Path]:
    """Each stage that makes a model after the upscale, and its folder, in order."""
    out = Path(r.output_dir)
    made = {key: out / key / "final" for key in TRAINING_STAGES if getattr(r, key) is not None}
    if r.merge is not None:
        made["merge"] = out / "merged"
    return made


def _paths(r: RunRecipe) -> dict[str, Any]:
    out = Path(r.output_dir)
    up = out / "upscaled"
    results = [out / "eval" / "base.json", up / "eval" / "upscaled.json"]
    results += [folder / "eval" / f"{RESULT_LABELS[key]}.json" for key, folder in _models(r).items()]
    return {"recipe": out / "recipe.yml", "upscaled": up, "final": final_model(r), "results": results}


def _stages(r: RunRecipe, configs: dict[str, Any], out: Path, push: bool, quiet: bool, where: str) -> list[Stage]:
    from importlib.metadata import version

    from dus_plugin.card import write_card
    from dus_plugin.manifest import manifest_sha256
    from dus_plugin.upscale import UpscaleOptions, upscale

    p = _paths(r)
    up, final = p["upscaled"], p["final"]
    base_res, up_res, trained_res = p["results"][:3]
    train_final = out / "train" / "final"
    plan_keys = {f: f"upscale.{f}" for f in UpscaleSection.model_fields}
    eval_keys = {f: f"eval.{f}" for f in RunEvalSettings.model_fields}
    eval_spec = {"eval": r.eval.model_dump(mode="json")}
    plan_fields = r.upscale.model_dump(mode="json", include=set(PlanOptions.model_fields))
    engine = EngineOptions(**r.upscale.model_dump(include=set(EngineOptions.model_fields)))
    stages = [
        Stage("plan", "plan", _naming(lambda: _plan(r, p["recipe"]), plan_keys),
              lambda: {"base": r.base, "upscale": plan_fields}, (p["recipe"],)),
        Stage("upscale", "upscale + verify",
              _naming(lambda: upscale(p["recipe"], up, UpscaleOptions(**engine.model_dump(), quiet=quiet,
                                                                    overwrite=True, base_model_id=r.base_model_id)),
                      plan_keys),
              lambda: {"recipe.yml": file_sha256(p["recipe"]), "upscale": engine.model_dump(mode="json"),
                       "base_model_id": r.base_model_id,
                       "versions": {k: version(k) for k in ("mergekit", "transformers")}}, (up,), needs=("plan",)),
        Stage("eval_base", "eval base", _naming(lambda: _eval(r, _base_dir(r), base_res, "base", quiet), eval_keys),
              lambda: {"base": r.base, **eval_spec}, (base_res,)),
        Stage("eval_upscaled", "eval upscaled (before training)",
              _naming(lambda: _eval(r, up, up_res, "upscaled", quiet), eval_keys),
              lambda: {"upscaled": manifest_sha256(up), **eval_spec}, (up_res,), needs=("upscale",)),
        Stage("train", "continued pretraining",
              lambda: _train(_with_baseline(configs["train"], r), r.launch, out / "train_config.yml", quiet),
              lambda: {"train": r.train, "launch": r.launch and r.launch.model_dump(mode="json"),
                       "upscaled": manifest_sha256(up)}, (out / "train",), keeps_work=lambda: _has_training(out / "train"),
              needs=("upscale",)),
        Stage("eval_trained", "eval trained",
              _naming(lambda: _eval(r, train_final, trained_res, "trained", quiet), eval_keys),
              lambda: {"trained": manifest_sha256(train_final), **eval_spec}, (trained_res,), needs=("train",)),
        *_instruct_stages(r, configs, quiet, eval_keys, eval_spec),
        Stage("card", "model card", lambda: write_card(final, base_model=r.base_model_id,
                                                       results=p["results"][:-1]), always=True),
    ]
    if push:
        if not r.push.repo_id:
            raise RecipeError(f"{where}: field push.repo_id is empty; set it to push, e.g. me/{r.name}")
        from dus_plugin.hub import push as hub_push

        stages.append(Stage("push", "push", lambda: hub_push(final, r.push.repo_id, private=r.push.private,
                                                             revision=r.push.revision), always=True))
    return stages


def _instruct_stages(r: RunRecipe, configs: dict[str, Any], quiet: bool, eval_keys: dict[str, str],
                     eval_spec: dict[str, Any]) -> list[Stage]:
    """SOLAR-Instruct's stages after continued pretraining, those the recipe has: sft, dpo, merge, each followed
    by its evaluation."""
    from dus_plugin.manifest import manifest_sha256

    out, made, stages = Path(r.output_dir), _models(r), []
    previous = "train"
    for key in ("sft", "dpo"):
        if key not in configs:
            continue
        keys = {**{f: f"{key}.{f}" for f in type(configs[key]).model_fields}, "data.sources": f"{key}.data.sources"}
        stages.append(Stage(key, TRAINING_STAGES[key],
                            _naming(lambda key=key: _train(configs[key], r.launch, out / f"{key}_config.yml", quiet),
                                    keys),
                            lambda key=key, prev=previous: {key: getattr(r, key), "from": manifest_sha256(made[prev])},
                            (out / key,), keeps_work=lambda key=key: _has_training(out / key), needs=(previous,)))
        stages.append(_eval_stage(r, key, made[key], quiet, eval_keys, eval_spec))
        previous = key
    if r.merge is not None:
        stages.append(Stage("merge", "merge the tuned models", _naming(lambda: _merge(r, made["merge"], quiet),
                                                                        {f: f"merge.{f}" for f in MergeSection.model_fields}),
                            lambda: {"merge": r.merge.model_dump(mode="json"),
                                     "parents": [manifest_sha256(m) for m in merge_inputs(r, "")]},
                            (made["merge"],), needs=tuple(k for k in ("train", "sft", "dpo") if k in r.merge.of)))
        stages.append(_eval_stage(r, "merge", made["merge"], quiet, eval_keys, eval_spec))
    return stages


def _eval_stage(r: RunRecipe, key: str, model: Path, quiet: bool, eval_keys: dict[str, str],
                eval_spec: dict[str, Any]) -> Stage:
    from dus_plugin.manifest import manifest_sha256

    label = RESULT_LABELS[key]
    result = model / "eval" / f"{label}.json"
    return Stage(f"eval_{label}", f"eval {label}", _naming(lambda: _eval(r, model, result, label, quiet), eval_keys),
                 lambda: {label: manifest_sha256(model), **eval_spec}, (result,), needs=(key,))


def _merge(r: RunRecipe, out: Path, quiet: bool) -> None:
    from dus_plugin.merge import merge

    options = MergeOptions(**r.merge.model_dump(exclude={"of"}))
    merge([str(m) for m in merge_inputs(r, "")], out, options, quiet=quiet, overwrite=True)


def _has_training(stage_dir: Path) -> bool:
    from dus_plugin.train.checkpoint import latest

    return latest(stage_dir / "checkpoints") is not None or (stage_dir / "final").is_dir()


def _naming(fn: Callable[[], Any], keys: dict[str, str]) -> Callable[[], Any]:
    """Errors about a setting name it by its key in the run recipe."""
    def call() -> Any:
        try:
            return fn()
        except DusError as e:
            raise e.naming(keys) from None
    return call


def _interrupt_note(stage: str | None, out: Path, command: str) -> str:
    from dus_plugin.train.checkpoint import latest

    done = "nothing finished yet" if stage == "plan" else f"the stages before {stage} are finished in {out}"
    ckpt = latest(out / (stage if stage in TRAINING_STAGES else "train") / "checkpoints")
    kept = f"; training checkpoint {ckpt} is kept and training resumes from it" if ckpt else ""
    return f"interrupted during stage {stage}; {done}{kept}. Continue with: {command}"


def _plan(r: RunRecipe, path: Path) -> None:
    from dus_plugin.planner import make_recipe

    planned = make_recipe(r.base, r.upscale)
    atomic_write_text(path, planned.render(r.upscale.method, command=["dus", "run", r.name]))


def _base_dir(r: RunRecipe) -> Path:
    from dus_plugin.source import local_snapshot, resolve_base

    return local_snapshot(resolve_base(r.base))


def _eval(r: RunRecipe, model: Path, path: Path, label: str, quiet: bool) -> None:
    """One stage's evaluation; `eval.chat` applies to the tuned models only (sft, dpo, merged), as a base, an
    upscale and a continued-pretraining model have no chat format."""
    from dus_plugin.eval.run import evaluate

    settings = r.eval if label in ("sft", "dpo", "merged") else r.eval.model_copy(update={"chat": False})
    evaluate(model, settings, label=label, progress=not quiet, save_to=path)


def _with_baseline(cfg, r: RunRecipe):
    """The base's validation loss goes on the loss curve unless the recipe sets `train.baseline_model` itself.

    Not under `launch:`: every process would hold the whole base beside its shard of the grown model."""
    if "baseline_model" in r.train or r.launch is not None:
        return cfg
    return cfg.model_copy(update={"baseline_model": str(_base_dir(r))})


def _train(cfg, launch: LaunchSpec | None, config: Path, quiet: bool) -> None:
    """In-process on one device, or `accelerate launch` of `python -m dus_plugin.train` (resuming either way)."""
    if launch is None:
        from dus_plugin.train.loop import train

        train(cfg, resume=True, quiet=quiet)  # continues from a checkpoint if an earlier run stopped
        return
    import subprocess
    import sys

    atomic_write_text(config, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    command = [sys.executable, "-m", "dus_plugin.train.launch"]
    if launch.config_file:
        command += ["--config_file", launch.config_file]
    if launch.num_processes:
        command += ["--num_processes", str(launch.num_processes)]
    command += [*launch.args, "-m", "dus_plugin.train", str(config), "--resume"] + (["-q"] if quiet else [])
    LOG.info("launching: %s", " ".join(command))
    code = subprocess.call(command)
    if code != 0:
        raise TrainingLaunchError(f"accelerate launch exited with status {code} in the training stage (its output is "
                                  f"above); fix the cause and run again: training resumes from its last checkpoint")
