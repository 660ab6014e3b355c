"""The text-classification recipe (``kind: text-classification``): the user's texts and labels
(files, a folder, a hub dataset, a built-in source), a Hugging Face sequence classifier as the
teacher (or a base model fine-tuned in the run first), a student derived from the teacher's
layers (DistilBERT) or another model, which may tokenize differently, and the same-budget
student trained without a teacher."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..config import OptimizerConfig, TrainConfig, from_training_arguments
from ..data.sources import load_callable
from ..losses.objective import Objective
from .common import (
    DerivedModelSpec,
    DeviceSetting,
    HFModelSpec,
    PlacedTeacher,
    StrictModel,
    TapsSpec,
    TermSpec,
    build_objective,
    check_sharded_teacher,
    check_terms,
    run_device,
    share_seed,
)
from .data import TableSpec

DEFAULT_EPOCHS = 3
DEFAULT_BATCH = 32
DEFAULT_LR = 5e-5


def _train() -> TrainConfig:
    return TrainConfig(
        epochs=DEFAULT_EPOCHS, batch_size=DEFAULT_BATCH, optimizer=OptimizerConfig(lr=DEFAULT_LR)
    )


def _with_defaults(section: dict[str, Any]) -> dict[str, Any]:
    """A train section with this kind's defaults (3 epochs, batch 32, lr 5e-5) for the keys it
    does not set: TrainConfig's own (1 epoch, batch 128, lr 1e-3) are wrong for a transformer."""
    out = dict(from_training_arguments(section))
    if "epochs" not in out and "max_steps" not in out:
        out["epochs"] = DEFAULT_EPOCHS
    out.setdefault("batch_size", DEFAULT_BATCH)
    optimizer = out.get("optimizer")
    if optimizer is None or isinstance(optimizer, dict):
        out["optimizer"] = {"lr": DEFAULT_LR, **(optimizer or {})}
    return out


class TextTableSpec(TableSpec):
    """Texts and their labels. ``columns`` names ``text``, optionally ``text_pair`` (sentence
    pairs) and ``label``; ``labels`` lists the classes in order (rows with another label are
    left out and counted); texts longer than ``max_length`` tokens are cut and counted."""

    labels: list[str] | None = Field(None, min_length=2)
    max_length: int = Field(128, gt=2)


class TeacherSpec(HFModelSpec, PlacedTeacher):
    """The teacher: a fine-tuned sequence classifier (hub name or folder), or with ``finetune``
    a base model whose new classification head and body are trained on the labels first."""

    finetune: TrainConfig | None = None
    cache: bool = Field(True, description="compute the teacher's logits once and reuse them")


class StudentSpec(DerivedModelSpec):
    """The student: ``keep`` / ``layers`` of the teacher (DistilBERT), or another ``model``
    (its own tokenizer; a classification head of the data's classes), optionally derived too."""

    model: str | None = None  # type: ignore[assignment]

    @model_validator(mode="after")
    def _something(self) -> StudentSpec:
        if self.model is None and not self.derived:
            raise ValueError(
                "give keep or layers (a student derived from the teacher), or model (another "
                "model by hub name or folder)"
            )
        return self


class EvalSpec(StrictModel):
    """Speed measurement batch sizes, and your own metrics: ``name: module:function``, each
    ``function(logits, labels) -> float`` over the test split, reported beside the others."""

    latency_batch: int = Field(1, gt=0)
    throughput_batch: int = Field(64, gt=0)
    metrics: dict[str, str] = Field(default_factory=dict)

    @field_validator("metrics")
    @classmethod
    def _importable(cls, metrics: dict[str, str]) -> dict[str, str]:
        for name, entry in metrics.items():
            load_callable(entry, f"metrics.{name}")
        return metrics

    def user_metrics(self) -> dict[str, Any]:
        """The metric functions, imported."""
        return {name: load_callable(e, f"metrics.{name}") for name, e in self.metrics.items()}


class TextClassificationRecipe(StrictModel):
    """A text-classification distillation run (``kind: text-classification``)."""

    kind: Literal["text-classification"]
    name: str = "text-classification"
    seed: int = 0
    device: DeviceSetting = run_device()
    data: TextTableSpec
    teacher: TeacherSpec
    student: StudentSpec
    objective: list[TermSpec] = Field(
        default_factory=lambda: [
            TermSpec(kind="kd", weight=0.5, temperature=2.0),
            TermSpec(kind="ce", weight=0.5),
        ]
    )
    train: TrainConfig = Field(default_factory=_train)
    taps: TapsSpec = Field(default_factory=TapsSpec)
    baseline: bool = Field(True, description="also train the student without a teacher")
    evaluation: EvalSpec = Field(default_factory=EvalSpec)

    @model_validator(mode="before")
    @classmethod
    def _keep_budget_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("train"), dict):
            data["train"] = _with_defaults(data["train"])
        teacher = data.get("teacher")
        if isinstance(teacher, dict) and isinstance(teacher.get("finetune"), dict):
            data["teacher"] = {**teacher, "finetune": _with_defaults(teacher["finetune"])}
        return data

    @model_validator(mode="after")
    def _check(self) -> TextClassificationRecipe:
        extra = (self.teacher.finetune,) if self.teacher.finetune else ()
        share_seed(self.seed, self.train, *extra)
        check_terms("objective", self.objective)
        check_sharded_teacher(self.teacher, derived_from_teacher=self.student.model is None)
        return self

    def build_objective(self, layer_counts: dict[str, dict[str, int]] | None = None) -> Objective:
        """The distilled student's objective (``layer_counts``: see ``TermSpec.build``)."""
        return build_objective(self.objective, layer_counts)
