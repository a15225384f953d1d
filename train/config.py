"""The training config: one typed YAML, validated at load, every error naming its field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dus_plugin.errors import TrainConfigError
from dus_plugin.eval.settings import HookSettings
from dus_plugin.io import model_folder_problem, read_yaml_mapping
from dus_plugin.validation import first_error


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSource(Strict):
    """One text source of the mixture."""

    path: str
    """A .txt file (one document per blank-line-separated block), .jsonl, .parquet, or a `datasets`
    folder saved with save_to_disk; or `hf:NAME` for datasets.load_dataset(NAME)."""
    text_field: str = "text"
    """Column holding the text (.jsonl, .parquet, datasets)."""
    weight: float = Field(1.0, gt=0)
    """Relative share of training sequences drawn from this source."""
    split: str = "train"
    """Split for `hf:` datasets."""
    streaming: bool = False
    """Read an `hf:` dataset as a stream; tokenization stops at max_tokens."""
    max_tokens: Optional[int] = Field(None, gt=0)
    """Cap on tokens taken from this source (required with streaming)."""
    columns: dict[str, str] = Field(default_factory=dict)
    """sft and dpo: the source's own column for each name dus reads, e.g. OpenOrca's
    {system: system_prompt, prompt: question, completion: response}."""

    @model_validator(mode="after")
    def _stream_cap(self) -> "DataSource":
        if self.streaming and self.max_tokens is None:
            raise ValueError("streaming sources need max_tokens, the number of tokens to take from the stream")
        return self


class DataConfig(Strict):
    sources: list[DataSource] = Field(min_length=1)
    seq_len: int = Field(gt=1)
    """Tokens per packed training sequence."""
    val_fraction: float = Field(0.01, ge=0, lt=0.5)
    """Share of each source's sequences held out for validation loss (taken from the end)."""
    document_mask: bool = False
    """Reset position ids at each document start so documents do not attend across boundaries."""
    cache_dir: Optional[str] = None
    """Where tokenized sources are cached [default: OUTPUT_DIR/../.token_cache]."""


class OptimizerConfig(Strict):
    name: Literal["adamw", "adamw8bit"] = "adamw"
    """adamw: torch's AdamW, 8 bytes of state per trained parameter; adamw8bit: torchao's 8-bit AdamW,
    about 2 bytes (install the [lowmem] extra)."""
    lr: float = Field(gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = Field(0.1, ge=0)
    fused: Optional[bool] = None
    """Fused AdamW; default: on for CUDA, off on CPU."""


class ScheduleConfig(Strict):
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_fraction: float = Field(0.2, gt=0, le=1)
    """WSD: share of the steps spent decaying at the end."""


class SeamConfig(Strict):
    """DUS-specific options, driven by dus_manifest.json in the model folder."""

    focus: Literal["none", "duplicated", "seam_window"] = "none"
    """Train only these layers for the first focus_steps steps (others get LR 0), then all."""
    focus_steps: int = Field(0, ge=0)
    window: int = Field(2, ge=1)
    """seam_window: layers on each side of the seam."""
    seam_lr_multiplier: float = Field(1.0, gt=0)
    """LR multiplier for the seam window's layers for the whole run."""

    @model_validator(mode="after")
    def _steps(self) -> "SeamConfig":
        if self.focus != "none" and self.focus_steps == 0:
            raise ValueError("focus needs focus_steps > 0, the number of steps to train only the focused layers")
        return self


class TrainOnlyConfig(Strict):
    """Train only some layers: the rest get no gradient and no optimizer state (LLaMA Pro-style)."""

    layers: Union[Literal["duplicated", "seam_window"], list[int]]
    """duplicated: the second copy of each duplicated layer (what an identity upscale zeroed);
    seam_window: `window` layers on each side of the seam; or a list of output layer indices."""
    window: int = Field(2, ge=1)
    """seam_window: layers on each side of the seam."""
    non_layer: bool = False
    """Also train what is outside the layer stack: embeddings, final norm, output head."""


class DpoConfig(Strict):
    beta: float = Field(0.1, gt=0)
    """How strongly the loss holds the model near the reference (the model training starts from): larger
    keeps it closer."""


class ProfileConfig(Strict):
    start: int = Field(10, ge=0)
    """First profiled step (after torch.compile's warm-up steps)."""
    steps: int = Field(3, gt=0)


class TrainConfig(Strict):
    model: str
    """Folder of the (upscaled) model to train."""
    output_dir: str
    objective: Literal["lm", "sft", "dpo"] = "lm"
    """lm: continued pretraining on text (every token); sft: instruction tuning on chat rows, the loss on the
    assistant's turns only, conversations packed; dpo: preference tuning on (prompt, chosen, rejected) rows
    against the starting model as reference. `dus sft` and `dus dpo` set it."""
    chat_template: Optional[str] = None
    """sft and dpo: a .jinja file with the chat template to render conversations with [default: the model's]."""
    dpo: DpoConfig = DpoConfig()
    data: DataConfig
    micro_batch_size: int = Field(gt=0)
    global_batch_size: int = Field(gt=0)
    """Sequences per optimizer step across all processes; accumulation = global / (micro x processes)."""
    max_steps: Optional[int] = Field(None, gt=0)
    max_tokens: Optional[int] = Field(None, gt=0)
    """Alternative to max_steps: train until this many tokens were seen."""
    optimizer: OptimizerConfig
    schedule: ScheduleConfig = ScheduleConfig()
    grad_clip: Optional[float] = Field(1.0, gt=0)
    precision: Literal["bf16", "fp32", "fp8"] = "bf16"
    """bf16: matmuls in bf16 autocast; fp32: everything in float32; fp8: the decoder layers' linear layers in
    float8 (torchao float8 training, CUDA compute capability 8.9+, extra [lowmem]), the rest as bf16."""
    fp8_recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    """torchao's float8 scaling with precision fp8: one scale per tensor, or one per row."""
    fp8_weight_cast: Literal["per_matmul", "per_step"] = "per_matmul"
    """precision fp8: cast each weight to float8 in every matmul (torchao's way), or once per optimizer step and
    keep the cast (1 byte per decoder-layer weight) across the step's micro-batches and recomputed layers; the same
    numbers bit for bit. per_step needs fp8_recipe tensorwise and one process or DDP (not FSDP or DeepSpeed)."""
    master_weights: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the trained weights and their gradients (precision fp8 too: float8 layers cast either dtype in their
    matmuls). bf16 halves both; it needs optimizer.name: adamw8bit, whose stochastic rounding keeps updates smaller
    than a bf16 step."""
    train_only: Optional[TrainOnlyConfig] = None
    """Freeze everything except these layers [default: train everything]."""
    memory_limit_gb: Optional[float] = Field(None, gt=0)
    """Refuse to start when the memory estimate per device exceeds this [default: the GPU's memory;
    on CPU, the machine's RAM shared by the processes]."""
    activation_checkpointing: Union[Literal["auto", "none", "full"], int] = "auto"
    """How much backward recomputes. auto: the least that fits the device's memory (or memory_limit_gb) with
    the planner's headroom, chosen and printed before the model loads; none; full (every decoder layer; true is
    the same); or a number K: only the first K decoder layers (false is none)."""
    compile: Optional[bool] = None
    """torch.compile the training forward and backward [default, auto: on a CUDA GPU, yes; on CPU, no]."""
    compile_scope: Literal["layers", "model"] = "layers"
    """With compile: each decoder layer on its own (masks stay eager, so unpadded attention runs SDPA's causal
    kernel; one compile serves the whole stack), or the whole model as one graph."""
    attention_backend: Literal["auto", "sdpa", "flash", "cudnn", "efficient", "flex"] = "auto"
    """Which attention kernel trains: sdpa (PyTorch's choice of its SDPA kernels), one SDPA kernel by name, or
    flex (torch's FlexAttention, which skips the blocks a document mask hides; CUDA only) [auto: flex on a CUDA
    GPU when data.document_mask is on, else sdpa]."""
    fused_projections: Optional[bool] = None
    """Train with q|k|v and gate|up fused into single GEMMs (Llama, Mistral, Qwen2/3); export is unfused
    [default, auto: on a CUDA GPU for those families, yes; elsewhere, no]."""
    seed: int = 0
    log_every: int = Field(10, gt=0)
    save_every: int = Field(0, ge=0)
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = Field(2, gt=0)
    save_final: bool = True
    """Checkpoint at the last step too (what --resume continues from after the run ends)."""
    eval_every: int = Field(0, ge=0)
    """Validation loss every N steps (0: only at the end)."""
    eval_on_start: bool = False
    """Also measure validation loss before the first step (logged at step 0): the seam's cost, on the same rows."""
    val_batches: int = Field(8, gt=0)
    baseline_model: Optional[str] = None
    """A model folder (the base before growing) whose validation loss is measured once before training, on the
    same held-out rows, and drawn as a line on the loss curve; `dus run` sets it to its base on one process. Each
    process loads the whole model for this, so leave it out where a process cannot hold it beside its shard."""
    seam: SeamConfig = SeamConfig()
    eval: HookSettings = HookSettings()
    """Held-out perplexity during training (dus_plugin.eval); no text_files: validation loss only."""
    tensorboard: bool = True
    profile: Optional[ProfileConfig] = None
    """Profile a few steps with torch.profiler: OUTPUT_DIR/profile.json says where the step's time goes."""
    export: bool = True
    """Write an HF folder (weights, tokenizer, manifest) to OUTPUT_DIR/final at the end."""

    @field_validator("compile", "fused_projections", mode="before")
    @classmethod
    def _auto_is_unset(cls, value):
        return None if value == "auto" else value

    @field_validator("fp8_weight_cast")
    @classmethod
    def _cast_once_needs_tensorwise(cls, value, info):
        if value == "per_step" and (info.data.get("precision"), info.data.get("fp8_recipe")) != ("fp8", "tensorwise"):
            raise ValueError("per_step is for precision: fp8 with fp8_recipe: tensorwise (one scale per weight, the "
                             "same in forward and backward); set those, or fp8_weight_cast: per_matmul")
        return value

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_words(cls, value):
        if isinstance(value, bool):  # the boolean form of earlier configs
            return "full" if value else "none"
        if isinstance(value, int) and value < 0:
            raise ValueError(f"a number of checkpointed layers must be 0 or more, not {value}")
        return value

    @property
    def bf16_compute(self) -> bool:
        """Matmuls outside float8 run in bf16 (precision bf16 or fp8)."""
        return self.precision in ("bf16", "fp8")

    @model_validator(mode="after")
    def _length(self) -> "TrainConfig":
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("give exactly one of max_steps and max_tokens")
        if self.master_weights == "bf16" and self.optimizer.name != "adamw8bit":
            raise ValueError("master_weights: bf16 needs optimizer.name: adamw8bit (stochastic rounding); plain "
                             "AdamW on bf16 weights rounds small updates away")
        if self.master_weights == "bf16" and self.precision == "fp32":
            raise ValueError("master_weights: bf16 computes in bf16; set precision: bf16 or master_weights: fp32")
        if self.objective == "lm" and self.chat_template:
            raise ValueError("chat_template is for objective sft or dpo; continued pretraining reads plain text")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        return self

    def grad_accum(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise TrainConfigError(
                f"global_batch_size {self.global_batch_size} is not divisible by micro_batch_size x processes "
                f"= {self.micro_batch_size} x {world_size}; change one of them")
        return self.global_batch_size // per_step

    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        tokens_per_step = self.global_batch_size * self.data.seq_len
        return max(1, -(-self.max_tokens // tokens_per_step))  # type: ignore[operator]


def check_model_folder(model: str) -> None:
    """The model is a local folder with a config.json; a missing one is never looked up on the Hub."""
    if problem := model_folder_problem(model):
        raise TrainConfigError(f"model folder {problem}; set `model` to the folder `dus upscale` wrote "
                               "(e.g. `dus upscale configs/dus_solar.yml out/dus` first)", setting="model")


def check_trains_on_text(model: str) -> None:
    """dus train feeds text only; a multimodal family whose forward needs an image in every prompt cannot take it."""
    from dus_plugin.architecture import Architecture
    from dus_plugin.vision_inputs import needs_image

    if model_folder_problem(model):
        return  # check_model_folder says what is wrong with it
    arch = Architecture.from_folder(model)
    if arch.multimodal and needs_image(arch.model_class):
        raise TrainConfigError(f"{arch.name} takes no prompt without an image, and dus train trains on text only; "
                               "train it in a loop that feeds images, or set `model` to a text model",
                               setting="model")


def check_baseline_folder(folder: str | None) -> None:
    if folder and (problem := model_folder_problem(folder)):
        raise TrainConfigError(f"baseline model folder {problem}; set `baseline_model` to the base's folder, or "
                               "leave it out", setting="baseline_model")


def load_train_config(path: str | Path, overrides: dict | None = None, objective: str | None = None) -> TrainConfig:
    """The validated config at PATH (with OVERRIDES); OBJECTIVE, when given (`dus sft`, `dus dpo`), is what the
    YAML must say or leave out."""
    path = Path(path)
    data = read_yaml_mapping(path, TrainConfigError, "training config", "start from configs/cpt_tiny.yml")
    if overrides:
        data.update(overrides)
    if objective is not None:
        if data.setdefault("objective", objective) != objective:
            raise TrainConfigError(f"{path} says `objective`: {data['objective']}, but this command trains "
                                   f"objective {objective}; remove the key or make it {objective}",
                                   setting="objective")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        raise TrainConfigError(first_error(e, str(path))) from None
