"""The sentence-embedding recipe (``kind: embed``): a Hugging Face encoder teacher, a student
derived from a smaller encoder, texts, and several objectives (variants) at the same budget."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import TrainConfig
from ..tasks.embedding import POOLING_MODES, Pooling, read_pooling
from .common import (
    DerivedModelSpec,
    DeviceSetting,
    HFModelSpec,
    PlacedTeacher,
    StrictModel,
    TapsSpec,
    TermSpec,
    budget_default,
    check_terms,
    check_variant_names,
    run_device,
    share_seed,
)
from .data import TableSpec

RESERVED_ROWS = ("teacher", "original student model", "derived, not distilled")
"""Rows every embedding report has: variants may not take these names."""


class PoolingSpec(StrictModel):
    """How a model pools its token vectors: ``mode`` ``auto`` reads its sentence-transformers
    configuration (``modules.json``: the Pooling module's mode and a Normalize module), or
    ``mean``/``cls``/``max``/``mean_sqrt_len``/``lasttoken``; ``normalize`` (default: from
    the configuration) L2-normalises the embedding."""

    mode: Literal[("auto", *POOLING_MODES)] = "auto"  # type: ignore[valid-type]
    normalize: bool | None = None

    def resolve(self, folder: str) -> Pooling:
        """The pooling of the model in ``folder`` with this spec's choices applied."""
        found = read_pooling(folder)
        mode = found.mode if self.mode == "auto" else self.mode
        return Pooling(mode, found.normalize if self.normalize is None else self.normalize)


class EmbedTeacherSpec(HFModelSpec, PlacedTeacher):
    """The teacher encoder and its pooling."""

    pooling: PoolingSpec = Field(default_factory=PoolingSpec)


class EmbedStudentSpec(DerivedModelSpec):
    """The student encoder (kept layers) and its pooling."""

    pooling: PoolingSpec = Field(default_factory=PoolingSpec)


class EmbedTableSpec(TableSpec):
    """Your texts for embedding distillation: a ``text`` column (``columns: {text: ...}``); the
    held-out texts are the validation split."""

    test_size: float | None = Field(None, gt=0, description="not used by embedding runs")


class PairsSpec(TableSpec):
    """Held-out sentence pairs with a similarity score (an STS set): each model's cosine
    similarities are ranked against the scores (``pairs_spearman``). ``columns`` names
    ``text``, ``text_pair`` and ``score`` (default: sentence1 / sentence2 / score, or
    text / text_pair / label); the test split when the source has one, else every row."""

    val_size: float | None = Field(None, gt=0, description="not used: every row is held out")
    test_size: float | None = Field(None, gt=0, description="not used: every row is held out")


class TextDataSpec(StrictModel):
    """Texts for embedding distillation: Debian's fortunes, or ``source`` (your data: any
    table with a text column). ``train`` / ``val``: how many texts of each."""

    name: Literal["fortunes"] = "fortunes"
    source: EmbedTableSpec | None = None
    folder: str | None = None
    max_length: int = Field(48, gt=2)
    train: int = Field(1500, gt=0)
    val: int = Field(500, gt=10)


class EmbedRecipe(StrictModel):
    """A sentence-embedding distillation run (``kind: embed``)."""

    kind: Literal["embed"]
    name: str = "embed"
    seed: int = 0
    device: DeviceSetting = run_device()
    teacher: EmbedTeacherSpec
    student: EmbedStudentSpec
    data: TextDataSpec = Field(default_factory=TextDataSpec)
    taps: TapsSpec = Field(default_factory=TapsSpec)
    variants: dict[str, list[TermSpec]]
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=2, batch_size=16))
    pairs: PairsSpec | None = None
    latency_batch: int = 1
    throughput_batch: int = 64

    @model_validator(mode="before")
    @classmethod
    def _keep_budget_default(cls, data: Any) -> Any:
        return budget_default(data, ("train",), {"epochs": 2})

    @model_validator(mode="after")
    def _check(self) -> EmbedRecipe:
        share_seed(self.seed, self.train)
        if not self.variants:
            raise ValueError("variants: give at least one, e.g. {PKT: [{kind: pkt}]}")
        check_variant_names(self.variants, RESERVED_ROWS)
        for name, terms in self.variants.items():
            check_terms(f"variants.{name}", terms)
        return self
