"""Training settings shared by the Python API, the Distiller and recipes (validated by pydantic)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TRAINING_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "num_train_epochs": ("epochs",),
    "per_device_train_batch_size": ("batch_size",),
    "gradient_accumulation_steps": ("grad_accum",),
    "learning_rate": ("optimizer", "lr"),
    "weight_decay": ("optimizer", "weight_decay"),
    "max_grad_norm": ("clip_grad_norm",),
    "lr_scheduler_type": ("schedule", "name"),
    "warmup_steps": ("schedule", "warmup_steps"),
    "warmup_ratio": ("schedule", "warmup_ratio"),
    "logging_steps": ("log_every",),
    "eval_steps": ("eval_every",),
    "save_steps": ("checkpoint_every",),
    "save_total_limit": ("checkpoints_kept",),
    "torch_compile": ("compile",),
    "disable_tqdm": ("progress",),
    "bf16": ("precision",),
    "fp16": ("precision",),
}
"""``transformers.TrainingArguments``' names that a training section takes with the same
meaning, and the field each sets (``max_steps``, ``seed`` and ``report_to`` are the same
names already). ``bf16: true`` / ``fp16: true`` set ``precision``; ``disable_tqdm: true`` is
``progress: false``; ``max_grad_norm: 0`` is no clipping; ``lr_scheduler_type`` takes
constant, linear and cosine."""


def from_training_arguments(data: Any, where: str = "train") -> Any:
    """A training section with ``TrainingArguments``' names (:data:`TRAINING_ARGUMENTS`) put
    as potstill's fields; ValueError when a name and the field it sets are both given."""
    if not isinstance(data, dict) or not any(k in TRAINING_ARGUMENTS for k in data):
        return data
    out = {k: v for k, v in data.items() if k not in TRAINING_ARGUMENTS}
    for name, value in data.items():
        if name not in TRAINING_ARGUMENTS:
            continue
        *parents, field = TRAINING_ARGUMENTS[name]
        if name in ("bf16", "fp16"):
            if not value:
                continue
            value = name
        elif name == "disable_tqdm":
            value = not value
        elif name == "max_grad_norm" and not value:
            value = None
        node = out
        for p in parents:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        if field in node:
            raise ValueError(
                f"{where}: {name} (TrainingArguments' name) and {'.'.join((*parents, field))} "
                "both given; keep one"
            )
        node[field] = value
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizerConfig(_Strict):
    """Optimizer: ``adamw`` (default), ``adam`` or ``sgd``."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    betas: tuple[float, float] = (0.9, 0.999)
    fused: bool | None = Field(
        None,
        description="adam/adamw: fused kernels (default: when every parameter is a float "
        "tensor on CPU or CUDA); false: torch's multi-tensor (foreach) implementation",
    )


class ScheduleConfig(_Strict):
    """Learning-rate schedule: linear warm-up for ``warmup_steps`` (or ``warmup_ratio`` of all
    steps), then ``constant``, ``linear`` decay or ``cosine`` decay to ``min_lr_ratio``·lr."""

    name: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


def _training_arguments_schema(schema: dict[str, Any]) -> None:
    """TrainConfig's JSON schema also takes TrainingArguments' names (as editors should)."""
    props = schema["properties"]
    nested = {"learning_rate": {"type": "number", "exclusiveMinimum": 0},
              "weight_decay": {"type": "number", "minimum": 0},
              "lr_scheduler_type": {"enum": ["constant", "linear", "cosine"]},
              "warmup_steps": {"type": "integer", "minimum": 0},
              "warmup_ratio": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
              "bf16": {"type": "boolean"}, "fp16": {"type": "boolean"},
              "disable_tqdm": {"type": "boolean"},
              "max_grad_norm": {"anyOf": [{"type": "number", "minimum": 0},
                                          {"type": "null"}]}}  # fmt: skip
    for name, path in TRAINING_ARGUMENTS.items():
        sub = nested.get(name) or dict(props[path[0]])
        props[name] = {**sub, "description": f"TrainingArguments' name for {'.'.join(path)}"}


class TrainConfig(_Strict):
    """How long and how to train: ``epochs``, or ``max_steps`` (optimizer steps), which wins
    when both are given; one epoch when neither is. ``transformers.TrainingArguments``' names
    are taken too (:data:`TRAINING_ARGUMENTS`)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_training_arguments_schema)

    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(128, gt=0)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    clip_grad_norm: float | None = Field(None, gt=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    eval_every: int | None = Field(
        None, gt=0, description="steps between evaluations; default once per epoch"
    )
    checkpoint_every: int | None = Field(
        None, gt=0, description="steps between checkpoints; default at each evaluation"
    )
    checkpoints_kept: int = Field(
        2,
        ge=1,
        description="the newest checkpoints kept: a damaged newest one falls back to "
        "the next intact one on resume (1: the newest alone)",
    )
    nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a step whose loss or gradients are NaN or infinite: stop the run naming "
        "the step, term and examples, or skip its update (counted in the results)",
    )
    log_every: int = Field(20, gt=0)
    seed: int = 0
    shuffle: bool = True
    progress: bool | None = Field(None, description="progress bar; default: when on a terminal")
    tensorboard: bool = Field(
        True, description="false: leave TensorBoard out of report_to's default (auto)"
    )
    report_to: Literal["auto", "all", "none"] | list[Literal["tensorboard", "wandb", "mlflow"]] = (
        Field(
            "auto",
            description="experiment trackers for every loss term, lr, throughput and "
            "evaluation metric: auto (those installed), all, none, or a list of tensorboard, "
            "wandb, mlflow",
        )
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="bf16: mixed precision (autocast) for the forward passes and the loss; "
        "weights, gradients and optimizer state stay fp32. Fast where the hardware multiplies "
        "bf16 natively (CPUs with avx512_bf16 or AMX, GPUs from Ampere on). fp16: the same in "
        "float16 with a gradient scaler (GPUs before Ampere: V100, T4)",
    )
    tf32: bool | None = Field(
        None,
        description="fp32 matrix products in TF32 on a GPU that has it (Ampere and later); "
        "default: on there, and logged; false: full fp32 products",
    )
    compile: bool | str = Field(
        False,
        description="torch.compile the student (true: the default inductor backend, or a "
        "backend's name); a model that does not compile trains uncompiled, with a warning",
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="under torchrun: ddp (a student copy per process) or fsdp (the student's "
        "weights, gradients and optimizer state sharded across processes)",
    )

    @model_validator(mode="before")
    @classmethod
    def _training_arguments(cls, data: Any) -> Any:
        return from_training_arguments(data)

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1
        return self


def same_budget(config: TrainConfig, steps: int) -> TrainConfig:
    """``config`` for exactly ``steps`` optimizer steps of the same batch size: the budget of the
    baseline student trained without a teacher, so it gets as many updates as the distilled one
    (whose epochs, hint stage included, came to ``steps``)."""
    return config.model_copy(update={"max_steps": steps, "epochs": None})
