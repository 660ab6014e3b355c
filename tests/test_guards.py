"""Non-finite guards (the fault issue, item 4): NaN or infinite inputs are named by row when the
data is given, a teacher's NaN outputs are never cached or taught, and a step whose loss or
gradients are not finite stops the run naming the step, the term and the examples (or, asked
to, is skipped and counted)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_mlp, quiet_config
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from potstill.data.rows import DataError
from potstill.data.tensors import epoch_order
from potstill.distiller import Distiller
from potstill.guards import NonFiniteError
from potstill.losses.terms import hinton_objective, labels_only_objective
from potstill.teachers import LiveTeacher


def _with_nan(digits, rows, value=float("nan")):
    x, y = (t.clone() for t in digits.train.tensors)
    x[rows, 0, 3, 3] = value
    return TensorDataset(x, y)


def test_nan_rows_in_tensors_are_named_before_training(digits):
    data = _with_nan(digits, [5, 40, 41])
    with pytest.raises(DataError, match=r"column 'input' has NaN or infinite values in rows "
                       r"5, 40, 41 \(counted from 0\)"):  # fmt: skip
        Distiller(make_mlp([8]), labels_only_objective(), data, config=quiet_config(max_steps=2))


def test_inf_rows_reach_potstill_distill_as_a_clear_error(digits):
    """The issue's case: ``potstill.distill`` on inputs with a few bad rows used to return a
    student whose weights were all NaN."""
    import potstill

    data = _with_nan(digits, [7], float("inf"))
    with pytest.raises(DataError, match=r"rows 7 "):
        potstill.distill(make_mlp([32], seed=1), make_mlp([8]), data, epochs=1, progress=False,
                         baseline=False)  # fmt: skip


class Lazy(Dataset):
    """A dataset read item by item (nothing to check up front)."""

    def __init__(self, base: TensorDataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


def test_nan_in_a_lazy_dataset_is_named_by_example_when_its_batch_is_made(digits):
    data = Lazy(_with_nan(digits, [123]))
    cfg = quiet_config(epochs=1, batch_size=64)
    d = Distiller(make_mlp([8]), labels_only_objective(), data, config=cfg)
    with pytest.raises(DataError, match=r"the training data: 'input' has NaN or infinite "
                       r"values in examples 123;"):  # fmt: skip
        d.fit()
    assert 0 < d.step < d.total_steps  # it ran up to the batch that holds example 123


def _batch_of(step: int, n: int, batch_size: int, seed: int = 0) -> list[int]:
    """The examples of (1-based) step ``step`` by the loop's documented epoch order."""
    per_epoch = -(-n // batch_size)
    epoch, b = divmod(step - 1, per_epoch)
    order = epoch_order(n, seed, epoch)
    return sorted(int(i) for i in order[b * batch_size : (b + 1) * batch_size])


def test_a_diverged_step_stops_naming_step_term_and_examples(digits, tmp_path):
    """Weights set to inf after step 2 make step 3's loss NaN: the run stops there, naming
    the step, each non-finite term and the batch's examples; step 2's checkpoint resumes."""
    cfg = quiet_config(max_steps=6, batch_size=32, checkpoint_every=1)
    student = make_mlp([8])
    d = Distiller(student, hinton_objective(4.0, 0.5), digits.train,
                  teacher=LiveTeacher(make_mlp([32], seed=1)), config=cfg,
                  run_dir=tmp_path)  # fmt: skip

    def poison(step, row):
        if step == 2:
            with torch.no_grad():
                next(student.parameters()).fill_(float("inf"))

    d.callbacks.append(poison)
    with pytest.raises(NonFiniteError) as e:
        d.fit()
    msg = str(e.value)
    first = _batch_of(3, len(digits.train), 32)
    assert msg.startswith("step 3 of 6: the loss is not finite: term 'kd', 'ce'")
    assert "training examples " + ", ".join(map(str, first[:10])) in msg
    assert "train.nonfinite: skip" in msg and "train.clip_grad_norm" in msg
    assert d.step == 2
    assert (tmp_path / "checkpoints" / "step-00000002").is_dir()
    assert not (tmp_path / "checkpoints" / "step-00000003").exists()


def _nan_for(example: int):
    """A student forward whose logits are NaN for one example of the training data."""

    def forward(model, batch):
        out = model(batch["input"])
        bad = (batch["index"] == example).to(out.device)[:, None]
        return torch.where(bad, torch.full_like(out, float("nan")), out)

    return forward


def test_skip_drops_each_non_finite_step_and_counts_it(digits):
    n, bs, epochs = len(digits.train), 64, 3
    cfg = quiet_config(epochs=epochs, batch_size=bs, nonfinite="skip", log_every=1)
    d = Distiller(make_mlp([8]), labels_only_objective(), digits.train, config=cfg,
                  student_forward=_nan_for(11))  # fmt: skip
    result = d.fit()
    assert result.skipped_steps == epochs  # example 11 is in one batch per epoch
    assert all(torch.isfinite(p).all() for p in result.student.parameters())
    logged = [r["loss"] for r in result.history if "loss" in r]
    assert len(result.history) == d.total_steps
    assert len(logged) == d.total_steps - epochs and all(v == v for v in logged)
    # a skipped step logs no loss: its interval holds no kept step
    skipped = [r["step"] for r in result.history if "loss" not in r]
    assert len(skipped) == epochs
    for step in skipped:
        assert 11 in _batch_of(step, n, bs)


def test_non_finite_gradients_with_a_finite_loss_are_named(digits):
    def forward(model, batch):  # sqrt at 0: a finite value, an infinite gradient
        out = model(batch["input"])
        return out + torch.sqrt(out - out.detach())

    cfg = quiet_config(max_steps=3, batch_size=32)
    d = Distiller(make_mlp([8]), labels_only_objective(), digits.train, config=cfg,
                  student_forward=forward)  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"step 1 of 3: the gradients are not finite with a "
                       r"finite loss \(parameters: student\.\d+\.weight"):  # fmt: skip
        d.fit()


class NanTeacher(nn.Module):
    """A teacher whose outputs are NaN for the inputs whose pixel signature is ``bad_sum``."""

    def __init__(self, bad_sum: float):
        super().__init__()
        self.net = make_mlp([32], seed=1)
        self.bad = bad_sum

    def forward(self, x):
        out = self.net(x)
        hit = (_signature(x)[:, None] - self.bad).abs() < 1e-4
        return torch.where(hit, torch.full_like(out, float("nan")), out)


def _signature(x: torch.Tensor) -> torch.Tensor:
    """A weighted pixel sum, fixed weights: (almost) one value per distinct image."""
    w = torch.linspace(0.5, 1.5, x[0].numel(), dtype=x.dtype, device=x.device) ** 3
    return x.flatten(1) @ w


def _bad_examples(digits, example: int = 17) -> tuple[float, list[int]]:
    """The signature of ``example`` and every training example sharing it (independently)."""
    sums = _signature(digits.train.tensors[0])
    target = float(sums[example])
    return target, sorted(int(i) for i in ((sums - target).abs() < 1e-4).nonzero().flatten())


def test_a_teacher_giving_nan_is_refused_when_taught_from_even_with_skip(digits):
    threshold, bad = _bad_examples(digits)
    assert 1 <= len(bad) <= 10
    cfg = quiet_config(epochs=1, batch_size=len(digits.train), nonfinite="skip")
    d = Distiller(make_mlp([8]), hinton_objective(4.0, 0.5), digits.train,
                  teacher=LiveTeacher(NanTeacher(threshold)), config=cfg)  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"step 1 of 1: the teacher's outputs are NaN .*"
                       rf"training examples {', '.join(map(str, bad))}\b"):  # fmt: skip
        d.fit()


def test_a_teacher_giving_nan_is_never_cached(digits, tmp_path):
    from potstill.cache import build_logit_cache

    threshold, bad = _bad_examples(digits)
    with pytest.raises(NonFiniteError, match=rf"filling the teacher cache: .* examples "
                       rf"{', '.join(map(str, bad))}\b.*refusing"):  # fmt: skip
        build_logit_cache(NanTeacher(threshold), digits.train, tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_blank_texts_are_named_by_their_row_in_the_tables_order():
    """check_texts reads a table's rows in its own order (a shuffled or selected table too),
    and skips columns that are not text."""
    from datasets import Dataset as HFDataset

    from potstill.guards import check_texts

    texts = ["a", "", "b", None, "c", " \t", "d"]
    table = HFDataset.from_dict({"text": texts, "n": list(range(7))})
    with pytest.raises(DataError, match=r"column 'text' of the train split has no text in "
                       r"rows 1, 3, 5 \(counted from 0\)"):  # fmt: skip
        check_texts({"train": table}, ["n", "text"], "data")
    order = [6, 5, 4, 3, 2, 1, 0]
    with pytest.raises(DataError, match=r"of the test split has no text in rows 1, 3, 5 "):
        check_texts({"test": table.select(order)}, ["text"], "data")
    shuffled = table.shuffle(seed=3)
    expected = [i for i, t in enumerate(shuffled["text"]) if not (t or "").strip()]
    with pytest.raises(DataError, match=rf"rows {', '.join(map(str, expected))} \("):
        check_texts({"train": shuffled}, ["text"], "data")
    check_texts({"train": table.select([0, 2, 4, 6])}, ["text"], "data")  # nothing blank
