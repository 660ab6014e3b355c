"""Tests for the Distiller: exact resume, frozen teacher, objective logging, gradient
accumulation, learning-rate schedule, checkpoints and the labels-only baseline."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_mlp, quiet_config, state_equal
from safetensors.torch import load_model
from torch.utils.data import TensorDataset

from potstill.checkpoints import CheckpointError
from potstill.config import OptimizerConfig, ScheduleConfig
from potstill.data.splits import IGNORE_INDEX
from potstill.data.tensors import epoch_order, make_batch
from potstill.distiller import Distiller
from potstill.evaluate import classification_eval
from potstill.losses import kd_loss, soft_target_loss
from potstill.losses.objective import Objective
from potstill.losses.terms import hinton_objective, labels_only_objective
from potstill.signal import StudentView
from potstill.teachers import LiveTeacher


class Interrupt(Exception):
    """Raised by a callback to simulate a crash in the middle of a run."""


def _raise_at(step: int):
    def callback(s: int, row: dict) -> None:
        if s == step:
            raise Interrupt(f"simulated crash at step {s}")

    return callback


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train_rows(path: Path) -> list[dict]:
    return [r for r in _read_jsonl(path) if "eval" not in r]


def _eval_rows(path: Path) -> list[dict]:
    return [r["eval"] for r in _read_jsonl(path) if "eval" in r]


# ---- exact resume ---------------------------------------------------------------------------


# batch 70 on 1,151 examples: 17 micro-batches per epoch (the last of 31 examples), so with
# grad_accum=2 step 9 accumulates the last micro-batch of epoch 0 and the first of epoch 1.
RESUME_CFG = dict(
    max_steps=14,
    batch_size=70,
    grad_accum=2,
    clip_grad_norm=0.5,
    optimizer=OptimizerConfig(name="adamw", lr=3e-3, weight_decay=0.01),
    schedule=ScheduleConfig(name="cosine", warmup_steps=3, min_lr_ratio=0.1),
    eval_every=5,
    checkpoint_every=4,
    log_every=1,
    seed=7,
)


def _resume_distiller(digits, teacher, run_dir, callbacks=None, **overrides):
    student = make_mlp([32], dropout=0.3, seed=11)
    return Distiller(
        student,
        hinton_objective(temperature=3.0, alpha=0.6),
        digits.train,
        teacher=teacher,
        config=quiet_config(**{**RESUME_CFG, **overrides}),
        run_dir=run_dir,
        evaluate=classification_eval(digits.val),
        best_metric="accuracy",
        callbacks=callbacks,
    )


def test_dropout_student_is_stochastic_in_train_mode(digits):
    # The resume test below relies on dropout consuming the global RNG: check it does.
    student = make_mlp([32], dropout=0.3, seed=11).train()
    x = digits.train.tensors[0][:16]
    assert not torch.equal(student(x), student(x))


def test_resume_after_crash_gives_bitwise_identical_student(digits, teacher_model, tmp_path):
    teacher = LiveTeacher(teacher_model)
    full = _resume_distiller(digits, teacher, tmp_path / "A")
    result_a = full.fit()
    assert result_a.steps == 14

    crashed = _resume_distiller(digits, teacher, tmp_path / "B", callbacks=[_raise_at(10)])
    with pytest.raises(Interrupt):
        crashed.fit()
    assert crashed.step == 10
    last = json.loads((tmp_path / "B" / "checkpoints" / "last.json").read_text())
    assert last["step"] == 8  # checkpoints at 4 and 8; step 10 is past the last one

    resumed = _resume_distiller(digits, teacher, tmp_path / "B")
    result_b = resumed.fit(resume=True)
    assert result_b.steps == 14

    sa, sb = result_a.student.state_dict(), result_b.student.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name

    opt_a, opt_b = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i in opt_a["state"]:
        assert float(opt_a["state"][i]["step"]) == float(opt_b["state"][i]["step"]) == 14
        assert torch.equal(opt_a["state"][i]["exp_avg"], opt_b["state"][i]["exp_avg"])
        assert torch.equal(opt_a["state"][i]["exp_avg_sq"], opt_b["state"][i]["exp_avg_sq"])
    assert full.scheduler.last_epoch == resumed.scheduler.last_epoch == 14
    assert full.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]

    # evaluations and the best checkpoint agree as well
    assert result_a.evals == result_b.evals
    assert [e["step"] for e in result_b.evals] == [5, 10, 14]
    assert result_a.best == result_b.best
    assert (tmp_path / "A" / "best" / "student.safetensors").read_bytes() == (
        tmp_path / "B" / "best" / "student.safetensors"
    ).read_bytes()

    # metrics.jsonl: no step twice, the same training rows, the same values
    rows_a = _train_rows(tmp_path / "A" / "metrics.jsonl")
    rows_b = _train_rows(tmp_path / "B" / "metrics.jsonl")
    steps_b = [r["step"] for r in rows_b]
    assert len(steps_b) == len(set(steps_b))
    assert [r["step"] for r in rows_a] == steps_b == list(range(1, 15))
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("epoch", "lr", "loss", "kd", "ce"):
            assert ra[key] == rb[key], (ra["step"], key)
    assert _eval_rows(tmp_path / "A" / "metrics.jsonl") == _eval_rows(
        tmp_path / "B" / "metrics.jsonl"
    )
    # the in-memory history of the resumed run holds the rows before and after the crash
    assert [r["step"] for r in result_b.history] == list(range(1, 15))


def test_resume_with_another_length_is_refused(digits, teacher_model, tmp_path):
    teacher = LiveTeacher(teacher_model)
    _resume_distiller(digits, teacher, tmp_path, max_steps=4).fit()
    other = _resume_distiller(digits, teacher, tmp_path, max_steps=6)
    with pytest.raises(CheckpointError, match="4 steps"):
        other.fit(resume=True)


def test_resume_of_a_finished_run_changes_nothing(digits, teacher_model, tmp_path):
    teacher = LiveTeacher(teacher_model)
    done = _resume_distiller(digits, teacher, tmp_path, max_steps=4).fit()
    again = _resume_distiller(digits, teacher, tmp_path, max_steps=4).fit(resume=True)
    assert again.steps == 4
    assert state_equal(done.student, again.student)
    assert again.evals == done.evals
    assert [r["step"] for r in _train_rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_resume_before_first_checkpoint_does_not_duplicate_metrics(digits, teacher_model, tmp_path):
    teacher = LiveTeacher(teacher_model)
    crashed = _resume_distiller(
        digits, teacher, tmp_path, callbacks=[_raise_at(2)], max_steps=6, checkpoint_every=5
    )
    with pytest.raises(Interrupt):
        crashed.fit()
    assert not (tmp_path / "checkpoints").exists()
    _resume_distiller(digits, teacher, tmp_path, max_steps=6, checkpoint_every=5).fit(resume=True)
    steps = [r["step"] for r in _train_rows(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_logs_the_same_values_when_log_interval_straddles_a_checkpoint(
    digits, teacher_model, tmp_path
):
    teacher = LiveTeacher(teacher_model)
    kw = dict(max_steps=9, log_every=3, checkpoint_every=4)
    _resume_distiller(digits, teacher, tmp_path / "A", **kw).fit()
    crashed = _resume_distiller(digits, teacher, tmp_path / "B", callbacks=[_raise_at(6)], **kw)
    with pytest.raises(Interrupt):
        crashed.fit()
    _resume_distiller(digits, teacher, tmp_path / "B", **kw).fit(resume=True)
    rows_a = _train_rows(tmp_path / "A" / "metrics.jsonl")
    rows_b = _train_rows(tmp_path / "B" / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [3, 6, 9]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]


# ---- the teacher stays frozen ----------------------------------------------------------------


def test_teacher_is_unchanged_frozen_and_in_eval_mode_after_a_run(digits, teacher_model):
    before = copy.deepcopy(teacher_model)
    teacher_model.train()
    source = LiveTeacher(teacher_model)
    Distiller(
        make_mlp([16], seed=2),
        hinton_objective(4.0, 0.5),
        digits.train,
        teacher=source,
        config=quiet_config(max_steps=15, batch_size=64, optimizer=OptimizerConfig(lr=1e-2)),
    ).fit()
    assert state_equal(before, teacher_model)
    assert not teacher_model.training
    assert all(not m.training for m in teacher_model.modules())
    assert all(not p.requires_grad for p in teacher_model.parameters())
    assert all(p.grad is None for p in teacher_model.parameters())


def test_live_teacher_signal_carries_no_graph_and_ignores_train_mode(digits, teacher_model):
    reference = copy.deepcopy(teacher_model).eval()
    assert any(isinstance(m, torch.nn.Dropout) for m in teacher_model.modules())
    source = LiveTeacher(teacher_model)
    batch = make_batch(digits.train, torch.arange(64))
    with torch.enable_grad():
        first = source.signal(batch).logits
    assert not first.requires_grad
    assert first.grad_fn is None

    teacher_model.train()  # someone flips the shared module back to training mode
    second = source.signal(batch).logits
    third = source.signal(batch).logits
    assert torch.equal(second, third)
    assert torch.equal(first, second)
    with torch.no_grad():
        assert torch.equal(first, reference(batch["input"]))


# ---- the objective ---------------------------------------------------------------------------


def _batch_with_logits(digits, teacher_model, hide_every: int | None = None):
    batch = dict(make_batch(digits.train, torch.arange(100, 164)))
    if hide_every:
        labels = batch["label"].clone()
        labels[::hide_every] = IGNORE_INDEX
        batch["label"] = labels
    student = make_mlp([16], seed=3)
    view = StudentView(logits=student(batch["input"]))
    signal = LiveTeacher(teacher_model).signal(batch)
    return batch, student, view, signal


@pytest.mark.parametrize("hide_every", [None, 3])
@pytest.mark.parametrize("temperature, alpha", [(4.0, 0.5), (2.0, 0.7), (1.0, 0.0)])
def test_hinton_objective_equals_kd_loss(digits, teacher_model, hide_every, temperature, alpha):
    batch, student, view, signal = _batch_with_logits(digits, teacher_model, hide_every)
    total, values = hinton_objective(temperature, alpha)(view, signal, batch)
    want = kd_loss(view.logits, signal.logits, batch["label"], temperature=temperature, alpha=alpha)
    torch.testing.assert_close(total, want, atol=1e-6, rtol=1e-6)

    # the same gradient for the student's parameters
    params = list(student.parameters())
    got_grads = torch.autograd.grad(total, params, retain_graph=True)
    want_grads = torch.autograd.grad(want, params)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)

    # each weighted term is reported on its own, detached, weight not applied
    labelled = batch["label"] != IGNORE_INDEX
    ce = F.cross_entropy(view.logits[labelled], batch["label"][labelled])
    kd = soft_target_loss(view.logits, signal.logits, temperature=temperature)
    if alpha:
        assert set(values) == {"kd", "ce"}
        torch.testing.assert_close(values["kd"], kd.detach(), atol=1e-6, rtol=1e-6)
    else:
        assert set(values) == {"ce"}  # a zero-weight term is skipped
    torch.testing.assert_close(values["ce"], ce.detach(), atol=1e-6, rtol=1e-6)
    assert all(not v.requires_grad for v in values.values())


def test_ce_term_of_a_batch_without_labels_is_zero_with_a_graph(digits, teacher_model):
    batch, student, view, signal = _batch_with_logits(digits, teacher_model, hide_every=1)
    total, values = hinton_objective(2.0, 0.5)(view, signal, batch)
    assert values["ce"].item() == 0.0
    kd = soft_target_loss(view.logits, signal.logits, temperature=2.0)
    torch.testing.assert_close(total, 0.5 * kd, atol=1e-6, rtol=1e-6)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())


def test_objective_rejects_duplicate_names_and_empty():
    with pytest.raises(ValueError, match="unique"):
        Objective([labels_only_objective().terms[0], labels_only_objective().terms[0]])
    with pytest.raises(ValueError, match="at least one term"):
        Objective([])


def test_history_rows_log_each_term_and_the_weighted_total(digits, teacher_model):
    student = make_mlp([16], seed=4)
    initial = copy.deepcopy(student)
    cfg = quiet_config(
        max_steps=8, batch_size=64, log_every=1, seed=5, optimizer=OptimizerConfig(lr=1e-2)
    )
    result = Distiller(
        student,
        hinton_objective(temperature=4.0, alpha=0.5),
        digits.train,
        teacher=LiveTeacher(teacher_model),
        config=cfg,
    ).fit()
    assert [r["step"] for r in result.history] == list(range(1, 9))
    for row in result.history:
        assert {"step", "epoch", "lr", "loss", "kd", "ce", "examples_per_s"} <= set(row)
        assert row["loss"] == pytest.approx(0.5 * row["kd"] + 0.5 * row["ce"], rel=1e-6)

    # the first row is the loss of the first batch of the seeded epoch order at the initial
    # weights: recompute it independently
    first = epoch_order(len(digits.train), 5, 0)[:64]
    batch = make_batch(digits.train, first)
    with torch.no_grad():
        s = initial(batch["input"])
        t = teacher_model(batch["input"])
    row = result.history[0]
    assert row["kd"] == pytest.approx(soft_target_loss(s, t, temperature=4.0).item(), rel=1e-5)
    assert row["ce"] == pytest.approx(F.cross_entropy(s, batch["label"]).item(), rel=1e-5)
    want = kd_loss(s, t, batch["label"], temperature=4.0, alpha=0.5).item()
    assert row["loss"] == pytest.approx(want, rel=1e-5)


def test_log_rows_average_the_steps_since_the_previous_row(digits, teacher_model):
    def run(log_every):
        return Distiller(
            make_mlp([16], seed=4),
            hinton_objective(4.0, 0.5),
            digits.train,
            teacher=LiveTeacher(copy.deepcopy(teacher_model)),
            config=quiet_config(max_steps=9, batch_size=64, log_every=log_every, seed=5),
        ).fit()

    every, grouped = run(1).history, run(3).history
    assert [r["step"] for r in grouped] == [3, 6, 9]
    for i, row in enumerate(grouped):
        window = every[3 * i : 3 * i + 3]
        for key in ("loss", "kd", "ce"):
            assert row[key] == pytest.approx(sum(r[key] for r in window) / 3, rel=1e-5)


# ---- gradient accumulation -------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
def test_grad_accum_equals_one_big_batch(digits, teacher_model, shuffle):
    x, y = digits.train.tensors
    # unequal labelled counts in the two halves of each step: in order, the first micro-batch
    # of every 64 has 8 labels and the second 32, so a mean of the micro-batches' own means
    # (not one mean over the step's 40 labels) would weigh them wrongly
    y = torch.where(torch.arange(1024) % 64 < 24, IGNORE_INDEX, y[:1024])
    data = TensorDataset(x[:1024], y)  # divisible by 2B = 64
    teacher = LiveTeacher(teacher_model)

    def run(batch_size, grad_accum):
        cfg = quiet_config(
            epochs=2,
            batch_size=batch_size,
            grad_accum=grad_accum,
            shuffle=shuffle,
            # gradient norms here are ~0.25-0.5: clipping acts on about half of the steps, and
            # must act on the accumulated gradient, not on each micro-batch
            clip_grad_norm=0.35,
            optimizer=OptimizerConfig(name="sgd", lr=0.2, momentum=0.0, weight_decay=0.01),
            schedule=ScheduleConfig(name="constant"),
            log_every=4,
        )
        d = Distiller(
            make_mlp([16], seed=6), hinton_objective(3.0, 0.5), data, teacher=teacher, config=cfg
        )
        return d.fit()

    accum, big = run(32, 2), run(64, 1)
    assert accum.steps == big.steps == 32
    initial = make_mlp([16], seed=6).state_dict()
    sa, sb = accum.student.state_dict(), big.student.state_dict()
    for name in sa:
        assert not torch.allclose(sa[name], initial[name])  # it did train
        torch.testing.assert_close(sa[name], sb[name], atol=1e-6, rtol=0)
    for ra, rb in zip(accum.history, big.history, strict=True):
        assert ra["step"] == rb["step"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    assert accum.examples_seen == big.examples_seen == 2 * 1024


def test_total_steps_count_optimizer_steps(digits):
    # 1,151 examples, batch 100: 12 micro-batches per epoch; 3 epochs with grad_accum 5 -> 36
    # micro-batches -> ceil(36 / 5) = 8 optimizer steps
    d = Distiller(
        make_mlp([8]),
        labels_only_objective(),
        digits.train,
        config=quiet_config(epochs=3, batch_size=100, grad_accum=5),
    )
    assert d.batches_per_epoch == 12
    assert d.total_steps == 8
    assert d.fit().steps == 8


# ---- learning-rate schedule ------------------------------------------------------------------


def _expected_factor(k, total, warmup, name, min_ratio):
    """Closed form of the schedule after ``k`` optimizer steps."""
    if k < warmup:
        return (k + 1) / warmup
    if name == "constant":
        return 1.0
    p = min(1.0, (k - warmup) / (total - warmup))
    shape = (1 - p) if name == "linear" else 0.5 * (1 + math.cos(math.pi * p))
    return min_ratio + (1 - min_ratio) * shape


@pytest.mark.parametrize(
    "name, warmup_steps, warmup_ratio, min_ratio",
    [("cosine", 4, 0.0, 0.1), ("linear", 0, 0.25, 0.0), ("constant", 3, 0.0, 0.0)],
)
def test_lr_schedule_follows_closed_form(digits, name, warmup_steps, warmup_ratio, min_ratio):
    total, base = 20, 0.01
    warmup = warmup_steps or int(warmup_ratio * total)
    cfg = quiet_config(
        max_steps=total,
        batch_size=32,
        log_every=1,
        optimizer=OptimizerConfig(name="sgd", lr=base, momentum=0.0),
        schedule=ScheduleConfig(
            name=name,
            warmup_steps=warmup_steps,
            warmup_ratio=warmup_ratio,
            min_lr_ratio=min_ratio,
        ),
    )
    d = Distiller(make_mlp([8]), labels_only_objective(), digits.train, config=cfg)
    used: list[list[float]] = []
    d.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: used.append([g["lr"] for g in opt.param_groups])
    )
    result = d.fit()

    # the lr the optimizer applies at its j-th step (j = 1..total) is the schedule at j - 1
    assert len(used) == total
    for j, lrs in enumerate(used, start=1):
        want = base * _expected_factor(j - 1, total, warmup, name, min_ratio)
        assert lrs == pytest.approx([want, want], rel=1e-12), j
    # the logged lr of row `step` is the rate that step used
    for row in result.history:
        assert row["lr"] == used[row["step"] - 1][0], row["step"]
    if warmup:
        assert used[0][0] == pytest.approx(base / warmup)
        assert used[warmup - 1][0] == pytest.approx(base)
    if name != "constant":
        # the schedule would reach min_lr_ratio·lr after the last step
        assert d.scheduler.get_last_lr()[0] == pytest.approx(base * min_ratio, abs=1e-15)


# ---- checkpoints -----------------------------------------------------------------------------


def _checkpointed(digits, run_dir, **kw):
    cfg = quiet_config(
        **{
            "max_steps": 10,
            "batch_size": 64,
            "eval_every": 2,
            "checkpoint_every": 3,
            "optimizer": OptimizerConfig(lr=5e-3),
            **kw,
        }
    )
    return Distiller(
        make_mlp([16], seed=8),
        labels_only_objective(),
        digits.train,
        config=cfg,
        run_dir=run_dir,
        evaluate=classification_eval(digits.val),
        best_metric="accuracy",
    )


def test_checkpoint_folder_keeps_the_newest_steps(digits, tmp_path):
    result = _checkpointed(digits, tmp_path).fit()
    root = tmp_path / "checkpoints"
    last = json.loads((root / "last.json").read_text())
    assert last == {"dir": "step-00000010", "step": 10}
    # the newest two (train.checkpoints_kept): the one before is the fallback
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000009", "step-00000010"]
    assert not list(root.rglob(".*.tmp"))  # no temporary files left behind
    folder = root / "step-00000010"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["step"] == 10
    assert set(meta["files"]) == {"student.safetensors", "trainer_state.pt"}

    fresh = make_mlp([16], seed=99)
    load_model(fresh, str(folder / "student.safetensors"))
    assert state_equal(fresh, result.student)


def test_best_checkpoint_is_the_best_evaluation(digits, tmp_path):
    result = _checkpointed(digits, tmp_path).fit()
    assert [e["step"] for e in result.evals] == [2, 4, 6, 8, 10]
    accuracies = [e["accuracy"] for e in result.evals]
    best = result.evals[accuracies.index(max(accuracies))]  # the first of equal maxima
    assert result.best == best
    assert json.loads((tmp_path / "best" / "eval.json").read_text()) == best

    model = make_mlp([16], seed=99)
    load_model(model, str(tmp_path / "best" / "student.safetensors"))
    model.eval()
    metrics = classification_eval(digits.val)(model)
    assert metrics["accuracy"] == best["accuracy"]
    assert metrics["loss"] == pytest.approx(best["loss"], rel=1e-6)


def test_best_metric_min_mode_keeps_the_lowest(digits, tmp_path):
    d = _checkpointed(digits, tmp_path)
    d.best_metric, d.best_mode = "loss", "min"
    result = d.fit()
    assert result.best["loss"] == min(e["loss"] for e in result.evals)


def test_unknown_best_metric_is_named(digits, tmp_path):
    d = _checkpointed(digits, tmp_path)
    d.best_metric = "f1"
    with pytest.raises(KeyError, match="f1"):
        d.fit()


def test_a_damaged_only_checkpoint_is_named_and_the_model_trains_again(digits, tmp_path,
                                                                      caplog):  # fmt: skip
    """With only the newest kept there is nothing to fall back to: the model trains again from
    its start, to the same weights (tests/test_faults.py: the fallback)."""
    whole = _checkpointed(digits, tmp_path / "whole", max_steps=6, checkpoints_kept=1).fit()
    _checkpointed(digits, tmp_path / "cut", max_steps=6, checkpoints_kept=1).fit()
    path = tmp_path / "cut" / "checkpoints" / "step-00000006" / "student.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, "potstill"):
        again = _checkpointed(digits, tmp_path / "cut", max_steps=6, checkpoints_kept=1).fit(
            resume=True
        )
    assert str(path) in caplog.text and "falling back to the start" in caplog.text
    assert state_equal(again.student, whole.student)


def test_a_checkpoint_without_meta_is_incomplete_and_not_used(digits, tmp_path, caplog):
    _checkpointed(digits, tmp_path, max_steps=3, checkpoints_kept=1).fit()
    (tmp_path / "checkpoints" / "step-00000003" / "meta.json").unlink()
    with caplog.at_level(logging.WARNING, "potstill"):
        _checkpointed(digits, tmp_path, max_steps=3, checkpoints_kept=1).fit(resume=True)
    assert "meta.json is missing: the checkpoint is incomplete" in caplog.text


@pytest.mark.parametrize("file", ["trainer_state.pt", "meta.json"])
def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_in_force(
    digits, tmp_path, monkeypatch, file
):
    """The second checkpoint (step 6) fails while its files are written, as on a full disk:
    the first (step 3) stays whole and named by last.json, nothing of step 6 is published, and
    a resume continues from step 3 (not from the start) to the uninterrupted weights. Only one
    checkpoint is kept, so a save that dropped the old one first would leave nothing."""
    from potstill import faults
    from potstill.checkpoints import read_checkpoint

    whole = _checkpointed(digits, tmp_path / "whole", checkpoints_kept=1).fit()
    monkeypatch.setattr(faults, "_counts", {})
    monkeypatch.setenv(faults.ENV_ENOSPC, f"write:{file}@2")
    with pytest.raises(OSError, match="No space left"):
        _checkpointed(digits, tmp_path / "cut", checkpoints_kept=1).fit()
    monkeypatch.delenv(faults.ENV_ENOSPC)
    root = tmp_path / "cut" / "checkpoints"
    assert json.loads((root / "last.json").read_text()) == {"dir": "step-00000003", "step": 3}
    assert read_checkpoint(root / "step-00000003", 10)["step"] == 3  # whole: every checksum
    assert not (root / "step-00000006" / "meta.json").exists()  # step 6 never became one
    steps: list[int] = []
    d = _checkpointed(digits, tmp_path / "cut", checkpoints_kept=1)
    d.callbacks.append(lambda step, row: steps.append(step))
    again = d.fit(resume=True)
    assert steps == list(range(4, 11))  # from the checkpoint of step 3
    assert state_equal(again.student, whole.student)


def test_resume_without_run_dir_or_checkpoint(digits, tmp_path):
    d = Distiller(make_mlp([8]), labels_only_objective(), digits.train, config=quiet_config())
    with pytest.raises(ValueError, match="run_dir"):
        d.fit(resume=True)
    # an empty run_dir: resume starts from scratch, like a fresh fit
    a = _checkpointed(digits, tmp_path / "a", max_steps=4).fit(resume=True)
    b = _checkpointed(digits, tmp_path / "b", max_steps=4).fit()
    assert state_equal(a.student, b.student)


# ---- errors and the baseline -----------------------------------------------------------------


def test_objective_needing_a_teacher_without_one_is_refused(digits):
    with pytest.raises(ValueError, match="kd"):
        Distiller(make_mlp([8]), hinton_objective(2.0, 0.5), digits.train, teacher=None)
    # alpha = 0 leaves only CE: no teacher needed
    Distiller(make_mlp([8]), hinton_objective(2.0, 0.0), digits.train, teacher=None)


def test_bad_arguments_are_refused(digits):
    with pytest.raises(ValueError, match="best_mode"):
        Distiller(make_mlp([8]), labels_only_objective(), digits.train, best_mode="highest")
    with pytest.raises(ValueError, match="empty"):
        Distiller(make_mlp([8]), labels_only_objective(), TensorDataset(torch.zeros(0, 1, 8, 8)))


def test_labels_only_baseline_trains_without_a_teacher(digits):
    result = Distiller(
        make_mlp([32], seed=9),
        labels_only_objective(),
        digits.train,
        teacher=None,
        config=quiet_config(
            epochs=4, batch_size=64, log_every=6, optimizer=OptimizerConfig(lr=1e-2)
        ),
        evaluate=classification_eval(digits.val),
    ).fit()
    losses = [r["loss"] for r in result.history]
    assert set(result.history[0]) >= {"loss", "ce"}
    assert "kd" not in result.history[0]
    assert losses[-1] < 0.5 * losses[0]
    assert result.final_eval["accuracy"] > 0.8
    assert result.examples_seen == 4 * len(digits.train)
    assert not result.student.training


def test_bf16_mixed_precision_runs_matmuls_in_bf16_and_keeps_fp32_weights(digits, teacher_model):
    seen: list[torch.dtype] = []

    def forward(model, batch):
        logits = model(batch["input"])
        seen.append(logits.dtype)
        return logits

    def run(precision: str) -> torch.nn.Module:
        student = make_mlp([32], seed=3)
        cfg = quiet_config(max_steps=20, batch_size=64, precision=precision,
                           optimizer={"name": "sgd", "lr": 0.05})  # fmt: skip
        return Distiller(
            student, hinton_objective(2.0, 0.5), digits.train,
            teacher=LiveTeacher(teacher_model), config=cfg, student_forward=forward,
        ).fit().student  # fmt: skip

    fp32 = run("fp32")
    assert set(seen) == {torch.float32}
    seen.clear()
    bf16 = run("bf16")
    assert set(seen) == {torch.bfloat16}  # the student's products ran in bf16 ...
    for (name, a), b in zip(fp32.state_dict().items(), bf16.state_dict().values(), strict=True):
        assert b.dtype == torch.float32, name  # ... its weights stayed fp32
        change = (a - make_mlp([32], seed=3).state_dict()[name]).norm()
        # bf16 rounding moves the 20-step result, by a small part of the distance trained
        # (seen: up to 3% with torch 2.13, 5.1% with 2.6)
        assert 0 < (a - b).norm() < 0.1 * change, name


# ---- tied embeddings: sparse lookup gradient ------------------------------------------------


class TiedLM(torch.nn.Module):
    """A bag-of-previous-token LM whose output layer is its input embedding (tied), plus an
    untied embedding of positions."""

    def __init__(self, vocab: int = 50, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width, padding_idx=0)
        self.positions = torch.nn.Embedding(8, width)
        self.mix = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.positions(torch.arange(x.shape[1]))
        return self.head(torch.tanh(self.mix(h)))


def _tied_data(n: int = 96, vocab: int = 50, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, 8), generator=g)  # repeated ids within a batch, and 0 (padding)
    return TensorDataset(x, torch.randint(0, vocab, (n,), generator=g))


def test_tied_embedding_gradient_is_the_same_without_a_dense_lookup_buffer():
    from potstill.distiller import sparse_tied_embeddings

    model = TiedLM()
    x = _tied_data().tensors[0][:32]

    def grads(sparse: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        model.zero_grad(set_to_none=True)
        ctx = sparse_tied_embeddings(model) if sparse else contextlib.nullcontext([])
        with ctx, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(x).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, {
            e.key: e.count for e in prof.key_averages()
        }

    dense, dense_ops = grads(False)
    sparse, sparse_ops = grads(True)
    # two dense lookup gradients (tied and positions) become one: no vocabulary × width buffer
    assert dense_ops["aten::embedding_dense_backward"] == 2
    assert sparse_ops["aten::embedding_dense_backward"] == 1
    assert sparse_ops["aten::embedding_sparse_backward"] == 1
    for name, g in dense.items():
        assert not sparse[name].is_sparse, name  # the optimizer sees a dense gradient
        torch.testing.assert_close(sparse[name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert sparse["embed.weight"][0].abs().sum() > 0  # the head's row for padding id 0 ...
    only_head = dense["embed.weight"][0]  # ... carries the head's gradient alone, both ways
    torch.testing.assert_close(sparse["embed.weight"][0], only_head)
    assert not model.embed.sparse  # restored


def test_distiller_switches_only_tied_embeddings_and_trains_the_same(monkeypatch):
    import potstill.distiller as D

    data = _tied_data()
    teacher = TiedLM(seed=5).eval()
    flags: list[tuple[bool, bool]] = []

    def forward(model, batch):
        flags.append((model.embed.sparse, model.positions.sparse))
        return model(batch["input"])[:, -1]

    def run() -> torch.nn.Module:
        cfg = quiet_config(max_steps=6, batch_size=32, grad_accum=2, clip_grad_norm=1.0,
                           optimizer={"name": "sgd", "lr": 0.5})  # fmt: skip
        teach = LiveTeacher(teacher, forward=lambda m, b: m(b["input"])[:, -1])
        return Distiller(
            TiedLM(), hinton_objective(2.0, 0.5), data, teacher=teach, config=cfg,
            student_forward=forward,
        ).fit().student  # fmt: skip

    switched = run()
    assert set(flags) == {(True, False)}  # the tied embedding only; the untied one stays dense
    assert not switched.embed.sparse  # restored after the run
    flags.clear()
    monkeypatch.setattr(D, "sparse_tied_embeddings", lambda m: contextlib.nullcontext([]))
    plain = run()
    assert set(flags) == {(False, False)}
    for name, a in switched.state_dict().items():
        torch.testing.assert_close(a, plain.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)
    assert (switched.embed.weight - TiedLM().embed.weight).abs().max() > 1e-3  # it trained


def test_placement_puts_every_batch_on_its_device(digits):
    """The Distiller hands the teacher and the student batches placed by its Placement (the
    seam GPUs come in through); on the CPU placement training is unchanged."""
    from potstill.placement import CPU, Placement

    seen: list[str] = []

    class Recording(Placement):
        def batch(self, batch):
            placed = super().batch(batch)
            seen.append(placed["input"].device.type)
            return placed

    def fit(placement):
        student = make_mlp([16], seed=0)
        cfg = quiet_config(max_steps=5, batch_size=32)
        return Distiller(
            student, labels_only_objective(), digits.train, config=cfg, placement=placement
        ).fit()

    plain, recorded = fit(CPU), fit(Recording())
    assert seen == ["cpu"] * 5  # one placed batch per step
    assert state_equal(plain.student, recorded.student)
