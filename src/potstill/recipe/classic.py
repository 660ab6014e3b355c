"""The classic recipe (``kind: classic``, the default when ``kind`` is absent, also called
``kind: image-classification``): a classifier of images (a built-in dataset or your own), a
teacher trained first or loaded (a built-in architecture, a Hugging Face image classifier, a
torchvision architecture), a student of any of those kinds, the objective, experimental
settings (labelled fractions) and the same-budget baseline."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..config import TrainConfig
from ..data.sources import SOURCES
from ..losses.objective import Objective
from ..models import ArchSpec
from .common import (
    DeviceSetting,
    StrictModel,
    TapsSpec,
    TeacherDevice,
    TermSpec,
    budget_default,
    build_objective,
    check_terms,
    run_device,
    share_seed,
)
from .data import TableSpec

DEFAULT_EPOCHS = 10
DEFAULT_DATA = "fashion-mnist"
DEFAULT_TEACHER_EPOCHS = 5


class ImageTableSpec(TableSpec):
    """Your images (:func:`potstill.data.image_tables.image_tables`, read batch by batch): an
    image folder (one subfolder per class; ``train/`` and ``test/`` inside give both splits),
    a ``save_to_disk`` folder or a hub dataset with an image and a ClassLabel column.
    ``mode`` converts (``L``, ``RGB``), ``size`` ([H, W]) resizes. A missing test split is
    carved by ``test_size`` (default: a fifth); the validation split by the data section's
    ``val_size``."""

    val_size: float | None = Field(None, gt=0, description="use data.val_size")
    test_size: float | None = Field(None, gt=0)
    mode: Literal["L", "RGB"] | None = None
    size: tuple[int, int] | None = None

    def rows_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~potstill.data.image_tables.image_tables`."""
        out = self.source_options()
        out.pop("val_size")
        return {**out, "columns": self.columns, "mode": self.mode, "size": self.size}


class DataSpec(StrictModel):
    """Which data source (:data:`potstill.data.sources.SOURCES`: the built-in ``fashion-mnist``
    and ``digits``, or one registered there), where its files are, how much of the training set
    is held out."""

    name: str = DEFAULT_DATA
    source: ImageTableSpec | None = Field(
        None, description="your images (an image folder, ...) instead of a built-in name"
    )
    data_dir: str | None = Field(None, description="folder with the IDX files (fashion-mnist)")
    val_size: int = Field(5000, gt=0)
    columns: dict[Literal["input", "label"], str] | None = Field(
        None,
        description="the source's columns for the task's input and label (default: "
        "image and label)",
    )

    @field_validator("name")
    @classmethod
    def _known_source(cls, name: str) -> str:
        if name not in SOURCES:
            raise ValueError(f"unknown dataset {name!r}; data sources: {', '.join(SOURCES)}")
        return name

    @property
    def described(self) -> str:
        """The data in a few words: the built-in name, or where your images are."""
        return self.name if self.source is None else f"images from {self.source.described}"

    @model_validator(mode="after")
    def _name_or_source(self) -> DataSpec:
        # judged by value, so a saved recipe (every field written) validates again
        if self.source is not None and self.name != DEFAULT_DATA:
            raise ValueError("give name (a built-in set) or source (your images), not both")
        return self


class ModelChoice(StrictModel):
    """Which model: the built-in ``arch`` (the default), a Hugging Face image classifier
    (``model``: hub name or folder, with its own image processor; or ``config``: a transformers
    config with ``model_type``, built untrained), or a torchvision architecture by name
    (``torchvision``: an optional extra). ``processor`` names where the image processor is
    read from when it is not the model's own (a model from a config has none unless given)."""

    model: str | None = Field(None, description="a Hugging Face image classifier")
    config: dict[str, Any] | None = Field(None, description="a transformers config to build")
    torchvision: str | None = Field(None, description="a torchvision architecture by name")
    processor: str | None = Field(None, description="the image processor's folder or hub name")
    trust_remote_code: bool = False
    arch: ArchSpec = Field(default_factory=ArchSpec, description="a built-in architecture")

    @property
    def family(self) -> Literal["arch", "model", "config", "torchvision"]:
        """Which of the ways to give a model this one uses."""
        given = [k for k in ("model", "config", "torchvision") if getattr(self, k) is not None]
        return given[0] if given else "arch"  # type: ignore[return-value]

    @model_validator(mode="after")
    def _one_model(self) -> ModelChoice:
        given = [k for k in ("model", "config", "torchvision") if getattr(self, k) is not None]
        if self.arch != type(self).model_fields["arch"].get_default(call_default_factory=True):
            given.insert(0, "arch")  # by value, so a saved recipe (all fields) validates again
        if len(given) > 1:
            raise ValueError(f"give one of arch, model, config or torchvision, not {given}")
        if self.processor is not None and self.family not in ("model", "config"):
            raise ValueError("processor: only a Hugging Face model (model or config) has one")
        return self

    def describe(self, arch: ArchSpec) -> str:
        """The model in a few words (``arch``: the built-in architecture, sized)."""
        if self.family == "model":
            return f"the Hugging Face image classifier `{self.model}`"
        if self.family == "config":
            kind = (self.config or {}).get("model_type")
            return f"a Hugging Face {kind} built from a config"
        if self.family == "torchvision":
            return f"torchvision's {self.torchvision}"
        words = [f"channels {arch.channels}"] if arch.channels else []
        words.append(f"hidden {arch.hidden}")
        return f"{'a CNN' if arch.kind == 'cnn' else 'an MLP'} ({', '.join(words)})"


class TeacherSpec(ModelChoice, TeacherDevice):
    """A saved teacher (``path``: a folder potstill wrote; a list of paths: their ensemble, the
    mean of their logits), a Hugging Face image classifier trained on these classes
    (``model``; with ``finetune: true`` it gets a new head for the data's classes and is
    trained first), or an architecture that potstill trains first and keeps."""

    path: str | list[str] | None = None
    arch: ArchSpec = Field(default_factory=lambda: ArchSpec(hidden=[1024, 1024], dropout=0.2))
    finetune: bool = Field(False, description="model: train it on the data's classes first")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=DEFAULT_TEACHER_EPOCHS))
    cache: bool = Field(True, description="compute the teacher's logits once and reuse them")

    @model_validator(mode="after")
    def _path_alone(self) -> TeacherSpec:
        if self.path is not None and self.family != "arch":
            raise ValueError("give path (a saved teacher) or a model to build, not both")
        if self.finetune and self.family != "model":
            raise ValueError("finetune: only a Hugging Face model (teacher.model) is fine-tuned")
        return self

    @property
    def trained_here(self) -> bool:
        """Whether the run trains the teacher (it is not loaded as it is)."""
        return self.path is None and (self.family != "model" or self.finetune)


class StudentSpec(ModelChoice):
    """The student: a built-in ``arch`` (the default), a Hugging Face image classifier
    (``model``: its weights, a head for the data's classes; ``config``: untrained) or
    a ``torchvision`` architecture."""

    arch: ArchSpec = Field(default_factory=lambda: ArchSpec(hidden=[32]))


class HintSpec(StrictModel):
    """An optional first stage (FitNets hints): the distilled student is trained on these
    feature terms alone before the main objective."""

    objective: list[TermSpec]
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1))


class SettingSpec(StrictModel):
    """One experimental setting: the student sees labels for ``labelled_fraction`` of the
    training set; the teacher labels all of it."""

    name: str
    labelled_fraction: float = Field(1.0, gt=0, le=1)


class EvalSpec(StrictModel):
    """Final evaluation: speed measurement batch sizes."""

    latency_batch: int = Field(1, gt=0)
    throughput_batch: int = Field(256, gt=0)
    measure_cache_speedup: bool = True


class ClassicRecipe(StrictModel):
    """A whole classic distillation run (``kind: classic``, or no ``kind``)."""

    kind: Literal["classic", "image-classification"] = "classic"
    name: str = "run"
    seed: int = 0
    device: DeviceSetting = run_device()
    data: DataSpec = Field(default_factory=DataSpec)
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)  # type: ignore[arg-type]
    student: StudentSpec = Field(default_factory=StudentSpec)
    objective: list[TermSpec] = Field(
        default_factory=lambda: [
            TermSpec(kind="kd", weight=0.5, temperature=4.0),
            TermSpec(kind="ce", weight=0.5),
        ]
    )
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=DEFAULT_EPOCHS))
    taps: TapsSpec = Field(default_factory=TapsSpec)
    hint: HintSpec | None = None
    settings: list[SettingSpec] = Field(default_factory=lambda: [SettingSpec(name="main")])
    baseline: bool = Field(True, description="also train the student without a teacher")
    evaluation: EvalSpec = Field(default_factory=EvalSpec)

    @model_validator(mode="before")
    @classmethod
    def _keep_budget_defaults(cls, data: Any) -> Any:
        data = budget_default(data, ("train",), {"epochs": DEFAULT_EPOCHS})
        return budget_default(data, ("teacher", "train"), {"epochs": DEFAULT_TEACHER_EPOCHS})

    @model_validator(mode="after")
    def _check(self) -> ClassicRecipe:
        hint = (self.hint.train,) if self.hint else ()
        share_seed(self.seed, self.train, self.teacher.train, *hint)
        check_terms("objective", self.objective)
        snames = [s.name for s in self.settings]
        if len(set(snames)) != len(snames):
            raise ValueError(f"settings: names must be unique, got {snames}")
        return self

    def build_objective(self, layer_counts: dict[str, dict[str, int]] | None = None) -> Objective:
        """The objective of the distilled student (``layer_counts``: see ``TermSpec.build``)."""
        return build_objective(self.objective, layer_counts)

    def build_hint_objective(
        self, layer_counts: dict[str, dict[str, int]] | None = None
    ) -> Objective | None:
        """The hint stage's objective, or None when the recipe has no hint stage."""
        if self.hint is None:
            return None
        return build_objective(self.hint.objective, layer_counts)
