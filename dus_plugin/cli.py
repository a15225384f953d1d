"""The `dus` command line: parse, call one library function, render errors as one line."""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from dus_plugin.logs import silence_benign
from dus_plugin.threads import share_cpus_politely
from dus_plugin.errors import DusError, Interrupted
from dus_plugin.eval.settings import FLAGS as EVAL_FLAGS
from dus_plugin.eval.settings import EvalSettings
from dus_plugin.merge import MergeOptions
from dus_plugin.options import for_command, model_options, pop_model
from dus_plugin.planner import PlanOptions
from dus_plugin.upscale import EngineOptions

LOG = logging.getLogger("dus_plugin")


def _quiet_libraries() -> None:
    """-q: no progress bars from huggingface_hub, transformers or accelerate either."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


WRITE_FAULTS = {errno.EROFS: "the location is read-only: choose a writable folder",
                errno.EACCES: "permission denied: choose a folder you can write to",
                errno.ENOSPC: "the disk is full: free space or choose another disk",
                errno.EDQUOT: "the disk quota is used up: free space or choose another disk"}
"""Faults of the machine, not of dus: one line naming the path, never a traceback (nothing half-written stays)."""


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("quiet"):
            _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            click.echo(f"interrupted: {for_command(e)}", err=True)
            sys.exit(130)
        except DusError as e:
            click.echo(f"error: {for_command(e)}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except OSError as e:
            if e.errno not in WRITE_FAULTS:
                raise
            click.echo(f"error: cannot write {e.filename or 'the output'}: {e.strerror}; "
                       f"{WRITE_FAULTS[e.errno]}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage is doing.")
@click.version_option(package_name="dus-plugin")
def main(verbose: bool) -> None:
    """Depth up-scaling (SOLAR) of language models through mergekit."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    share_cpus_politely()
    silence_benign()
    if not verbose:
        # transformers resets its logger's level when it is imported (later, lazily): tell it by env
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from huggingface_hub.utils import logging as hub_logging

        # its retry warnings repeat once per attempt; the one line a failure ends in says what happened
        hub_logging.set_verbosity_error()
        for noisy in ("mergekit", "huggingface_hub", "transformers", "lm_eval"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


@main.command()
@click.argument("base")
@model_options(PlanOptions, short={"drop": "-m"})
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the mergekit YAML here.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_handle_errors
def plan(base: str, output: Path | None, as_json: bool, **options: Any) -> None:
    """Plan a DUS of BASE (folder or Hub id): print the layer map, write stock mergekit YAML.

    --layout and --method choose where the copies go and how they start; which to pick, measured side by
    side: docs/reproduction.md, "Growth operators: which to choose"."""
    from dus_plugin.plan import format_layer_map
    from dus_plugin.planner import make_recipe

    plan_options = pop_model(PlanOptions, options)
    planned = make_recipe(base, plan_options)
    click.echo(json.dumps(planned.plan.to_dict(), indent=2) if as_json else format_layer_map(planned.plan))
    for note in planned.notes:
        click.echo(f"note: {note}", err=True)
    if output is not None:
        from dus_plugin.io import atomic_write_text

        replaced = output.exists()
        atomic_write_text(output, planned.render(plan_options.method, command=["dus", *sys.argv[1:]]))
        click.echo(f"wrote {output}" + (" (it replaced the file that was there)" if replaced else ""), err=True)


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The merged model's folder.")
@model_options(MergeOptions)
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Only write the stock mergekit YAML here (run it with mergekit-yaml); merge nothing.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it is not empty (only once the new one is complete).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_handle_errors
def merge(models: tuple[str, ...], output: Path | None, recipe: Path | None, overwrite: bool, quiet: bool,
          **options: Any) -> None:
    """Merge tuned variants of one model (SOLAR-Instruct's last step): the weighted mean (linear) or SLERP of
    MODELS, as stock mergekit YAML, every tensor checked against the parents. e.g.
    dus merge out/sft out/dpo --weights 0.3,0.7 -o out/merged"""
    from dus_plugin import merge as merging

    merge_options = pop_model(MergeOptions, options)
    if recipe is not None:
        from dus_plugin.io import atomic_write_text

        merging.check_parents(list(models))
        atomic_write_text(recipe, merging.render_merge_recipe(merging.merge_recipe(list(models), merge_options)))
        click.echo(f"wrote {recipe}", err=True)
        return
    if output is None:
        raise click.UsageError("give -o OUTPUT for the merged model (or --recipe FILE to write only the YAML)")
    m = merging.merge(list(models), output, merge_options, quiet=quiet, overwrite=overwrite)
    click.echo(f"merged {len(models)} models into {output} ({m.stages[-1].method}); "
               f"{m.stages[-1].tensors_checked} tensors checked against the parents")


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is not empty (only once the new one is complete).")
@click.option("--base-model-id", default=None, help="The base's Hub id, for the card, when the recipe reads a local copy.")
@model_options(EngineOptions)
@click.option("--no-verify", is_flag=True, help="Skip the tensor-by-tensor check against the base.")
@click.option("--no-forward", is_flag=True, help="Verify tensors but skip loading the model for a forward pass.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_handle_errors
def upscale(config: Path, out: Path, overwrite: bool, base_model_id: str | None, no_verify: bool, no_forward: bool,
            quiet: bool, **options: Any) -> None:
    """Run recipe CONFIG into OUT, write dus_manifest.json and verify."""
    from dus_plugin.errors import RecipeError
    from dus_plugin.upscale import UpscaleOptions
    from dus_plugin.upscale import upscale as run
    from dus_plugin.validation import validated

    m = run(config, out, validated(UpscaleOptions, RecipeError, **options, overwrite=overwrite, verify=not no_verify,
                                   forward=not no_forward, quiet=quiet, base_model_id=base_model_id))
    click.echo(f"upscaled {m.base.ref}: {m.plan.n} -> {m.plan.s} layers ({m.method}, {m.engine} engine), "
               f"{len(m.tensors or {})} tensors{'' if no_verify else ', verified'} -> {out}")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--base", default=None, help="Base folder or Hub id to compare against [default: the manifest's].")
@click.option("--no-forward", is_flag=True, help="Skip loading the model for a forward pass.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_handle_errors
def verify(out: Path, base: str | None, no_forward: bool, quiet: bool) -> None:
    """Check an upscaled folder: tensors vs plan, config, tokenizer, forward pass."""
    from dus_plugin.verify import verify as run

    r = run(out, base=base, forward=not no_forward, quiet=quiet)
    how = ("equal to the merge of their parents, recomputed from the parents' files" if r.against_parents else
           "finite (a trained export: its weights moved on from the upscale by design)" if r.trained else
           "bitwise equal to their planned base tensors" if r.against_base else
           "matching the manifest's hashes (base not found; pass --base)")
    click.echo(f"ok: {r.tensors} tensors {how}; config and tokenizer follow the plan"
               + ("; transformers forward pass ok" if r.forward else "")
               + (" (an image in the prompt)" if r.image else ""))


def _training_command(name: str, objective: str | None, doc: str) -> None:
    """`dus train`, `dus sft` and `dus dpo`: one trainer, one kind of YAML; sft and dpo set its objective."""

    @main.command(name, help=doc)
    @click.argument("config", type=click.Path(path_type=Path))
    @click.option("--resume", is_flag=True, help="Continue from the latest complete checkpoint.")
    @click.option("--overwrite", is_flag=True, help="Start over in an output folder that has checkpoints (removes them).")
    @click.option("--stop-after", type=int, default=None, metavar="N", help="Stop after step N with a checkpoint.")
    @click.option("--estimate", is_flag=True, help="Print the memory estimate per device and exit without training.")
    @click.option("--processes", type=int, default=1, show_default=True, help="With --estimate: processes (GPUs).")
    @click.option("--distributed-type", type=click.Choice(["NO", "MULTI_GPU", "FSDP", "DEEPSPEED"]), default=None,
                  help="With --estimate: accelerate's distributed type [default: NO for 1 process, else MULTI_GPU].")
    @click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
    @_handle_errors
    def command(config: Path, resume: bool, overwrite: bool, stop_after: int | None, estimate: bool, processes: int,
                distributed_type: str | None, quiet: bool) -> None:
        from dus_plugin.train.config import load_train_config
        from dus_plugin.train.loop import train as run

        if resume and overwrite:
            raise click.UsageError("--resume and --overwrite are alternatives; give one")
        cfg = load_train_config(config, objective=objective)
        if estimate:
            click.echo(_estimate(cfg, processes, distributed_type))
            return
        r = run(cfg, resume=resume, quiet=quiet, stop_after=stop_after, overwrite=overwrite,
                echo=None if quiet else click.echo)
        click.echo(r.summary())


_training_command("train", None, "Continued pretraining (or the YAML's objective) in one process; for several: "
                  "accelerate launch -m dus_plugin.train.")
_training_command("sft", "sft", "Instruction tuning: the loss on the assistant's turns of chat rows, conversations "
                  "packed (the training YAML with objective sft).")
_training_command("dpo", "dpo", "Preference tuning (DPO) on prompt/chosen/rejected rows against the starting model "
                  "(the training YAML with objective dpo).")


def _estimate(cfg, processes: int, distributed_type: str | None) -> str:
    import torch

    from dus_plugin.train import auto, memory

    kind = distributed_type or ("NO" if processes == 1 else "MULTI_GPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = auto.resolve(cfg, processes, kind, device, refuse=False)
    lines = [plan.report()]
    if cfg.memory_limit_gb:
        verdict = "fits" if plan.need.total <= cfg.memory_limit_gb * memory.GB else "does not fit"
        lines.append(f"{verdict} in memory_limit_gb {cfg.memory_limit_gb:g}")
    return "\n".join(lines)


@main.command("eval")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@model_options(EvalSettings, flags=EVAL_FLAGS)
@click.option("--no-default-tasks", is_flag=True, help="Index only --include-path tasks (faster start).")
@click.option("--limit", type=float, default=None, help="lm-eval: examples per task (for smoke runs).")
@click.option("--label", default=None, help="Column name in tables [default: base / upscaled / trained].")
@click.option("--compare", is_flag=True, help="PATHS are result files: print their before/after table.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the result JSON here [default: MODEL/eval/<label>.json; ./eval/ for a model shipped in the package].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_handle_errors
def eval_(paths: tuple[Path, ...], no_default_tasks: bool, limit: float | None, label: str | None, compare: bool,
          output: Path | None, quiet: bool, **options: Any) -> None:
    """Evaluate a model folder (perplexity on --text, lm-eval --tasks) into a result JSON;
    or, with --compare, print the table of result files: dus eval --compare base.json up.json."""
    from dus_plugin.eval import results as res

    if compare:
        if not paths:
            raise click.UsageError("--compare needs result files, e.g. dus eval --compare base.json trained.json")
        click.echo(res.compare_table([res.load_result(p) for p in paths]))
        return
    settings = pop_model(EvalSettings, options)
    if len(paths) != 1 or not (settings.text_files or settings.tasks):
        raise click.UsageError("give one MODEL folder with --text and/or --tasks, or --compare FILE...")
    model = paths[0]
    from dus_plugin.eval.run import evaluate

    path = output or res.default_result_path(model, label)
    from dus_plugin.io import check_writable, model_folder_problem

    if not model_folder_problem(model):  # else evaluate names the problem, and no folder is made for it
        check_writable(path)  # before the evaluation, so a read-only location loses no result
    result = evaluate(model, settings, use_default_tasks=not no_default_tasks, limit=limit, label=label,
                      progress=not quiet, save_to=path)
    click.echo(res.compare_table([result]))
    click.echo(f"wrote {path}", err=True)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--base-model", default=None, help="Hub id of the base, when the manifest only knows a local path.")
@click.option("--license", "license_", default=None, help="License id [default: the base's, when its card says].")
@click.option("--dataset", "datasets", multiple=True, help="Hub id of a training dataset (repeatable).")
@click.option("--results", multiple=True, type=click.Path(path_type=Path),
              help="Eval result JSON to include (copied into FOLDER/eval/; repeatable).")
@click.option("--title", default=None, help="Card title [default: <base> DUS <s> layers].")
@_handle_errors
def card(folder: Path, base_model: str | None, license_: str | None, datasets: tuple[str, ...],
         results: tuple[Path, ...], title: str | None) -> None:
    """Write FOLDER/README.md from the manifest, training record and eval results."""
    from dus_plugin.card import write_card

    path = write_card(folder, base_model=base_model, license=license_, datasets=list(datasets) or None,
                      title=title, results=list(results))
    click.echo(f"wrote {path}")


@main.command("gguf-patch")
@click.argument("gguf_file", metavar="FILE.gguf", type=click.Path(path_type=Path))
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_handle_errors
def gguf_patch(gguf_file: Path, model_dir: Path, quiet: bool) -> None:
    """Make llama.cpp compute MODEL_DIR's model as transformers does: add to FILE.gguf (converted from
    MODEL_DIR by llama.cpp's convert_hf_to_gguf.py) the per-layer settings its loader would otherwise
    pick by layer index. The file is replaced only once the patched copy is complete and checked."""
    from dus_plugin.gguf_patch import patch_gguf

    r = patch_gguf(gguf_file, model_dir, quiet=quiet)
    for key, value in r.written.items():
        shown = "".join("S" if v else "F" for v in value) if isinstance(value, list) else value
        click.echo(f"wrote {key} = {shown} (S sliding, F full attention)")
    if r.mismatch:
        click.echo(f"warning: llama.cpp will still compute this model differently from transformers: {r.mismatch}",
                   err=True)
    click.echo(f"patched {gguf_file}" if r.written else f"nothing to patch: llama.cpp already runs {gguf_file} "
               f"with {model_dir}'s per-layer settings")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="Target Hub repo, e.g. me/Mistral-DUS-10.7B.")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", default=None, help="Branch to push to [default: main]; created if missing.")
@click.option("--message", default=None, help="Commit message [default: names the recipe].")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded and its size; change nothing.")
@click.option("--allow-unlinked", is_flag=True, help="Push even though the card names no base_model.")
@_handle_errors
def push(folder: Path, repo_id: str, private: bool, revision: str | None, message: str | None, dry_run: bool,
         allow_unlinked: bool) -> None:
    """Verify FOLDER and upload it (weights, card, results) to the Hub in one commit."""
    from dus_plugin.hub import push as run
    from dus_plugin.plan import human_count

    r = run(folder, repo_id, private=private, revision=revision, dry_run=dry_run, message=message,
            allow_unlinked=allow_unlinked)
    if dry_run:
        for path, size in r.files:
            click.echo(f"{size:>14,}  {path}")
        click.echo(f"{len(r.files)} files, {r.total_bytes:,} bytes ({human_count(r.total_bytes)}B) "
                   f"would go to {repo_id}@{r.revision}")
    else:
        click.echo(f"pushed {len(r.files)} files to {repo_id}@{r.revision}: {r.commit_url}")


@main.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.option("--text", "texts", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Text sample (repeatable).")
@click.option("--max-length", type=int, default=512, show_default=True, help="Tokens per window.")
@click.option("--windows", type=int, default=16, show_default=True, help="Windows of text to average over.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("dus_analysis.png"),
              show_default=True, help="Heat-map PNG; the numbers go beside it as .json.")
@click.option("-q", "--quiet", is_flag=True)
@_handle_errors
def analyze(base: Path, texts: tuple[Path, ...], max_length: int, windows: int, output: Path, quiet: bool) -> None:
    """Angular distances between BASE's hidden states and a recommended overlap m for DUS."""
    from dus_plugin.analyze import analyze as run
    from dus_plugin.analyze import heatmap
    from dus_plugin.eval.perplexity import read_texts
    from dus_plugin.io import atomic_write_text

    a = run(base, read_texts(texts), max_length=max_length, max_windows=windows, progress=not quiet)
    heatmap(a, output)
    atomic_write_text(output.with_suffix(".json"), json.dumps(a.to_dict(), indent=2))
    click.echo(f"n = {a.n}; lowest seam cost right after upscaling: m = {a.recommended_m}: {a.reason}")
    click.echo(f"for the model after continued pretraining: {a.after_training}")
    click.echo("relative seam cost by m: " + ", ".join(f"{m}: {c:.3f}" for m, c in sorted(a.relative_cost.items())))
    for note in a.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {output} and {output.with_suffix('.json')}", err=True)


@main.command("run")
@click.argument("recipe", required=False, type=click.Path(path_type=Path))
@click.option("--push", "do_push", is_flag=True, help="Also push the trained folder (push.repo_id in the recipe).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, dotted, value as YAML (repeatable): --set train.max_steps=20")
@click.option("--restart", is_flag=True, help="Redo training too when the recipe changed (its output is removed).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (stage lines stay).")
@_handle_errors
def run_(recipe: Path | None, do_push: bool, sets: tuple[str, ...], restart: bool, quiet: bool) -> None:
    """Plan, upscale, evaluate, train, evaluate, card (and push): the whole recipe, resumable.
    Without RECIPE: the quickstart recipe shipped with the package (configs/quickstart.yml), on a
    32-layer base that ships with it too."""
    from dus_plugin.pipeline import default_recipe, parse_overrides, run

    result = run(recipe or default_recipe(), push=do_push, quiet=quiet, echo=click.echo,
                 overrides=parse_overrides(sets), restart=restart, command=_continue_command(recipe, sets, do_push))
    click.echo("\n" + result.table + "\n")
    width = max(12, *(len(what) + 2 for what in result.outputs))
    for what, path in result.outputs.items():
        if path.exists():
            click.echo(f"{what + ':':<{width}}{path}")


def _continue_command(recipe: Path | None, sets: tuple[str, ...], push: bool) -> str:
    """The command that continues an interrupted run: the same recipe and every --set (never --restart, which
    would discard the training checkpoints the interrupted run kept)."""
    import shlex

    args = ["dus", "run", *([str(recipe)] if recipe else [])]
    for item in sets:
        args += ["--set", item]
    return shlex.join(args + (["--push"] if push else []))


@main.command("mergekit-yaml", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.pass_context
@_handle_errors
def mergekit_yaml(ctx: click.Context, config: Path, out: Path) -> None:
    """mergekit's own `mergekit-yaml CONFIG OUT [options]`, with per-layer config lists fixed, local paths made
    absolute, and OUT written only when complete."""
    from dus_plugin.mergekit_cli import run

    click.echo(f"wrote {run(config, out, list(ctx.args))}")


if __name__ == "__main__":
    main()
