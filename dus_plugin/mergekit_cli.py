"""`dus mergekit-yaml`: mergekit's own CLI, made safe for the cases its users hit.

- Local model paths are made absolute first. mergekit's card step asks the Hub whether a relative path
  such as ``models/base`` is a repo, which fails offline after the weights were written.
- The output is written to a temporary folder beside OUT and renamed into place only when mergekit
  finished, so a failure never leaves a half-written OUT.
- Per-layer config lists follow the layer map (``configfix``); an unreachable Hub ends in one line.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from dus_plugin.errors import NetworkError, OutputExistsError, RecipeError, UpscaleError, first_line
from dus_plugin.io import read_yaml_mapping
from dus_plugin.recipe import AVERAGE_METHOD

MODEL_KEYS = ("model", "base_model", "tokenizer_source")


def absolute_models(doc: Any, root: Path) -> Any:
    """The recipe with every model path that exists locally (relative to ``root``) made absolute."""
    if isinstance(doc, dict):
        return {k: (_absolute(v, root) if k in MODEL_KEYS and isinstance(v, str) else absolute_models(v, root))
                for k, v in doc.items()}
    if isinstance(doc, list):
        return [absolute_models(v, root) for v in doc]
    return doc


def _absolute(value: str, root: Path) -> str:
    path, plus, lora = value.partition("+")  # mergekit's "model+lora" form
    local = root / path
    return str(local.resolve()) + plus + lora if path and local.exists() else value


def _one_base(doc: dict, config: Path) -> None:
    """A passthrough stack is grown from one base: its per-layer settings follow that base's layer map, which
    means nothing for slices of two models (a frankenmerge is stock mergekit's job)."""
    stacks = [doc.get("slices") or []] + [m.get("slices") or [] for m in (doc.get("modules") or {}).values()
                                          if isinstance(m, dict)]
    models = {src.get("model") for slices in stacks for sl in slices if isinstance(sl, dict)
              for src in sl.get("sources") or [] if isinstance(src, dict)}
    if doc.get("merge_method") == "passthrough" and len(models) > 1:
        raise RecipeError(f"{config} stacks slices of {len(models)} models ({', '.join(sorted(map(str, models)))}); "
                          "dus grows one base, so give every slice the same model, or run stock `mergekit-yaml` for "
                          "a merge of several models")


def run(config: Path, out: Path, mergekit_args: list[str]) -> Path:
    """Run mergekit-yaml on ``config`` into ``out`` (atomically); returns ``out``."""
    from mergekit.scripts.run_yaml import main as mergekit_main

    from dus_plugin.configfix import mergekit_per_layer_fix
    from dus_plugin.network import NETWORK_ERRORS, unreachable

    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"{out} is not empty; remove it or choose a new output folder", setting="out")
    doc = read_yaml_mapping(config, RecipeError, "mergekit config", "write one with `dus plan BASE -o recipe.yml`")
    if doc.get("merge_method") == AVERAGE_METHOD:
        raise RecipeError(f"{config} averages layers (merge_method {AVERAGE_METHOD}, method average), which mergekit "
                          f"cannot do; run it with `dus upscale {config} {out}`")
    _one_base(absolute_models(doc, Path.cwd()), config)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    recipe = tmp.parent / f".tmp-{out.name}.yml"
    recipe.write_text(yaml.safe_dump(absolute_models(doc, Path.cwd()), sort_keys=False))
    try:
        with mergekit_per_layer_fix():
            mergekit_main.main(args=[str(recipe), str(tmp), *mergekit_args], prog_name="dus mergekit-yaml",
                               standalone_mode=False)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except NETWORK_ERRORS as e:
        raise NetworkError(unreachable("the Hub", f"running mergekit on {config}", e)) from None
    except Exception as e:  # mergekit's own failure, e.g. a corrupt shard: one line, and no OUT
        raise UpscaleError(f"mergekit failed on {config}: {first_line(e)}; nothing was written to "
                           f"{out}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        recipe.unlink(missing_ok=True)
    return out
