"""`dus run RECIPE`: plan -> upscale -> eval (before) -> continued pretraining -> eval (after) -> card -> push.

Every stage writes files and skips itself when its output is already complete, so re-running a
recipe resumes where it stopped (training resumes from its last checkpoint) and never redoes work.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dus_plugin.errors import RecipeError, TrainingLaunchError
from dus_plugin.io import atomic_write_text, read_yaml_mapping
from dus_plugin.planning import PlanOptions
from dus_plugin.validation import first_error

LOG = logging.getLogger(__name__)
PKG = Path(__file__).parent


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvalSpec(Strict):
    text_files: list[str] = Field(min_length=1)
    max_length: int = Field(256, gt=1)
    stride: Optional[int] = None
    tasks: Optional[str] = None
    """lm-eval tasks (h6 or names), needs the [eval] extra."""
    include_paths: list[str] = []
    batch_size: int = Field(8, gt=0)


class PushSpec(Strict):
    repo_id: Optional[str] = None
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


class RunRecipe(Strict):
    name: str = "dus-run"
    base: str
    """Base model folder or Hub id."""
    base_model_id: Optional[str] = None
    """Hub id the card links when ``base`` is a local folder."""
    output_dir: str
    upscale: PlanOptions = PlanOptions()
    eval: EvalSpec
    train: dict[str, Any]
    """A training config (see configs/cpt_tiny.yml), inline or as the path of its YAML file (relative to the
    recipe). The run sets its model and output_dir."""
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


def _merge(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            _merge(data[key], value)
        else:
            data[key] = value
    return data


def load_run_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> RunRecipe:
    path = Path(path)
    data = read_yaml_mapping(path, RecipeError, "run recipe", "start from configs/quickstart.yml")
    if isinstance(data.get("train"), str):
        data["train"] = _train_file(path, data["train"])
    data = _merge(data, overrides or {})
    try:
        r = RunRecipe.model_validate(_resolve_pkg(data))
    except ValidationError as e:
        raise RecipeError(first_error(e, str(path))) from None
    return r


def _train_file(recipe: Path, name: str) -> dict[str, Any]:
    file = package_path(name[4:]) if name.startswith("pkg:") else recipe.parent / name
    return read_yaml_mapping(file, RecipeError, f"{recipe}: field train: training config",
                             "give a training YAML beside the recipe or the training fields inline")


def train_config(r: RunRecipe, where: str):
    """The training stage's config: the recipe's train fields, with model and output_dir set by the run."""
    from dus_plugin.train.config import TrainConfig

    out = Path(r.output_dir)
    try:
        cfg = TrainConfig.model_validate({**r.train, "model": str(out / "upscaled"), "output_dir": str(out / "train")})
    except ValidationError as e:
        raise RecipeError(first_error(e, f"{where} (train)")) from None
    if r.launch:  # checked now, not after the stages before training
        cfg.grad_accum(launch_processes(r.launch, where))
    return cfg


def launch_processes(launch: LaunchSpec, where: str) -> int:
    """Processes the launch starts; reading the config file also checks that it exists and parses."""
    config = {} if not launch.config_file else read_yaml_mapping(
        launch.config_file, RecipeError, f"{where}: field launch.config_file:",
        "name an accelerate config such as pkg:train/fsdp.yaml")
    return launch.num_processes or int(config.get("num_processes") or 1)


class Stages:
    """Numbered stage headers, timings and skip notes: one progress view across the run."""

    def __init__(self, total: int, echo: Callable[[str], None]):
        self.total, self.k, self.echo = total, 0, echo

    def run(self, name: str, done: bool, fn: Callable[[], Any]) -> Any:
        self.k += 1
        if done:
            self.echo(f"[{self.k}/{self.total}] {name}: already complete, skipped")
            return None
        self.echo(f"[{self.k}/{self.total}] {name} ...")
        t0 = time.perf_counter()
        out = fn()
        self.echo(f"[{self.k}/{self.total}] {name}: done in {time.perf_counter() - t0:.1f} s")
        return out


def run(recipe_path: str | Path, push: bool = False, quiet: bool = False, echo: Callable[[str], None] = print,
        overrides: dict[str, Any] | None = None) -> str:
    """Run every stage; return the before/after table (also written to OUTPUT_DIR/summary.md)."""
    from dus_plugin.card import write_card
    from dus_plugin.eval.results import compare_table, load_result
    from dus_plugin.upscale import UpscaleOptions, upscale

    r = load_run_recipe(recipe_path, overrides)
    out = Path(r.output_dir)
    up, final = out / "upscaled", out / "train" / "final"
    results = {"base": out / "eval" / "base.json", "upscaled": up / "eval" / "upscaled.json",
               "trained": final / "eval" / "trained.json"}
    train_cfg = train_config(r, str(recipe_path))
    stages = Stages(8 if push else 7, echo)
    stages.run("plan", (out / "recipe.yml").is_file(), lambda: _plan(r, out / "recipe.yml"))
    stages.run("upscale + verify", (up / "dus_manifest.json").is_file(),
               lambda: upscale(out / "recipe.yml", up, UpscaleOptions(quiet=quiet, overwrite=True, forward=True)))
    stages.run("eval base", results["base"].is_file(), lambda: _eval(r, _base_dir(r), results["base"], "base", quiet))
    stages.run("eval upscaled (before training)", results["upscaled"].is_file(),
               lambda: _eval(r, up, results["upscaled"], "upscaled", quiet))
    stages.run("continued pretraining", (final / "dus_manifest.json").is_file(), lambda: _train(train_cfg, r.launch, out, quiet))
    stages.run("eval trained", results["trained"].is_file(), lambda: _eval(r, final, results["trained"], "trained", quiet))
    stages.run("model card", False, lambda: write_card(final, base_model=r.base_model_id,
                                                         results=[results["base"], results["upscaled"]]))
    if push:
        if not r.push.repo_id:
            raise RecipeError(f"{recipe_path}: field push.repo_id is empty; set it to push, e.g. me/{r.name}")
        from dus_plugin.hub import push as hub_push

        stages.run("push", False, lambda: hub_push(final, r.push.repo_id, private=r.push.private,
                                                   revision=r.push.revision))
    table = compare_table([load_result(p) for p in results.values()])
    (out / "summary.md").write_text(f"# {r.name}\n\n{table}\n")
    return table


def _plan(r: RunRecipe, path: Path) -> None:
    from dus_plugin.planning import make_recipe

    planned = make_recipe(r.base, r.upscale)
    atomic_write_text(path, planned.render(r.upscale.method, command=["dus", "run", r.name]))


def _base_dir(r: RunRecipe) -> Path:
    from dus_plugin.source import local_snapshot, resolve_base

    return local_snapshot(resolve_base(r.base))


def _eval(r: RunRecipe, model: Path, path: Path, label: str, quiet: bool) -> None:
    from dus_plugin.eval.results import save_result
    from dus_plugin.eval.run import evaluate

    e = r.eval
    save_result(evaluate(model, texts=e.text_files, tasks=e.tasks, include_paths=e.include_paths,
                         max_length=e.max_length, stride=e.stride, batch_size=e.batch_size, label=label,
                         progress=not quiet), path)


def _train(cfg, launch: LaunchSpec | None, out: Path, quiet: bool) -> None:
    """In-process on one device, or `accelerate launch` of `python -m dus_plugin.train` (resuming either way)."""
    if launch is None:
        from dus_plugin.train.loop import train

        train(cfg, resume=True, quiet=quiet)  # continues from a checkpoint if an earlier run stopped
        return
    import subprocess
    import sys

    config = out / "train_config.yml"
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
