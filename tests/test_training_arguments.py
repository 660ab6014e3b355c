"""``transformers.TrainingArguments``' names where they mean the same thing: a training section
(recipe, API) given them is the same TrainConfig as one given potstill's names; both names at
once are an error naming both; a kind's default budget sees them; the schema takes them."""

from __future__ import annotations

import pytest
import torch
from conftest import make_mlp, state_equal

import potstill
from potstill.config import TRAINING_ARGUMENTS, TrainConfig
from potstill.recipe import load_recipe, validate_recipe

HF = {
    "num_train_epochs": 2.0, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 4,
    "learning_rate": 5e-5, "weight_decay": 0.01, "max_grad_norm": 1.0,
    "lr_scheduler_type": "linear", "warmup_steps": 3, "warmup_ratio": 0.1, "logging_steps": 5,
    "eval_steps": 50, "save_steps": 25, "save_total_limit": 3, "torch_compile": True,
    "disable_tqdm": True, "bf16": True, "seed": 7, "max_steps": 90, "report_to": "none",
}  # fmt: skip
OURS = {
    "epochs": 2.0, "batch_size": 16, "grad_accum": 4, "clip_grad_norm": 1.0,
    "optimizer": {"lr": 5e-5, "weight_decay": 0.01},
    "schedule": {"name": "linear", "warmup_steps": 3, "warmup_ratio": 0.1},
    "log_every": 5, "eval_every": 50, "checkpoint_every": 25, "checkpoints_kept": 3,
    "compile": True, "progress": False, "precision": "bf16", "seed": 7, "max_steps": 90,
    "report_to": "none",
}  # fmt: skip


def test_every_name_sets_the_field_it_means():
    assert set(HF) - {"seed", "max_steps", "report_to"} == set(TRAINING_ARGUMENTS) - {"fp16"}
    assert TrainConfig(**HF) == TrainConfig(**OURS)
    assert TrainConfig(fp16=True).precision == "fp16"
    assert TrainConfig(bf16=False).precision == "fp32"
    assert TrainConfig(max_grad_norm=0).clip_grad_norm is None  # 0: no clipping, as there
    with pytest.raises(ValueError, match=r"learning_rate \(TrainingArguments' name\) and "
                       r"optimizer.lr both given; keep one"):  # fmt: skip
        TrainConfig(learning_rate=1e-3, optimizer={"lr": 1e-4})


def test_recipes_take_them_and_keep_their_kinds_budget_rules():
    lm = load_recipe("smollm2-fortunes")
    data = lm.model_dump(mode="json")
    data["train"] = {"num_train_epochs": 2, "per_device_train_batch_size": 4}
    r = validate_recipe(data)
    assert (r.train.epochs, r.train.max_steps, r.train.batch_size) == (2, None, 4)
    data["train"] = {"per_device_train_batch_size": 4}  # no length: the kind's 60 steps
    assert validate_recipe(data).train.max_steps == 60
    tc = load_recipe("fortunes-topics").model_dump(mode="json")
    tc["train"] = {"learning_rate": 3e-5}  # the kind's 3 epochs and batch 32 stay
    t = validate_recipe(tc).train
    assert (t.optimizer.lr, t.batch_size, t.epochs) == (3e-5, 32, 3)


def test_the_schema_takes_them():
    jsonschema = pytest.importorskip("jsonschema")
    from potstill.recipe.explain import recipe_schema

    check = jsonschema.Draft202012Validator(recipe_schema())
    data = load_recipe("default").model_dump(mode="json")
    data["train"] = HF
    assert not [e.message for e in check.iter_errors(data)]
    data["train"] = {"learning_rate": "fast"}
    assert not check.is_valid(data)


def test_the_api_takes_them_as_keywords(digits, teacher_model):
    kw = {"progress": False, "seed": 3, "report_to": "none"}
    ours = potstill.distill(teacher_model, make_mlp([8], seed=4), digits.train, epochs=1,
                            batch_size=64, lr=3e-3, clip_grad_norm=0.5, **kw)  # fmt: skip
    theirs = potstill.distill(teacher_model, make_mlp([8], seed=4), digits.train,
                              num_train_epochs=1, per_device_train_batch_size=64,
                              learning_rate=3e-3, max_grad_norm=0.5, **kw)  # fmt: skip
    assert state_equal(ours.student, theirs.student)
    other = potstill.distill(teacher_model, make_mlp([8], seed=4), digits.train, epochs=1,
                             batch_size=64, lr=3e-3, **kw)  # fmt: skip
    assert not state_equal(ours.student, other.student)  # the clipping did something
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'learning_rat'"):
        potstill.distill(teacher_model, make_mlp([8]), digits.train, learning_rat=1e-3)
    assert torch.isfinite(next(theirs.student.parameters())).all()
