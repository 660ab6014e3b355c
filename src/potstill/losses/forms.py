"""The one place that picks how a divergence term is computed: fused with the student's output
layer (a deferred view and dense teacher logits), on the k+1 buckets of a top-k teacher (a
cache), chunked (``chunk_size``), or dense. Every form gives the value and gradient of
:func:`~potstill.losses.divergences.divergence` (parity-tested in ``tests/test_llm_losses.py``)."""

from __future__ import annotations

from torch import Tensor

from ..signal import StudentView, TopK
from .chunked import chunked_divergence
from .divergences import divergence
from .fused import fused_linear_divergence
from .sparse import sparse_divergence


def shared_vocabulary(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Both logits cut to their common vocabulary size, for models whose output matrices differ
    only by padding rows (checked beforehand with ``potstill.hf.shared_vocab_size``)."""
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    if v_s == v_t:
        return student_logits, teacher_logits
    v = min(v_s, v_t)
    return student_logits[..., :v], teacher_logits[..., :v]


def view_divergence(
    view: StudentView,
    target: Tensor | TopK,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    shared_vocab: bool = False,
) -> Tensor:
    """The divergence ``kind`` between the student's ``view`` and the teacher's ``target``
    (dense logits or :class:`~potstill.signal.TopK`), averaged over the positions of ``mask``.

    The form: a view whose logits are deferred (hidden state + head) with dense teacher logits
    is fused with the head (:func:`~potstill.losses.fused.fused_linear_divergence`); a top-k
    teacher gives :func:`~potstill.losses.sparse.sparse_divergence` (chunked when
    ``chunk_size`` is set); dense logits :func:`~potstill.losses.chunked.chunked_divergence`
    with a ``chunk_size``, else :func:`~potstill.losses.divergences.divergence`.
    ``shared_vocab`` cuts both sides to their common vocabulary first (causal LMs whose output
    matrices differ by padding rows).
    """
    opts = {"temperature": temperature, "beta": beta, "skew": skew, "mask": mask}
    if view.deferred and not isinstance(target, TopK):
        # the student's output layer fused with the divergence: logits one chunk at a time
        assert view.head is not None and view.hidden is not None
        weight, bias = view.head.weight, view.head.bias
        v = min(weight.shape[0], target.shape[-1]) if shared_vocab else weight.shape[0]
        if v < weight.shape[0]:  # (a slice's gradient is a full-size copy: only if needed)
            weight, bias = weight[:v], None if bias is None else bias[:v]
        if v < target.shape[-1]:
            target = target[..., :v]
        return fused_linear_divergence(
            view.hidden, weight, target, kind, bias=bias, chunk_size=chunk_size, **opts
        )
    logits = view.logits
    if isinstance(target, TopK):
        return sparse_divergence(logits, target, kind, chunk_size=chunk_size, **opts)
    if shared_vocab:
        logits, target = shared_vocabulary(logits, target)
    target = target.detach()
    if chunk_size is None:
        return divergence(logits, target, kind, **opts)
    return chunked_divergence(logits, target, kind, chunk_size=chunk_size, **opts)
