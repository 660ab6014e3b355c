"""The text-classification task for Hugging Face sequence classifiers: the batch holds each
model's own tokenization (``{prefix}input_ids``, ``{prefix}attention_mask``; teacher and
student may tokenize differently, since logits over classes need no shared vocabulary) and
``label``; the output is the classifier's logits; the figures are accuracy, macro-F1 and
per-class F1, agreement with the teacher, size and measured speed; the student is exported as
a plain ``AutoModelForSequenceClassification`` folder with its tokenizer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.tensors import make_batch
from ..evaluate import accuracy, agreement, file_size, median_seconds, predict_logits
from ..hf import export_pretrained
from ..models import count_parameters
from ..teachers import Batch, ForwardFn
from . import Task


def classifier_forward(prefix: str = "") -> ForwardFn:
    """The forward of a Hugging Face sequence classifier reading ``{prefix}input_ids``,
    ``{prefix}attention_mask`` (and ``{prefix}token_type_ids`` when the batch has them); it
    returns the logits."""

    def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
        kwargs = {
            "input_ids": batch[f"{prefix}input_ids"],
            "attention_mask": batch[f"{prefix}attention_mask"],
        }
        if f"{prefix}token_type_ids" in batch:
            kwargs["token_type_ids"] = batch[f"{prefix}token_type_ids"]
        return model(**kwargs).logits

    forward.__qualname__ = f"classifier_forward({prefix!r})"
    return forward


def f1_scores(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """F1 of each class (0 for a class neither predicted nor present)."""
    pred = logits.argmax(-1)
    out = []
    for c in range(num_classes):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        out.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return out


def _speed(model: nn.Module, data: Dataset, forward: ForwardFn, batch_size: int, repeats: int):
    batch = make_batch(data, torch.arange(min(batch_size, len(data))))  # type: ignore[arg-type]
    with torch.no_grad():
        return median_seconds(lambda: forward(model, batch), repeats, warmup=2)


def metrics(
    models: Mapping[str, nn.Module],
    data: Dataset,
    *,
    forwards: Mapping[str, ForwardFn],
    classes: Sequence[str],
    teacher_logits: torch.Tensor | None = None,
    latency_batch: int = 1,
    throughput_batch: int = 64,
) -> dict[str, dict[str, Any]]:
    """Each model's figures on the labelled ``data``: accuracy, macro-F1, per-class F1,
    agreement with ``teacher_logits`` (when given), parameters, file size, latency (median of
    a forward on ``latency_batch`` rows) and throughput (rows per second at
    ``throughput_batch``). ``forwards`` gives each model's forward (its tokenization)."""
    rows: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        forward = forwards[name]
        logits, labels = predict_logits(model, data, batch_size=64, forward=forward)
        assert labels is not None, "evaluation data needs labels"
        f1 = f1_scores(logits, labels, len(classes))
        row: dict[str, Any] = {
            "accuracy": accuracy(logits, labels),
            "macro_f1": sum(f1) / len(f1),
            "per_class_f1": dict(zip(classes, f1, strict=True)),
            "parameters": count_parameters(model),
            "layers": getattr(model.config, "num_hidden_layers", None),
            "file_bytes": file_size(model),
            "latency_ms": 1e3 * _speed(model, data, forward, latency_batch, 20),
            "throughput": throughput_batch / _speed(model, data, forward, throughput_batch, 3),
        }
        if teacher_logits is not None:
            row["agreement"] = agreement(logits, teacher_logits)
        rows[name] = row
    return rows


def export(model: nn.Module, folder: Path, *, tokenizer: Any = None) -> Path:
    """A plain ``AutoModelForSequenceClassification`` folder (safetensors, config with the label
    names in ``id2label``) with the tokenizer."""
    return export_pretrained(model, folder, tokenizer=tokenizer)  # type: ignore[arg-type]


TASK = Task(
    name="text-classifier",
    tokens=False,
    student_forward=classifier_forward(),
    teacher_forward=classifier_forward(),
    metrics=metrics,
    export=export,
)
