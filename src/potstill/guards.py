"""Non-finite guards: NaN or infinite values in the training data, in a teacher's outputs, in a
step's loss or gradients are caught where they appear and named (rows, examples, the step, the
term), instead of training a student whose weights all become NaN."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from .data.rows import DataError
from .data.tensors import TensorDictDataset
from .signal import Signal

log = logging.getLogger("potstill")

SHOWN = 10
"""How many row or example numbers a message lists."""

TEACHER_FIX = (
    "Check the teacher on these inputs (a float16 teacher that overflows: load it in bfloat16 "
    "or float32)"
)


class NonFiniteError(ValueError):
    """A step's loss or gradients, or a teacher's outputs, are NaN or infinite."""


def listed(index: Sequence[int] | torch.Tensor, what: str = "rows") -> str:
    """``rows 3, 17, 40`` (in order, the first :data:`SHOWN`, then how many in all)."""
    ids = sorted(int(i) for i in index)
    shown = ", ".join(str(i) for i in ids[:SHOWN])
    more = f", … ({len(ids)} in all)" if len(ids) > SHOWN else ""
    return f"{what} {shown}{more}"


def _bad_rows(t: torch.Tensor) -> torch.Tensor:
    """Indices along the first dimension of the rows of floating ``t`` with a NaN or inf."""
    if not t.is_floating_point() or t.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    bad = ~torch.isfinite(t.reshape(len(t), -1)).all(dim=1)
    return bad.nonzero().flatten().cpu()


def _columns(dataset: Dataset) -> Mapping[str, torch.Tensor] | None:
    if isinstance(dataset, TensorDictDataset):
        return dataset.tensors
    if isinstance(dataset, TensorDataset):
        names = ["input", "label", *(f"tensor {i}" for i in range(2, len(dataset.tensors)))]
        return dict(zip(names, dataset.tensors, strict=False))
    return None


def check_columns(columns: Mapping[str, Any], source: str) -> None:
    """DataError naming the column and row numbers of the first floating tensor column of
    ``columns`` that holds NaN or infinite values (each row counted from 0)."""
    for name, col in columns.items():
        if isinstance(col, torch.Tensor):
            rows = _bad_rows(col)
            if len(rows):
                raise DataError(
                    f"{source}: column {name!r} has NaN or infinite values in "
                    f"{listed(rows)} (counted from 0); drop or repair those rows"
                )


def check_texts(tables: Mapping[str, Any], columns: Sequence[str], source: str) -> None:
    """DataError naming the split, the column and the row numbers (each split counted from 0)
    of the first text column of ``tables`` (split name → ``datasets.Dataset``) with missing or
    blank texts: a labelled example without its text would train on an empty string."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for split, table in tables.items():
        for name in columns:
            col = table.with_format("arrow")[name]  # in the split's row order
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                continue
            blank = pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_trim_whitespace(col), ""))
            rows = pc.indices_nonzero(pc.fill_null(blank, True)).to_pylist()
            if rows:
                raise DataError(
                    f"{source}: column {name!r} of the {split} split has no text in "
                    f"{listed(rows)} (counted from 0); fill them in or remove those rows"
                )


def check_data(dataset: Dataset, who: str = "the training data") -> bool:
    """Check a dataset held in tensors (TensorDataset, TensorDictDataset) for NaN or infinite
    values at once (DataError naming the rows); False for other datasets, whose batches are
    checked as they are made (:func:`batch_problem`)."""
    columns = _columns(dataset)
    if columns is None:
        return False
    check_columns(columns, who)
    return True


def batch_problem(batch: Mapping[str, Any]) -> str | None:
    """What is not finite in a batch's floating inputs (the examples named by their dataset
    index), or None."""
    index = batch.get("index")
    for name, t in batch.items():
        if name == "index" or not isinstance(t, torch.Tensor):
            continue
        rows = _bad_rows(t)
        if len(rows):
            ids = index[rows] if isinstance(index, torch.Tensor) else rows
            return f"{name!r} has NaN or infinite values in {listed(ids, 'examples')}"
    return None


def _bad(t: torch.Tensor) -> torch.Tensor:
    """Whether ``t`` holds a NaN or +inf (a 0-d bool tensor; no device sync). −inf is allowed:
    a teacher may mask tokens it never emits with it."""
    return (torch.isnan(t) | torch.isposinf(t)).any()


def _rows_bad(t: torch.Tensor, allow_neg_inf: bool) -> torch.Tensor:
    """Per row (first dimension) of ``t``: whether it holds a NaN or an inf (+inf only with
    ``allow_neg_inf``); a 1-d bool tensor on ``t``'s device, no sync."""
    flat = t.detach().reshape(len(t), -1) if t.dim() else t.detach().reshape(1, 1)
    bad = torch.isnan(flat) | (torch.isposinf(flat) if allow_neg_inf else torch.isinf(flat))
    return bad.any(dim=1)


def signal_rows_bad(signal: Signal | None) -> torch.Tensor | None:
    """Per example of a teacher's signal: whether its logits, top-k or features hold NaN or
    +inf (features: any inf); a 1-d bool tensor (no device sync), or None without any."""
    if signal is None:
        return None
    parts = [(t, True) for t in (signal.logits,) if t is not None]
    if signal.topk is not None:
        parts += [(signal.topk.logprobs, True), (signal.topk.tail_mass, True)]
    parts += [(f, False) for f in signal.features.values()]
    flags = [_rows_bad(t, neg) for t, neg in parts if t.is_floating_point()]
    if not flags:
        return None
    n = len(flags[0])
    if any(len(f) != n for f in flags):  # outputs not laid out by example: one flag for all
        return torch.stack([f.any() for f in flags]).any().reshape(1)
    return torch.stack(flags).any(dim=0)


def grads_bad(params: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
    """Whether this process's gradients hold a NaN or inf (0-d bool), or None without any."""
    grads = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        grads.append(g.to_local() if hasattr(g, "to_local") else g)  # FSDP2: the local shard
    if not grads:
        return None
    norms = torch._foreach_norm(grads)
    return ~torch.isfinite(torch.stack([n.reshape(()).float() for n in norms])).all()


def bad_parameters(named: Iterable[tuple[str, torch.nn.Parameter]]) -> list[str]:
    """The names of the parameters whose gradients hold a NaN or inf."""
    out = []
    for name, p in named:
        g = p.grad
        if g is not None:
            g = g.to_local() if hasattr(g, "to_local") else g
            if not bool(torch.isfinite(g).all()):
                out.append(name)
    return out


def check_teacher_rows(rows: Sequence[torch.Tensor], index: torch.Tensor, who: str) -> None:
    """NonFiniteError naming the examples (by dataset ``index``) whose teacher outputs
    ``rows`` hold NaN or +inf: such outputs are never cached or taught."""
    if not rows:
        return
    flags = torch.stack([_bad(r) for r in rows]).tolist()  # one device sync for the batch
    bad = [int(index[e]) for e, f in enumerate(flags) if f]
    if bad:
        raise NonFiniteError(
            f"{who}: the teacher's outputs are NaN or infinite for {listed(bad, 'examples')}; "
            f"refusing to use them. {TEACHER_FIX}"
        )


__all__ = [
    "NonFiniteError",
    "StepGuard",
    "bad_parameters",
    "batch_problem",
    "check_columns",
    "check_data",
    "check_teacher_rows",
    "grads_bad",
    "listed",
    "signal_rows_bad",
]


class StepGuard:
    """The non-finite check of one optimizer step: each micro-batch's loss, terms and teacher
    signal are flagged on the device as they are computed (:meth:`micro`); :meth:`verdict`
    adds the gradients, agrees across processes (one small all-reduce) and, with one device
    sync, tells whether the step may update the weights. ``mode`` ``stop`` raises
    :class:`NonFiniteError` naming the step, the terms and the examples; ``skip`` drops the
    step's update (counted in :attr:`skipped`). A teacher giving NaN is refused in both modes.
    ``check_grads`` False (fp16, whose loss scaler skips steps with inf gradients itself)
    checks the losses alone."""

    def __init__(self, names: Sequence[str], mode: str = "stop", check_grads: bool = True):
        self.names = list(names)
        self.mode = mode
        self.check_grads = check_grads
        self.skipped = 0
        self._flags: list[torch.Tensor] = []
        self._index: list[Any] = []
        self._teacher_rows: list[torch.Tensor | None] = []

    def micro(
        self, loss: torch.Tensor, values: Mapping[str, torch.Tensor], signal: Signal | None,
        index: Any,
    ) -> None:  # fmt: skip
        """Flag one micro-batch (no device sync): loss, each term, the teacher's signal."""
        vals = [loss.detach().float().reshape(())]
        vals += [torch.as_tensor(values[n]).detach().float().reshape(()).to(vals[0].device)
                 for n in self.names]  # fmt: skip
        flags = ~torch.isfinite(torch.stack(vals))
        rows = signal_rows_bad(signal)
        teacher = torch.zeros((), dtype=torch.bool) if rows is None else rows.any()
        self._flags.append(torch.cat([flags, teacher.reshape(1).to(flags.device)]))
        self._index.append(index)
        self._teacher_rows.append(rows)

    def verdict(self, step: int, total: int, named: Sequence[tuple[str, torch.nn.Parameter]],
                all_reduce: Any = None) -> bool:  # fmt: skip
        """True when step ``step`` (1-based) may update the weights; see the class doc."""
        local, index, teacher_rows = torch.stack(self._flags), self._index, self._teacher_rows
        self._flags, self._index, self._teacher_rows = [], [], []
        grads = grads_bad(p for _, p in named) if self.check_grads else None
        grads = torch.zeros((), dtype=torch.bool) if grads is None else grads.cpu()
        summary = torch.cat([local.any(0).cpu(), grads.reshape(1)]).double()
        if all_reduce is not None:
            summary = all_reduce(summary.to(local.device)).cpu()
        flags = summary.tolist()  # the step's one sync
        if not any(flags):
            return True
        why = self._why(local, index, teacher_rows, flags, named)
        if flags[-2]:  # the teacher: never taught from
            raise NonFiniteError(f"step {step} of {total}: {why}")
        if self.mode == "skip":
            self.skipped += 1
            log.warning("step %d of %d: %s; skipping the step (train.nonfinite: skip; %d "
                        "skipped so far)", step, total, why, self.skipped)  # fmt: skip
            return False
        raise NonFiniteError(
            f"step {step} of {total}: {why}. The weights are those of step {step - 1} (its "
            "checkpoint, if one was written, resumes). Lower train.optimizer.lr, set "
            "train.clip_grad_norm, check these examples, or set train.nonfinite: skip to skip "
            "such steps (counted in the results)"
        )

    def _why(
        self, local: torch.Tensor, index: list[Any], teacher_rows: list[torch.Tensor | None],
        flags: list[float], named: Sequence[tuple[str, torch.nn.Parameter]],
    ) -> str:  # fmt: skip
        rows = local.cpu().tolist()
        for j, row in enumerate(rows):
            if not any(row):
                continue
            where = f"micro-batch {j + 1} of {len(rows)}"
            ids = index[j]
            if row[-1] and ids is not None:  # the teacher: the examples it failed on
                ids, bad = torch.as_tensor(ids).cpu(), teacher_rows[j]
                if bad is not None and len(bad) == len(ids):
                    ids = ids[bad.cpu()]
            if ids is not None:
                where += f", training {listed(torch.as_tensor(ids), 'examples')}"
            if row[-1]:
                return (f"the teacher's outputs are NaN or infinite ({where}); refusing to "
                        f"teach from them. {TEACHER_FIX}")  # fmt: skip
            terms = [n for n, bad in zip(self.names, row[1:-1], strict=True) if bad]
            what = f"term {', '.join(map(repr, terms))}" if terms else "the loss"
            return f"the loss is not finite: {what} ({where})"
        if flags[-2] or any(flags[:-1]):
            return "the loss is not finite on another process"
        params = bad_parameters(named)
        names = ", ".join(params[:SHOWN]) or "on another process's shard"
        return f"the gradients are not finite with a finite loss (parameters: {names})"
