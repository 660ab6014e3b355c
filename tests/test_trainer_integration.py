"""Inside a ``transformers.Trainer``: a real Trainer run of a small Hugging Face classifier with
potstill's objective as its loss gives the same losses at the same steps, and the same trained
weights, as the same run through potstill's Distiller; a teacher cache feeds it as the live
teacher does; every term reaches the Trainer's log; the agreement callback counts as by hand."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments  # noqa: E402

from potstill.cache import cached_or_live  # noqa: E402
from potstill.config import TrainConfig  # noqa: E402
from potstill.data.tensors import TensorDictDataset  # noqa: E402
from potstill.distiller import Distiller  # noqa: E402
from potstill.integrations.transformers import (  # noqa: E402
    DistillationTrainer,
    TeacherAgreement,
    logits_forward,
)
from potstill.losses.terms import hinton_objective  # noqa: E402
from potstill.teachers import LiveTeacher  # noqa: E402

STEPS, BATCH, LR = 6, 8, 2e-3


pytestmark = pytest.mark.usefixtures("no_fake_accelerator")


def classifier(seed: int, layers: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def dataset() -> TensorDictDataset:
    g = torch.Generator().manual_seed(0)
    n = STEPS * BATCH
    labels = torch.randint(0, 3, (n,), generator=g)
    labels[::5] = -100  # unlabelled: only the teacher teaches them
    return TensorDictDataset({
        "input_ids": torch.randint(1, 60, (n, 10), generator=g),
        "attention_mask": torch.ones(n, 10, dtype=torch.long),
        "label": labels, "index": torch.arange(n),
    })  # fmt: skip


def args(tmp_path, **over) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "trainer"), max_steps=STEPS, per_device_train_batch_size=BATCH,
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=0,
        optim="adamw_torch", disable_tqdm=True,
    )  # fmt: skip
    return TrainingArguments(**{**base, **over})


def distiller_run(teacher, student):
    config = TrainConfig(
        max_steps=STEPS, batch_size=BATCH, shuffle=False, log_every=1, progress=False,
        report_to="none", optimizer={"lr": LR, "fused": False}, schedule={"name": "constant"},
    )  # fmt: skip
    return Distiller(
        student, hinton_objective(2.0, 0.5), dataset(),
        teacher=LiveTeacher(teacher, forward=logits_forward), config=config,
        student_forward=logits_forward,
    ).fit()  # fmt: skip


class InOrder(DistillationTrainer):
    """The examples in order, as the Distiller takes them with ``shuffle: false`` (newer
    Trainers say ``train_sampling_strategy="sequential"``; this works in every release)."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def trainer_run(tmp_path, teacher, student, **over):
    trainer = InOrder(
        model=student, args=args(tmp_path, **over.pop("args", {})), train_dataset=dataset(),
        teacher=teacher, objective=hinton_objective(2.0, 0.5), **over,
    )  # fmt: skip
    trainer.train()
    return trainer


def test_a_trainer_run_matches_the_distiller_step_for_step(tmp_path):
    teacher = classifier(1, layers=2).eval()
    ours = distiller_run(teacher, classifier(2, layers=1))
    trainer = trainer_run(tmp_path, teacher, classifier(2, layers=1))
    logged = [r for r in trainer.state.log_history if "kd" in r]
    assert (
        [r["step"] for r in logged]
        == [r["step"] for r in ours.history]
        == list(range(1, STEPS + 1))
    )
    for theirs, mine in zip(logged, ours.history, strict=True):
        for term in ("kd", "ce", "loss"):
            assert theirs[term] == pytest.approx(mine[term], rel=1e-5, abs=1e-6), term
    a, b = trainer.model.state_dict(), ours.student.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    moved = any(not torch.equal(p, q) for p, q in zip(a.values(),
                classifier(2, layers=1).state_dict().values(), strict=True))  # fmt: skip
    assert moved  # it did train


def test_a_teacher_cache_feeds_the_trainer_as_the_live_teacher_does(tmp_path):
    teacher = classifier(1, layers=2).eval()
    live = trainer_run(tmp_path / "live", teacher, classifier(2, layers=1))
    cache = cached_or_live(teacher, dataset(), tmp_path / "cache", forward=logits_forward)
    assert type(cache).__name__ == "CachedTeacher"
    cached = trainer_run(tmp_path / "cached", cache, classifier(2, layers=1))
    for name, w in live.model.state_dict().items():
        torch.testing.assert_close(cached.model.state_dict()[name], w, rtol=1e-5, atol=1e-6)


def test_the_agreement_callback_counts_as_by_hand(tmp_path):
    teacher = classifier(1, layers=2).eval()
    trainer = DistillationTrainer(
        model=classifier(2, layers=1), args=args(tmp_path, eval_strategy="no"),
        train_dataset=dataset(), eval_dataset=dataset(), teacher=teacher,
        objective=hinton_objective(2.0, 0.5),
    )  # fmt: skip
    trainer.add_callback(TeacherAgreement(trainer))
    metrics = trainer.evaluate()
    data = dataset().batch(torch.arange(len(dataset())))
    with torch.no_grad():
        s = logits_forward(trainer.model.eval(), data).argmax(-1)
        t = logits_forward(teacher, data).argmax(-1)
    assert metrics["eval_agreement"] == pytest.approx(float((s == t).float().mean()))
    assert "eval_loss" in metrics  # the objective's loss on the held-out data
