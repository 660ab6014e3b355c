"""The one training loop. It knows nothing about particular losses or models: it feeds batches to a
teacher source and the student, sums the objective, steps the optimizer, evaluates, checkpoints
atomically, and resumes exactly where it stopped."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from . import distributed, faults
from .checkpoints import (
    BEST_DIR,
    full_optimizer_state,
    load_optimizer_state,
    load_weights,
    newest_intact,
    truncate_metrics,
    write_checkpoint,
)
from .config import TrainConfig
from .data.rows import DataError
from .data.tensors import epoch_order, make_batch
from .guards import StepGuard, batch_problem, check_data
from .io import atomic_save_module, atomic_write_text
from .logs import MetricsLog, metrics_text, read_metrics_lines
from .losses.chunked import single_backward
from .losses.objective import Objective
from .optim import make_optimizer, make_scheduler
from .placement import CPU, Placement, peak_memory_gb, reset_peak_memory
from .progress import Progress, duration
from .sealed import seal
from .signal import Signal, StudentView
from .taps import Taps, TapsLike, tapped_forward
from .teachers import TeacherSource, default_forward

log = logging.getLogger("potstill")

EvalFn = Callable[[nn.Module], dict[str, float]]
StepCallback = Callable[[int, dict[str, float]], None]
# a student forward gives logits, or a StudentView whose logits are deferred (hidden + head)
StudentForwardFn = Callable[[nn.Module, dict[str, Any]], "torch.Tensor | StudentView"]


@dataclass
class FitResult:
    """What a finished run gives back: the trained student and everything measured on the way."""

    student: nn.Module
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    train_time_s: float = 0.0
    examples_seen: int = 0
    run_dir: Path | None = None
    peak_memory_gb: float | None = None
    """The most GPU memory allocated while training (GiB; None off a GPU)."""
    device: str = "cpu"
    """Where the student trained."""
    skipped_steps: int = 0
    """Steps whose update was dropped for a non-finite loss (``train.nonfinite: skip``)."""

    @property
    def final_eval(self) -> dict[str, Any] | None:
        """The evaluation after the last step (what reports use: not the best epoch)."""
        return self.evals[-1] if self.evals else None

    @property
    def examples_per_s(self) -> float:
        """Training throughput, evaluation and checkpoint time excluded."""
        return self.examples_seen / self.train_time_s if self.train_time_s else float("nan")


@contextlib.contextmanager
def sparse_tied_embeddings(model: nn.Module) -> Iterator[list[nn.Embedding]]:
    """While open, every embedding of ``model`` whose weight is trained and shared with a layer
    that is not an embedding (an LM head tied to the input embedding) passes its lookup's
    gradient on as a sparse tensor. Autograd adds it in place into the tied layer's dense
    gradient, so the backward pass never builds a second dense vocabulary × width buffer (for
    SmolLM2-135M 113 MB); the summed gradient, the optimizer and the trained weights are the
    same. Yields the embeddings it switched; their flags are restored on exit."""
    holders: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), []).append(module)
    switched = [
        m
        for m in model.modules()
        if isinstance(m, nn.Embedding)
        and not m.sparse
        and m.weight.requires_grad
        and not hasattr(m.weight, "device_mesh")  # not an FSDP shard (DTensor)
        and any(not isinstance(h, nn.Embedding) for h in holders[id(m.weight)])
    ]
    for m in switched:
        m.sparse = True
    try:
        yield switched
    finally:
        for m in switched:
            m.sparse = False


def plan_steps(n: int, cfg: TrainConfig) -> tuple[int, int, int, int]:
    """``(batches per epoch, optimizer steps, steps between evaluations, steps between
    checkpoints)`` of training on ``n`` examples: ``max_steps`` when given, else the epochs'
    steps (at least one); an evaluation per epoch and a checkpoint at each unless set."""
    batches_per_epoch = math.ceil(n / cfg.batch_size)
    if cfg.max_steps is not None:
        total = cfg.max_steps
    else:
        assert cfg.epochs is not None
        total = max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))
    eval_every = cfg.eval_every or max(1, batches_per_epoch // cfg.grad_accum)
    return batches_per_epoch, total, eval_every, cfg.checkpoint_every or eval_every


class Distiller:
    """Train ``student`` on ``train_data`` to minimise ``objective`` against ``teacher``.

    ``teacher`` may be None when no term needs it (the labels-only baseline runs through the same
    loop). ``evaluate(student)`` returns metrics; ``best_metric`` names the one that picks the
    best checkpoint. With ``run_dir`` set, metrics go to ``run_dir/metrics.jsonl`` (and
    TensorBoard when installed) and checkpoints to ``run_dir/checkpoints``. Each callback is
    called as ``callback(step, row)`` after every optimizer step; ``row`` is the logged row on
    logging steps and empty otherwise. ``batch_transform(batch, micro)`` (optional) replaces each
    training batch before the teacher and the student see it, ``micro`` counting micro-batches
    from the start of training (so a resumed run transforms as an uninterrupted one would): how
    on-policy distillation swaps in the student's own completions. ``placement`` (or ``device``:
    ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) puts the student, the objective's trainable
    parts, every batch and the teacher's signals on its device; the teacher runs on its own
    (wherever whoever built it put it: :mod:`potstill.placement`; the CPU by default).

    Under ``torchrun`` (see :mod:`potstill.distributed`) every process builds the same
    Distiller: each global batch of ``config.batch_size`` examples is split into contiguous
    shares, one per process; the student trains under DDP (``config.distributed: fsdp`` shards
    it with FSDP2 instead) and the teacher runs replicated on each share; each term's loss is
    normalised by its item count over the whole optimizer step (all micro-batches, all
    processes: :attr:`Term.count`), so the update does not depend on the split. Rank 0 alone
    logs, evaluates and writes checkpoints, which hold full (unsharded) states and resume under
    any number of processes.

    >>> result = Distiller(student, hinton_objective(4.0, 0.5), train_set,   # doctest: +SKIP
    ...                    teacher=LiveTeacher(teacher), config=TrainConfig(epochs=5)).fit()
    """

    def __init__(
        self,
        student: nn.Module,
        objective: Objective,
        train_data: Dataset,
        *,
        teacher: TeacherSource | None = None,
        config: TrainConfig | None = None,
        run_dir: str | Path | None = None,
        evaluate: EvalFn | None = None,
        best_metric: str | None = None,
        best_mode: str = "max",
        student_forward: StudentForwardFn = default_forward,
        callbacks: list[StepCallback] | None = None,
        name: str = "student",
        student_taps: TapsLike | None = None,
        batch_transform: Callable[[dict[str, Any], int], dict[str, Any]] | None = None,
        placement: Placement = CPU,
        device: str | torch.device | None = None,
    ) -> None:
        if device is not None:
            if placement is not CPU:
                raise ValueError("give device or placement, not both")
            placement = Placement.of(device)
        if objective.needs_teacher and teacher is None:
            raise ValueError(
                "the objective has teacher terms "
                f"{[t.name for t in objective.terms if t.needs_teacher]} "
                "but no teacher was given"
            )
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.placement = placement
        self.student = placement.model(student)
        self.objective = objective
        self.train_data = train_data
        self.teacher = teacher if objective.needs_teacher else None
        self.cfg = config or TrainConfig()
        self.run_dir = Path(run_dir) if run_dir else None
        self.evaluate = evaluate
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.student_forward = student_forward
        self.callbacks = callbacks or []
        self.name = name
        self.student_taps = student_taps
        self.batch_transform = batch_transform
        # the next step's micro-batches, made early for a teacher that prefetches (by number)
        self._ahead: dict[int, tuple[dict[str, Any], torch.Tensor, int]] = {}

        self.n = len(train_data)  # type: ignore[arg-type]
        if self.n == 0:
            raise ValueError("train_data is empty")
        # data in tensors is checked for NaN and inf at once; other data batch by batch
        self._data_checked = check_data(train_data)
        self.batches_per_epoch, self.total_steps, self.eval_every, self.checkpoint_every = (
            plan_steps(self.n, self.cfg)
        )

        self._probe()
        placement.model(self.objective)  # with the projectors its terms built on the probe
        self.rank, self.world = distributed.setup()
        self.main = self.rank == 0
        self.fsdp = self.world > 1 and self.cfg.distributed == "fsdp"
        if self.fsdp and batch_transform is not None:
            raise ValueError(
                "train.distributed: fsdp shards the student, which then cannot sample "
                "on-policy completions on one process; use ddp"
            )
        self._plain: nn.Module | None = None  # FSDP: a full copy the trained weights land in
        self._plain_step = -1  # the step whose weights _plain holds
        # a step of one micro-batch on one process is its own whole: nothing to weigh
        self._weigh = self.world > 1 or self.cfg.grad_accum > 1
        self._order_epoch, self._order = -1, torch.arange(0)  # the epoch order last built
        self.model, self._objective = self._wrap()
        self._eager = self.model  # what a student that does not compile trains as
        self._compiled = False
        if self.cfg.compile:
            backend = "inductor" if self.cfg.compile is True else str(self.cfg.compile)
            try:
                self.model = torch.compile(self.model, backend=backend)
                self._compiled = True
            except Exception as e:  # noqa: BLE001  (an unknown backend, no compiler support)
                self._no_compile(e)
        self._set_tf32()
        device_type = placement.device.type
        self.scaler = torch.amp.GradScaler(device_type, enabled=self.cfg.precision == "fp16")
        params = [p for p in self.student.parameters() if p.requires_grad]
        params += [p for p in self.objective.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = make_optimizer(params, self.cfg)
        self._named = [(f"student.{n}", p) for n, p in self.student.named_parameters()]
        self._named += [(f"objective.{n}", p) for n, p in self.objective.named_parameters()]
        self.guard = StepGuard(
            [t.name for t in self.objective.active_terms], self.cfg.nonfinite,
            check_grads=self.cfg.precision != "fp16",
        )  # fmt: skip
        self.scheduler = make_scheduler(self.optimizer, self.cfg, self.total_steps)
        self.step = 0
        self.best: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        # running state that a checkpoint carries, so a resumed run logs and times as one run
        self._sums: dict[str, torch.Tensor] = {}
        self._n_sums = 0
        self.train_time_s = 0.0
        self.examples_seen = 0

    # ---- set-up -----------------------------------------------------------------------------

    def _signal(self, batch: dict[str, Any]) -> Signal | None:
        """The teacher's signal on the batch, on the student's device (None without one)."""
        if self.teacher is None:
            return None
        return self.placement.signal(self.teacher.signal(batch))

    def _probe(self) -> None:
        """Check that every feature the objective reads is tapped, and let terms build their
        projectors from one batch's shapes (seeded, so runs and resumes build the same ones)."""
        teacher_names = getattr(self.teacher, "feature_names", set()) if self.teacher else set()
        needs_probe = self.student_taps or any(
            hasattr(t.module, "setup") for t in self.objective.active_terms
        )
        if not needs_probe:
            self.objective.check_features(set(), teacher_names)
            return
        taps = Taps(self.student, self.student_taps) if self.student_taps else None
        try:
            self.objective.check_features(set(taps.names) if taps else set(), teacher_names)
            order = epoch_order(self.n, self.cfg.seed, 0, self.cfg.shuffle)
            batch = self.placement.batch(make_batch(self.train_data, order[: self.cfg.batch_size]))
            was_training = self.student.training
            self.student.eval()
            try:
                with torch.no_grad():
                    view = self._view(taps, batch)
                    signal = self._signal(batch)
            finally:
                self.student.train(was_training)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed + 1)
                self.objective.setup(view, signal)
        finally:
            if taps is not None:
                taps.remove()

    def _view(
        self, taps: Taps | None, batch: dict[str, Any], model: nn.Module | None = None
    ) -> StudentView:
        model = self.student if model is None else model
        if taps is None:
            out, features = self.student_forward(model, batch), {}
        else:
            out, features = tapped_forward(taps, self.student_forward, model, batch)
        if isinstance(out, StudentView):  # a forward that defers the logits (hidden + head)
            out.features.update(features)
            return out
        return StudentView(logits=out, features=features)

    def _wrap(self) -> tuple[nn.Module, nn.Module]:
        """The modules the training step calls: the student (under DDP, or sharded in place by
        FSDP2) and the objective (under DDP when it has trainable parts), or both as they are
        in a single process."""
        if self.world == 1:
            return self.student, self.objective
        has_params = any(p.requires_grad for p in self.objective.parameters())
        objective = distributed.ddp(self.objective) if has_params else self.objective
        if not self.fsdp:
            return distributed.ddp(self.student), objective
        self._plain = copy.deepcopy(self.student)
        distributed.shard_blocks(self.student)
        return self.student, objective

    # ---- the loop -------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> FitResult:
        """Train to ``total_steps``. With ``resume``, continue from the last checkpoint in
        ``run_dir`` (a fresh start when there is none)."""
        if resume:
            if self.run_dir is None:
                raise ValueError("resume needs a run_dir")
            self._load_last_checkpoint()
        else:
            self._start_fresh()
        writer = MetricsLog(
            self.run_dir if self.main else None, report_to=self.cfg.report_to,
            tensorboard=self.cfg.tensorboard, name=self.name,
            config={"train": self.cfg.model_dump(mode="json")},
        )  # fmt: skip
        cfg = self.cfg
        bar = Progress(
            self.total_steps, self.name, "step", enabled=cfg.progress, initial=self.step,
            show=self.main,
        )  # fmt: skip
        taps = Taps(self.student, self.student_taps) if self.student_taps else None
        reset_peak_memory(self.placement.device)
        try:
            # FSDP2 gathers and reshards weights itself: leave its embeddings as they are
            tied = contextlib.nullcontext() if self.fsdp else sparse_tied_embeddings(self.student)
            with tied:
                self._loop(taps, writer, bar)
        finally:
            if taps is not None:
                taps.remove()
            bar.close()
            writer.close()
        student = self._gathered() if self.fsdp else self.student
        student.eval()
        return FitResult(
            student,
            self.step,
            self.history,
            self.evals,
            self.best,
            self.train_time_s,
            self.examples_seen,
            self.run_dir,
            peak_memory_gb(self.placement.device),
            str(self.placement.device),
            self.guard.skipped,
        )

    def _micro_batch(self, micro: int) -> tuple[dict[str, Any], torch.Tensor, int]:
        """Micro-batch number ``micro`` (counted from the start of training): this process's
        share of it, the share's item counts per active term (zero for a process whose share
        is empty: it runs one example of the batch to take part, weighted 0), and the size of
        the whole micro-batch."""
        cfg = self.cfg
        epoch, start = divmod(micro, self.batches_per_epoch)
        if self._order_epoch != epoch:
            self._order = epoch_order(self.n, cfg.seed, epoch, cfg.shuffle)
            self._order_epoch = epoch
        index = self._order[start * cfg.batch_size : (start + 1) * cfg.batch_size]
        share = index[distributed.shard_of(len(index))] if self.world > 1 else index
        empty = len(share) == 0
        made = make_batch(self.train_data, index[:1] if empty else share)
        if not self._data_checked and (problem := batch_problem(made)) is not None:
            raise DataError(f"the training data: {problem}; drop or repair those rows")
        batch = self.placement.batch(made)
        if self.batch_transform is not None:
            batch = self.batch_transform(batch, micro)
        if not self._weigh:
            return batch, torch.ones(0), len(index)  # counts unused
        counts = self.objective.counts(batch)
        return batch, counts * 0 if empty else counts, len(index)

    def _prefetch(self, micro: int) -> None:
        """A teacher that can ask ahead (a served one: ``prefetch(batch)``) is given the next
        step's micro-batches now, so its answers travel while this step trains. Not with a
        batch transform (on-policy batches are sampled from the student as it is then)."""
        fetch = getattr(self.teacher, "prefetch", None)
        if fetch is None or self.batch_transform is not None or self.step + 1 >= self.total_steps:
            return
        for j in range(self.cfg.grad_accum):
            self._ahead[micro + j] = made = self._micro_batch(micro + j)
            fetch(made[0])

    def _autocast(self) -> contextlib.AbstractContextManager:
        """``train.precision: bf16`` (or ``fp16``): the forward passes (teacher and student) and
        the loss under torch.autocast in bfloat16 (float16), matrix products in the low
        precision, reductions and softmaxes in fp32; weights, gradients and optimizer state
        stay fp32 (fp16: the loss scaled against underflow, :attr:`scaler`)."""
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.placement.device.type, dtype=dtype)

    def _set_tf32(self) -> None:
        """``train.tf32``: fp32 matrix products in TF32 on a GPU that has it (default on)."""
        device = self.placement.device
        if device.type != "cuda" or self.cfg.tf32 is False:
            return
        if torch.cuda.get_device_capability(device) < (8, 0):
            if self.cfg.tf32:
                log.warning("train.tf32: %s has no TF32 (before Ampere); products stay fp32",
                            torch.cuda.get_device_name(device))  # fmt: skip
            return
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log.info("%s: fp32 matrix products in TF32 (train.tf32: false turns it off)",
                 torch.cuda.get_device_name(device))  # fmt: skip

    def _student_view(self, taps: Taps | None, batch: dict[str, Any]) -> StudentView:
        """The student's view of a training batch, through the compiled student when
        ``train.compile`` is set; one that does not compile trains as it is from then on."""
        if not self._compiled:
            return self._view(taps, batch, self.model)
        try:
            return self._view(taps, batch, self.model)
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back, say why)
            self._no_compile(e)
            return self._view(taps, batch, self.model)

    def _no_compile(self, error: Exception) -> None:
        reason = (str(error).splitlines() or [""])[0]
        log.warning("train.compile: the student did not compile (%s: %s); training it "
                    "uncompiled", type(error).__name__, reason)  # fmt: skip
        self.model, self._compiled = self._eager, False

    def _loop(self, taps: Taps | None, writer: Any, bar: Any) -> None:
        cfg = self.cfg
        self.student.train()
        self.objective.train()
        micro = self.step * cfg.grad_accum
        interval_examples = 0
        interval_t = t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        names = [t.name for t in self.objective.active_terms]
        step_sums: dict[str, torch.Tensor] = {}  # the step's figures, logged once it is kept
        while self.step < self.total_steps:
            # the whole step's micro-batches first: its item counts normalise every term
            prepared = [
                self._ahead.pop(micro + j, None) or self._micro_batch(micro + j)
                for j in range(cfg.grad_accum)
            ]
            self._prefetch(micro + cfg.grad_accum)
            if self._weigh:
                counts = torch.stack([c for _, c, _ in prepared]).sum(0)
                totals = distributed.all_reduce_sum(counts).clamp_min(1)
            for j, (batch, counts, size) in enumerate(prepared):
                # this micro-batch's part of each term's step mean
                share = counts / totals if self._weigh else None
                # single_backward: the losses keep nothing for a second backward pass
                with (
                    distributed.gradient_sync(
                        (self.model, self._objective), last=j == cfg.grad_accum - 1
                    ),
                    self._autocast(),
                    single_backward(),
                ):
                    signal = self._signal(batch)
                    view = self._student_view(taps, batch)
                    # DDP and FSDP average gradients over processes: scale back up by their number
                    scales = None if share is None else share * self.world
                    loss, values = self._objective(view, signal, batch, scales)
                    self.guard.micro(loss, values, signal, batch.get("index"))
                    # the logits of both models are not needed by the backward pass (the
                    # graph keeps what it needs): let them go before it allocates gradients
                    del view, signal
                    self.scaler.scale(loss).backward()
                step_values = (
                    dict(values)
                    if share is None
                    else {n: values[n] * float(share[i]) for i, n in enumerate(names)}
                )
                step_values["loss"] = loss.detach() / self.world
                for k, v in step_values.items():
                    step_sums[k] = step_sums[k] + v if k in step_sums else v
                self.examples_seen += size
                interval_examples += size
            micro += cfg.grad_accum
            update = self.guard.verdict(
                self.step + 1, self.total_steps, self._named,
                distributed.all_reduce_sum if self.world > 1 else None,
            )  # fmt: skip
            if update:  # a skipped step leaves its non-finite figures out of the log
                for k, v in step_sums.items():
                    self._sums[k] = self._sums[k] + v if k in self._sums else v
                self._n_sums += 1
            step_sums = {}
            if cfg.clip_grad_norm is not None and update:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients (fp16)
                torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad_norm)
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
            if update:
                self.scaler.step(self.optimizer)  # the optimizer's step (fp16: none on inf/nan)
                self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            last = self.step >= self.total_steps
            row: dict[str, float] = {}
            if self.step % cfg.log_every == 0 or last:
                rate = interval_examples / max(time.perf_counter() - interval_t, 1e-9)
                row = self._interval_row(micro, lr, rate)
                self._log(row, writer)
                bar.set_postfix(
                    {k: f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
                     for k, v in row.items() if k not in ("step", "epoch", "lr")}
                )  # fmt: skip
                self._sums, self._n_sums = {}, 0
                interval_examples, interval_t = 0, time.perf_counter()
            bar.update(1)  # after the step's figures, so its line carries them
            for cb in self.callbacks:
                cb(self.step, row)
            if self.step % self.eval_every == 0 or last:
                self.train_time_s += time.perf_counter() - t0
                self._evaluate(writer)
                t0 = time.perf_counter()
            if self.run_dir and (self.step % self.checkpoint_every == 0 or last):
                self.train_time_s += time.perf_counter() - t0
                self.save_checkpoint()
                t0 = time.perf_counter()
            faults.point(f"train:{self.name}")
        self.train_time_s += time.perf_counter() - t0

    def _rewrite_metrics(self) -> None:
        """``metrics.jsonl`` as it stood at the checkpoint (rows logged after it go; damaged
        lines, named in a warning, are written again)."""
        assert self.run_dir is not None
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            for problem in read_metrics_lines(path)[1]:
                log.warning("%s: written again from the checkpoint", problem)
        atomic_write_text(path, metrics_text(self.history, self.evals))

    def _interval_row(self, micro: int, lr: float, examples_per_s: float) -> dict[str, float]:
        """The logged row of the interval since the last one: each term's and the loss's mean
        over its steps, summed across processes."""
        keys = list(self._sums)  # the same order on every process
        summed = distributed.all_reduce_sum(
            torch.stack([self._sums[k].detach().double().reshape(()) for k in keys])
        ) if keys else torch.zeros(0)  # fmt: skip
        return {
            "step": self.step,
            "epoch": round(micro / self.batches_per_epoch, 4),
            "lr": lr,
            **{k: float(v) / self._n_sums for k, v in zip(keys, summed, strict=True)},
            "examples_per_s": examples_per_s,
        }

    # ---- evaluation and logs ---------------------------------------------------------------

    def _evaluate(self, writer: Any) -> None:
        if self.evaluate is None:
            return
        model = self._gathered() if self.fsdp else self.student  # FSDP: every process gathers
        if not self.main:  # rank 0 evaluates and keeps the best model
            return
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            metrics = dict(self.evaluate(model))
        self.student.train()
        figures = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
        )
        log.info("%s: evaluation at step %d/%d (%s): %s", self.name, self.step,
                 self.total_steps, duration(time.perf_counter() - t0), figures)  # fmt: skip
        row = {"step": self.step, **metrics}
        self.evals.append(row)
        self._log({"eval": row}, writer)
        if self.best_metric:
            if self.best_metric not in metrics:
                raise KeyError(
                    f"best_metric {self.best_metric!r} is not among the evaluation "
                    f"metrics {sorted(metrics)}"
                )
            v = metrics[self.best_metric]
            b = self.best[self.best_metric] if self.best else None
            if b is None or (v > b if self.best_mode == "max" else v < b):
                self.best = row
                if self.run_dir:  # sealed: verified when a finished part is reused
                    best = self.run_dir / BEST_DIR
                    atomic_save_module(model, best / "student.safetensors")
                    atomic_write_text(best / "eval.json", json.dumps(row))
                    seal(best, point="best")

    def _log(self, row: dict[str, Any], writer: MetricsLog) -> None:
        if "eval" not in row:
            self.history.append(row)
        writer.write(row)

    # ---- checkpoints -------------------------------------------------------------------------

    def _gathered(self) -> nn.Module:
        """FSDP: the student's full weights gathered (a collective: every process calls it)
        into the plain copy kept for evaluation, checkpoints and the result."""
        assert self._plain is not None
        if self._plain_step != self.step:  # not gathered yet (evaluation and checkpoint share)
            distributed.gather_full_state(self.student, into=self._plain)
            self._plain_step = self.step
        return self._plain

    def save_checkpoint(self) -> Path:
        """Write the whole training state for exact resume (see :mod:`potstill.checkpoints`);
        returns the checkpoint folder. In a distributed run every process calls it (sharded
        states are gathered) and rank 0 writes; the states are full, so any number of
        processes can resume from them."""
        assert self.run_dir is not None
        student = self._gathered() if self.fsdp else self.student
        optimizer = full_optimizer_state(self.optimizer, fsdp=self.fsdp)
        if not self.main:
            distributed.barrier()  # the files exist once rank 0 is through
            return self.run_dir / "checkpoints" / f"step-{self.step:08d}"
        state = {
            "step": self.step,
            "total_steps": self.total_steps,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            **self._device_rng(),
            **({"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
            "python_rng": random.getstate(),
            "best": json.dumps(self.best),
            "evals": json.dumps(self.evals),
            "history": json.dumps(self.history),  # metrics.jsonl is rebuilt from it on resume
            "log_sums": {k: v.detach().cpu().clone() for k, v in self._sums.items()},
            "log_count": self._n_sums,
            "train_time_s": self.train_time_s,
            "examples_seen": self.examples_seen,
            "skipped_steps": self.guard.skipped,
            "processes": self.world,
        }
        folder = write_checkpoint(self.run_dir, self.step, student, self.objective, state,
                                  kept=self.cfg.checkpoints_kept)  # fmt: skip
        distributed.barrier()
        return folder

    def _device_rng(self) -> dict[str, torch.Tensor]:
        """The GPU's random state when the student trains on one (dropout draws from it)."""
        if self.placement.device.type != "cuda":
            return {}
        return {"cuda_rng": torch.cuda.get_rng_state(self.placement.device)}

    def _start_fresh(self) -> None:
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        if self.run_dir and self.main and (self.run_dir / "metrics.jsonl").exists():
            (self.run_dir / "metrics.jsonl").unlink()

    def _load_last_checkpoint(self) -> None:
        assert self.run_dir is not None
        found = newest_intact(self.run_dir, self.total_steps)
        if found is None:
            log.info("no checkpoint in %s: starting from scratch", self.run_dir)
            self._start_fresh()
            return
        folder, state, damaged = found
        if damaged:
            # none intact (a kill during the first checkpoint, or damage): this model trains
            # again from its start, to the same weights; the rest of the run is kept
            to = folder.name if folder is not None else "the start of this model's training"
            for _, why in damaged:
                log.warning("%s: falling back to %s", why, to)
            distributed.barrier()  # every process has chosen before the damaged ones move
            if self.main:  # kept for a look, out of the way of the checkpoints kept
                for bad, _ in damaged:
                    aside, n = bad.with_name(f"damaged-{bad.name}"), 1
                    while aside.exists():
                        aside, n = bad.with_name(f"damaged-{bad.name}-{n}"), n + 1
                    bad.rename(aside)
        if folder is None or state is None:
            self._start_fresh()
            return
        self._plain_step = -1  # FSDP: the weights change without a step
        load_weights(folder, self.student, self.objective, fsdp=self.fsdp)
        load_optimizer_state(self.optimizer, state["optimizer"], fsdp=self.fsdp)
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.placement.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.placement.device)
        random.setstate(state["python_rng"])
        self.step = int(state["step"])
        self.best = json.loads(state["best"])
        self.evals = json.loads(state["evals"])
        self._sums = {k: v.to(self.placement.device) for k, v in state["log_sums"].items()}
        self._n_sums = int(state["log_count"])
        self.train_time_s = float(state["train_time_s"])
        self.examples_seen = int(state["examples_seen"])
        self.guard.skipped = int(state.get("skipped_steps", 0))
        if "history" in state:  # the log as it was at the checkpoint, whatever became of it
            self.history = json.loads(state["history"])
            if self.main:
                self._rewrite_metrics()
        elif self.main:  # a checkpoint written before: the log cut back to its step
            self.history += truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        log.info("resumed %s at step %d of %d", self.name, self.step, self.total_steps)
