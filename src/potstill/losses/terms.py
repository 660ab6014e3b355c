"""The terms an objective is made of, and the one dispatch from a term's kind and options to its
builder: on a model's outputs ``kd`` (Hinton), ``ce`` (labels) and every divergence of
:data:`~potstill.losses.divergences.DIVERGENCES`, per row (classifiers, embeddings) or per next
token (causal LMs: ``tokens``); on tapped features the kinds of
:mod:`~potstill.losses.feature_terms`. How a divergence is computed (dense, chunked, sparse,
fused) is chosen in one place, :func:`~potstill.losses.forms.view_divergence`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..signal import Signal, StudentView
from .divergences import DIVERGENCES
from .feature_terms import (
    FEATURE_TERM_KINDS,
    attention_term,
    attention_transfer_term,
    feature_term,
    minilm_term,
    relational_term,
)
from .forms import view_divergence
from .objective import Objective, Term, batch_examples, teacher_target
from .tokens import batch_token_mask, next_token_nll, token_count

DIVERGENCE_KINDS: tuple[str, ...] = tuple(DIVERGENCES)
"""Every divergence kind, in the order of :data:`~potstill.losses.divergences.DIVERGENCES`."""
OUTPUT_TERM_KINDS: tuple[str, ...] = ("kd", "ce", *DIVERGENCE_KINDS)
"""Kinds that compare the models' outputs (logits, or embeddings)."""
TERM_KINDS: tuple[str, ...] = (*OUTPUT_TERM_KINDS, *FEATURE_TERM_KINDS)
"""Every term kind a recipe may name."""


def kd_term(temperature: float = 2.0, weight: float = 0.5, name: str = "kd") -> Term:
    """Hinton's soft-target term: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batch mean. With a
    top-k teacher (a cache) the KL is taken on the k+1 buckets (``sparse_divergence``)."""

    def fn(view: StudentView, signal: Signal | None, batch: Mapping[str, Any]) -> Tensor:
        target = teacher_target(signal, name)
        return temperature**2 * view_divergence(view, target, "fkl", temperature=temperature)

    return Term(name, fn, weight)


def ce_term(
    weight: float = 0.5, ignore_index: int = -100, label_smoothing: float = 0.0, name: str = "ce"
) -> Term:
    """Cross-entropy with the labels, averaged over labelled examples; 0 when a batch has none."""

    def fn(view: StudentView, signal: Signal | None, batch: Mapping[str, Any]) -> Tensor:
        labels = batch["label"]
        logits = view.logits.reshape(-1, view.logits.shape[-1])
        labels = labels.reshape(-1)
        # a sum over a clamped count rather than reduction="mean": no host sync, and a batch
        # without labels gives 0 instead of NaN
        total = nn.functional.cross_entropy(
            logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
            reduction="sum",
        )  # fmt: skip
        return total / (labels != ignore_index).sum().clamp_min(1)

    def count(batch: Mapping[str, Any]) -> Tensor:
        return (batch["label"] != ignore_index).sum()

    return Term(name, fn, weight, needs_teacher=False, count=count)


def divergence_term(
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    weight: float = 1.0,
    name: str | None = None,
    skew: float = 0.1,
) -> Term:
    """A row-level divergence between student and teacher outputs (see ``divergence``), over
    the rows of the batch's ``mask`` when it has one; on the k+1 buckets
    (``sparse_divergence``) when the teacher is a top-k cache."""

    def fn(view: StudentView, signal: Signal | None, batch: Mapping[str, Any]) -> Tensor:
        target = teacher_target(signal, name or kind)
        return view_divergence(
            view, target, kind, temperature=temperature, beta=beta, skew=skew,
            mask=batch.get("mask"),
        )  # fmt: skip

    def count(batch: Mapping[str, Any]) -> torch.Tensor | int:
        mask = batch.get("mask")
        return batch_examples(batch) if mask is None else mask.sum()

    return Term(name or kind, fn, weight, count=count)


def next_token_ce_term(weight: float = 1.0, name: str = "ce") -> Term:
    """Cross-entropy on the data's next tokens (the usual LM fine-tuning loss), averaged over the
    positions of :func:`~potstill.losses.tokens.batch_token_mask`; 0 when a batch has none.
    Needs no teacher."""

    def fn(view: StudentView, signal: Signal | None, batch: Mapping[str, Any]) -> Tensor:
        total, count = next_token_nll(view.logits, batch["input_ids"], batch_token_mask(batch))
        return total / count.clamp_min(1)

    return Term(name, fn, weight, needs_teacher=False, count=token_count)


def token_term(
    kind: str = "fkl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    weight: float = 1.0,
    chunk_size: int | None = None,
    name: str | None = None,
) -> Term:
    """A token-level divergence between the student's and the teacher's next-token
    distributions on the positions of :func:`~potstill.losses.tokens.batch_token_mask`, over
    their shared vocabulary; the teacher's signal may be dense (a live teacher) or top-k (a
    teacher cache). With a view whose logits are deferred (a hidden state and the LM head) and
    a dense teacher, the head is fused with the divergence
    (:func:`~potstill.losses.fused.fused_linear_divergence`): the student's full logits and
    their gradient are never built; the value and gradients are the same."""

    def fn(view: StudentView, signal: Signal | None, batch: Mapping[str, Any]) -> Tensor:
        target = teacher_target(signal, name or kind)
        return view_divergence(
            view, target, kind, temperature=temperature, beta=beta, skew=skew,
            mask=batch_token_mask(batch), chunk_size=chunk_size, shared_vocab=True,
        )  # fmt: skip

    return Term(name or kind, fn, weight, count=token_count)


def build_term(
    kind: str,
    *,
    weight: float = 1.0,
    name: str | None = None,
    tokens: bool = False,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    label_smoothing: float = 0.0,
    student: str | Sequence[str] | None = None,
    teacher: str | Sequence[str] | None = None,
    loss: str = "mse",
    normalize: bool = False,
    layer_map: Sequence[tuple[int, int]] | None = None,
    p: float = 2.0,
    relation_heads: int | None = None,
) -> Term:
    """The term of ``kind`` with its options: the one dispatch from a recipe's term to a loss.

    ``tokens``: the task predicts next tokens (a causal LM): ``ce`` is the next-token loss and
    divergences are token terms (chunked by ``chunk_size``); otherwise ``ce`` reads the
    batch's labels and divergences compare rows. ``kd`` (rows only), feature kinds: see their
    builders. ``student``/``teacher`` name taps (default: the outputs, ``"logits"``);
    ``layer_map`` pairs wildcard taps' layers, resolved beforehand.
    """
    name = name or kind
    if kind not in TERM_KINDS:
        raise ValueError(f"unknown term kind {kind!r}; accepted kinds: {', '.join(TERM_KINDS)}")
    if tokens and kind not in ("ce", *DIVERGENCE_KINDS):
        raise ValueError(
            f"a {kind} term does not apply to next-token prediction; causal-LM terms are "
            f"ce and the divergences {', '.join(DIVERGENCE_KINDS)}"
        )
    if kind == "kd":
        return kd_term(temperature, weight, name)
    if kind == "ce":
        if tokens:
            return next_token_ce_term(weight, name)
        return ce_term(weight, label_smoothing=label_smoothing, name=name)
    if kind in DIVERGENCE_KINDS:
        if tokens:
            return token_term(
                kind, temperature=temperature, beta=beta, skew=skew, weight=weight,
                chunk_size=chunk_size, name=name,
            )  # fmt: skip
        return divergence_term(kind, temperature, beta, weight, name, skew=skew)
    s = student if student is not None else "logits"
    t = teacher if teacher is not None else "logits"
    if kind == "feature":
        return feature_term(
            s, t, loss=loss, normalize=normalize, weight=weight, layer_map=layer_map, name=name
        )
    if kind in ("attention_mse", "attention_kl"):
        return attention_term(s, t, kind=kind, weight=weight, layer_map=layer_map, name=name)
    if kind == "minilm":
        if relation_heads is None:
            raise ValueError("a minilm term needs relation_heads")
        return minilm_term(
            _as_list(s), _as_list(t), relation_heads=relation_heads, weight=weight, name=name
        )
    if kind == "at":
        return attention_transfer_term(s, t, p=p, weight=weight, name=name)
    if not (isinstance(s, str) and isinstance(t, str)):
        raise ValueError(f"a {kind} term reads one tap per side, not a list")
    return relational_term(kind, s, t, weight=weight, name=name)


def _as_list(x: str | Sequence[str]) -> list[str]:
    return [x] if isinstance(x, str) else list(x)


def hinton_objective(temperature: float = 2.0, alpha: float = 0.5) -> Objective:
    """The classic objective ``alpha·kd + (1−alpha)·ce``: the same value as ``kd_loss``."""
    return Objective([kd_term(temperature, alpha), ce_term(1.0 - alpha)])


def labels_only_objective() -> Objective:
    """Cross-entropy alone: the baseline student trained without a teacher."""
    return Objective([ce_term(1.0)])
