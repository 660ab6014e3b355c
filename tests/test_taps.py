"""Tests for taps: forward hooks by dotted path on built-in CNNs, small custom modules and a
Hugging Face BERT; output selection, error messages, and leaving the model as it was."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_config
from torch import nn

from potstill.distiller import Distiller
from potstill.losses.terms import labels_only_objective
from potstill.models import ArchSpec, build_model
from potstill.taps import TapError, Taps, TapSpec, tap_counts, tapped_forward
from potstill.teachers import LiveTeacher, default_forward

CNN = ArchSpec(kind="cnn", channels=[4, 8], hidden=[16], input_shape=[1, 8, 8])


# one intra-op thread: tiny models run as fast, and far faster on a busy machine
pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = build_model(CNN)
    assert isinstance(model, nn.Sequential)
    return model.eval()


def _images(n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


# ---- paths and wildcards on a built-in CNN ----------------------------------------------------


def test_tap_equals_the_first_modules_run_by_hand():
    model, x = _cnn(), _images()
    expected = x
    for i in range(4):  # conv, relu, pool, conv
        expected = model[i](expected)
    assert expected.shape == (5, 8, 4, 4)
    with Taps(model, {"c2": "3"}) as taps:
        logits = model(x)
        assert set(taps.outputs) == {"c2"}
        assert taps.names == ["c2"] and taps.paths == {"c2": "3"}
        assert torch.equal(taps.outputs["c2"], expected)
        # without detach the tapped tensor keeps its graph (student features must train)
        assert taps.outputs["c2"].requires_grad
    # the tap changed nothing about the output
    assert torch.equal(logits, model(x))


def test_detached_taps_carry_no_graph():
    model, x = _cnn(), _images()
    with Taps(model, {"c2": "3"}, detach=True) as taps:
        model(x)
        out = taps.outputs["c2"]
    assert not out.requires_grad and out.grad_fn is None
    assert torch.equal(out, model[:4](x))


def test_wildcard_on_a_sequential_gives_one_output_per_child_in_order():
    model, x = _cnn(), _images()
    n = len(model)
    assert n == 10
    with Taps(model, {"all": "*"}) as taps:
        model(x)
        assert taps.names == [f"all.{i}" for i in range(n)]
        assert taps.groups == {"all": [f"all.{i}" for i in range(n)]}
        assert taps.paths == {f"all.{i}": str(i) for i in range(n)}
        h = x
        for i, layer in enumerate(model):
            h = layer(h)
            assert torch.equal(taps.outputs[f"all.{i}"], h), i
    assert tap_counts(model, {"all": "*", "c2": "3", "root": ""}) == {"all": 10, "c2": 1, "root": 1}


def test_spec_given_as_a_mapping_and_the_model_itself():
    model, x = _cnn(), _images()
    with Taps(model, {"c1": {"path": "0", "select": None}, "out": ""}) as taps:
        logits = model(x)
        assert torch.equal(taps.outputs["c1"], model[0](x))
        assert torch.equal(taps.outputs["out"], logits)
        assert taps.paths["out"] == ""


# ---- output selection ---------------------------------------------------------------------------


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        y = self.lin(x)
        return y, 2 * y, "not a tensor"


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        y = self.lin(x)
        return {"first": y, "second": y + 1}


@dataclass
class Result:
    hidden: torch.Tensor
    scores: torch.Tensor
    note: str = "meta"


class ObjectOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        y = self.lin(x)
        return Result(hidden=y, scores=y.softmax(-1))


class Outer(nn.Module):
    """Holds a block with a structured output, so the tap path is not the model itself."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.block = inner

    def forward(self, x):
        out = self.block(x)
        if isinstance(out, tuple):
            return out[0]
        if isinstance(out, dict):
            return out["first"]
        return out.hidden


def _linear_by_hand(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.lin.weight, module.lin.bias)


def _xs() -> torch.Tensor:
    return torch.randn(2, 3, generator=torch.Generator().manual_seed(4))


def test_select_a_tuple_element_and_the_first_by_default():
    torch.manual_seed(0)
    model, x = Outer(TupleOut()), _xs()
    y = _linear_by_hand(model.block, x)
    with Taps(model, {"first": "block", "second": TapSpec("block", 1)}) as taps:
        model(x)
        assert torch.equal(taps.outputs["first"], y)
        assert torch.equal(taps.outputs["second"], 2 * y)
    for select, match in ((2, "gives str, not a tensor"), (5, "cannot select 5")):
        with Taps(model, {"bad": TapSpec("block", select)}), pytest.raises(TapError, match=match):
            model(x)


def test_select_a_dict_key_and_dict_without_select_lists_keys():
    torch.manual_seed(0)
    model, x = Outer(DictOut()), _xs()
    y = _linear_by_hand(model.block, x)
    with Taps(model, {"s": TapSpec("block", "second")}) as taps:
        model(x)
        assert torch.equal(taps.outputs["s"], y + 1)
    with Taps(model, {"whole": "block"}), pytest.raises(TapError) as err:
        model(x)
    message = str(err.value)
    assert "'whole'" in message and "dict" in message
    assert "keys: first, second" in message
    with Taps(model, {"k": TapSpec("block", "third")}), pytest.raises(TapError, match="third"):
        model(x)


def test_select_an_attribute_of_an_output_object():
    torch.manual_seed(0)
    model, x = Outer(ObjectOut()), _xs()
    y = _linear_by_hand(model.block, x)
    with Taps(model, {"h": TapSpec("block", "hidden"), "p": TapSpec("block", "scores")}) as taps:
        model(x)
        assert torch.equal(taps.outputs["h"], y)
        assert torch.equal(taps.outputs["p"], torch.softmax(y, dim=-1))
    with Taps(model, {"n": TapSpec("block", "note")}), pytest.raises(TapError, match="str"):
        model(x)
    with Taps(model, {"n": TapSpec("block", "nope")}), pytest.raises(TapError, match="nope"):
        model(x)
    with Taps(model, {"n": "block"}), pytest.raises(TapError, match="Result, not a tensor"):
        model(x)


# ---- paths that match nothing -------------------------------------------------------------------


def test_path_matching_nothing_lists_near_matches_on_a_cnn():
    model = _cnn()
    with pytest.raises(TapError, match="matches no module of Sequential") as err:
        Taps(model, {"x": "3.weight"})
    assert isinstance(err.value, ValueError)
    with pytest.raises(TapError, match="'11'"):
        tap_counts(model, {"x": "11"})


# ---- hooks are removed, the model is left as it was --------------------------------------------


SPECS = {"all": "*", "c2": TapSpec("3"), "root": ""}


def test_with_block_leaves_no_hook_and_the_model_unchanged():
    model, x = _cnn(), _images()
    out_before, state_before = model(x), _state(model)
    assert _forward_hooks(model) == 0
    with Taps(model, SPECS) as taps:
        assert _forward_hooks(model) == 10 + 1 + 1
        model(x)
        assert len(taps.outputs) == 12
    assert all(not m._forward_hooks for m in model.modules())
    assert taps.outputs == {}
    _assert_state_equal(model, state_before)
    assert torch.equal(model(x), out_before)
    assert taps.outputs == {}  # nothing recorded any more


def test_remove_leaves_no_hook_and_the_model_unchanged():
    model, x = _cnn(), _images()
    out_before, state_before = model(x), _state(model)
    taps = Taps(model, SPECS)
    model(x)
    taps.remove()
    assert all(not m._forward_hooks for m in model.modules())
    _assert_state_equal(model, state_before)
    assert torch.equal(model(x), out_before)
    assert taps.outputs == {}
    taps.remove()  # twice is harmless
    assert _forward_hooks(model) == 0


def test_construction_failing_half_way_leaves_no_hook():
    model, x = _cnn(), _images()
    out_before, state_before = model(x), _state(model)
    with pytest.raises(TapError, match="'nope'"):
        Taps(model, {"all": "*", "bad": "nope", "c2": "3"})
    assert all(not m._forward_hooks for m in model.modules())
    _assert_state_equal(model, state_before)
    assert torch.equal(model(x), out_before)


def test_bracket_wildcard_is_expanded_like_tap_counts_says():
    model, x = _cnn(), _images()
    assert tap_counts(model, {"convs": "[03]"}) == {"convs": 2}
    with Taps(model, {"convs": "[03]"}) as taps:
        model(x)
        assert taps.names == ["convs.0", "convs.1"]
        assert torch.equal(taps.outputs["convs.1"], model[:4](x))


def test_distiller_leaves_no_hook_on_the_student(digits, tmp_path):
    model = _cnn()
    state_before = _state(model)
    distiller = Distiller(
        model,
        labels_only_objective(),
        digits.train,
        config=quiet_config(max_steps=2, batch_size=32),
        student_taps={"c2": "3", "all": "*"},
    )
    assert _forward_hooks(model) == 0  # the probe's hooks are gone
    _assert_state_equal(model, state_before)  # and the probe trained nothing
    distiller.fit()
    assert all(not m._forward_hooks for m in model.modules())


def test_distiller_crashing_mid_run_leaves_no_hook_on_the_student(digits):
    model = _cnn()

    def crash(step: int, row: dict) -> None:
        assert _forward_hooks(model) == 1  # the taps are on while training
        raise RuntimeError("boom")

    distiller = Distiller(
        model,
        labels_only_objective(),
        digits.train,
        config=quiet_config(max_steps=3, batch_size=32),
        student_taps={"c2": "3"},
        callbacks=[crash],
    )
    with pytest.raises(RuntimeError, match="boom"):
        distiller.fit()
    assert _forward_hooks(model) == 0


def test_live_teacher_taps_and_close():
    model, x = _cnn(), _images()
    teacher = LiveTeacher(model, taps={"c2": "3"})
    assert teacher.feature_names == {"c2"}
    assert _forward_hooks(model) == 1
    signal = teacher.signal({"input": x})
    assert torch.equal(signal.features["c2"], model[:4](x))
    assert not signal.features["c2"].requires_grad
    assert torch.equal(signal.logits, model(x))
    teacher.close()
    assert all(not m._forward_hooks for m in model.modules())


# ---- taps on modules the forward pass does not call ---------------------------------------------


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, 2)
        self.unused = nn.Linear(3, 2)

    def forward(self, x):
        return self.used(x)


def test_tapped_forward_names_taps_whose_module_was_not_called():
    torch.manual_seed(0)
    model, x = Branchy(), _xs()
    expected = F.linear(x, model.used.weight, model.used.bias)
    with Taps(model, {"ok": "used"}) as taps:
        logits, features = tapped_forward(taps, default_forward, model, {"input": x})
        assert taps.outputs == {}  # handed over, not kept (they hold the graph)
        assert torch.equal(logits, expected) and torch.equal(features["ok"], expected)
    with Taps(model, {"ok": "used", "skipped": "unused"}) as taps:
        with pytest.raises(TapError) as err:
            tapped_forward(taps, default_forward, model, {"input": x})
    message = str(err.value)
    assert "'skipped'" in message and "unused" in message and "'ok'" not in message


# ---- Hugging Face -------------------------------------------------------------------------------


def _bert(attn: str = "eager"):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


@pytest.fixture(scope="module")
def bert():
    return _bert()


def _ids(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(seed))


HF_TAPS = {"h": "encoder.layer.*", "att": TapSpec("encoder.layer.*.attention.self", 1)}


def test_bert_hidden_states_and_attentions(bert):
    ids = _ids()
    assert tap_counts(bert, HF_TAPS) == {"h": 3, "att": 3}
    with torch.no_grad(), Taps(bert, HF_TAPS) as taps:
        out = bert(ids, output_hidden_states=True, output_attentions=True)
        assert len(out.hidden_states) == 4 and len(out.attentions) == 3
        assert sorted(taps.outputs) == ["att.0", "att.1", "att.2", "h.0", "h.1", "h.2"]
        for i in range(3):
            assert torch.equal(taps.outputs[f"h.{i}"], out.hidden_states[i + 1]), i
            assert torch.equal(taps.outputs[f"att.{i}"], out.attentions[i]), i
            assert taps.outputs[f"att.{i}"].shape == (2, 4, 7, 7)


def test_bert_select_an_attribute_of_the_model_output(bert):
    ids = _ids(3)
    with torch.no_grad(), Taps(bert, {"last": TapSpec("", "last_hidden_state")}) as taps:
        out = bert(ids)
        assert torch.equal(taps.outputs["last"], out.last_hidden_state)
    with torch.no_grad(), Taps(bert, {"whole": ""}), pytest.raises(TapError) as err:
        bert(ids)
    assert "last_hidden_state" in str(err.value) and "pooler_output" in str(err.value)


def test_bert_misspelt_path_suggests_near_matches(bert):
    with pytest.raises(TapError) as err:
        Taps(bert, {"x": "encoder.layr.1"})
    message = str(err.value)
    assert "near matches" in message
    near = message.split("near matches: ")[1].split(" (")[0].split(", ")
    assert near[0] == "encoder.layer.1"
    assert all(name in dict(bert.named_modules()) for name in near)


def test_bert_taps_leave_its_own_hooks_and_outputs_alone(bert):
    """transformers installs output-capturing hooks of its own: ours come and go beside them."""
    ids = _ids(4)
    with torch.no_grad():
        before = bert(ids, output_hidden_states=True).last_hidden_state
    hooks_before = {n: list(m._forward_hooks.values()) for n, m in bert.named_modules()}
    state_before = _state(bert)
    with torch.no_grad(), Taps(bert, HF_TAPS):
        bert(ids)
        assert _forward_hooks(bert) == sum(map(len, hooks_before.values())) + 6
    assert {n: list(m._forward_hooks.values()) for n, m in bert.named_modules()} == hooks_before
    _assert_state_equal(bert, state_before)
    with torch.no_grad():
        assert torch.equal(bert(ids, output_hidden_states=True).last_hidden_state, before)


def test_attention_tap_on_sdpa_bert_says_to_use_eager():
    model = _bert("sdpa")
    spec = {"att": TapSpec("encoder.layer.0.attention.self", 1)}
    with torch.no_grad(), Taps(model, spec), pytest.raises(TapError, match="eager"):
        model(_ids())
