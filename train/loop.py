"""The trainer in parts, over accelerate (one GPU, DDP, FSDP or DeepSpeed alike): ``setup`` makes a ``Run``,
``fit`` takes its steps, ``finish`` exports and summarises; ``CheckpointManager`` owns the checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from dus_plugin.errors import DusError, Interrupted, TrainConfigError, TrainingDiverged
from dus_plugin.train import auto, checkpoint, memory
from dus_plugin.train.checkpoint import CheckpointManager
from dus_plugin.train.compiled import compile_model
from dus_plugin.train.config import TrainConfig, check_baseline_folder, check_model_folder, check_trains_on_text
from dus_plugin.train.data import Mixture, PackedData, check_sources
from dus_plugin.train.metrics import MetricsLog, plot_loss
from dus_plugin.train.profile import StepProfiler
from dus_plugin.train.schedule import LRSchedule
from dus_plugin.train.seam import freeze, param_groups, read_layout
from dus_plugin.stream import copy_tokenizer_files

LOG = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    loss: float | None
    val_loss: float | None
    output_dir: str
    export_dir: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    tokens_per_second: float | None = None
    processes: int = 1
    distributed_type: str = "NO"
    estimate_gb: float | None = None
    """The memory planner's figure per device, before the run."""
    peak_gpu_gb: float | None = None
    """torch.cuda.max_memory_allocated on this process's GPU (None on CPU)."""

    settings: dict[str, Any] = field(default_factory=dict)
    """What the auto settings became on this machine (activation_checkpointing, compile, fused_projections)."""

    already_finished: bool = False
    """``resume`` found the run finished; nothing was trained now."""

    def summary(self) -> str:
        """The line the CLIs print when a run ends."""
        head = f"already finished: {self.steps} steps" if self.already_finished else f"trained {self.steps} steps"
        return (f"{head}, {self.tokens} tokens"
                + (f"; loss {self.loss:.4f}" if self.loss is not None else "")
                + (f", validation loss {self.val_loss:.4f}" if self.val_loss is not None else "")
                + (f"; exported {self.export_dir}" if self.export_dir else ""))


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    # The Accelerator must be made first: a bare PartialState() would fix accelerate's shared state
    # without the launcher's ACCELERATE_USE_CPU, leaving every CPU process alone in its own world.
    # bf16 master weights compute in bf16 already; autocast is for float32 weights
    autocast = cfg.bf16_compute and cfg.master_weights == "fp32"
    accelerator = Accelerator(mixed_precision="bf16" if autocast else "no")
    accelerator.gradient_accumulation_steps = cfg.grad_accum(accelerator.num_processes)
    return accelerator


def _load_model(cfg: TrainConfig, accelerator):
    import torch
    from transformers import AutoTokenizer

    from dus_plugin.architecture import Architecture

    arch = Architecture.from_folder(cfg.model)
    frozen_bf16 = memory.frozen_in_file_dtype(cfg)
    dtype = torch.bfloat16 if cfg.master_weights == "bf16" or frozen_bf16 else torch.float32
    model = arch.model_class.from_pretrained(cfg.model, dtype=dtype, attn_implementation=attention_kind(cfg))
    model.config.use_cache = False
    trainable = freeze(model, cfg.train_only, read_layout(cfg.model), arch)

    if frozen_bf16:  # loaded as the files hold them; only what trains gets float32 master weights
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if cfg.train_only is not None:
        LOG.info("training %.3gB of %.3gB parameters (train_only)", trainable / 1e9,
                 sum(p.numel() for p in model.parameters()) / 1e9)
    if cfg.fused_projections:
        from dus_plugin.train.fused import fuse_projections

        fuse_projections(model)
    if cfg.precision == "fp8":
        from dus_plugin.train.fp8 import to_float8

        to_float8(model, cfg.fp8_recipe, cfg.fp8_weight_cast)
    _checkpoint_layers(cfg, model, arch)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    return model, tokenizer


def _checkpoint_layers(cfg: TrainConfig, model, arch) -> None:
    """Recompute the first K decoder layers in backward (all of them for full), as ``train.auto`` planned."""
    layers = arch.layers_of(model)
    count = memory.checkpointed_count(cfg, len(layers))
    if not count:
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23; the older name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for layer in list(layers)[count:]:
        layer.gradient_checkpointing = False


def _cap_gpu_memory(cfg: TrainConfig, accelerator) -> None:
    """memory_limit_gb on a GPU is enforced, not only planned for, so a smaller card is emulated faithfully."""
    if not cfg.memory_limit_gb or accelerator.device.type != "cuda":
        return
    import torch

    device = torch.cuda.current_device()  # accelerator.device may carry no index, which this call needs
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.memory_limit_gb * memory.GB / total), device)


def _optimizer(cfg: TrainConfig, model, accelerator):
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    groups = param_groups(model, cfg.seam, read_layout(cfg.model), cfg.optimizer.lr, cfg.optimizer.weight_decay)
    if cfg.optimizer.name == "adamw8bit":
        opt = _adamw8bit(cfg, groups)
    else:
        fused = cfg.optimizer.fused if cfg.optimizer.fused is not None else accelerator.device.type == "cuda"
        opt = torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=cfg.optimizer.betas, eps=cfg.optimizer.eps,
                                fused=fused)
    total = cfg.total_steps()
    frozen_until = cfg.seam.focus_steps if cfg.seam.focus != "none" else 0
    lambdas = [LRSchedule(cfg.schedule, total, frozen_until, g["focus"]) for g in groups]
    return opt, LambdaLR(opt, lambdas)


def _adamw8bit(cfg: TrainConfig, groups: list[dict[str, Any]]):
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        raise TrainConfigError("optimizer.name: adamw8bit needs torchao; install the [lowmem] extra "
                               "(pip install -e '.[lowmem]')") from None
    # bf16 weights keep an update smaller than their last bit only through stochastic rounding
    return AdamW8bit(groups, lr=cfg.optimizer.lr, betas=cfg.optimizer.betas, eps=cfg.optimizer.eps,
                     bf16_stochastic_round=cfg.master_weights == "bf16")


@dataclass
class Run:
    """What ``setup`` made and ``fit`` and ``finish`` use: the prepared model and optimizer, the data, the
    checkpoint manager, the metrics, and the progress so far."""

    cfg: TrainConfig
    accelerator: Any
    checkpoints: CheckpointManager
    model: Any
    tokenizer: Any
    data: Mixture
    opt: Any
    sched: Any
    metrics: MetricsLog
    hook: Any
    estimate_gb: float
    start: int = 0
    tokens_seen: int = 0
    baseline_loss: float | None = None
    last_loss: float | None = None
    last_val: float | None = None
    rate: float | None = None
    phase_losses: dict[str, list[float]] = field(default_factory=dict)


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False, stop_after: int | None = None,
          overwrite: bool = False, echo: Callable[[str], Any] | None = None) -> TrainResult:
    """Run (or resume) the configured training: ``setup`` -> ``fit`` -> ``finish``; return what it did.

    ``stop_after``: end after this many steps (counted from 0) with a checkpoint and no export,
    for jobs with a time budget; ``resume=True`` later continues the same schedule. An output folder
    with checkpoints needs ``resume`` (continue) or ``overwrite`` (start over); Ctrl-C raises
    Interrupted, whose message says what is on disk and how to continue. ``echo``: where the memory estimate
    is shown before the model loads [default: the log].
    """
    if cfg.precision == "fp8":  # before the Accelerator fixes this process's mixed precision
        from dus_plugin.train.fp8 import require_float8

        require_float8()
    check_trains_on_text(cfg.model)  # before the Accelerator and the output folder: the refusal touches nothing
    accelerator = _accelerator(cfg)
    checkpoints = CheckpointManager(cfg, accelerator)
    checkpoints.claim(resume, overwrite)
    if resume and (done := _finished(cfg, checkpoints)) is not None:
        return done
    run = setup(cfg, accelerator, checkpoints, resume, quiet, echo)
    end = run.cfg.total_steps() if stop_after is None else min(run.cfg.total_steps(), stop_after)
    fit(run, end, quiet)
    return finish(run, end)


def setup(cfg: TrainConfig, accelerator, checkpoints: CheckpointManager, resume: bool, quiet: bool,
          echo: Callable[[str], Any] | None) -> Run:
    """Everything before the first step: the data checked and tokenized, the memory planned, the baseline
    measured, the model and optimizer made and prepared, and the latest checkpoint loaded when resuming."""
    from accelerate.utils import set_seed

    check_sources(cfg.data)  # before the estimate and the model load: a typo costs nothing
    if cfg.objective != "lm":
        from dus_plugin.train.instruct_data import check_rows

        check_rows(cfg.data, cfg.objective, cfg.chat_template)
    check_model_folder(cfg.model)
    check_baseline_folder(cfg.baseline_model)
    set_seed(cfg.seed)
    plan = auto.resolve(cfg, accelerator.num_processes, accelerator.distributed_type.value, accelerator.device.type)
    cfg, need = plan.cfg, plan.need
    if accelerator.is_main_process:
        (echo or LOG.info)(plan.report())
        if plan.multimodal:
            (echo or LOG.info)("  multimodal: the language tower trains; the vision tower and projector stay frozen")
    _cap_gpu_memory(cfg, accelerator)
    model, tokenizer = _load_model(cfg, accelerator)
    data = _training_data(cfg, tokenizer, accelerator, quiet)
    opt, sched = _optimizer(cfg, model, accelerator)
    _attention_backend(cfg.attention_backend)
    if cfg.compile:
        model = compile_model(model, cfg.compile_scope)
    model, opt = accelerator.prepare(model, opt)
    accelerator.register_for_checkpointing(sched)
    start, tokens = checkpoints.resume() if resume else (0, 0)
    if cfg.objective == "dpo":
        _dpo_reference(cfg, model, data, accelerator, resume, progress=accelerator.is_main_process and not quiet)
    run = Run(cfg, accelerator, checkpoints, model, tokenizer, data, opt, sched,
              MetricsLog(Path(cfg.output_dir), accelerator.is_main_process, cfg.tensorboard, resume_step=start),
              _eval_hook(cfg), round(need.total / 1e9, 2), start, tokens)
    if cfg.baseline_model and start == 0:
        run.baseline_loss = baseline_loss(cfg, data, accelerator)
    return run


def _training_data(cfg: TrainConfig, tokenizer, accelerator, quiet: bool) -> Mixture:
    """The objective's data (packed text, packed chats or preference pairs); the main process goes first, so
    the others read its token cache."""
    failed = None
    with accelerator.main_process_first():
        try:
            return _make_data(cfg, tokenizer, accelerator.is_main_process and not quiet)
        except DusError as e:  # leave through the barrier, or the other ranks die waiting at it
            failed = e
    raise failed


def _make_data(cfg: TrainConfig, tokenizer, show_progress: bool) -> Mixture:
    samples = cfg.total_steps() * cfg.global_batch_size
    if cfg.objective == "lm":
        return PackedData(cfg.data, tokenizer, Path(cfg.data.cache_dir or Path(cfg.output_dir) / "token_cache"),
                          cfg.seed, samples, show_progress=show_progress)
    from dus_plugin.train.instruct_data import ChatData, ChatTemplate, PreferenceData

    template = ChatTemplate(tokenizer, cfg.chat_template)
    if cfg.objective == "sft":
        return ChatData(cfg.data, template, cfg.seed, samples)
    return PreferenceData(cfg.data, template, cfg.seed, samples, cfg.dpo.beta)


def _dpo_reference(cfg: TrainConfig, model, data, accelerator, resume: bool, progress: bool) -> None:
    """DPO's reference log-probabilities: measured with the model as it starts, before any step, and kept in the
    output folder, so a resumed run compares with the same reference."""
    path = Path(cfg.output_dir) / "dpo_reference.npz"
    if resume and data.load_reference(path):
        return
    rows = {data.locate(i) for i in range(len(data.source_of))}  # only the pairs this run will train on
    rows |= set(data.val_index()[:cfg.val_batches * cfg.micro_batch_size * accelerator.num_processes])
    LOG.info("measuring the reference model's log-probabilities of %d pairs' answers", len(rows))
    data.measure_reference(model, accelerator.device, cfg.micro_batch_size, rows, progress)
    if accelerator.is_main_process:
        data.save_reference(path)


def fit(run: Run, end: int, quiet: bool) -> None:
    """The steps from ``run.start`` to ``end``, each followed by its logging, evaluation and checkpoint."""
    from tqdm import tqdm

    cfg, accelerator = run.cfg, run.accelerator
    if cfg.eval_on_start and run.start == 0 or run.baseline_loss is not None:
        _log_start(run)
    bar = tqdm(total=cfg.total_steps(), initial=run.start, desc="Training", unit="step",
               disable=not accelerator.is_main_process or quiet)
    profiler = StepProfiler(Path(cfg.output_dir), cfg.profile.start, cfg.profile.steps, accelerator.device.type) \
        if cfg.profile and accelerator.is_main_process else None
    clock = _Clock()
    run.model.train()
    step = run.start
    try:
        for step in range(run.start, end):
            loss = _profiled_step(run, step, profiler)
            _after_step(run, step, loss, clock, end)
            if run.rate is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{run.rate:.0f}")
            bar.update(1)
    except KeyboardInterrupt:
        raise Interrupted(_on_disk(run.checkpoints, step)) from None
    bar.close()
    run.metrics.close()


@dataclass
class _Clock:
    """Tokens since the last logged step, and when that was: the tokens/s of each log row."""

    since: float = field(default_factory=time.perf_counter)
    tokens: int = 0

    def rate(self) -> float:
        rate = self.tokens / (time.perf_counter() - self.since)
        self.since, self.tokens = time.perf_counter(), 0
        return rate


def _log_start(run: Run) -> None:
    """Step 0: validation loss before any update (the seam's cost), the held-out texts, the base's loss."""
    row: dict[str, Any] = {"step": 0, "tokens": 0}
    if run.cfg.eval_on_start:
        run.last_val = row["val_loss"] = validation_loss(run.cfg, run.model, run.data, run.accelerator)
        if run.hook is not None:
            row["val_perplexity"] = run.hook.run(run.model, run.tokenizer, 0, write=run.accelerator.is_main_process,
                                                 device=run.accelerator.device)["perplexity"]["perplexity"]
    if run.baseline_loss is not None:
        row["baseline_val_loss"] = run.baseline_loss
    run.metrics.log(row)


def _profiled_step(run: Run, step: int, profiler: StepProfiler | None) -> float:
    if profiler:
        profiler.step_begins(step)
    loss = _train_step(run.cfg, run.model, run.opt, run.data, run.accelerator, step,
                       run.cfg.grad_accum(run.accelerator.num_processes), run.accelerator.num_processes,
                       run.accelerator.process_index)
    if profiler and (written := profiler.step_done(step)):
        LOG.info("profile of steps %d-%d: %s", run.cfg.profile.start, step, written)
    if not math.isfinite(loss):
        good = run.checkpoints.latest()
        raise TrainingDiverged(
            f"loss became {loss} at step {step + 1}; weights were not updated with it and the last good "
            f"checkpoint is {good or 'none (set save_every)'}; lower optimizer.lr or set grad_clip")
    return loss


def _after_step(run: Run, step: int, loss: float, clock: _Clock, end: int) -> None:
    """The schedule moves on; the step is logged, evaluated and checkpointed at their cadence."""
    cfg, done, total = run.cfg, step + 1, run.cfg.total_steps()
    step_lr = float(max(run.sched.get_last_lr()))  # the rate this step used; sched.step() sets the next one
    run.sched.step()
    tokens = cfg.global_batch_size * cfg.data.seq_len
    run.tokens_seen += tokens
    clock.tokens += tokens
    run.last_loss = loss
    phase = "focus" if cfg.seam.focus != "none" and step < cfg.seam.focus_steps else "all"
    run.phase_losses.setdefault(phase, []).append(loss)
    row: dict[str, Any] = {}
    if done % cfg.log_every == 0 or done == total:
        run.rate = clock.rate()
        row = {"loss": loss, "lr": step_lr, "tokens_per_s": run.rate, "phase": phase}
    if (cfg.eval_every and done % cfg.eval_every == 0) or done == total:
        run.last_val = row["val_loss"] = validation_loss(cfg, run.model, run.data, run.accelerator)
    if run.hook is not None and run.hook.should_run(done, final=done == total):
        row["val_perplexity"] = run.hook.run(run.model, run.tokenizer, done, write=run.accelerator.is_main_process,
                                             device=run.accelerator.device)["perplexity"]["perplexity"]
    if row:
        run.metrics.log({"step": done, "tokens": run.tokens_seen, **row})
    if run.checkpoints.due(done, end):
        run.checkpoints.save(done, run.tokens_seen)


def finish(run: Run, end: int) -> TrainResult:
    """The result, the loss curve, the export (when the schedule is done) and train_summary.json."""
    accelerator, out = run.accelerator, Path(run.cfg.output_dir)
    result = TrainResult(end, run.tokens_seen, run.last_loss, run.last_val, str(out),
                         phases={k: sum(v) / len(v) for k, v in run.phase_losses.items()},
                         tokens_per_second=run.rate, processes=accelerator.num_processes,
                         distributed_type=str(accelerator.distributed_type.value), estimate_gb=run.estimate_gb,
                         peak_gpu_gb=_peak_gpu_gb(accelerator),
                         settings=run.cfg.model_dump(include=RESOLVED_SETTINGS))
    if accelerator.is_main_process:
        plot_loss(run.metrics.rows(), out / "loss_curve.png")
    if run.cfg.export and end == run.cfg.total_steps():
        result.export_dir = str(export(run.cfg, run.model, run.tokenizer, accelerator, result))
    if accelerator.is_main_process:
        (out / "train_summary.json").write_text(json.dumps(asdict(result), indent=2))
    accelerator.end_training()
    return result


def attention_kind(cfg: TrainConfig) -> str:
    """The transformers attention implementation the trained model loads with."""
    return "flex_attention" if cfg.attention_backend == "flex" else "sdpa"


RESOLVED_SETTINGS = {"activation_checkpointing", "compile", "fused_projections", "attention_backend"}
"""The settings ``auto`` decides on the machine; ``train_summary.json`` records what they became."""


def _attention_backend(name: str) -> None:
    """Leave only the chosen SDPA kernel enabled (process-wide, as torch.compile reads these flags when it traces)."""
    import torch

    if name in ("auto", "sdpa", "flex"):
        return
    torch.backends.cuda.enable_flash_sdp(name == "flash")
    torch.backends.cuda.enable_cudnn_sdp(name == "cudnn")
    torch.backends.cuda.enable_mem_efficient_sdp(name == "efficient")
    torch.backends.cuda.enable_math_sdp(True)  # the fallback for masks the fast kernels refuse (CPU, padding)


def _peak_gpu_gb(accelerator) -> float | None:
    import torch

    if accelerator.device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(accelerator.device) / 1e9, 2)


def _on_disk(checkpoints: CheckpointManager, step: int) -> str:
    last = checkpoints.latest()
    kept = [f"checkpoint {last}" if last else "no checkpoint yet (set save_every to checkpoint during the run)"]
    if (checkpoints.out / "metrics.jsonl").is_file():
        kept.append(f"metrics {checkpoints.out / 'metrics.jsonl'}")
    resume = (f"continue from {last.name} with `resume`" if last else "start again with `overwrite`")
    return f"training interrupted in step {step + 1}; kept: {', '.join(kept)}; {resume}"


def _finished(cfg: TrainConfig, checkpoints: CheckpointManager) -> TrainResult | None:
    """The finished run's result, when ``resume`` finds nothing left to do."""
    last = checkpoints.latest()
    summary = Path(cfg.output_dir) / "train_summary.json"
    if last is None or checkpoint.step_of(last) < cfg.total_steps() or not summary.is_file():
        return None
    result = TrainResult(**json.loads(summary.read_text()))
    result.already_finished = True
    return result


def _eval_hook(cfg: TrainConfig):
    """The eval/ hook when the config names held-out text; every process runs it (FSDP needs all)."""
    if not cfg.eval.text_files:
        return None
    from dus_plugin.eval.hook import EvalHook

    return EvalHook(cfg.eval, cfg.output_dir, seq_len=cfg.data.seq_len, model_dir=cfg.model)


def _train_step(cfg: TrainConfig, model, opt, data: Mixture, accelerator, step: int, accum: int,
                world: int, rank: int) -> float:
    """One optimizer step over ``accum`` micro-batches; returns the mean loss across processes.

    ``accelerator.accumulate`` owns the no-sync/sync and loss scaling, so DDP, FSDP and DeepSpeed
    (whose engine counts micro-steps itself) all see the same loop. A non-finite loss skips the
    update (except under DeepSpeed, whose engine steps inside backward).
    """
    import torch

    micro = cfg.micro_batch_size
    loss_sum = torch.zeros((), device=accelerator.device)
    mean = float("nan")
    for k in range(accum):
        first = ((step * accum + k) * world + rank) * micro
        batch = {key: v.to(accelerator.device) for key, v in data.batch(first, micro).items()}
        with accelerator.accumulate(model):
            loss = data.loss(model, batch)
            accelerator.backward(loss)
            loss_sum += loss.detach()
            if accelerator.sync_gradients:
                mean = accelerator.reduce(loss_sum, reduction="mean").item() / accum
                if math.isfinite(mean):
                    if cfg.grad_clip:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    opt.step()
                opt.zero_grad(set_to_none=True)
    return mean


def validation_loss(cfg: TrainConfig, model, data: Mixture, accelerator) -> float | None:
    """Mean token loss on the held-out rows (sharded across processes)."""
    import torch

    rows = data.val_rows()[: cfg.val_batches * cfg.micro_batch_size * accelerator.num_processes]
    if not rows:
        return None
    mine = rows[accelerator.process_index::accelerator.num_processes]
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for k in range(0, len(mine), cfg.micro_batch_size):
            chunk = mine[k:k + cfg.micro_batch_size]
            batch = {key: v.to(accelerator.device) for key, v in data.collate(chunk).items()}
            total[0] += data.loss(model, batch).double() * len(chunk)
            total[1] += len(chunk)
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1]).item()


def baseline_loss(cfg: TrainConfig, data: Mixture, accelerator) -> float | None:
    """``validation_loss`` of ``cfg.baseline_model`` (loaded beside the prepared model before any optimizer state
    exists, then freed): the line growth must beat."""
    import torch

    from dus_plugin.architecture import Architecture

    dtype = torch.bfloat16 if cfg.bf16_compute else torch.float32
    model = Architecture.from_folder(cfg.baseline_model).model_class.from_pretrained(
        cfg.baseline_model, dtype=dtype, attn_implementation=attention_kind(cfg))
    model.config.use_cache = False  # as the trained model: with a cache, transformers ignores the document mask
    model.to(accelerator.device)
    loss = validation_loss(cfg, model, data, accelerator)
    del model
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
    LOG.info("baseline %s: validation loss %.4f", cfg.baseline_model, loss if loss is not None else float("nan"))
    return loss


def export(cfg: TrainConfig, model, tokenizer, accelerator, result: TrainResult) -> Path:
    """An HF folder (safetensors, tokenizer, manifest with this run appended), renamed into place."""

    final = Path(cfg.output_dir) / "final"
    tmp = Path(cfg.output_dir) / ".tmp-final"
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped = getattr(unwrapped, "_orig_mod", unwrapped)
        dtype = _saved_dtype(cfg.model)
        state = {k.removeprefix("_orig_mod."): v.to(dtype) for k, v in state.items()}
        if cfg.fused_projections:
            from dus_plugin.train.fused import unfuse_state_dict

            state = unfuse_state_dict(state, unwrapped.config)
        if cfg.fused_projections or cfg.precision == "fp8":  # a plain transformers model saves the plain names
            unwrapped = _fresh_model(cfg.model)
        state = _without_tied_copies(state, unwrapped)
        unwrapped.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        _config_says_dtype(tmp, dtype)
        template = Path(cfg.chat_template).read_text(encoding="utf-8") if cfg.chat_template else None
        if template:  # the model now answers in this format: its tokenizer says so
            tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp)
        copy_tokenizer_files(Path(cfg.model), tmp)  # the processor's files of a multimodal model, the chat template
        if template:
            (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        _write_manifest(cfg, tmp, result)
        if (Path(cfg.output_dir) / "loss_curve.png").is_file():  # the model card shows it
            shutil.copy(Path(cfg.output_dir) / "loss_curve.png", tmp / "loss_curve.png")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        LOG.info("exported %s", final)
    accelerator.wait_for_everyone()
    return final


def _config_says_dtype(folder: Path, dtype) -> None:
    """save_pretrained writes the live parameters' dtype (the float32 master weights); the files hold ``dtype``."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _without_tied_copies(state: dict, model) -> dict:
    """The state dict without the tensors the model ties to another (a tied lm_head stays tied on disk).

    The dtype cast above makes each tied name its own tensor, so save_pretrained no longer sees them as shared.
    """
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {k: v for k, v in state.items() if not (k in tied and tied[k] in state)}


def _fresh_model(model_dir: str):
    """An unfused module tree of the same architecture, on the meta device, to save a state dict with."""
    from dus_plugin.architecture import Architecture

    return Architecture.from_folder(model_dir).meta


def _saved_dtype(model_dir: str):
    import torch

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32)


def _write_manifest(cfg: TrainConfig, folder: Path, result: TrainResult) -> None:
    from dus_plugin.manifest import BaseRecord, Manifest, TrainStage

    manifest = Manifest.read_optional(cfg.model)
    if manifest is None:  # a plain base trained without an upscale: it is its own base
        config = json.loads((Path(cfg.model) / "config.json").read_text())
        manifest = Manifest(base=BaseRecord(ref=Path(cfg.model).name, local_path=str(Path(cfg.model).absolute()),
                                            architecture=(config.get("architectures") or [None])[0], config=config))
    stage = TrainStage(objective=cfg.objective, steps=result.steps, tokens=result.tokens, loss=result.loss, val_loss=result.val_loss,
                       config=cfg.model_dump(mode="json"), **{"from": str(Path(cfg.model).absolute())})
    manifest.append_stage(stage).write(folder)
