"""The classifier task on tensors: a batch holds ``input`` and ``label``, the model's output is
its logits, the figures are test accuracy, top-1 agreement with the teacher, size and measured
speed, and the student is exported as the folder its library reloads (a built-in model's
safetensors and spec, a Hugging Face image classifier's ``save_pretrained`` folder)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..evaluate import model_card_figures, predict_logits
from ..models import ArchSpec, save_model_folder
from ..sealed import seal
from ..teachers import default_forward
from ..vision import ImageClassifier, TorchvisionSpec
from . import Task


def metrics(
    models: Mapping[str, nn.Module],
    data: Dataset,
    *,
    teacher: nn.Module | None = None,
    teacher_logits: torch.Tensor | None = None,
    latency_batch: int = 1,
    throughput_batch: int = 256,
) -> dict[str, dict[str, Any]]:
    """Each model's figures on the labelled ``data``; agreement with the teacher (its logits
    given, or computed from ``teacher``) for every model that is not the teacher itself."""
    if teacher_logits is None and teacher is not None:
        teacher_logits, _ = predict_logits(teacher, data)
    return {
        name: model_card_figures(
            model,
            data,
            teacher_logits=None if model is teacher else teacher_logits,
            latency_batch=latency_batch,
            throughput_batch=throughput_batch,
        )  # fmt: skip
        for name, model in models.items()
    }


def export(
    model: nn.Module, folder: Path, *, spec: ArchSpec | TorchvisionSpec | None = None
) -> Path:
    """The model's folder: a Hugging Face image classifier's ``save_pretrained`` folder with
    its image processor, or weights in safetensors beside the architecture spec (built-in or
    torchvision); :func:`potstill.vision.load_classifier` reloads any of them, after checking
    the folder's ``SHA256SUMS``."""
    if isinstance(model, ImageClassifier):
        model.save(folder)
    elif isinstance(spec, TorchvisionSpec):
        spec.save(model, folder)
    else:
        save_model_folder(model, folder, spec)
    seal(folder)
    return folder


TASK = Task(
    name="classifier",
    tokens=False,
    student_forward=default_forward,
    teacher_forward=default_forward,
    metrics=metrics,
    export=export,
)
