"""Tests for derived students: layer selection, weight copies checked against the teacher and an
independently rebuilt shallow teacher, config round trips, and Llama KV-cache decoding."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    MPNetConfig,
    MPNetModel,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from potstill.students import derive, find_layer_stack, spread_layers  # noqa: E402

N_LAYERS = 6
VOCAB = 100


# one intra-op thread: tiny models run as fast, and far faster on a busy machine
pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=64,
    num_hidden_layers=N_LAYERS,
)


def _bert(cls: type[PreTrainedModel]) -> Callable[[], PreTrainedModel]:
    return lambda: cls(BertConfig(**SMALL, max_position_embeddings=64, num_labels=3))


def _mpnet() -> PreTrainedModel:
    return MPNetModel(MPNetConfig(**SMALL, max_position_embeddings=64))


def _llama(tie: bool) -> Callable[[], PreTrainedModel]:
    return lambda: LlamaForCausalLM(
        LlamaConfig(
            **SMALL, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie
        )
    )


@dataclass(frozen=True)
class Case:
    build: Callable[[], PreTrainedModel]
    auto: type
    stack: str  # expected layer-stack name
    outside: tuple[str, ...]  # modules outside the stack that must be copied
    causal: bool = False


CASES = {
    "bert": Case(_bert(BertModel), AutoModel, "encoder.layer", ("embeddings", "pooler")),
    "bert-cls": Case(
        _bert(BertForSequenceClassification),
        AutoModelForSequenceClassification,
        "bert.encoder.layer",
        ("bert.embeddings", "bert.pooler", "classifier"),
    ),
    "mpnet": Case(
        _mpnet,
        AutoModel,
        "encoder.layer",
        ("embeddings", "encoder.relative_attention_bias", "pooler"),
    ),
    "llama-tied": Case(
        _llama(True),
        AutoModelForCausalLM,
        "model.layers",
        ("model.embed_tokens", "model.norm", "lm_head"),
        causal=True,
    ),
    "llama-untied": Case(
        _llama(False),
        AutoModelForCausalLM,
        "model.layers",
        ("model.embed_tokens", "model.norm", "lm_head"),
        causal=True,
    ),
}


def _teacher(case: Case, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return case.build().eval()


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


def _inputs(seed: int = 1, batch: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    """Random ids and an attention mask with padding (left for row 1, right for row 2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _outputs(model: nn.Module, **kw) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**_inputs(), use_cache=False, **kw)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _assert_outputs_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _rebuilt_teacher(teacher: PreTrainedModel, kept: list[int]) -> PreTrainedModel:
    """An independent reference: a deep copy of the teacher whose layer stack is replaced by the
    kept layers themselves, with their layer indices (KV-cache slots) renumbered."""
    ref = copy.deepcopy(teacher)
    name, stack = find_layer_stack(ref)
    parent_name, _, attr = name.rpartition(".")
    parent = ref.get_submodule(parent_name)
    new = nn.ModuleList([stack[j] for j in kept])
    setattr(parent, attr, new)
    for i, layer in enumerate(new):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    ref.config.num_hidden_layers = len(kept)
    return ref


# --- spread_layers ---


@pytest.mark.parametrize(
    ("n", "keep", "expected"),
    [
        (6, 3, [0, 3, 5]),
        (30, 10, [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]),
        (6, 1, [0]),
        (6, 6, [0, 1, 2, 3, 4, 5]),
        (12, 6, [0, 2, 4, 7, 9, 11]),
        (1, 1, [0]),
        (5, 2, [0, 4]),
    ],
)
def test_spread_layers_values(n: int, keep: int, expected: list[int]) -> None:
    assert spread_layers(n, keep) == expected


def test_spread_layers_is_increasing_and_spans() -> None:
    for n in range(1, 40):
        for keep in range(1, n + 1):
            kept = spread_layers(n, keep)
            assert len(kept) == keep and kept[0] == 0
            assert all(a < b for a, b in zip(kept[:-1], kept[1:], strict=True))
            assert keep == 1 or kept[-1] == n - 1


@pytest.mark.parametrize(
    ("n", "keep", "match"),
    [
        (6, 0, "keep must lie in"),
        (6, 7, r"keep must lie in \[1, n_teacher\] = \[1, 6\], got keep=7"),
        (0, 1, "n_teacher must be positive"),
        (6, True, "keep must be an int"),
        (6, 2.0, "keep must be an int"),
    ],
)
def test_spread_layers_errors(n: int, keep: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        spread_layers(n, keep)


# --- find_layer_stack ---


def test_find_layer_stack(case: Case) -> None:
    teacher = _teacher(case)
    name, stack = find_layer_stack(teacher)
    assert name == case.stack
    assert stack is teacher.get_submodule(case.stack) and len(stack) == N_LAYERS


def test_find_layer_stack_errors() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
            self.decoder = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))

    with pytest.raises(ValueError, match="several nn.ModuleLists of length 3.*encoder, decoder"):
        find_layer_stack(Two(), num_layers=3)
    with pytest.raises(ValueError, match=r"no nn.ModuleList of length 4.*encoder \(3\)"):
        find_layer_stack(Two(), num_layers=4)
    with pytest.raises(ValueError, match="no config.num_hidden_layers"):
        find_layer_stack(Two())


def test_find_layer_stack_ignores_nested_lists() -> None:
    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))

    outer = nn.Module()
    outer.blocks = nn.ModuleList(Layer() for _ in range(2))
    name, stack = find_layer_stack(outer, num_layers=2)
    assert name == "blocks" and stack is outer.blocks


# --- derive: weights ---


def test_layer_and_outside_weights_are_copied(case: Case) -> None:
    teacher = _teacher(case)
    kept = [0, 2, 5]
    student = derive(teacher, layers=kept)
    assert type(student) is type(teacher)
    t_stack = teacher.get_submodule(case.stack)
    s_stack = student.get_submodule(case.stack)
    assert len(s_stack) == len(kept)
    for i, j in enumerate(kept):
        t_params = dict(t_stack[j].named_parameters())
        s_params = dict(s_stack[i].named_parameters())
        assert t_params.keys() == s_params.keys() and t_params
        for name, p in s_params.items():
            assert torch.equal(p, t_params[name]), (i, j, name)
            assert p.data_ptr() != t_params[name].data_ptr()  # a copy, not shared
    for module in case.outside:
        t_state = teacher.get_submodule(module).state_dict()
        s_state = student.get_submodule(module).state_dict()
        assert t_state.keys() == s_state.keys() and t_state, module
        assert all(torch.equal(s_state[k], t_state[k]) for k in t_state), module
    # every student parameter outside the stack equals the teacher's at the same name
    t_params = dict(teacher.named_parameters())
    for name, p in student.named_parameters():
        if not name.startswith(case.stack + "."):
            assert torch.equal(p, t_params[name]), name


@pytest.mark.parametrize("tie", [True, False])
def test_llama_tied_embeddings(tie: bool) -> None:
    teacher = _teacher(CASES["llama-tied" if tie else "llama-untied"])
    student = derive(teacher, layers=[1, 3])
    assert (student.lm_head.weight is student.model.embed_tokens.weight) is tie
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert student.lm_head.weight.data_ptr() != teacher.lm_head.weight.data_ptr()
    if tie:
        with torch.no_grad():
            student.model.embed_tokens.weight.add_(1.0)
        assert torch.equal(student.lm_head.weight, student.model.embed_tokens.weight)


# --- derive: config and round trip ---


def test_config_and_save_reload(case: Case, tmp_path: Path) -> None:
    teacher = _teacher(case)
    student = derive(teacher, layers=[1, 4])
    assert not student.training
    assert all(p.requires_grad for p in student.parameters())
    assert student.config.num_hidden_layers == 2
    assert student.config.potstill_derived_from == {"layers": [1, 4], "teacher_layers": 6}
    assert teacher.config.num_hidden_layers == N_LAYERS
    assert not hasattr(teacher.config, "potstill_derived_from")
    t_cfg, s_cfg = teacher.config.to_dict(), student.config.to_dict()
    assert t_cfg.keys() | {"potstill_derived_from"} == s_cfg.keys()
    differing = {k for k in t_cfg if t_cfg[k] != s_cfg[k]}
    # config.dtype records the weights' dtype, as from_pretrained does (None in a fresh config)
    assert differing <= {"num_hidden_layers", "dtype"} and "num_hidden_layers" in differing
    assert s_cfg["dtype"] == "float32"

    student.save_pretrained(tmp_path)
    reloaded = case.auto.from_pretrained(tmp_path)
    assert type(reloaded) is type(student) and not reloaded.training
    assert reloaded.config.potstill_derived_from == {"layers": [1, 4], "teacher_layers": 6}
    assert reloaded.config.num_hidden_layers == 2
    _assert_outputs_equal(_outputs(reloaded), _outputs(student))


def test_default_keeps_half_spread() -> None:
    teacher = _teacher(CASES["bert"])
    student = derive(teacher)
    assert student.config.potstill_derived_from["layers"] == [0, 3, 5]
    assert derive(teacher, keep=2).config.potstill_derived_from["layers"] == [0, 5]
    assert derive(teacher, keep=1).config.num_hidden_layers == 1


# --- derive: independent checks of the mapping ---


def test_all_layers_reproduce_the_teacher(case: Case) -> None:
    teacher = _teacher(case)
    student = derive(teacher, layers=list(range(N_LAYERS)))
    _assert_outputs_equal(_outputs(student), _outputs(teacher))
    student = derive(teacher, keep=N_LAYERS)
    _assert_outputs_equal(_outputs(student), _outputs(teacher))


@pytest.mark.parametrize("kept", [[0, 2], [1, 3, 4], [5]])
def test_student_matches_teacher_with_replaced_stack(case: Case, kept: list[int]) -> None:
    teacher = _teacher(case)
    student = derive(teacher, layers=kept)
    reference = _rebuilt_teacher(teacher, kept)
    _assert_outputs_equal(
        _outputs(student, output_hidden_states=True),
        _outputs(reference, output_hidden_states=True),
    )


def test_bert_hidden_state_is_manual_layer_run() -> None:
    teacher = _teacher(CASES["bert"])
    student = derive(teacher, layers=[0, 2])
    ids = _inputs()["input_ids"]  # no padding: the layers then need no mask
    with torch.no_grad():
        hidden = student(input_ids=ids, output_hidden_states=True).hidden_states
        h = teacher.embeddings(input_ids=ids)
        h0 = teacher.encoder.layer[0](h)
        h0 = h0[0] if isinstance(h0, tuple) else h0
        h2 = teacher.encoder.layer[2](h0)
        h2 = h2[0] if isinstance(h2, tuple) else h2
    assert torch.equal(hidden[0], h)
    assert torch.equal(hidden[1], h0)
    assert torch.equal(hidden[2], h2)


# --- derive: Llama decoding with a KV cache ---


@pytest.mark.parametrize("tie", [True, False])
def test_llama_incremental_decode_and_generate(tie: bool) -> None:
    teacher = _teacher(CASES["llama-tied" if tie else "llama-untied"])
    kept = [1, 3, 5]
    student = derive(teacher, layers=kept)
    layer_idx = [layer.self_attn.layer_idx for layer in student.model.layers]
    assert layer_idx == [0, 1, 2]

    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = student(input_ids=ids, use_cache=False).logits
        first = student(input_ids=ids[:, :4], use_cache=True)
        assert len(first.cache.layers) == len(kept)
        # transformers 5.24 renamed past_key_values to cache (the old name is deprecated)
        second = student(input_ids=ids[:, 4:5], cache=first.cache, use_cache=True)
        third = student(input_ids=ids[:, 5:6], cache=second.cache, use_cache=True)
    torch.testing.assert_close(first.logits, full[:, :4], rtol=0, atol=1e-5)
    torch.testing.assert_close(second.logits[:, 0], full[:, 4], rtol=0, atol=1e-5)
    torch.testing.assert_close(third.logits[:, 0], full[:, 5], rtol=0, atol=1e-5)

    reference = _rebuilt_teacher(teacher, kept)
    prompt = ids[:1, :4]
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    generated = student.generate(prompt, **kw)
    assert generated.shape == (1, 7)
    assert torch.equal(generated, reference.generate(prompt, **kw))


# --- derive: per-layer config fields, dtype, teacher left alone ---


@contextlib.contextmanager
def _no_derive_warning() -> Iterator[None]:
    """Fail on any warning from derive about layers that differ from the teacher's."""
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        yield
    derived = [str(w.message) for w in log if "derived student" in str(w.message)]
    assert not derived, derived


def test_per_layer_config_fields_are_subset(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = Qwen2Config(
        **SMALL,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=3,
    )
    teacher = Qwen2ForCausalLM(config).eval()
    types = list(teacher.config.layer_types)
    assert types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    kept = [1, 4]
    with _no_derive_warning():
        student = derive(teacher, layers=kept)
    assert list(student.config.layer_types) == [types[1], types[4]]
    attns = [layer.self_attn for layer in student.model.layers]
    assert [a.layer_type for a in attns] == [types[1], types[4]]
    assert [a.sliding_window for a in attns] == [None, 4]
    assert teacher.config.layer_types == types
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert list(reloaded.config.layer_types) == [types[1], types[4]]
    ids = _inputs()["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, student(input_ids=ids).logits)


def test_differing_layer_attribute_warns() -> None:
    teacher = _teacher(CASES["llama-untied"])
    teacher.model.layers[2].self_attn.scaling = 0.5
    with pytest.warns(UserWarning, match=r"layer 1 \(teacher 2\) self_attn.scaling"):
        derive(teacher, layers=[0, 2])
    with _no_derive_warning():
        derive(teacher, layers=[0, 3])


def test_dtype_frozen_teacher_left_unchanged() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True)
    config._attn_implementation = "eager"
    teacher = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    teacher.train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = derive(teacher, keep=2)
    assert student.dtype == torch.bfloat16 and student.device == teacher.device
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())
    # buffers keep the dtype a fresh bfloat16 model gives them (RoPE frequencies stay float32)
    assert student.model.rotary_emb.inv_freq.dtype == teacher.model.rotary_emb.inv_freq.dtype
    assert student.config.dtype == torch.bfloat16
    assert all(p.requires_grad for p in student.parameters())
    assert not student.training and teacher.training
    assert student.config._attn_implementation == "eager"
    after = teacher.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(teacher.model.layers) == N_LAYERS
    assert [layer.self_attn.layer_idx for layer in teacher.model.layers] == list(range(N_LAYERS))


# --- derive: errors ---


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"layers": [0, 6]}, r"layer 6 is out of range: the teacher has 6 layers"),
        ({"layers": [-1, 2]}, r"layer -1 is out of range: the teacher has 6 layers"),
        ({"layers": [2, 1]}, "strictly increasing, got 1 after 2"),
        ({"layers": [1, 1]}, "strictly increasing, got 1 after 1"),
        ({"layers": []}, "at least one teacher layer"),
        ({"layers": [0, 2], "keep": 2}, "either layers or keep, not both"),
        ({"keep": 7}, r"keep must lie in \[1, n_teacher\] = \[1, 6\], got keep=7"),
        ({"keep": 0}, "keep must lie in"),
        ({"layers": [0, 1.5]}, "must be an int"),
        ({"layers": "01"}, "sequence of ints"),
    ],
)
def test_derive_errors(kw: dict, match: str) -> None:
    teacher = _teacher(CASES["bert"])
    with pytest.raises(ValueError, match=match):
        derive(teacher, **kw)


def test_derive_rejects_non_hf_models() -> None:
    with pytest.raises(TypeError, match="PreTrainedModel"):
        derive(nn.Linear(2, 2))  # type: ignore[arg-type]
