"""Tests for objective terms on tapped features: projectors that train and checkpoint with the
student, feature checks before training, each term kind against its pure loss function,
layer maps from recipes, MiniLM on BERT q/k/v taps, and the pipeline's hint stage."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import quiet_config
from pydantic import ValidationError
from safetensors import safe_open
from torch import nn

import potstill.runs.classic
from potstill.cache import CachedTeacher, build_logit_cache
from potstill.config import OptimizerConfig
from potstill.data.splits import hide_labels, load_splits
from potstill.distiller import Distiller
from potstill.losses.attention import (
    attention_kl,
    attention_mse,
    attention_transfer,
    minilm_relation_loss,
)
from potstill.losses.feature_terms import (
    attention_term,
    attention_transfer_term,
    feature_term,
    minilm_term,
    relational_term,
)
from potstill.losses.features import ConvProjector, feature_distance
from potstill.losses.objective import Objective
from potstill.losses.relational import pkt, rkd_angle, rkd_distance
from potstill.losses.terms import ce_term, kd_term
from potstill.models import ArchSpec, build_model, load_model_folder, save_model_folder
from potstill.recipe import RecipeError
from potstill.recipe.classic import ClassicRecipe
from potstill.recipe.common import TermSpec
from potstill.runs import run as run_recipe
from potstill.signal import Signal, StudentView
from potstill.taps import Taps, tap_counts, tapped_forward
from potstill.teachers import LiveTeacher

TEACHER_ARCH = ArchSpec(kind="cnn", channels=[8, 16], hidden=[32], input_shape=[1, 8, 8])
STUDENT_ARCH = ArchSpec(kind="cnn", channels=[4, 8], hidden=[16], input_shape=[1, 8, 8])
TAPS = {"c2": "3"}  # the second conv: (B, 8, 4, 4) in the student, (B, 16, 4, 4) in the teacher


# one intra-op thread: tiny models run as fast, and far faster on a busy machine
pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupt(Exception):
    """Raised by a callback to simulate a crash."""


def _raise_at(step: int):
    def callback(s: int, row: dict) -> None:
        if s == step:
            raise Interrupt(f"simulated crash at step {s}")

    return callback


def _model(arch: ArchSpec, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(arch)


def _feature_objective() -> Objective:
    return Objective([kd_term(2.0, 0.5), ce_term(0.5), feature_term("c2", "c2")])


def _distiller(digits, *, seed=3, run_dir=None, callbacks=None, **cfg) -> Distiller:
    settings = dict(
        max_steps=10,
        batch_size=64,
        checkpoint_every=4,
        log_every=1,
        seed=seed,
        optimizer=OptimizerConfig(lr=1e-2),
    )
    return Distiller(
        _model(STUDENT_ARCH, 7),
        _feature_objective(),
        digits.train,
        teacher=LiveTeacher(_model(TEACHER_ARCH, 5), taps=TAPS),
        config=quiet_config(**{**settings, **cfg}),
        run_dir=run_dir,
        callbacks=callbacks,
        student_taps=TAPS,
    )


def _projector(distiller: Distiller) -> nn.Module:
    return distiller.objective.term_modules["feature"].projectors[0]


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- projectors in a Distiller ------------------------------------------------------------------


def test_projector_is_a_1x1_conv_that_trains_with_the_student(digits):
    distiller = _distiller(digits)
    proj = _projector(distiller)
    assert isinstance(proj, ConvProjector) and proj.size is None
    conv = proj.conv
    assert isinstance(conv, nn.Conv2d)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (8, 16, (1, 1))
    in_optimizer = {id(p) for g in distiller.optimizer.param_groups for p in g["params"]}
    assert id(conv.weight) in in_optimizer and id(conv.bias) in in_optimizer
    assert all(id(p) in in_optimizer for p in distiller.student.parameters())
    teacher_params = {id(p) for p in distiller.teacher.model.parameters()}
    assert not teacher_params & in_optimizer

    proj_before = _state(proj)
    teacher_before = _state(distiller.teacher.model)
    result = distiller.fit()
    assert result.steps == 10
    for k, v in proj.state_dict().items():
        assert not torch.equal(v, proj_before[k]), k
    _assert_bitwise(_state(distiller.teacher.model), teacher_before)
    feature_values = [row["feature"] for row in result.history]
    assert len(feature_values) == 10 and all(math.isfinite(v) and v > 0 for v in feature_values)
    distiller.teacher.close()


def test_exact_resume_restores_student_and_projector(digits, tmp_path):
    full = _distiller(digits, run_dir=tmp_path / "A")
    result_a = full.fit()
    folder = tmp_path / "A" / "checkpoints" / "step-00000010"
    assert (folder / "objective.safetensors").exists()
    proj_a = _state(_projector(full))
    with safe_open(str(folder / "objective.safetensors"), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    prefix = "term_modules.feature.projectors.0."
    _assert_bitwise(saved, {prefix + k: v for k, v in proj_a.items()})

    crashed = _distiller(digits, run_dir=tmp_path / "B", callbacks=[_raise_at(6)])
    with pytest.raises(Interrupt):
        crashed.fit()
    last = json.loads((tmp_path / "B" / "checkpoints" / "last.json").read_text())
    assert last["step"] == 4
    # the crashed run's projector moved on past the checkpoint: resume must restore it
    assert not torch.equal(_projector(crashed).conv.weight, proj_a["conv.weight"])

    resumed = _distiller(digits, run_dir=tmp_path / "B")
    result_b = resumed.fit(resume=True)
    assert result_b.steps == 10
    _assert_bitwise(_state(result_a.student), _state(result_b.student))
    _assert_bitwise(proj_a, _state(_projector(resumed)))
    rows_a = [r["feature"] for r in result_a.history]
    assert rows_a == [r["feature"] for r in result_b.history]

    # the exported student holds only the student's weights
    save_model_folder(result_b.student, tmp_path / "export", STUDENT_ARCH)
    with safe_open(str(tmp_path / "export" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(build_model(STUDENT_ARCH).state_dict())
    assert not any("projector" in k or "term_modules" in k for k in keys)
    loaded, _ = load_model_folder(tmp_path / "export")
    _assert_bitwise(_state(loaded), _state(result_b.student))
    for d in (full, crashed, resumed):
        d.teacher.close()


def test_projector_init_is_seeded(digits):
    a, b, c = (_distiller(digits, seed=s) for s in (3, 3, 4))
    _assert_bitwise(_state(_projector(a)), _state(_projector(b)))
    assert not torch.equal(_projector(a).conv.weight, _projector(c).conv.weight)
    # building the projector trained nothing: the students are as built
    _assert_bitwise(_state(a.student), _state(_model(STUDENT_ARCH, 7)))
    for d in (a, b, c):
        d.teacher.close()


# ---- features that no tap provides --------------------------------------------------------------


def test_missing_teacher_feature_is_refused_at_construction(digits):
    teacher = LiveTeacher(_model(TEACHER_ARCH, 5), taps=TAPS)
    student = _model(STUDENT_ARCH, 7)
    objective = Objective([kd_term(), feature_term("c2", "c9", name="hint")])
    with pytest.raises(ValueError) as err:
        Distiller(student, objective, digits.train, teacher=teacher, student_taps=TAPS)
    message = str(err.value)
    assert "'hint'" in message and "teacher features ['c9']" in message
    assert "['c2']" in message  # what the teacher taps do provide
    assert all(not m._forward_hooks for m in student.modules())
    teacher.close()


def test_missing_student_feature_is_refused_at_construction(digits):
    teacher = LiveTeacher(_model(TEACHER_ARCH, 5), taps=TAPS)
    objective = Objective([feature_term("c2", "c2")])
    for taps in ({"conv": "3", "all": "*"}, None):
        with pytest.raises(ValueError) as err:
            Distiller(
                _model(STUDENT_ARCH, 7), objective, digits.train, teacher=teacher, student_taps=taps
            )
        message = str(err.value)
        assert "'feature'" in message and "student features ['c2']" in message
        assert ("['all.0'" in message and "'conv'" in message) if taps else "none" in message
    teacher.close()


def test_cached_teacher_cannot_serve_feature_terms(digits, tmp_path):
    teacher = _model(TEACHER_ARCH, 5)
    path = build_logit_cache(teacher, digits.train, tmp_path / "logits-cache")
    cached = CachedTeacher(path, dataset=digits.train, teacher=teacher)
    with pytest.raises(ValueError) as err:
        Distiller(
            _model(STUDENT_ARCH, 7),
            _feature_objective(),
            digits.train,
            teacher=cached,
            student_taps=TAPS,
        )
    message = str(err.value)
    assert "'feature'" in message and "teacher features ['c2']" in message
    assert "provide none" in message


def test_cached_teacher_serves_relations_on_logits(digits, tmp_path):
    """rkd on "logits" needs no tap, so the logit cache serves it."""
    teacher = _model(TEACHER_ARCH, 5)
    path = build_logit_cache(teacher, digits.train, tmp_path / "logits-cache")
    student = _model(STUDENT_ARCH, 7)
    objective = Objective([relational_term("rkd_distance")])
    distiller = Distiller(
        student,
        objective,
        digits.train,
        teacher=CachedTeacher(path),
        config=quiet_config(max_steps=1, batch_size=50, shuffle=False, log_every=1),
    )
    with torch.no_grad():
        x = digits.train.tensors[0][:50]
        expected = rkd_distance(student(x), teacher(x))
    result = distiller.fit()
    assert result.history[0]["rkd_distance"] == pytest.approx(float(expected), rel=1e-5)


def test_relations_on_logits_do_not_need_teacher_features():
    assert not Objective([kd_term(), relational_term("rkd_distance")]).needs_teacher_features


def test_a_feature_term_name_may_hold_a_dot():
    objective = Objective([feature_term("a", "b", name="hint.c2")])
    assert [t.name for t in objective.terms] == ["hint.c2"]


# ---- each term kind against its pure function --------------------------------------------------


def _randn(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _evaluate(term, view: StudentView, signal: Signal, batch: dict | None = None):
    objective = Objective([term])
    objective.setup(view, signal)
    total, values = objective(view, signal, batch or {})
    assert list(values) == [term.name]
    torch.testing.assert_close(total, term.weight * values[term.name], rtol=1e-12, atol=0)
    return total, values[term.name]


def test_feature_term_without_projector_is_the_plain_distance():
    s, t = _randn(6, 8, 4, 4, seed=1), _randn(6, 8, 4, 4, seed=2)
    view, signal = StudentView(_randn(6, 10, seed=3), {"a": s}), Signal(features={"b": t})
    term = feature_term("a", "b")
    _, value = _evaluate(term, view, signal)
    assert isinstance(term.module.projectors[0], nn.Identity)
    torch.testing.assert_close(value, feature_distance(s, t, "mse", dim=1), rtol=1e-12, atol=0)

    # token features: cosine over the last dim, after L2 normalisation
    s3, t3 = _randn(4, 5, 12, seed=4), _randn(4, 5, 12, seed=5)
    view, signal = StudentView(s3[:, 0], {"a": s3}), Signal(features={"b": t3})
    _, value = _evaluate(feature_term("a", "b", loss="cosine", normalize=True), view, signal)
    expected = feature_distance(s3, t3, "cosine", dim=-1, normalize=True)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)


def test_feature_term_with_projector_and_layer_map():
    view = StudentView(
        _randn(3, 4, seed=0), {f"h.{i}": _randn(3, 5, 6, seed=10 + i).float() for i in range(2)}
    )
    signal = Signal(features={f"g.{j}": _randn(3, 5, 9, seed=20 + j).float() for j in range(4)})
    term = feature_term("h", "g", layer_map=[(0, 1), (1, 3)], loss="smooth_l1", weight=0.25)
    assert term.student_features == ("h.0", "h.1") and term.teacher_features == ("g.1", "g.3")
    total, value = _evaluate(term, view, signal)
    projectors = term.module.projectors
    assert [type(p) for p in projectors] == [nn.Linear, nn.Linear]
    assert (projectors[0].in_features, projectors[0].out_features) == (6, 9)
    with torch.no_grad():
        expected = (
            feature_distance(
                projectors[0](view.features["h.0"]), signal.features["g.1"], "smooth_l1"
            )
            + feature_distance(
                projectors[1](view.features["h.1"]), signal.features["g.3"], "smooth_l1"
            )
        ) / 2
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(total, 0.25 * expected)


def test_attention_terms_use_the_batch_mask():
    s = torch.softmax(_randn(2, 3, 5, 5, seed=1), -1)
    t = torch.softmax(_randn(2, 3, 5, 5, seed=2), -1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    view, signal = StudentView(s[:, 0, 0], {"sa": s}), Signal(features={"ta": t})
    for kind, fn in (("attention_mse", attention_mse), ("attention_kl", attention_kl)):
        _, value = _evaluate(
            attention_term("sa", "ta", kind=kind), view, signal, {"attention_mask": mask}
        )
        expected = fn(s, t, mask=mask.bool())
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
        assert value != fn(s, t)  # the mask made a difference
        _, unmasked = _evaluate(attention_term("sa", "ta", kind=kind), view, signal)
        torch.testing.assert_close(unmasked, fn(s, t), rtol=1e-12, atol=0)


def test_attention_transfer_term():
    s, t = _randn(4, 3, 8, 8, seed=1), _randn(4, 7, 4, 4, seed=2)
    view, signal = StudentView(s[:, 0, 0], {"s": s}), Signal(features={"t": t})
    _, value = _evaluate(attention_transfer_term("s", "t", p=3.0), view, signal)
    torch.testing.assert_close(value, attention_transfer(s, t, p=3.0), rtol=1e-12, atol=0)
    assert value != attention_transfer(s, t, p=2.0)


def test_relational_terms():
    s_logits, t_logits = _randn(7, 10, seed=1), _randn(7, 10, seed=2)
    s_feat, t_feat = _randn(7, 4, 3, seed=3), _randn(7, 20, seed=4)
    view = StudentView(s_logits, {"f": s_feat})
    signal = Signal(logits=t_logits, features={"g": t_feat})
    term = relational_term("rkd_distance")
    assert term.student_features == ("logits",) and term.teacher_features == ("logits",)
    _, value = _evaluate(term, view, signal)
    torch.testing.assert_close(value, rkd_distance(s_logits, t_logits), rtol=1e-12, atol=0)
    for kind, fn in (("pkt", pkt), ("rkd_angle", rkd_angle), ("rkd_distance", rkd_distance)):
        _, value = _evaluate(relational_term(kind, "f", "g"), view, signal)
        torch.testing.assert_close(value, fn(s_feat, t_feat), rtol=1e-12, atol=0)
        assert value != fn(s_logits, t_logits)


def test_minilm_term_and_weighted_sum():
    s = {n: _randn(2, 6, 8, seed=i) for i, n in enumerate("qkv")}
    t = {n: _randn(2, 6, 12, seed=10 + i) for i, n in enumerate("qkv")}
    view = StudentView(_randn(2, 3, seed=30), {f"s{n}": x for n, x in s.items()})
    signal = Signal(logits=_randn(2, 3, seed=31), features={f"t{n}": x for n, x in t.items()})
    mini = minilm_term(["sq", "sk", "sv"], ["tq", "tk", "tv"], relation_heads=2, weight=0.3)
    pk = relational_term("pkt", "sq", "tq", weight=2.0)
    objective = Objective([mini, pk])
    objective.setup(view, signal)
    total, values = objective(view, signal, {})
    expected_mini = minilm_relation_loss(
        (s["q"], s["k"], s["v"]), (t["q"], t["k"], t["v"]), num_relation_heads=2
    )
    expected_pkt = pkt(s["q"], t["q"])
    torch.testing.assert_close(values["minilm"], expected_mini, rtol=1e-12, atol=0)
    torch.testing.assert_close(values["pkt"], expected_pkt, rtol=1e-12, atol=0)
    torch.testing.assert_close(total, 0.3 * expected_mini + 2.0 * expected_pkt)


# ---- layer maps and validation in recipes -------------------------------------------------------

COUNTS = {"student": {"hs": 2}, "teacher": {"ht": 4}}


@pytest.mark.parametrize(
    ("extra", "student", "teacher"),
    [
        ({"layer_map": "uniform"}, ("hs.0", "hs.1"), ("ht.1", "ht.3")),
        ({"layer_map": "last-k", "k": 1}, ("hs.1",), ("ht.3",)),
        ({"layer_map": "last-k", "k": 2}, ("hs.0", "hs.1"), ("ht.2", "ht.3")),
        ({"layer_map": [[0, 0], [1, 2]]}, ("hs.0", "hs.1"), ("ht.0", "ht.2")),
        ({}, ("hs",), ("ht",)),
    ],
)
def test_recipe_layer_maps(extra, student, teacher):
    for kind in ("feature", "attention_mse"):
        term = TermSpec(kind=kind, student="hs", teacher="ht", **extra).build(COUNTS)
        assert term.name == kind
        assert term.student_features == student and term.teacher_features == teacher


def test_recipe_layer_map_errors():
    spec = TermSpec(kind="feature", student="hs", teacher="ht", layer_map="uniform")
    for counts in (None, {"student": {"hs": 2}}, {"student": {"hs": 2}, "teacher": {"x": 4}}):
        with pytest.raises(RecipeError) as err:
            spec.build(counts)
        assert "uniform" in str(err.value) and "'hs' (student)" in str(err.value)
        assert "'ht' (teacher)" in str(err.value)
    with pytest.raises(ValueError, match="out of range"):
        TermSpec(kind="feature", student="hs", teacher="ht", layer_map=[[0, 4]]).build(COUNTS)
    with pytest.raises(RecipeError, match="one wildcard tap name per side"):
        TermSpec(kind="feature", student=["a", "b"], teacher="ht", layer_map="uniform").build(
            COUNTS
        )


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"kind": "feature", "student": "hs"}, "feature term needs student and teacher"),
        ({"kind": "at", "teacher": "ht"}, "at term needs student and teacher"),
        (
            {"kind": "minilm", "student": ["a", "b", "c"], "teacher": ["d", "e", "f"]},
            "relation_heads",
        ),
        (
            {"kind": "feature", "student": "hs", "teacher": "ht", "layer_map": "last-k"},
            "last-k needs k",
        ),
    ],
)
def test_term_spec_validation(fields, match):
    with pytest.raises(ValidationError, match=match):
        TermSpec(**fields)
    with pytest.raises(ValidationError, match=match):
        ClassicRecipe.model_validate({"objective": [{"kind": "ce"}, fields]})


def test_relational_spec_defaults_to_logits():
    term = TermSpec(kind="pkt").build()
    assert term.student_features == term.teacher_features == ("logits",)


def test_relational_spec_with_lists_is_a_recipe_error():
    with pytest.raises((RecipeError, ValidationError)):
        TermSpec(kind="rkd_distance", student=["a", "b"], teacher=["c", "d"]).build()


# ---- MiniLM on BERT q/k/v taps ------------------------------------------------------------------


def _bert(hidden: int, heads: int, layers: int, seed: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval()


def _bert_forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]


def _qkv_by_hand(model, batch) -> tuple[torch.Tensor, ...]:
    out = model(**batch, output_hidden_states=True)
    attn = model.encoder.layer[-1].attention.self
    h = out.hidden_states[-2]  # the last layer's input
    return attn.query(h), attn.key(h), attn.value(h)


def test_minilm_term_on_bert_qkv_taps():
    student = _bert(32, 4, 2, seed=0)
    teacher = _bert(48, 6, 3, seed=1)
    qkv = {
        n: f"encoder.layer.*.attention.self.{m}"
        for n, m in zip("qkv", ("query", "key", "value"), strict=True)
    }
    assert tap_counts(student, qkv) == {"q": 2, "k": 2, "v": 2}
    assert tap_counts(teacher, qkv) == {"q": 3, "k": 3, "v": 3}
    live = LiveTeacher(teacher, forward=_bert_forward, taps=qkv)
    assert not any(p.requires_grad for p in teacher.parameters())
    g = torch.Generator().manual_seed(5)
    batch = {
        "input_ids": torch.randint(0, 100, (3, 9), generator=g),
        "attention_mask": torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 4 + [0] * 5]),
    }
    term = minilm_term(["q.1", "k.1", "v.1"], ["q.2", "k.2", "v.2"], relation_heads=4)
    objective = Objective([term])
    with Taps(student, qkv) as taps:
        logits, features = tapped_forward(taps, _bert_forward, student, batch)
    view, signal = StudentView(logits, features), live.signal(batch)
    assert signal.features["q.2"].shape == (3, 9, 48) and view.features["q.1"].shape == (3, 9, 32)
    objective.setup(view, signal)
    total, values = objective(view, signal, batch)
    assert math.isfinite(total.item()) and total.item() > 0

    with torch.no_grad():
        s_qkv = _qkv_by_hand(student, batch)
        t_qkv = _qkv_by_hand(teacher, batch)
    expected = minilm_relation_loss(
        s_qkv, t_qkv, num_relation_heads=4, mask=batch["attention_mask"].bool()
    )
    torch.testing.assert_close(values["minilm"], expected)
    unmasked = minilm_relation_loss(s_qkv, t_qkv, num_relation_heads=4)
    assert not torch.allclose(values["minilm"], unmasked)

    total.backward()
    attn = student.encoder.layer[-1].attention.self
    for lin in (attn.query, attn.key, attn.value):
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    live.close()


# ---- the pipeline's hint stage -----------------------------------------------------------------

_QUIET = {"batch_size": 64, "optimizer": {"lr": 0.01}, "progress": False, "tensorboard": False}
HINT_RECIPE = {
    "name": "hint-digits",
    "seed": 0,
    "data": {"name": "digits"},
    "teacher": {
        "arch": {"kind": "cnn", "channels": [8, 16], "hidden": [32]},
        "train": {"epochs": 2, **_QUIET},
    },
    "student": {"arch": {"kind": "cnn", "channels": [4, 8], "hidden": [16]}},
    "taps": {"student": {"c2": "3"}, "teacher": {"c2": "3"}},
    "hint": {
        "objective": [{"kind": "feature", "student": "c2", "teacher": "c2"}],
        "train": {"epochs": 1, **_QUIET},
    },
    "objective": [{"kind": "kd", "weight": 0.5, "temperature": 2.0}, {"kind": "ce", "weight": 0.5}],
    "train": {"epochs": 1, **_QUIET},
    "settings": [{"name": "main"}],
    "evaluation": {"throughput_batch": 64},
}


def _quick_measure(seen: list[int]):
    """A stand-in for the cache-speed measurement (minutes of training on two cores) that
    records how many forward hooks the live teacher it is given carries."""

    def measure(student, objective, train, live, cached, config, **kw):
        seen.append(sum(len(m._forward_hooks) for m in live.model.modules()))
        return {
            "steps_measured": 1,
            "live_examples_per_s": 1.0,
            "cached_examples_per_s": 2.0,
            "live_epoch_s": 1.0,
            "cached_epoch_s": 0.5,
            "speedup": 2.0,
        }

    return measure


def _run(recipe: ClassicRecipe, run_dir: Path, seen: list[int], **kw) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(potstill.runs.classic, "measure_cache_speedup", _quick_measure(seen))
        return run_recipe(recipe, run_dir, **kw)


@pytest.fixture(scope="module")
def hint_run(tmp_path_factory):
    """One recipe run with a hint stage: (run_dir, recipe, results, hooks seen on the teacher by
    the cache-speed measurement)."""
    run_dir = tmp_path_factory.mktemp("hint") / "run"
    recipe = ClassicRecipe.model_validate(HINT_RECIPE)
    seen: list[int] = []
    results = _run(recipe, run_dir, seen)
    return run_dir, recipe, results, seen


def _train_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval" not in r]


def test_hint_stage_results_budget_and_report(hint_run):
    run_dir, _, results, seen = hint_run
    assert len(seen) == 1  # the cache speed was measured once, for the kd+ce stage
    assert json.loads((run_dir / "results.json").read_text()) == json.loads(
        json.dumps(results, default=str)
    )
    runs = results["settings"][0]["runs"]
    hint = runs["distilled"]["hint"]
    steps_per_epoch = math.ceil(1151 / 64)
    assert hint["steps"] == steps_per_epoch and runs["distilled"]["steps"] == steps_per_epoch
    assert hint["metrics"] == "main/distilled/hint/metrics.jsonl"
    assert (run_dir / hint["metrics"]).exists()
    assert "hint" not in runs["baseline"]
    assert runs["baseline"]["steps"] == hint["steps"] + runs["distilled"]["steps"]

    hint_rows = _train_rows(run_dir / hint["metrics"])
    assert [r["step"] for r in hint_rows] == [steps_per_epoch]  # log_every 20 > 18 steps
    assert "feature" in hint_rows[0] and "kd" not in hint_rows[0]
    assert hint_rows[0]["feature"] > 0
    distilled_rows = _train_rows(run_dir / runs["distilled"]["metrics"])
    assert {"kd", "ce"} <= set(distilled_rows[0]) and "feature" not in distilled_rows[0]

    training = [
        ln for ln in (run_dir / "report.md").read_text().splitlines() if ln.startswith("Training:")
    ]
    assert len(training) == 1
    assert f"distilled (hint stage) {hint['steps']} steps on 1,151 examples" in training[0]
    assert f"baseline {runs['baseline']['steps']} steps" in training[0]


def _init_student(recipe: ClassicRecipe) -> nn.Module:
    arch = recipe.student.arch.model_copy(update={"input_shape": [1, 8, 8], "num_classes": 10})
    torch.manual_seed(recipe.seed)
    return build_model(arch)


def test_hint_stage_feeds_the_distilled_stage(hint_run):
    """Both stages, redone by hand: the hint stage from the shared initial weights, the
    distilled stage from the hint stage's final weights (and not from the initial ones)."""
    run_dir, recipe, _, _ = hint_run
    splits = load_splits("digits", val_size=recipe.data.val_size, seed=recipe.seed)
    train = hide_labels(splits.train, 1.0, recipe.seed)
    teacher, _ = load_model_folder(run_dir / "teacher" / "final")
    init = _init_student(recipe)
    hint_final, _ = load_model_folder(run_dir / "main" / "distilled" / "hint" / "final")
    distilled_final, _ = load_model_folder(run_dir / "main" / "distilled" / "final")
    assert not torch.equal(hint_final[0].weight, init[0].weight)

    taps = recipe.taps.as_taps("student")
    counts = {"student": {"c2": 1}, "teacher": {"c2": 1}}
    live = LiveTeacher(teacher, taps=recipe.taps.as_taps("teacher"))
    hint_again = Distiller(
        copy.deepcopy(init),
        recipe.build_hint_objective(counts),
        train,
        teacher=live,
        config=recipe.hint.train,
        student_taps=taps,
    ).fit()
    live.close()
    _assert_bitwise(_state(hint_again.student), _state(hint_final))

    cached = CachedTeacher(run_dir / "teacher" / "cache-train")

    def distill(start: nn.Module) -> nn.Module:
        return (
            Distiller(
                copy.deepcopy(start),
                recipe.build_objective(counts),
                train,
                teacher=cached,
                config=recipe.train,
                student_taps=taps,
            )
            .fit()
            .student
        )

    _assert_bitwise(_state(distill(hint_final)), _state(distilled_final))
    from_init = distill(init)
    assert not torch.equal(from_init[0].weight, distilled_final[0].weight)


def test_resume_reuses_both_stages(hint_run):
    run_dir, recipe, results, _ = hint_run
    done = sorted(run_dir.rglob("done.json"))
    assert {p.parent.relative_to(run_dir).as_posix() for p in done} == {
        "teacher",
        "main/distilled/hint",
        "main/distilled",
        "main/baseline",
    }
    finals = sorted(run_dir.rglob("final/model.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in done + finals}
    again = _run(recipe, run_dir, [], resume=True)
    assert {p: p.stat().st_mtime_ns for p in done + finals} == stamps
    a, b = again["settings"][0]["runs"], results["settings"][0]["runs"]
    assert a["distilled"]["hint"] == b["distilled"]["hint"]
    for kind in ("baseline", "distilled"):
        assert a[kind]["accuracy"] == b[kind]["accuracy"]
        assert a[kind]["steps"] == b[kind]["steps"]


def test_cache_speed_is_measured_on_a_teacher_without_taps(hint_run):
    _, _, _, seen = hint_run
    assert seen == [0]


def test_recipe_seed_reaches_the_hint_stage():
    recipe = ClassicRecipe.model_validate({**HINT_RECIPE, "seed": 5})
    assert recipe.train.seed == recipe.teacher.train.seed == 5
    assert recipe.hint is not None and recipe.hint.train.seed == 5
