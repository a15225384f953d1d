"""Run a DUS recipe through mergekit's engine into a temporary folder, record, verify, rename."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

import yaml
from pydantic import BaseModel as PydanticModel
from pydantic import ConfigDict, field_validator

from dus_plugin import __version__
from dus_plugin.configfix import mergekit_per_layer_fix
from dus_plugin.errors import (BaseModelError, DusError, Interrupted, OutputExistsError, RecipeError, UpscaleError,
                               first_line)
from dus_plugin.io import TOKENIZER_MODEL_FILES, parse_size
from dus_plugin.validation import HubId
from dus_plugin.manifest import Manifest, UpscaleStage
from dus_plugin.plan import recognise
from dus_plugin.recipe import AVERAGE_METHOD, Recipe, check_against_base, load_recipe
from dus_plugin.architecture import LayerStack
from dus_plugin.llamacpp import notes_for as llama_cpp_notes
from dus_plugin.source import ResolvedBase, base_tensor_names, local_snapshot, resolve_base
from dus_plugin.tensors import SAFETENSORS_DTYPES, check_readable, header_sha256, read_header, weight_map

LOG = logging.getLogger(__name__)
TMP_MARK = ".dus-tmp-"


class EngineOptions(PydanticModel):
    """How the weights are written; each field is a `dus upscale` flag and a key under `upscale:` in a run recipe."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    engine: Literal["auto", "stream", "mergekit"] = "auto"
    """auto: the streaming writer for pure passthrough plans, else mergekit; or force stream / mergekit."""
    shard_size: Union[str, int] = "5B"
    """Output shard size in bytes, mergekit's syntax (5B = 5e9 bytes, 500M)."""

    @field_validator("shard_size")
    @classmethod
    def _is_size(cls, value: str | int) -> str | int:
        parse_size(value)
        return value

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)


class UpscaleOptions(EngineOptions):
    base_model_id: Optional[HubId] = None
    """The base's Hub id, recorded for the card when the recipe reads the base from a local folder."""
    overwrite: bool = False
    verify: bool = True
    forward: bool = True
    """Let verification load the result with transformers and run a forward pass."""
    quiet: bool = False


def prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder {out} exists and is not empty; set `overwrite` or choose another folder",
                                setting="overwrite")
    for stale in out.parent.glob(f".{out.name}{TMP_MARK}*") if out.parent.is_dir() else []:
        LOG.info("removing %s, left by an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)


def upscale(recipe_path: str | Path, out: str | Path, options: UpscaleOptions | None = None) -> Manifest:
    """Merge ``recipe_path`` into ``out``; return the manifest. Nothing is left behind on failure."""
    options = options or UpscaleOptions()
    out = Path(out).absolute()
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    base = resolve_base(recipe.model)
    names = base_tensor_names(base)
    if names is not None:  # the stack as the files name it
        base.arch.check_tensor_names(names)
    stack = base.arch.stack
    check_against_base(recipe, base.arch.n, where=str(recipe_path))
    base.arch.check_layers(recipe.layer_map)  # refuses a layer map the family's config cannot express
    for line in llama_cpp_notes(base.config, recipe.layer_map):
        LOG.warning(line)
    _check_filters(recipe, base, stack, str(recipe_path))
    _check_vocab(recipe, base, str(recipe_path))
    prepare_output(out, options.overwrite)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        base_dir, engine, hashes = _run_engine(recipe, recipe_path.read_text(encoding="utf-8"), base, stack, tmp,
                                               options)
        manifest = build_manifest(recipe, recipe_path, base, base_dir, tmp, stack, quiet=options.quiet, hashes=hashes)
        manifest.engine = engine
        if options.base_model_id:
            manifest.base.hub_id = options.base_model_id
        manifest.write(tmp)
        if options.verify:
            from dus_plugin.verify import verify

            verify(tmp, base=base_dir, forward=options.forward, quiet=options.quiet, arch=base.arch)
        _commit(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"upscale stopped; its partial output was removed and {out} is unchanged; "
                              "run the same command again") from None
        raise
    LOG.info("upscaled %s -> %s (%d layers)", recipe.model, out, manifest.plan.s)
    return manifest


def _check_filters(recipe: Recipe, base: ResolvedBase, stack: LayerStack, where: str) -> None:
    filters = {f for fs in recipe.zeroed_outputs().values() for f in fs}
    if not filters:
        return
    if base.local_path is None or not any(base.local_path.glob("*.safetensors")):
        return  # a Hub base not downloaded yet: mergekit's run will tell
    names = [n for n in weight_map(base.local_path) if stack.index(n) is not None]
    for f in sorted(filters):
        if not any(f in n for n in names):
            raise RecipeError(
                f"{where}: scale filter {f!r} matches no layer tensor of {base.architecture}; "
                f"its layer tensors are {', '.join(sorted({stack.relative(n) for n in names}))}"
            )


def _check_vocab(recipe: Recipe, base: ResolvedBase, where: str) -> None:
    from dus_plugin.source import padded_vocab

    if recipe.tokenizer_source and (padded := padded_vocab(base)):
        raise RecipeError(
            f"{where}: field tokenizer_source: the base pads its vocabulary to {padded[0]} rows for {padded[1]} tokens, "
            "and mergekit would cut the embeddings to the tokenizer's size; remove tokenizer_source "
            "(mergekit then copies the tokenizer unchanged)")


def _run_engine(recipe: Recipe, recipe_text: str, base: ResolvedBase, stack: LayerStack, tmp: Path,
                options: UpscaleOptions) -> tuple[Path, str, dict[str, str] | None]:
    """(base folder, engine used, tensor hashes if the engine computed them)."""
    from dus_plugin.stream import stream_merge, streamable

    base_dir = local_snapshot(base)
    check_readable(base_dir)
    if not (base_dir / "tokenizer_config.json").is_file() or not any(
            (base_dir / f).is_file() for f in TOKENIZER_MODEL_FILES):
        raise BaseModelError(f"base {base.ref} has no tokenizer (tokenizer_config.json with tokenizer.json or "
                             "tokenizer.model); the upscaled model needs the base's tokenizer")
    if options.engine == "mergekit" and recipe.merge_method == AVERAGE_METHOD:
        raise RecipeError(f"`engine` mergekit cannot run merge_method {AVERAGE_METHOD} (method average): mergekit "
                          "has no per-layer mean; choose auto or stream", setting="engine")
    why = streamable(recipe) if options.engine != "mergekit" else "`engine` is mergekit"
    if why is None:
        LOG.info("streaming the plan tensor by tensor (pure passthrough)")
        return base_dir, "stream", stream_merge(recipe, recipe_text, base, base_dir, tmp,
                                                options.shard_bytes, stack, options.quiet)
    if options.engine == "stream":
        raise RecipeError(f"`engine` stream cannot run this recipe: {why}; choose auto or mergekit", setting="engine")
    from dus_plugin.source import mergekit_architectures
    from dus_plugin.stream import build_config

    if base.architecture not in mergekit_architectures():
        raise RecipeError(f"this recipe needs mergekit's engine ({why}), and mergekit has no definition of "
                          f"{base.architecture}; the streaming engine handles any family for plain copies and "
                          "zeroed projections (the recipes `dus plan` writes)")
    LOG.info("using mergekit's engine (%s)", why)
    _run_mergekit(recipe, recipe_text, base_dir, tmp, options)
    # mergekit writes the layer count under the key of its own definition; the config transformers
    # reads is rebuilt from the base's, as the streaming engine builds it
    build_config(base.config, recipe.layer_map, recipe.out_dtype or recipe.dtype, str(tmp))
    return base_dir, "mergekit", None


def _run_mergekit(recipe: Recipe, recipe_text: str, base_dir: Path, tmp: Path, options: UpscaleOptions) -> None:
    """Run mergekit's engine into ``tmp``."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    merge_config = MergeConfiguration.model_validate(yaml.safe_load(recipe_text))
    merge_options = MergeOptions(
        clone_tensors=True,  # duplicated layers would otherwise share storage on write
        copy_tokenizer=True,
        out_shard_size=options.shard_bytes,
        quiet=options.quiet,
        # mergekit's card looks every 'a/b' model name up on the Hub, which fails offline for a
        # relative local path; dus writes its own card (`dus card`) and keeps the YAML below.
        write_model_card=False,
    )
    LOG.info("merging %s with mergekit into %s", recipe.model, tmp)
    try:
        with mergekit_per_layer_fix(), _no_progress(options.quiet):
            run_merge(merge_config, str(tmp), options=merge_options, config_source=recipe_text)
    except DusError:
        raise
    except Exception as e:
        raise UpscaleError(f"mergekit failed: {first_line(e)}; nothing was written to the output") from None
    (tmp / "mergekit_config.yml").write_text(recipe_text, encoding="utf-8")
    for name in ("generation_config.json",):
        if (base_dir / name).is_file() and not (tmp / name).exists():
            shutil.copy(base_dir / name, tmp / name)


@contextlib.contextmanager
def _no_progress(quiet: bool) -> Iterator[None]:
    """Some of mergekit's progress bars ignore its quiet option; silence every tqdm while it runs."""
    import tqdm

    if not quiet:
        yield
        return
    original = tqdm.tqdm.__init__
    tqdm.tqdm.__init__ = functools.partialmethod(original, disable=True)  # type: ignore[method-assign]
    try:
        yield
    finally:
        tqdm.tqdm.__init__ = original  # type: ignore[method-assign]


def build_manifest(recipe: Recipe, recipe_path: Path, base: ResolvedBase, base_dir: Path, folder: Path,
                   stack: LayerStack, quiet: bool = False, hashes: dict[str, str] | None = None) -> Manifest:
    from importlib.metadata import version

    from dus_plugin.manifest import BaseRecord, LayersRecord, PlanRecord, ShardId, TensorRecord

    plan = recognise(base.arch.n, recipe.layer_map)  # with its layout (solar, interpose, stack) named
    plan = plan.with_params(base.arch.param_count(plan.layer_map))
    zeroed = recipe.zeroed_outputs()
    method = "average" if recipe.merge_method == AVERAGE_METHOD else "identity" if zeroed else "solar"
    return Manifest(
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        versions={"dus_plugin": __version__, "mergekit": version("mergekit"),
                  "transformers": version("transformers"), "torch": version("torch")},
        method=method,
        base=BaseRecord(
            ref=base.ref, hub_id=base.hub_id, revision=base.revision, local_path=str(base_dir.absolute()),
            architecture=base.architecture, config=base.config,
            # size + header hash identify a shard cheaply; the tensors' own hashes are below
            files={f: ShardId(size=(base_dir / f).stat().st_size, header_sha256=header_sha256(base_dir / f))
                   for f in sorted(set(weight_map(base_dir).values()))},
        ),
        recipe=recipe.model_dump(exclude_none=True),
        recipe_file=recipe_path.name,
        recipe_yaml=recipe_path.read_text(encoding="utf-8"),
        plan=PlanRecord(**plan.to_dict()),
        layers=LayersRecord(**stack.to_dict()),
        tensors={name: TensorRecord(**entry) for name, entry in _tensor_records(
            folder, stack, plan.layer_map, zeroed, recipe.averaged_outputs(), quiet, hashes).items()},
        stages=[UpscaleStage()],
    )


def _tensor_records(folder: Path, stack: LayerStack, layer_map: list[int], zeroed: dict[int, list[str]],
                    averaged: dict[int, int], quiet: bool, hashes: dict[str, str] | None) -> dict[str, dict[str, Any]]:
    from tqdm import tqdm

    from dus_plugin.stream import hash_file_tensors

    tensors: dict[str, dict[str, Any]] = {}
    files = sorted(set(weight_map(folder).values()))
    for file in tqdm(files, desc="Hashing output shards", disable=quiet or hashes is not None, unit="shard"):
        file_hashes = hashes if hashes is not None else hash_file_tensors(folder / file)
        for name, t in read_header(folder / file).items():
            i = stack.index(name)
            entry = {"source": name if i is None else stack.rename(name, layer_map[i]),
                     "dtype": SAFETENSORS_DTYPES.get(t.dtype, t.dtype.lower()), "shape": t.shape, "sha256": file_hashes[name]}
            if i is not None and any(f in name for f in zeroed.get(i, [])):
                entry["zeroed"] = True
            if i in averaged:
                entry["mean_with"] = stack.rename(name, averaged[i])
            tensors[name] = entry
    return tensors


def _commit(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an old folder is removed only after that works."""
    trash = None
    if out.exists():
        trash = out.parent / f".{out.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
    os.replace(tmp, out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
