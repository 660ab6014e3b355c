"""The sentence-embedding task for Hugging Face encoders: texts tokenized for teacher and
student, the mean-pooled forward, and the embedding metrics (neighbours, similarity ranks,
linear-map cosine)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.tensors import TensorDictDataset, iterate_batches
from ..data.tokenized import TableDataset, tokenize_table
from ..evaluate import file_size, forward_seconds
from ..hf import export_pretrained
from ..models import count_parameters
from ..placement import model_device, on_device
from ..sbert import declared_pooling
from . import Task

if TYPE_CHECKING:
    from datasets import Dataset as Table

log = logging.getLogger("potstill")


def tokenize_pair(
    texts: Sequence[str], teacher_tok: Any, student_tok: Any, max_length: int
) -> TensorDictDataset:
    """Both tokenizations of ``texts``, padded to ``max_length``, as one dataset:
    ``t_input_ids``, ``t_attention_mask``, ``s_input_ids``, ``s_attention_mask``."""
    t = teacher_tok(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    s = student_tok(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return TensorDictDataset({
        "t_input_ids": t["input_ids"], "t_attention_mask": t["attention_mask"],
        "s_input_ids": s["input_ids"], "s_attention_mask": s["attention_mask"],
    })  # fmt: skip


def tokenize_texts(
    table: Table, column: str, teacher_tok: Any, student_tok: Any, max_length: int
) -> TableDataset:
    """Both tokenizations of a table's text ``column`` (through ``datasets.map``, cached on
    disk beside a file-backed table), read a batch at a time and padded to ``max_length``: the
    fields of :func:`tokenize_pair`, without holding the texts or their tokens in memory."""
    columns: dict[str, str] = {}
    pad: dict[str, int] = {}
    for prefix, tok in (("t_", teacher_tok), ("s_", student_tok)):
        side = "teacher" if prefix == "t_" else "student"
        table, _ = tokenize_table(table, tok, column, max_length=max_length, prefix=prefix,
                                  desc=f"tokenizing for the {side}")  # fmt: skip
        for key, value in (("input_ids", tok.pad_token_id), ("attention_mask", 0)):
            columns[f"{prefix}{key}"] = f"{prefix}{key}"
            pad[f"{prefix}{key}"] = int(value or 0)
    return TableDataset(table, columns, pad, inputs=tuple(columns), pad_to=max_length)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors where ``mask`` is 1 (sentence-transformers' mean pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "lasttoken")


@dataclass(frozen=True)
class Pooling:
    """How token vectors become a sentence embedding: ``mode`` (mean, cls, max, mean_sqrt_len,
    lasttoken) and whether the embedding is L2-normalised after."""

    mode: str = "mean"
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling mode {self.mode!r} is not one of {', '.join(POOLING_MODES)}")


def read_pooling(folder: str | os.PathLike) -> Pooling:
    """The pooling a sentence-transformers folder declares (``modules.json``: its Pooling
    module's config and whether a Normalize module follows); mean without normalisation for a
    folder that declares none (a plain encoder)."""
    found = declared_pooling(folder)
    return Pooling(*found) if found else Pooling()


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling = Pooling()) -> torch.Tensor:
    """The sentence embedding of ``hidden`` ``(B, T, H)`` over the real tokens of ``mask``, as
    sentence-transformers' Pooling (and Normalize) modules compute it."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling.mode == "mean":
        out = mean_pool(hidden, mask)
    elif pooling.mode == "mean_sqrt_len":
        out = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9).sqrt()
    elif pooling.mode == "cls":
        out = hidden[:, 0]
    elif pooling.mode == "max":
        out = hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(1).values
    else:  # lasttoken: the last real token of each row (right padding)
        last = mask.sum(1).long().clamp_min(1) - 1
        out = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return torch.nn.functional.normalize(out, p=2, dim=-1) if pooling.normalize else out


def encoder_forward(prefix: str, pooling: Pooling = Pooling()):
    """A forward function for a Hugging Face encoder reading ``{prefix}input_ids`` and
    ``{prefix}attention_mask`` from the batch; it returns the pooled embedding (mean pooling
    without normalisation unless ``pooling`` says otherwise)."""

    def forward(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        mask = batch[f"{prefix}attention_mask"]
        out = model(input_ids=batch[f"{prefix}input_ids"], attention_mask=mask)
        return pool(out.last_hidden_state, mask, pooling)

    return forward


@torch.no_grad()
def embed(model: nn.Module, dataset: Dataset, forward, batch_size: int = 64) -> torch.Tensor:
    """Embeddings of every example, in order."""
    model.eval()
    n = len(dataset)  # type: ignore[arg-type]
    device = model_device(model)  # run where the model is; the embeddings come back to the CPU
    return torch.cat(
        [
            forward(model, on_device(b, device)).float().cpu()
            for b in iterate_batches(dataset, torch.arange(n), batch_size)
        ]
    )


def neighbour_agreement(student: torch.Tensor, teacher: torch.Tensor, k: int = 10) -> float:
    """Mean overlap of each text's ``k`` nearest neighbours (cosine, itself excluded) under the
    student's and the teacher's embeddings: 1 when every neighbourhood is the same."""

    def knn(x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(x, dim=-1)
        sim = x @ x.T
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(k, dim=-1).indices

    a, b = knn(student), knn(teacher)
    overlap = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().sum(-1) / k
    return float(overlap.mean())


def pair_spearman(
    model: nn.Module,
    forward: Any,
    first: TensorDictDataset,
    second: TensorDictDataset,
    scores: Sequence[float],
) -> float:
    """Spearman correlation between a model's cosine similarity of each sentence pair and the
    pair's similarity score (the STS figure)."""
    from scipy.stats import spearmanr

    a = nn.functional.normalize(embed(model, first, forward), dim=-1)
    b = nn.functional.normalize(embed(model, second, forward), dim=-1)
    rho = spearmanr((a * b).sum(-1).double().numpy(), list(scores))
    return float(rho.statistic)


def similarity_correlation(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Spearman correlation between the pairwise cosine similarities under student and teacher
    (all pairs of distinct texts): whether both rank pairs of texts alike."""

    def pairwise(x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(x, dim=-1)
        sim = x @ x.T
        iu = torch.triu_indices(len(x), len(x), 1)
        return sim[iu[0], iu[1]]

    from scipy.stats import spearmanr

    rho = spearmanr(pairwise(student).double().numpy(), pairwise(teacher).double().numpy())
    return float(rho.statistic)


def linear_map_cosine(
    student_train: torch.Tensor,
    teacher_train: torch.Tensor,
    student_test: torch.Tensor,
    teacher_test: torch.Tensor,
) -> float:
    """Mean cosine between teacher embeddings and student embeddings mapped into the teacher's
    space by the least-squares linear map fitted on the training texts (the same fair map for
    every student, whatever its size)."""
    ones = torch.ones(len(student_train), 1, dtype=torch.float64)
    x = torch.cat([student_train.double(), ones], 1)
    w = torch.linalg.lstsq(x, teacher_train.double()).solution
    mapped = (
        torch.cat([student_test.double(), torch.ones(len(student_test), 1, dtype=torch.float64)], 1)
        @ w
    )
    return float(nn.functional.cosine_similarity(mapped, teacher_test.double(), dim=-1).mean())


def metrics(
    models: Mapping[str, nn.Module],
    data: TensorDictDataset,
    *,
    teacher: nn.Module,
    train: TensorDictDataset,
    teacher_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    latency_batch: int = 1,
    throughput_batch: int = 64,
    forwards: tuple[Any, Any] | None = None,
    pairs: tuple[TensorDictDataset, TensorDictDataset, Sequence[float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each model's figures on the held-out texts ``data`` against the teacher's embeddings:
    neighbour agreement, similarity rank correlation, cosine after the least-squares linear map
    fitted on ``train``; its size and measured speed. ``teacher_embeddings``: the teacher's on
    (``data``, ``train``) when already computed; ``forwards``: the (teacher, student) forwards
    (their pooling), by default mean pooling on both sides; ``pairs``: sentence pairs (both
    sides tokenized) and their similarity scores, for each model's ``pairs_spearman``."""
    t_forward, s_forward = forwards or (TEACHER_FORWARD, STUDENT_FORWARD)
    t_val, t_train = teacher_embeddings or (
        embed(teacher, data, t_forward),
        embed(teacher, train, t_forward),
    )
    rows = {}
    for name, model in models.items():
        forward = t_forward if model is teacher else s_forward
        if model is teacher:
            e_val, e_train = t_val, t_train
        else:
            e_val, e_train = embed(model, data, forward), embed(model, train, forward)
        rows[name] = {
            "neighbour_agreement@10": neighbour_agreement(e_val, t_val, 10),
            "similarity_spearman": similarity_correlation(e_val, t_val),
            "linear_map_cosine": linear_map_cosine(e_train, t_train, e_val, t_val),
            "parameters": count_parameters(model),
            "layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
            "file_bytes": file_size(model),
            "latency_ms": 1e3 * forward_seconds(model, data, forward, latency_batch),
            "throughput": throughput_batch
            / forward_seconds(model, data, forward, throughput_batch, 3),
        }
        if pairs is not None:
            rows[name]["pairs_spearman"] = pair_spearman(model, forward, *pairs)
    return rows


def export(
    model: nn.Module,
    folder: Path,
    *,
    tokenizer: Any = None,
    sentence_transformers_from: str | os.PathLike | None = None,
    pooling: Pooling | None = None,
) -> Path:
    """A plain Hugging Face folder with the tokenizer and, given the sentence-transformers
    folder the student came from, saved as a sentence-transformers model by the library
    (``SentenceTransformer(folder)`` loads it) that pools by ``pooling`` (the one the student
    was trained with; default the source's)."""
    return export_pretrained(
        model, folder, tokenizer=tokenizer, sentence_transformers_from=sentence_transformers_from,
        pooling=(pooling.mode, pooling.normalize) if pooling is not None else None,
    )  # fmt: skip


STUDENT_FORWARD = encoder_forward("s_")
TEACHER_FORWARD = encoder_forward("t_")

TASK = Task(
    name="embedding",
    tokens=False,
    student_forward=STUDENT_FORWARD,
    teacher_forward=TEACHER_FORWARD,
    metrics=metrics,
    export=export,
)
