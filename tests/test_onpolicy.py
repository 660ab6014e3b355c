"""On-policy distillation (potstill.llm.onpolicy): with λ = 1 the training tokens are the
student's own completions, sampled with its current weights; λ = 0 leaves batches alone; the λ
draws are seeded per micro-batch; the Distiller feeds the teacher the transformed batch."""

from __future__ import annotations

import copy

import pytest
import torch
from test_llm_pipeline import tiny_llama

from potstill.config import TrainConfig
from potstill.data.instructions import instructions
from potstill.distiller import Distiller
from potstill.llm.data import LMExample, tokenize_examples
from potstill.llm.forward import causal_lm_forward
from potstill.llm.onpolicy import OnPolicySampler, SamplingSpec
from potstill.losses.objective import Objective
from potstill.losses.terms import token_term
from potstill.losses.tokens import batch_token_mask
from potstill.teachers import LiveTeacher

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tok):
    examples = [LMExample(p, "An answer.") for p in instructions("train")[:12]]
    return tokenize_examples(examples, tok, 48, fmt="chat")


def _greedy(model, prompt: list[int], n: int, eos: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
            do_sample=False, pad_token_id=eos,
        )[0, len(prompt) :].tolist()  # fmt: skip
    return out[: out.index(eos) + 1] if eos in out else out


def _sampler(student, tok, lam=1.0, seed=0, **spec):
    return OnPolicySampler(
        student, lam=lam, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        sampling=SamplingSpec(**{"max_new_tokens": 6, "temperature": 0, **spec}), seed=seed,
    )  # fmt: skip


def test_full_on_policy_batches_hold_the_students_current_completions(tok, data):
    student = tiny_llama(len(tok), seed=5).train()  # no dropout: train mode samples the same
    sampler = _sampler(student, tok)
    batch = data.batch(torch.tensor([0, 3, 7]))
    for micro in range(2):
        out = sampler(batch, micro)
        assert out["on_policy"] and torch.equal(out["prompt_length"], batch["prompt_length"])
        for b in range(3):
            n = int(batch["prompt_length"][b])
            row = out["input_ids"][b][out["attention_mask"][b].bool()].tolist()
            assert row[:n] == batch["input_ids"][b, :n].tolist()  # the prompt is kept
            assert row[n:] == _greedy(student, row[:n], 6, tok.eos_token_id)
        # only the student's tokens are scored: the mask covers exactly the completions
        mask = batch_token_mask(out)
        lengths = out["attention_mask"].sum(1) - out["prompt_length"]
        assert mask.sum(1).tolist() == lengths.tolist()
        # the sampler reads the weights the student has now
        with torch.no_grad():
            student.lm_head.weight.mul_(-1.0)
    assert sampler.sampled_batches == 2
    assert student.training  # eval mode only while sampling, then back


def test_lambda_zero_keeps_batches_and_draws_are_seeded(tok, data):
    student = tiny_llama(len(tok), seed=5)
    batch = data.batch(torch.tensor([1, 2]))
    out = _sampler(student, tok, lam=0.0)(batch, 0)
    assert not out["on_policy"] and torch.equal(out["input_ids"], batch["input_ids"])
    half = _sampler(student, tok, lam=0.5, seed=3, max_new_tokens=1)
    draws = [half(batch, m)["on_policy"] for m in range(60)]
    assert 18 <= sum(draws) <= 42
    again = _sampler(student, tok, lam=0.5, seed=3, max_new_tokens=1)
    assert [again(batch, m)["on_policy"] for m in range(60)] == draws  # resumable
    with pytest.raises(ValueError, match="on_policy"):
        _sampler(student, tok, lam=1.5)


class _Recording:
    """A LiveTeacher that remembers the batches it scored."""

    def __init__(self, model):
        self.live = LiveTeacher(model, forward=causal_lm_forward)
        self.batches = []

    def signal(self, batch):
        self.batches.append(batch)
        return self.live.signal(batch)


def test_distiller_trains_on_the_students_samples(tok, data):
    teacher = tiny_llama(len(tok), seed=1)
    student = tiny_llama(len(tok), seed=2)
    start = copy.deepcopy(student)
    sampler = _sampler(student, tok, temperature=1.0, max_new_tokens=5, seed=4)
    recorder = _Recording(teacher)
    cfg = TrainConfig(max_steps=3, batch_size=4, progress=False, tensorboard=False, log_every=1)
    fit = Distiller(
        student, Objective([token_term("fkl", chunk_size=64)]), data, teacher=recorder,
        config=cfg, student_forward=causal_lm_forward, batch_transform=sampler,
    ).fit()  # fmt: skip
    assert fit.steps == 3 and len(recorder.batches) == 3
    assert all(b["on_policy"] for b in recorder.batches)
    given = tok("An answer.", add_special_tokens=False)["input_ids"]
    for b in recorder.batches:
        for row in range(b["input_ids"].shape[0]):
            n = int(b["prompt_length"][row])
            completion = b["input_ids"][row][b["attention_mask"][row].bool()][n:].tolist()
            assert completion[: len(given)] != given  # not the dataset's answer
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in fit.history)
    assert not torch.equal(student.lm_head.weight, start.lm_head.weight)
