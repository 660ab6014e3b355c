"""What was written before issue 17 rebuilt the package's rooms still works: teacher caches made
then read back to the same signals, and a run interrupted then resumes to the same weights as
the uninterrupted run of that time (files in tests/data/before-17, made by make_before_17.py
with potstill at commit 4089819)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from potstill.cache import CachedTeacher, CacheError
from potstill.config import TrainConfig
from potstill.data.tensors import TensorDictDataset
from potstill.distiller import Distiller
from potstill.losses.terms import hinton_objective
from potstill.teachers import LiveTeacher

BEFORE = Path(__file__).parent / "data" / "before-17"


def _lm() -> nn.Module:
    lm = nn.Sequential(nn.Embedding(40, 8), nn.Tanh(), nn.Linear(8, 40))
    lm.load_state_dict(load_file(str(BEFORE / "lm.safetensors")))
    return lm


def _classifier() -> nn.Module:
    clf = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    clf.load_state_dict(load_file(str(BEFORE / "clf.safetensors")))
    return clf


def _rows() -> TensorDataset:
    t = load_file(str(BEFORE / "rows.safetensors"))
    return TensorDataset(t["x"], t["y"])


@pytest.mark.parametrize("name", ["q8-zlib", "f32-none"])
def test_token_cache_written_before_reads_the_same_signal(name):
    data = TensorDictDataset(load_file(str(BEFORE / "tokens.safetensors")))
    expected = load_file(str(BEFORE / "expected-signals.safetensors"))
    # the manifest's checks pass against the same teacher and data, recomputed today
    cached = CachedTeacher(BEFORE / f"cache-{name}", teacher=_lm(), dataset=data)
    topk = cached.signal(data.batch(torch.arange(len(data)))).topk
    assert torch.equal(topk.ids, expected[f"{name}.ids"])
    same(topk.logprobs, expected[f"{name}.logprobs"], f"{name}.logprobs")  # decoded on this CPU
    same(topk.tail_mass, expected[f"{name}.tail"], f"{name}.tail")
    # and the exact encoding still equals the teacher's own top-k at the real positions
    if name == "f32-none":
        live = torch.log_softmax(_lm()(data.tensors["input_ids"]).float(), -1)
        real = data.tensors["attention_mask"].bool()
        want = live.topk(8, dim=-1)
        torch.testing.assert_close(topk.logprobs[real], want.values[real], atol=1e-6, rtol=0)


def test_logit_cache_written_before_reads_the_same_logits():
    rows = _rows()
    cached = CachedTeacher(BEFORE / "cache-logits", teacher=_classifier(), dataset=rows)
    logits = cached.signal({"index": torch.arange(len(rows))}).logits
    assert torch.equal(logits, load_file(str(BEFORE / "expected-signals.safetensors"))["logits"])
    with torch.no_grad():
        torch.testing.assert_close(logits, _classifier()(rows.tensors[0]), atol=1e-6, rtol=0)


def test_cache_written_before_still_refuses_another_teacher():
    other = _classifier()
    with torch.no_grad():
        other[0].weight.add_(1.0)
    with pytest.raises(CacheError, match="teacher_weights differs"):
        CachedTeacher(BEFORE / "cache-logits", teacher=other, dataset=_rows())


def test_checkpoint_written_before_resumes_to_the_uninterrupted_result(tmp_path):
    run_dir = tmp_path / "interrupted"
    shutil.copytree(BEFORE / "interrupted", run_dir)
    config = TrainConfig(**json.loads((BEFORE / "README.json").read_text())["config"])
    student = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    student.load_state_dict(load_file(str(BEFORE / "student-init.safetensors")))
    seen: list[int] = []
    fit = Distiller(
        student, hinton_objective(2.0, 0.5), _rows(), teacher=LiveTeacher(_classifier()),
        config=config, run_dir=run_dir, callbacks=[lambda step, row: seen.append(step)],
    ).fit(resume=True)  # fmt: skip
    assert seen == [4, 5, 6]  # it continued from the checkpoint at step 3
    assert fit.steps == 6
    final = load_file(str(BEFORE / "student-final.safetensors"))
    # equal to the uninterrupted run only if weights, optimizer moments, schedule and random
    # state all came back from the old checkpoint
    for name, weight in fit.student.state_dict().items():
        torch.testing.assert_close(weight, final[name], atol=1e-6, rtol=0, msg=name)
    # the log keeps the rows up to the checkpoint (step 3) and continues from there
    steps = [json.loads(line).get("step") for line in (run_dir / "metrics.jsonl").open()]
    assert [s for s in steps if s is not None] == [1, 2, 3, 4, 5, 6]


def same(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """``got`` equals ``want`` to 1e-5 of ``want``'s largest magnitude: bitwise on the CPU that
    wrote the files; another CPU's vector kernels (exp, log, sums; AVX2 against AVX-512) round
    the last bits of the terms a value is summed from (seen: 2e-6 of it), while a change of a
    formula (a temperature, a weight, a mask) moves it by far more."""
    scale = want.abs().max().item() if want.numel() else 0.0
    worst = (got - want).abs().max().item() if want.numel() else 0.0
    assert got.shape == want.shape, name
    assert worst <= 1e-5 * max(scale, 1e-3), (name, worst, scale)


def test_every_term_gives_the_values_and_gradients_of_before():
    """kd, ce and every divergence per row and per token, dense, chunked, top-k and fused with
    the LM head: the same value and student gradient, to the last bit or two (:func:`same`), as
    the code before issue 17 gave on the same inputs (make_before_17.loss_values)."""
    from potstill.losses.terms import (
        ce_term,
        divergence_term,
        kd_term,
        next_token_ce_term,
        token_term,
    )
    from potstill.signal import Signal, StudentView, TopK

    g = torch.Generator().manual_seed(7)
    rows_s, rows_t = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    labels = torch.tensor([1, -100, 3, 4, -100, 0])
    B, T, V, H = 2, 5, 13, 4
    hidden, head = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
    tok_t = torch.randn(B, T, V, generator=g)
    batch = {
        "input_ids": torch.randint(0, V, (B, T), generator=g),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "prompt_length": torch.tensor([1, 2]),
        "label": labels,
        "index": torch.arange(B),
    }
    before = load_file(str(BEFORE / "loss-values.safetensors"))
    seen = []

    def check(name, term, student, signal, deferred=False):
        x = student.clone().requires_grad_()
        if deferred:
            view = StudentView(hidden=x, head=nn.Linear(H, V, bias=False))
            view.head.weight.data.copy_(head)
        else:
            view = StudentView(logits=x)
        value = term.fn(view, signal, batch if x.dim() == 3 else {"label": labels})
        value.backward()
        for what, got in (("value", value.detach()), ("grad", x.grad)):
            same(got, before[f"{name}.{what}"], f"{name}.{what}")
        seen.append(name)

    check("kd", kd_term(2.0, 1.0), rows_s, Signal(logits=rows_t))
    check("ce", ce_term(1.0, label_smoothing=0.1), rows_s, None)
    check("ce.token", next_token_ce_term(), tok_t * 0.5, None)
    topk = TopK.from_logits(tok_t, 4)
    for kind in ["fkl", "rkl", "jsd", "tvd", "mse", "skl", "srkl"]:
        opts = {"temperature": 1.5, "beta": 0.3, "skew": 0.2}
        check(f"row.{kind}", divergence_term(kind, **opts), rows_s, Signal(logits=rows_t))
        for chunk in (None, 3):
            term = token_term(kind, chunk_size=chunk, **opts)
            check(f"token.{kind}.{chunk}", term, tok_t * 0.5, Signal(logits=tok_t))
            if kind != "mse":
                check(f"topk.{kind}.{chunk}", term, tok_t * 0.5, Signal(topk=topk))
        check(f"fused.{kind}", token_term(kind, chunk_size=3, **opts), hidden,
              Signal(logits=tok_t), deferred=True)  # fmt: skip
    assert 2 * len(seen) == len(before)  # every recorded value was compared
