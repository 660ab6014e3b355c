"""The sentence-embedding task for Hugging Face encoders: texts tokenized for teacher and
student, the mean-pooled forward, and the embedding metrics (neighbours, similarity ranks,
linear-map cosine)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.tensors import TensorDictDataset, iterate_batches

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


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors where ``mask`` is 1 (sentence-transformers' mean pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def encoder_forward(prefix: str):
    """A forward function for a Hugging Face encoder reading ``{prefix}input_ids`` and
    ``{prefix}attention_mask`` from the batch; it returns the mean-pooled embedding."""

    def forward(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        mask = batch[f"{prefix}attention_mask"]
        out = model(input_ids=batch[f"{prefix}input_ids"], attention_mask=mask)
        return mean_pool(out.last_hidden_state, mask)

    return forward


@torch.no_grad()
def embed(model: nn.Module, dataset: Dataset, forward, batch_size: int = 64) -> torch.Tensor:
    """Embeddings of every example, in order."""
    model.eval()
    n = len(dataset)  # type: ignore[arg-type]
    return torch.cat(
        [forward(model, b).float() for b in iterate_batches(dataset, torch.arange(n), batch_size)]
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
