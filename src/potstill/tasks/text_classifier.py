"""The text-classification task for Hugging Face sequence classifiers: the batch holds each
model's own tokenization (``{prefix}input_ids``, ``{prefix}attention_mask``; teacher and
student may tokenize differently, since logits over classes need no shared vocabulary) and
``label``; the output is the classifier's logits; the figures are accuracy, macro-F1 and
per-class F1, agreement with the teacher, size and measured speed; the student is exported as
a plain ``AutoModelForSequenceClassification`` folder with its tokenizer."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.labels import classifier_tables
from ..data.tokenized import TableDataset, tokenize_table
from ..evaluate import accuracy, agreement, file_size, forward_seconds, predict_logits
from ..guards import check_texts
from ..hf import export_pretrained
from ..models import count_parameters
from ..teachers import Batch, ForwardFn
from . import Task

if TYPE_CHECKING:
    from datasets import Dataset as Table

log = logging.getLogger("potstill")

TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "sentence1")
"""Columns looked for, in order, when the text column is not named."""


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


@dataclass
class TokenizedSplits:
    """Splits tokenized for both models: the batches, each model's forward (which columns it
    reads) and, per split and side, how many texts were cut at ``max_length``."""

    splits: dict[str, TableDataset]
    teacher_forward: ForwardFn
    student_forward: ForwardFn
    cut: dict[str, dict[str, int]]


def pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token (GPT-2, Llama) its end-of-text token as one."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def tokenized_splits(
    tables: Mapping[str, Table],
    teacher_tokenizer: Any,
    student_tokenizer: Any | None,
    text: str,
    *,
    text_pair: str | None = None,
    max_length: int = 128,
    label: str | None = "label",
) -> TokenizedSplits:
    """Each table tokenized by the teacher's tokenizer (columns ``input_ids``, …) and, when the
    student has its own (``student_tokenizer``), by both (``t_input_ids`` …, ``s_input_ids``
    …), as batches with the integer ``label`` column; texts over ``max_length`` tokens are cut
    and counted (logged per split)."""
    sides = {"teacher": ("" if student_tokenizer is None else "t_", teacher_tokenizer)}
    if student_tokenizer is not None:
        sides["student"] = ("s_", student_tokenizer)
    cut: dict[str, dict[str, int]] = {}
    out: dict[str, TableDataset] = {}
    for split, table in tables.items():
        columns: dict[str, str] = {"label": label} if label else {}
        pad: dict[str, int] = {}
        for side, (prefix, tok) in sides.items():
            pad_token(tok)
            table, n_cut = tokenize_table(
                table, tok, text, max_length=max_length, prefix=prefix, text_pair=text_pair,
                desc=f"tokenizing {split} for the {side}",
            )  # fmt: skip
            cut.setdefault(split, {})[side] = n_cut
            for key, value in (("input_ids", tok.pad_token_id), ("attention_mask", 0),
                               ("token_type_ids", tok.pad_token_type_id)):  # fmt: skip
                if f"{prefix}{key}" in table.column_names:
                    columns[f"{prefix}{key}"] = f"{prefix}{key}"
                    pad[f"{prefix}{key}"] = int(value or 0)
        out[split] = TableDataset(table, columns, pad)
        if sum(cut[split].values()):
            log.info(
                "data: %d %s texts longer than %d tokens were cut",
                sum(cut[split].values()), split, max_length,
            )  # fmt: skip
    t_prefix = sides["teacher"][0]
    s_prefix = sides.get("student", sides["teacher"])[0]
    return TokenizedSplits(out, classifier_forward(t_prefix), classifier_forward(s_prefix), cut)


def f1_scores(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """F1 of each class (scikit-learn's; 0 for a class neither predicted nor present)."""
    from sklearn.metrics import f1_score

    scores = f1_score(
        labels.numpy(), logits.argmax(-1).numpy(), labels=list(range(num_classes)),
        average=None, zero_division=0,
    )  # fmt: skip
    return [float(x) for x in scores]


def metrics(
    models: Mapping[str, nn.Module],
    data: Dataset,
    *,
    forwards: Mapping[str, ForwardFn],
    classes: Sequence[str],
    teacher_logits: torch.Tensor | None = None,
    latency_batch: int = 1,
    throughput_batch: int = 64,
    user_metrics: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each model's figures on the labelled ``data``: ``user_metrics`` (``name:
    fn(logits, labels) -> float``), accuracy, macro-F1, per-class F1,
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
            "latency_ms": 1e3 * forward_seconds(model, data, forward, latency_batch, 20),
            "throughput": throughput_batch
            / forward_seconds(model, data, forward, throughput_batch, 3),
        }
        if teacher_logits is not None:
            row["agreement"] = agreement(logits, teacher_logits)
        for metric, fn in (user_metrics or {}).items():
            row.setdefault("metrics_yours", {})[metric] = float(fn(logits, labels))
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


def model_tokenizer(model: nn.Module, given: Any, who: str) -> Any:
    """``given``, else the tokenizer saved with ``model`` (its ``name_or_path``)."""
    if given is not None:
        return given
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot find the {who}'s tokenizer from {path!r}; pass it ({who}_tokenizer=... / "
            "tokenizer=...)"
        ) from e


def api_splits(
    teacher: nn.Module,
    student: nn.Module,
    tables: Mapping[str, Any],
    *,
    tokenizer: Any = None,
    student_tokenizer: Any = None,
    columns: Mapping[str, str] | None = None,
    max_length: int = 128,
) -> tuple[TokenizedSplits, list[str]]:
    """What ``potstill.distill`` needs to train a Hugging Face sequence classifier on rows of
    named fields: the splits tokenized for both models and the class names (the teacher's
    ``id2label`` when it names them; string labels are mapped by name)."""
    columns = dict(columns or {})
    encoded, text, names = classifier_tables(
        tables, teacher.config, student.config, columns, "text", TEXT_COLUMNS
    )
    pair = columns.get("text_pair")
    check_texts(encoded, [text, *([pair] if pair else [])], "data")
    t_tok = model_tokenizer(teacher, tokenizer, "teacher")
    s_tok = model_tokenizer(student, student_tokenizer, "student") if (
        student_tokenizer is not None or _own_tokenizer(teacher, student)
    ) else None  # fmt: skip
    if s_tok is not None and s_tok.get_vocab() == t_tok.get_vocab():
        s_tok = None  # the same vocabulary: one tokenization serves both
    return tokenized_splits(
        encoded, t_tok, s_tok, text, text_pair=pair, max_length=max_length
    ), names


def _own_tokenizer(teacher: nn.Module, student: nn.Module) -> bool:
    """Whether the student came from elsewhere than the teacher (a derived student keeps the
    teacher's ``name_or_path``)."""
    path = getattr(student, "name_or_path", "")
    return bool(path) and path != getattr(teacher, "name_or_path", "")


def is_sequence_classifier(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers sequence classifier."""
    return type(model).__name__.endswith("ForSequenceClassification") and hasattr(model, "config")
