"""Objective terms that read intermediate features through taps: hidden-state matching with
learned projectors (FitNets, TinyBERT), attention maps, MiniLM relations, attention transfer,
and relations between samples (RKD, PKT)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..signal import Signal, StudentView
from .attention import attention_kl, attention_mse, attention_transfer, minilm_relation_loss
from .features import feature_distance, make_projector
from .objective import Term
from .relational import pkt, rkd_angle, rkd_distance

Names = tuple[str, ...]
PairLoss = Callable[[list[torch.Tensor], list[torch.Tensor], Mapping[str, Any]], torch.Tensor]

FEATURE_TERM_KINDS = (
    "feature", "attention_mse", "attention_kl", "minilm", "at", "rkd_distance", "rkd_angle", "pkt",
)  # fmt: skip


def _get(features: Mapping[str, torch.Tensor], logits: torch.Tensor | None, name: str):
    # "logits" names the model's output, so relational terms can work on it without a tap
    return logits if name == "logits" else features[name]


class FeatureMatch(nn.Module):
    """Mean of a loss over pairs of (student features, teacher features).

    With ``project``, a projector per pair maps the student's feature to the teacher's shape; it
    is created by :meth:`setup` from the shapes of a first batch and trains with the student.
    """

    def __init__(
        self, pairs: Sequence[tuple[Names, Names]], loss: PairLoss, project: bool = False
    ) -> None:
        super().__init__()
        if not pairs:
            raise ValueError("a feature term needs at least one (student, teacher) pair")
        self.pairs = [(tuple(s), tuple(t)) for s, t in pairs]
        self.loss = loss
        self.project = project
        self.projectors = nn.ModuleList()
        self._ready = not project

    def setup(self, view: StudentView, signal: Signal | None) -> None:
        """Create the projectors from the student's and teacher's feature shapes."""
        if self._ready:
            return
        assert signal is not None
        for s_names, t_names in self.pairs:
            s = _get(view.features, view.logits, s_names[0])
            t = _get(signal.features, signal.logits, t_names[0])
            proj = make_projector(tuple(s.shape), tuple(t.shape))
            self.projectors.append(proj if proj is not None else nn.Identity())
        self._ready = True

    def forward(
        self, view: StudentView, signal: Signal | None, batch: Mapping[str, Any]
    ) -> torch.Tensor:
        assert signal is not None
        if not self._ready:
            raise RuntimeError("FeatureMatch.setup() must run before the first loss")
        total = None
        for i, (s_names, t_names) in enumerate(self.pairs):
            s = [_get(view.features, view.logits, n) for n in s_names]
            t = [_get(signal.features, signal.logits, n) for n in t_names]
            if self.project:
                s = [self.projectors[i](x) for x in s]
            value = self.loss(s, t, batch)
            total = value if total is None else total + value
        assert total is not None
        return total / len(self.pairs)


def _pairs(
    student: str | Sequence[str],
    teacher: str | Sequence[str],
    layer_map: Sequence[tuple[int, int]] | None,
) -> list[tuple[Names, Names]]:
    """Pairs of single names. With ``layer_map``, ``student``/``teacher`` are wildcard tap names
    and (i, j) pairs ``student.i`` with ``teacher.j``."""
    if layer_map is not None:
        if not (isinstance(student, str) and isinstance(teacher, str)):
            raise ValueError("with a layer map, student and teacher are single wildcard tap names")
        return [((f"{student}.{i}",), (f"{teacher}.{j}",)) for i, j in layer_map]
    s = [student] if isinstance(student, str) else list(student)
    t = [teacher] if isinstance(teacher, str) else list(teacher)
    if len(s) != len(t):
        raise ValueError(f"student features {s} and teacher features {t} must pair up one to one")
    return [((a,), (b,)) for a, b in zip(s, t, strict=True)]


def _term(name: str, weight: float, module: FeatureMatch) -> Term:
    s = tuple(n for p in module.pairs for n in p[0])
    t = tuple(n for p in module.pairs for n in p[1])
    return Term(
        name,
        module,
        weight,
        needs_teacher=True,
        student_features=s,
        teacher_features=t,
        module=module,
    )


def feature_term(
    student: str | Sequence[str],
    teacher: str | Sequence[str],
    *,
    loss: str = "mse",
    normalize: bool = False,
    weight: float = 1.0,
    layer_map: Sequence[tuple[int, int]] | None = None,
    name: str = "feature",
) -> Term:
    """Match student features to teacher features (FitNets hints, TinyBERT hidden states):
    ``loss`` is ``mse``, ``cosine`` or ``smooth_l1``; a projector maps the student's feature to
    the teacher's shape when they differ (linear over the last dim, 1×1 conv for 4-D maps)."""

    def fn(s: list[torch.Tensor], t: list[torch.Tensor], batch: Mapping[str, Any]):
        dim = 1 if t[0].dim() == 4 else -1
        return feature_distance(s[0], t[0], loss, dim=dim, normalize=normalize)

    return _term(name, weight, FeatureMatch(_pairs(student, teacher, layer_map), fn, True))


def attention_term(
    student: str | Sequence[str],
    teacher: str | Sequence[str],
    *,
    kind: str = "attention_mse",
    weight: float = 1.0,
    layer_map: Sequence[tuple[int, int]] | None = None,
    name: str | None = None,
) -> Term:
    """TinyBERT attention-map matching (``attention_mse`` or ``attention_kl``) on attention
    probabilities (B, H, T, T); the batch's ``attention_mask`` (if any) marks real tokens."""
    fns = {"attention_mse": attention_mse, "attention_kl": attention_kl}
    if kind not in fns:
        raise ValueError(f"attention term kind must be one of {sorted(fns)}, got {kind!r}")

    def fn(s: list[torch.Tensor], t: list[torch.Tensor], batch: Mapping[str, Any]):
        mask = batch.get("attention_mask")
        return fns[kind](s[0], t[0], mask=None if mask is None else mask.bool())

    return _term(name or kind, weight, FeatureMatch(_pairs(student, teacher, layer_map), fn))


def minilm_term(
    student: Sequence[str],
    teacher: Sequence[str],
    *,
    relation_heads: int,
    weight: float = 1.0,
    name: str = "minilm",
) -> Term:
    """MiniLM(v2) self-attention relation distillation: ``student`` and ``teacher`` each name
    three taps (query, key, value projections, (B, T, D)); sizes and head counts may differ."""
    if len(student) != 3 or len(teacher) != 3:
        raise ValueError("minilm: student and teacher each name three taps: query, key, value")

    def fn(s: list[torch.Tensor], t: list[torch.Tensor], batch: Mapping[str, Any]):
        mask = batch.get("attention_mask")
        return minilm_relation_loss(
            tuple(s),
            tuple(t),
            num_relation_heads=relation_heads,
            mask=None if mask is None else mask.bool(),
        )

    pairs = [(tuple(student), tuple(teacher))]
    return _term(name, weight, FeatureMatch(pairs, fn))


def attention_transfer_term(
    student: str | Sequence[str],
    teacher: str | Sequence[str],
    *,
    p: float = 2.0,
    weight: float = 1.0,
    name: str = "at",
) -> Term:
    """Attention transfer (Zagoruyko & Komodakis 2017) between CNN feature maps."""

    def fn(s: list[torch.Tensor], t: list[torch.Tensor], batch: Mapping[str, Any]):
        return attention_transfer(s[0], t[0], p=p)

    return _term(name, weight, FeatureMatch(_pairs(student, teacher, None), fn))


def relational_term(
    kind: str,
    student: str = "logits",
    teacher: str = "logits",
    *,
    weight: float = 1.0,
    name: str | None = None,
) -> Term:
    """Relations between the samples of a batch: ``rkd_distance``, ``rkd_angle`` (Park et al.
    2019) or ``pkt`` (Passalis & Tefas 2018), on features flattened to (B, D)."""
    fns = {"rkd_distance": rkd_distance, "rkd_angle": rkd_angle, "pkt": pkt}
    if kind not in fns:
        raise ValueError(f"relational term kind must be one of {sorted(fns)}, got {kind!r}")

    def fn(s: list[torch.Tensor], t: list[torch.Tensor], batch: Mapping[str, Any]):
        return fns[kind](s[0], t[0])

    return _term(name or kind, weight, FeatureMatch(_pairs(student, teacher, None), fn))
