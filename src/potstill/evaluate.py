"""Evidence for a classifier: accuracy, top-1 agreement with the teacher, parameters, file size,
and measured CPU latency (batch 1) and throughput (large batch)."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from .data.tensors import iterate_batches, make_batch
from .io import atomic_save_module
from .models import count_parameters
from .placement import model_device, on_device
from .teachers import ForwardFn, default_forward


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 1024,
    forward: ForwardFn = default_forward,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of ``model`` over ``dataset`` in order, and the labels (None when it has none),
    on the CPU; each batch is run on the model's device."""
    n = len(dataset)  # type: ignore[arg-type]
    device = model_device(model)
    logits, labels = [], []
    with eval_mode(model):
        for batch in iterate_batches(dataset, torch.arange(n), batch_size):
            logits.append(forward(model, on_device(batch, device)).float().cpu())
            if "label" in batch:
                labels.append(batch["label"])
    return torch.cat(logits), (torch.cat(labels) if labels else None)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy over examples whose label is a class (ignore-index labels are skipped)."""
    keep = labels >= 0
    return float((logits[keep].argmax(-1) == labels[keep]).float().mean())


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of examples where student and teacher predict the same top-1 class."""
    return float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean())


def classification_eval(
    dataset: Dataset, batch_size: int = 1024, forward: ForwardFn = default_forward
) -> Callable[[nn.Module], dict[str, float]]:
    """An evaluation function for the Distiller: accuracy and cross-entropy on ``dataset``."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        logits, labels = predict_logits(model, dataset, batch_size=batch_size, forward=forward)
        assert labels is not None, "evaluation data needs labels"
        return {
            "accuracy": accuracy(logits, labels),
            "loss": float(nn.functional.cross_entropy(logits, labels)),
        }

    return evaluate


def file_size(model: nn.Module) -> int:
    """Bytes of the model's weights as a safetensors file."""
    with tempfile.TemporaryDirectory() as d:
        path = atomic_save_module(model, Path(d) / "m.safetensors")
        return os.path.getsize(path)


def synced(out: object) -> object:
    """``out``, once the work queued for it is done: on a GPU a forward returns before it has
    run, so a timing must wait for it (nothing to wait for on the CPU)."""
    if isinstance(out, torch.Tensor) and out.device.type == "cuda":
        torch.cuda.synchronize(out.device)
    return out


def median_seconds(call: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``call()`` over ``repeats`` runs, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_seconds(
    model: nn.Module, data: Dataset, forward: ForwardFn, batch_size: int, repeats: int = 10
) -> float:
    """Median wall time of ``forward`` on the first ``batch_size`` rows of ``data`` (a batch of
    named fields, as training reads it), no gradients, after two untimed runs."""
    batch = make_batch(data, torch.arange(min(batch_size, len(data))))  # type: ignore[arg-type]
    batch = on_device(batch, model_device(model))
    with torch.no_grad():
        return median_seconds(lambda: synced(forward(model, batch)), repeats, warmup=2)


@torch.no_grad()
def measure_speed(
    model: nn.Module,
    example: torch.Tensor,
    *,
    batch_size: int,
    repeats: int = 30,
    warmup: int = 5,
    min_time_s: float = 0.3,
) -> dict[str, float]:
    """Median wall time of a forward pass on ``batch_size`` copies of ``example`` (eval mode, no
    grad, this process's threads), with its spread, and the implied examples per second."""
    x = example.unsqueeze(0).expand(batch_size, *example.shape).contiguous()
    x = x.to(model_device(model))
    times: list[float] = []
    with eval_mode(model):
        for _ in range(warmup):
            synced(model(x))
        start = time.perf_counter()
        while len(times) < repeats or (
            time.perf_counter() - start < min_time_s and len(times) < 10 * repeats
        ):
            t = time.perf_counter()
            synced(model(x))
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4)
    return {
        "median_s": med,
        "p25_s": q[0],
        "p75_s": q[2],
        "examples_per_s": batch_size / med,
        "runs": len(times),
    }


def model_card_figures(
    model: nn.Module,
    dataset: Dataset,
    *,
    teacher_logits: torch.Tensor | None,
    latency_batch: int = 1,
    throughput_batch: int = 256,
) -> dict[str, float]:
    """Everything a report row needs for one model on one labelled test set."""
    logits, labels = predict_logits(model, dataset)
    assert labels is not None
    example = dataset[0][0]
    lat = measure_speed(model, example, batch_size=latency_batch)
    thr = measure_speed(model, example, batch_size=throughput_batch, repeats=10)
    row = {
        "accuracy": accuracy(logits, labels),
        "parameters": count_parameters(model),
        "file_bytes": file_size(model),
        "latency_ms": lat["median_s"] * 1e3,
        "latency_ms_p25": lat["p25_s"] * 1e3,
        "latency_ms_p75": lat["p75_s"] * 1e3,
        "throughput": thr["examples_per_s"],
    }
    if teacher_logits is not None:
        row["agreement"] = agreement(logits, teacher_logits)
    return row
