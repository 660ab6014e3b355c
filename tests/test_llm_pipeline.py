"""The causal-LM path end to end: chat/text data with the real SmolLM2 tokenizer, batch trimming,
the next-token losses, evaluation against the teacher, greedy generation, and the
``kind: causal-lm`` recipe (API and CLI) with a tiny random Llama as the teacher."""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import card_metric, read_card

from potstill.data.fortunes import FORTUNES_DIR
from potstill.data.tensors import TensorDictDataset, make_batch
from potstill.hf import TokenizerMismatch
from potstill.llm.data import (
    LMExample,
    encode_example,
    fortune_examples,
    prompt_ids,
    tokenize_examples,
)
from potstill.llm.evaluate import greedy_generations, lm_figures
from potstill.llm.forward import causal_lm_forward
from potstill.losses.divergences import divergence
from potstill.losses.terms import next_token_ce_term, token_term
from potstill.losses.tokens import batch_token_mask, next_token_nll
from potstill.recipe.causal_lm import RESERVED_ROWS, LMRecipe
from potstill.runs import run as run_recipe
from potstill.signal import Signal, StudentView

pytestmark = pytest.mark.usefixtures("one_thread")

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
FORTUNES = FORTUNES_DIR
SYSTEM = "You tell fortunes."


# --- fixtures and helpers ---


def tiny_llama(vocab: int, *, seed: int = 0, layers: int = 2):
    """A tiny random Llama; its logits are spread enough for stable argmaxes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def save_llama(folder: Path, tok, vocab: int, seed: int) -> Path:
    tiny_llama(vocab, seed=seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tok):
    return tiny_llama(len(tok), seed=0)


@pytest.fixture(scope="module")
def llama_dir(tok, tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("tiny-llama"), tok, len(tok), seed=0)


@pytest.fixture(scope="module")
def small_fortunes(tmp_path_factory) -> Path:
    """A fortunes folder of two short files (fast to read) for the smaller pipeline runs."""
    folder = tmp_path_factory.mktemp("fortunes")
    texts = {
        "computers": [
            "Never trust a computer you cannot throw out of a window.",
            "There are two kinds of software: the broken and the not yet broken.",
            "To err is human; to really foul things up takes a computer.",
            "The best way to accelerate a computer is at nine point eight metres per second.",
        ],
        "love": [
            "Love is an ideal thing, marriage a real thing; a confusion of the two never goes "
            "unpunished.",
            "Love conquers all things except poverty and toothache.",
            "Love is the triumph of imagination over intelligence.",
            "Love is a grave mental disease, according to Plato at least.",
        ],
    }
    for name, entries in texts.items():
        (folder / name).write_text("\n%\n".join(entries) + "\n%\n")
    (folder / "love.dat").write_bytes(b"\x00\x01 index, not a fortune file")
    return folder


def chat_ids(tok, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if not isinstance(out, list) else out)


def val_dataset(tok, n: int = 5, max_length: int = 40) -> TensorDictDataset:
    examples = [
        LMExample("Tell me a fortune about computers.", "Never trust a computer."),
        LMExample("Tell me about love.", "Love is the triumph of imagination over intelligence."),
        LMExample("Go on.", "There are two kinds of software: the broken and the not yet broken."),
        LMExample("Science?", "Science is what you know; philosophy is what you don't."),
        LMExample("Hi", "To err is human."),
    ]
    return tokenize_examples(examples[:n], tok, max_length, system=SYSTEM)


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, section by section; ``variants`` are replaced whole."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        nested = isinstance(v, dict) and isinstance(out.get(k), dict) and k != "variants"
        out[k] = merged(out[k], v) if nested else v
    return out


def recipe_dict(teacher: Path, **over: Any) -> dict[str, Any]:
    base = {
        "kind": "causal-lm",
        "name": "tiny",
        "seed": 0,
        "teacher": {"model": str(teacher)},
        "student": {"keep": 1},
        "data": {
            "system": SYSTEM,
            "prompt": "A fortune about {category}.",
            "max_length": 40,
            "train": 8,
            "val": 4,
        },
        "variants": {"ce": [{"kind": "ce"}], "fkl": [{"kind": "fkl"}], "rkl": [{"kind": "rkl"}]},
        "train": {
            "max_steps": 2,
            "batch_size": 4,
            "progress": False,
            "tensorboard": False,
            "optimizer": {"lr": 0.01},
        },
        "chunk_size": 64,
        "eval_batch_size": 4,
        "generate": {
            "prompts": ["A fortune about computers.", "A fortune about love."],
            "max_new_tokens": 3,
        },
    }
    return merged(base, over)


def small_recipe(teacher: Path, folder: Path, **over: Any) -> LMRecipe:
    """One short step on the two-file fortunes folder."""
    small = {
        "data": {"folder": str(folder), "train": 4, "val": 2},
        "train": {"max_steps": 1},
        "generate": {"prompts": ["A fortune about love."], "max_new_tokens": 1},
    }
    return LMRecipe.model_validate(recipe_dict(teacher, **merged(small, over)))


# --- 1. data ---


def test_chat_encoding_masks_the_templated_prompt(tok):
    ex = LMExample("Tell me a fortune about computers.", "Never trust a computer you can't lift.")
    user = [{"role": "user", "content": ex.prompt}]
    for system in (None, SYSTEM):
        ids, n = encode_example(tok, ex, "chat", system)
        messages = ([{"role": "system", "content": system}] if system else []) + user
        head = chat_ids(tok, messages, generation_prompt=True)
        assert n == len(head)
        assert ids[:n] == head
        assert prompt_ids(tok, ex.prompt, "chat", system) == head
        prompt_text = tok.decode(ids[:n])
        assert prompt_text.endswith("<|im_start|>assistant\n")
        if system:
            assert SYSTEM in prompt_text
            assert "SmolLM" not in prompt_text  # the template's default system message is gone
        else:
            assert SYSTEM not in prompt_text

    # in a padded dataset, the response is what lies at positions >= prompt_length
    ds = tokenize_examples([ex], tok, 64, system=SYSTEM)
    row, mask, n = (
        ds.tensors["input_ids"][0],
        ds.tensors["attention_mask"][0],
        ds.tensors["prompt_length"][0],
    )
    assert int(n) == len(chat_ids(tok, [{"role": "system", "content": SYSTEM}, *user], True))
    response = [int(t) for t, m in zip(row[n:], mask[n:], strict=True) if m]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ex.response in tok.decode(response)
    assert not tok.decode(response).startswith(" ")  # nothing of the template before it
    # the response ends with <|im_end|>; what the template writes after it is only whitespace
    last = max(i for i, t in enumerate(response) if t == im_end)
    assert tok.decode(response[:last]) == ex.response
    assert tok.decode(response[last + 1 :]).strip() == ""
    # padding after the example, and the whole conversation is the chat template's
    full = chat_ids(
        tok,
        [
            {"role": "system", "content": SYSTEM},
            *user,
            {"role": "assistant", "content": ex.response},
        ],
        False,
    )
    assert int(mask.sum()) == len(full) and row[: len(full)].tolist() == full
    assert mask[len(full) :].sum() == 0


def test_text_format_masks_the_prompt_and_appends_eos(tok):
    ex = LMExample("Q: a fortune about computers\nA:", " Never trust a computer.")
    ids, n = encode_example(tok, ex, "text")
    assert ids[:n] == tok(ex.prompt)["input_ids"]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]) == ex.prompt + ex.response
    assert tok.decode(ids[n:-1]) == ex.response
    ds = tokenize_examples([ex, LMExample("", "Just a response.")], tok, 32, fmt="text")
    lengths = ds.tensors["attention_mask"].sum(1).tolist()
    assert lengths[0] == len(ids)
    assert ds.tensors["prompt_length"].tolist() == [n, 0]  # no BOS in SmolLM2's tokenizer
    assert ds.tensors["input_ids"][1, lengths[1] - 1] == tok.eos_token_id


def test_text_format_prompt_ending_with_a_space_keeps_the_boundary(tok):
    """In text format prompt and response are tokenized apart, so a prompt's trailing space
    stays the prompt's (no merge with the response's first word) and is no error."""
    ex = LMExample("A fortune about computers: ", "Never trust a computer.")
    ids, n = encode_example(tok, ex, "text")
    head = tok(ex.prompt)["input_ids"]
    assert n == len(head) and ids[:n] == head
    assert ids[n:] == tok(ex.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids[:n]) == ex.prompt and tok.decode(ids[n:-1]) == ex.response


def test_max_length_cuts_are_counted_and_a_full_prompt_raises(tok, caplog):
    prompt = "Tell me a fortune."
    examples = [
        LMExample(prompt, "Short."),
        LMExample(prompt, "A much longer response that goes on " * 4),
        LMExample(prompt, "Another long one, with many words in it, " * 3),
    ]
    head = chat_ids(tok, [{"role": "user", "content": prompt}], True)
    full = [
        chat_ids(
            tok,
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": e.response}],
            False,
        )
        for e in examples
    ]
    max_length = len(full[0]) + 2
    expected_cut = sum(len(f) > max_length for f in full)
    assert expected_cut == 2
    with caplog.at_level(logging.INFO, logger="potstill"):
        ds = tokenize_examples(examples, tok, max_length)
    assert f"{expected_cut} of 3 examples" in caplog.text
    assert ds.tensors["input_ids"].shape == (3, max_length)
    assert ds.tensors["attention_mask"].sum(1).tolist() == [len(full[0]), max_length, max_length]
    for i in (1, 2):
        assert ds.tensors["input_ids"][i].tolist() == full[i][:max_length]

    # one response token still fits; none does not
    ds = tokenize_examples(examples[1:2], tok, len(head) + 1)
    assert ds.tensors["attention_mask"].sum().item() == len(head) + 1
    with pytest.raises(ValueError, match=r"data\.max_length"):
        tokenize_examples(examples[:1], tok, len(head))


def test_fortune_examples_name_the_category(small_fortunes):
    examples = fortune_examples(small_fortunes, prompt="Say something about {category}!")
    prompts = {e.prompt for e in examples}
    assert prompts == {"Say something about computers!", "Say something about love!"}
    assert len(examples) == 8  # love.dat is not a fortune file
    assert examples[0].response == "Never trust a computer you cannot throw out of a window."
    twice = fortune_examples(small_fortunes, prompt="{category}: {category}")
    assert twice[0].prompt == "computers: computers"
    with pytest.raises(ValueError, match="category"):
        fortune_examples(small_fortunes, prompt="A fortune about {foo}.")


# --- 2. batch trimming ---


def test_batches_are_trimmed_to_their_longest_row():
    mask = torch.tensor(
        [[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0], [0] * 7]
    )
    ids = torch.arange(28).reshape(4, 7)
    extra = torch.randn(4, 7, 3)
    other = torch.randn(4, 5)  # a second dimension that is not the sequence
    plen = torch.tensor([1, 2, 1, 0])
    ds = TensorDictDataset(
        {
            "input_ids": ids,
            "attention_mask": mask,
            "x": extra,
            "other": other,
            "prompt_length": plen,
        },
        trim_by="attention_mask",
    )
    for rows, width in (([0, 2], 3), ([0, 1], 5), ([2], 2), ([1, 3], 5)):
        index = torch.tensor(rows)
        batch = make_batch(ds, index)
        assert torch.equal(batch["input_ids"], ids[index, :width])
        assert torch.equal(batch["attention_mask"], mask[index, :width])
        assert torch.equal(batch["x"], extra[index, :width])
        assert torch.equal(batch["other"], other[index])
        assert torch.equal(batch["prompt_length"], plen[index])
        assert torch.equal(batch["index"], index)
    empty = make_batch(ds, torch.tensor([3]))
    assert empty["input_ids"].shape == (1, 1) and empty["x"].shape == (1, 1, 3)
    untrimmed = TensorDictDataset({"input_ids": ids, "attention_mask": mask})
    assert make_batch(untrimmed, torch.tensor([2]))["input_ids"].shape == (1, 7)


def test_trimming_is_invisible_to_the_model(tok, llama):
    ds = val_dataset(tok, max_length=64)
    index = torch.tensor([0, 4])
    trimmed = make_batch(ds, index)
    full = {k: v[index] for k, v in ds.tensors.items()}
    assert trimmed["input_ids"].shape[1] < 64
    with torch.no_grad():
        a = causal_lm_forward(llama, trimmed)
        b = causal_lm_forward(llama, full)
    mask = trimmed["attention_mask"].bool()
    width = a.shape[1]
    assert torch.allclose(a[mask], b[:, :width][mask], atol=1e-5)
    m_a, m_b = batch_token_mask(trimmed), batch_token_mask(full)
    assert torch.equal(m_a, m_b[:, :width]) and not m_b[:, width:].any()
    s_a, c_a = next_token_nll(a, trimmed["input_ids"], m_a)
    s_b, c_b = next_token_nll(b, full["input_ids"], m_b)
    assert int(c_a) == int(c_b) and math.isclose(float(s_a), float(s_b), rel_tol=1e-5)


# --- 3. losses ---


def _lm_batch() -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([[3, 1, 4, 1, 5, 9, 2], [2, 7, 1, 8, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]]),
        "prompt_length": torch.tensor([3, 2]),
    }


def _positions(batch) -> list[tuple[int, int]]:
    """(row, position) pairs scored: the next token is real and not part of the prompt."""
    out = []
    for b in range(batch["input_ids"].shape[0]):
        real = int(batch["attention_mask"][b].sum())
        for t in range(batch["input_ids"].shape[1] - 1):
            if t + 1 < real and t + 1 >= int(batch["prompt_length"][b]):
                out.append((b, t))
    return out


def test_next_token_nll_is_cross_entropy_on_the_response():
    batch = _lm_batch()
    logits = torch.randn(2, 7, 10, generator=torch.Generator().manual_seed(0))
    pos = _positions(batch)
    assert pos == [(0, 2), (0, 3), (0, 4), (0, 5), (1, 1), (1, 2)]
    rows = torch.stack([logits[b, t] for b, t in pos])
    targets = torch.tensor([int(batch["input_ids"][b, t + 1]) for b, t in pos])
    expected = F.cross_entropy(rows, targets, reduction="sum")
    total, count = next_token_nll(logits, batch["input_ids"], batch_token_mask(batch))
    assert int(count) == len(pos)
    assert torch.allclose(total, expected, atol=1e-5)
    term = next_token_ce_term()
    value = term.fn(StudentView(logits), None, batch)
    assert torch.allclose(value, expected / len(pos), atol=1e-6)
    assert not term.needs_teacher


def test_ce_term_is_zero_without_response_positions():
    batch = {**_lm_batch(), "prompt_length": torch.tensor([7, 7])}
    logits = torch.randn(2, 7, 10, requires_grad=True)
    value = next_token_ce_term().fn(StudentView(logits), None, batch)
    assert value.item() == 0.0
    value.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_token_term_compares_response_positions_only(kind, chunk_size):
    batch = _lm_batch()
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 7, 10, generator=g) * 2
    teacher = torch.randn(2, 7, 10, generator=g) * 2
    pos = _positions(batch)
    idx = (torch.tensor([b for b, _ in pos]), torch.tensor([t for _, t in pos]))
    expected = divergence(student[idx], teacher[idx], kind, beta=0.3)
    term = token_term(kind, beta=0.3, chunk_size=chunk_size)
    got = term.fn(StudentView(student), Signal(logits=teacher), batch)
    assert torch.allclose(got, expected, atol=1e-6)
    # logits at prompt positions, padding and the last position do not count
    scored = torch.zeros(2, 7, dtype=torch.bool)
    scored[idx] = True
    noise = torch.randn(2, 7, 10, generator=g) * 5
    s2 = torch.where(scored.unsqueeze(-1), student, student + noise)
    t2 = torch.where(scored.unsqueeze(-1), teacher, teacher - noise)
    again = term.fn(StudentView(s2), Signal(logits=t2), batch)
    assert torch.allclose(again, got, atol=1e-6)
    with pytest.raises(ValueError, match="teacher"):
        term.fn(StudentView(student), None, batch)


# --- 4. evaluation ---


def test_lm_figures_against_itself_and_hf_loss(tok, llama):
    ds = val_dataset(tok)
    figures = lm_figures({"m": llama}, ds, teacher=llama, batch_size=2, progress=False)["m"]
    assert figures["top1_agreement"] == 1.0
    assert abs(figures["kl_to_teacher"]) < 1e-6
    assert math.isclose(figures["perplexity"], math.exp(figures["nll"]), rel_tol=1e-9)
    # independently: Hugging Face's own loss on each example alone, unpadded, prompt ignored
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            n = int(ds.tensors["attention_mask"][i].sum())
            ids = ds.tensors["input_ids"][i : i + 1, :n]
            labels = ids.clone()
            labels[:, : int(ds.tensors["prompt_length"][i])] = -100
            k = int((labels[:, 1:] != -100).sum())
            total += float(llama(input_ids=ids, labels=labels).loss) * k
            tokens += k
    assert figures["tokens"] == tokens
    assert math.isclose(figures["nll"], total / tokens, rel_tol=1e-5)
    for bs in (1, 3, 8):
        other = lm_figures({"m": llama}, ds, teacher=llama, batch_size=bs, progress=False)["m"]
        assert other["tokens"] == tokens
        assert math.isclose(other["nll"], figures["nll"], rel_tol=1e-5)


def test_lm_figures_agreement_and_kl_of_another_model(tok, llama):
    ds = val_dataset(tok)
    other = tiny_llama(len(tok), seed=1, layers=1)
    got = lm_figures({"o": other}, ds, teacher=llama, batch_size=4, progress=False)["o"]
    agree, kl, tokens = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            n = int(ds.tensors["attention_mask"][i].sum())
            p = int(ds.tensors["prompt_length"][i])
            ids = ds.tensors["input_ids"][i : i + 1, :n]
            s = other(input_ids=ids).logits[0, p - 1 : n - 1]
            t = llama(input_ids=ids).logits[0, p - 1 : n - 1]
            agree += float((s.argmax(-1) == t.argmax(-1)).sum())
            lt, ls = t.log_softmax(-1), s.log_softmax(-1)
            kl += float((lt.exp() * (lt - ls)).sum())
            tokens += n - p
    assert got["tokens"] == tokens
    assert math.isclose(got["top1_agreement"], agree / tokens, abs_tol=1e-9)
    assert math.isclose(got["kl_to_teacher"], kl / tokens, rel_tol=1e-4)
    assert got["top1_agreement"] < 1.0 and got["kl_to_teacher"] > 0
    assert other.training is False and llama.training is False


# --- 5. generation ---


def test_generate_is_greedy_decoding(tok, llama):
    prompts = [prompt_ids(tok, p, "chat", SYSTEM) for p in ("Tell me a fortune.", "Go on.")]
    texts, speed = greedy_generations(llama, tok, prompts, max_new_tokens=4)
    assert speed > 0
    assert len(texts) == 2
    for ids, text in zip(prompts, texts, strict=True):
        x = torch.tensor([ids])
        new = []
        with torch.no_grad():
            for _ in range(4):
                nxt = int(llama(input_ids=x).logits[0, -1].argmax())
                new.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
                if nxt == tok.eos_token_id:
                    break
        assert text == tok.decode(new, skip_special_tokens=True).strip()


# --- 6. the pipeline ---


@pytest.fixture(scope="module")
def lm_run(llama_dir, tmp_path_factory) -> tuple[Path, dict[str, Any], LMRecipe]:
    if not FORTUNES.is_dir():
        pytest.skip("Debian's fortunes package is not installed")
    recipe = LMRecipe.model_validate(recipe_dict(llama_dir))
    run_dir = tmp_path_factory.mktemp("lm-run")
    return run_dir, run_recipe(recipe, run_dir), recipe


def test_pipeline_results(lm_run, llama_dir):
    run_dir, results, _ = lm_run
    assert (
        json.loads((run_dir / "results.json").read_text())["rows"].keys() == results["rows"].keys()
    )
    assert results["kind"] == "causal-lm" and results["name"] == "tiny"
    assert results["teacher"] == str(llama_dir) and results["student"] == str(llama_dir)
    assert results["derived_layers"] == {"layers": [0], "teacher_layers": 2}
    assert results["vocabulary"] == 49152
    assert results["data"]["train"] == 8 and results["data"]["val"] == 4
    assert results["data"]["format"] == "chat" and results["data"]["max_length"] == 40
    assert 0 < results["data"]["response_tokens"] <= 8 * 40
    assert 0 < results["data"]["val_tokens"] <= 4 * 40
    assert results["train"]["steps"] == 2 and results["train"]["batch_size"] == 4
    assert results["prompts"] == ["A fortune about computers.", "A fortune about love."]
    rows = results["rows"]
    assert list(rows) == ["teacher", "derived, not distilled", "ce", "fkl", "rkl"]
    teacher = rows["teacher"]
    assert teacher["top1_agreement"] == 1.0 and abs(teacher["kl_to_teacher"]) < 1e-6
    assert teacher["layers"] == 2 and teacher["hidden_size"] == 32
    for name, row in rows.items():
        assert row["tokens"] == results["data"]["val_tokens"]
        assert math.isfinite(row["nll"]) and row["perplexity"] == pytest.approx(
            math.exp(row["nll"])
        )
        assert row["forward_tokens_per_s"] > 0 and row["generate_tokens_per_s"] > 0
        assert row["file_bytes"] > 0 and row["parameters"] > 0
        assert len(results["generations"][name]) == 2
        if name != "teacher":
            assert row["layers"] == 1 and row["parameters"] < teacher["parameters"]
            assert row["kl_to_teacher"] > 0
    for name in ("ce", "fkl", "rkl"):
        assert rows[name]["steps"] == 2
        assert rows[name]["objective"] == [{"kind": name}]
        metrics = [
            json.loads(line) for line in (run_dir / rows[name]["metrics"]).read_text().splitlines()
        ]
        assert metrics[-1]["step"] == 2 and math.isfinite(metrics[-1]["loss"])
        assert name in metrics[-1]
    # the saved recipe is a valid recipe again
    from potstill.recipe import load_recipe

    assert load_recipe(run_dir / "recipe.yaml").variants.keys() == {"ce", "fkl", "rkl"}


def test_pipeline_exports_the_evaluated_students(lm_run, tok, llama):
    from transformers import AutoModelForCausalLM

    run_dir, results, recipe = lm_run
    d = recipe.data
    examples = fortune_examples(prompt=d.prompt, max_chars=d.max_chars)
    random.Random(recipe.seed).shuffle(examples)
    val = tokenize_examples(examples[d.train : d.train + d.val], tok, d.max_length, system=d.system)
    scored = val.tensors["attention_mask"].sum(1) - val.tensors["prompt_length"]
    assert results["data"]["val_tokens"] == int(scored.sum())
    # the teacher's generations: greedy answers to the prompts in chat format, with the system
    prompts = [prompt_ids(tok, p, "chat", d.system) for p in results["prompts"]]
    assert (
        results["generations"]["teacher"]
        == greedy_generations(llama, tok, prompts, max_new_tokens=3)[0]
    )
    for name in ("ce", "fkl", "rkl"):
        export = run_dir / results["rows"][name]["export"]
        assert not (export.parent / "checkpoints").exists()  # keep_checkpoints is false
        model = AutoModelForCausalLM.from_pretrained(export)
        assert model.config.num_hidden_layers == 1
        batch = make_batch(val, torch.arange(len(val)))
        with torch.no_grad():
            assert torch.isfinite(causal_lm_forward(model, batch)).all()
        again = lm_figures({"m": model}, val, batch_size=4, progress=False)["m"]
        assert again["perplexity"] == pytest.approx(results["rows"][name]["perplexity"], rel=1e-5)
        card, meta = read_card(export)
        assert "Held-out perplexity" in card and meta.pipeline_tag == "text-generation"
        assert card_metric(meta, "perplexity") == pytest.approx(results["rows"][name]["perplexity"])
        assert (export / "tokenizer.json").exists() or (export / "tokenizer_config.json").exists()


def test_pipeline_report(lm_run):
    run_dir, results, _ = lm_run
    md = (run_dir / "report.md").read_text()
    html = (run_dir / "report.html").read_text()
    assert "## Generations (greedy)" in md and "Generations" in html
    for prompt in results["prompts"]:
        assert f"**{prompt}**" in md
    for name in results["rows"]:
        assert f"| {name} |" in md
    assert (run_dir / "losses.png").stat().st_size > 0


def test_cli_distill_and_report(llama_dir, small_fortunes, tmp_path):
    from typer.testing import CliRunner

    from potstill.cli import app

    data = recipe_dict(
        llama_dir,
        data={"folder": str(small_fortunes), "train": 4, "val": 2},
        variants={"ce": [{"kind": "ce"}]},
        train={"max_steps": 1},
        generate={"prompts": ["A fortune about love."], "max_new_tokens": 2},
        keep_checkpoints=True,
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["distill", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "## Generations (greedy)" in result.output
    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == ["teacher", "derived, not distilled", "ce"]
    assert (out / "ce" / "checkpoints").is_dir()  # keep_checkpoints: true
    md = (out / "report.md").read_text()
    (out / "report.md").unlink()
    (out / "report.html").unlink()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").read_text() == md
    assert "Generations" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"variants": {}}, "variants"),
        ({"variants": {"x": [{"kind": "kd"}]}}, "variants.x.terms.0.kind"),
        ({"variants": {"x": []}}, "variants.x"),
        ({"data": {"max_length": 2}}, "data.max_length"),
    ],
)
def test_cli_recipe_errors_name_the_field(tmp_path, change, field):
    from typer.testing import CliRunner

    from potstill.cli import app

    data = recipe_dict(tmp_path / "never-loaded", **change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["distill", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert field in result.output
    assert not (tmp_path / "run").exists()


def test_builtin_smollm2_recipe_validates():
    from potstill.recipe import load_recipe

    r = load_recipe("smollm2-fortunes")
    assert isinstance(r, LMRecipe) and r.kind == "causal-lm"
    assert r.teacher.model == SMOLLM2 and r.student.keep == 10
    kinds = {name: [t.kind for t in v.terms] for name, v in r.variants.items()}
    assert sorted(k for v in kinds.values() for k in v) == ["ce", "fkl", "jsd", "rkl"]
    assert len(kinds) == 4
    assert r.train.seed == r.seed and r.train.max_steps == 60


@pytest.mark.parametrize("row", RESERVED_ROWS)
def test_a_variant_named_as_a_report_row_is_refused(llama_dir, small_fortunes, row):
    with pytest.raises(ValueError, match=f"variants: '{row}' names a row of the report; rename"):
        small_recipe(llama_dir, small_fortunes, variants={row: [{"kind": "ce"}]})


def test_variant_names_that_would_share_a_folder_are_refused(llama_dir, small_fortunes):
    variants = {"forward KL": [{"kind": "fkl"}], "forward-kl": [{"kind": "rkl"}]}
    with pytest.raises(ValueError, match="variants: 'forward KL' and 'forward-kl' would share "
                                         "the folder 'forward-kl'; rename one"):  # fmt: skip
        small_recipe(llama_dir, small_fortunes, variants=variants)


def test_variant_names_get_distinct_folders(llama_dir, small_fortunes, tmp_path):
    variants = {"Forward KL": [{"kind": "fkl"}], "reverse KL (r)": [{"kind": "rkl"}]}
    results = run_recipe(small_recipe(llama_dir, small_fortunes, variants=variants), tmp_path)
    rows = results["rows"]
    for name, folder, kind in (("Forward KL", "forward-kl", "fkl"),
                               ("reverse KL (r)", "reverse-kl-r", "rkl")):  # fmt: skip
        assert rows[name]["export"] == f"{folder}/export"
        metrics = (tmp_path / rows[name]["metrics"]).read_text()
        assert f'"{kind}"' in metrics and rows[name]["metrics"].startswith(f"{folder}/")


# --- 7. vocabularies ---


def test_student_with_padding_rows(llama_dir, small_fortunes, tok, tmp_path):
    padded = save_llama(tmp_path / "padded", tok, len(tok) + 64, seed=3)
    recipe = small_recipe(
        llama_dir,
        small_fortunes,
        student={"model": str(padded), "keep": None},
        variants={"fkl": [{"kind": "fkl"}], "ce": [{"kind": "ce"}]},
    )
    results = run_recipe(recipe, tmp_path / "run")
    assert results["vocabulary"] == len(tok) == 49152
    assert results["student"] == str(padded) and results["derived_layers"] is None
    rows = results["rows"]
    assert rows["teacher"]["top1_agreement"] == 1.0
    # a given (not derived) student is labelled as such
    assert "derived, not distilled" not in rows
    for name in ("student, not distilled", "fkl", "ce"):
        assert math.isfinite(rows[name]["kl_to_teacher"]) and rows[name]["kl_to_teacher"] > 0
        assert math.isfinite(rows[name]["perplexity"])


def test_student_with_too_few_rows_is_refused(llama_dir, small_fortunes, tok, tmp_path):
    small = save_llama(tmp_path / "small", tok, len(tok) - 100, seed=4)
    recipe = small_recipe(llama_dir, small_fortunes, student={"model": str(small), "keep": None})
    with pytest.raises(TokenizerMismatch, match="49152"):
        run_recipe(recipe, tmp_path / "run")
    shutil.rmtree(tmp_path / "small")


def test_bf16_teacher_and_mixed_precision_recipe(llama_dir, small_fortunes, tmp_path):
    """teacher.dtype: bfloat16 and train.precision: bf16 run a whole recipe; the bf16 teacher's
    held-out perplexity stays near the fp32 teacher's."""
    fp32 = run_recipe(
        small_recipe(llama_dir, small_fortunes, variants={"fkl": [{"kind": "fkl"}]}),
        tmp_path / "fp32",
    )
    recipe = small_recipe(
        llama_dir, small_fortunes, variants={"fkl": [{"kind": "fkl"}]}, train={"precision": "bf16"}
    )
    recipe.teacher.dtype = "bfloat16"
    bf16 = run_recipe(recipe, tmp_path / "bf16")
    a, b = fp32["rows"]["teacher"]["perplexity"], bf16["rows"]["teacher"]["perplexity"]
    assert a != b and abs(math.log(b / a)) < 0.05
    assert bf16["rows"]["fkl"]["steps"] == 1 and math.isfinite(bf16["rows"]["fkl"]["perplexity"])


# --- fused LM head ---


@pytest.mark.parametrize(
    "terms",
    [
        [{"kind": "fkl"}],
        [{"kind": "jsd", "beta": 0.3, "temperature": 2.0}, {"kind": "ce", "weight": 0.5}],
    ],
)
def test_fused_head_trains_like_full_logits_without_building_them(tok, terms):
    """causal_lm_hidden_forward + token terms (the head fused with the divergence, in chunks)
    train the student exactly as the full-logits path; the head's forward never runs unless a
    term (ce) reads the logits."""
    from potstill import Distiller
    from potstill.config import TrainConfig
    from potstill.llm.forward import causal_lm_hidden_forward
    from potstill.losses.objective import Objective
    from potstill.recipe.causal_lm import LMVariantSpec
    from potstill.teachers import LiveTeacher

    data = val_dataset(tok, n=5)
    teacher = tiny_llama(len(tok), seed=3)
    spec = LMVariantSpec.model_validate({"terms": terms})

    def train(forward) -> tuple[torch.nn.Module, list[dict], int]:
        student = tiny_llama(len(tok), seed=0).train()
        calls = []
        student.lm_head.register_forward_hook(lambda *a: calls.append(1))
        cfg = TrainConfig(max_steps=4, batch_size=3, grad_accum=2, clip_grad_norm=1.0,
                          optimizer={"name": "sgd", "lr": 0.5}, log_every=1,
                          progress=False, tensorboard=False)  # fmt: skip
        fit = Distiller(
            student, Objective([t.build(chunk_size=7) for t in spec.terms]), data,
            teacher=LiveTeacher(teacher, forward=causal_lm_forward), config=cfg,
            student_forward=forward,
        ).fit()  # fmt: skip
        return fit.student, fit.history, len(calls)

    full, full_rows, full_calls = train(causal_lm_forward)
    fused, fused_rows, fused_calls = train(causal_lm_hidden_forward)
    assert full_calls == 4 * 2  # one head forward per micro-batch
    reads_logits = any(t["kind"] == "ce" for t in terms)
    assert fused_calls == (8 if reads_logits else 0)
    for a, b in zip(full_rows, fused_rows, strict=True):
        for key in ("loss", *(t.get("name", t["kind"]) for t in terms)):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    for name, w in full.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], w, rtol=1e-5, atol=1e-6, msg=name)
    assert (full.lm_head.weight - tiny_llama(len(tok), seed=0).lm_head.weight).abs().max() > 1e-3


def test_fused_head_refuses_scaled_logits(tok):
    from potstill.llm.forward import causal_lm_hidden_forward, fused_head_problem

    model = tiny_llama(len(tok), seed=0)
    assert fused_head_problem(model) is None
    model.config.final_logit_softcapping = 30.0
    batch = make_batch(val_dataset(tok, n=2), torch.arange(2))
    with pytest.raises(ValueError, match="final_logit_softcapping = 30.0.*fused_head: false"):
        causal_lm_hidden_forward(model, batch)
    assert "not a plain nn.Linear" in fused_head_problem(torch.nn.Linear(2, 2))


def test_fused_head_recipe(llama_dir, small_fortunes, tmp_path):
    """fused_head: true runs a whole recipe without the student's LM head ever running in
    training (the divergence takes its weight in chunks); its student equals the unfused
    recipe's."""
    from torch.nn.modules.module import register_module_forward_hook

    runs, head_calls = {}, {}
    vocab = json.loads((llama_dir / "config.json").read_text())["vocab_size"]
    for fused in (False, True):
        recipe = small_recipe(
            llama_dir, small_fortunes, variants={"fkl": [{"kind": "fkl"}]}, fused_head=fused,
            train={"max_steps": 2, "optimizer": {"name": "sgd", "lr": 0.5}},
        )  # fmt: skip
        calls: list[int] = []

        def count(module, args, output, calls=calls) -> None:
            # a trainable LM head (the student's: the teacher's is frozen) run with gradients
            weight = getattr(module, "weight", None)
            if (isinstance(module, torch.nn.Linear) and module.out_features == vocab
                    and weight.requires_grad and torch.is_grad_enabled()):  # fmt: skip
                calls.append(1)

        hook = register_module_forward_hook(count)
        try:
            runs[fused] = run_recipe(recipe, tmp_path / str(fused))
        finally:
            hook.remove()
        head_calls[fused] = len(calls)
    assert head_calls == {False: 2, True: 0}  # one per step unfused (1 micro-batch), none fused
    a, b = (runs[f]["rows"]["fkl"]["perplexity"] for f in (False, True))
    assert b == pytest.approx(a, rel=1e-5)


def test_fused_head_under_bf16_mixed_precision(tok):
    """train.precision: bf16 with the fused head: the chunks' products run in bf16 like the
    full logits would; the logged losses stay within bf16 rounding of the unfused run's."""
    from potstill import Distiller
    from potstill.config import TrainConfig
    from potstill.llm.forward import causal_lm_hidden_forward
    from potstill.losses.objective import Objective
    from potstill.losses.terms import token_term
    from potstill.teachers import LiveTeacher

    data = val_dataset(tok, n=4)
    teacher = tiny_llama(len(tok), seed=3)

    def run(forward) -> list[float]:
        cfg = TrainConfig(max_steps=3, batch_size=2, precision="bf16", log_every=1,
                          optimizer={"name": "sgd", "lr": 0.5}, progress=False,
                          tensorboard=False)  # fmt: skip
        fit = Distiller(
            tiny_llama(len(tok), seed=0).train(), Objective([token_term("fkl", chunk_size=5)]),
            data, teacher=LiveTeacher(teacher, forward=causal_lm_forward), config=cfg,
            student_forward=forward,
        ).fit()  # fmt: skip
        assert fit.student.lm_head.weight.dtype == torch.float32
        return [r["fkl"] for r in fit.history]

    full, fused = run(causal_lm_forward), run(causal_lm_hidden_forward)
    assert all(math.isfinite(v) for v in fused)
    assert fused == pytest.approx(full, rel=0.02)


def test_fused_head_is_refused_under_torchrun_before_anything_runs(
    llama_dir, small_fortunes, tmp_path, monkeypatch
):
    import potstill.distributed as D

    monkeypatch.setattr(D, "setup", lambda: (0, 2))  # as if launched by torchrun, 2 processes
    recipe = small_recipe(llama_dir, small_fortunes, variants={"fkl": [{"kind": "fkl"}]},
                          fused_head=True)  # fmt: skip
    with pytest.raises(ValueError, match="fused_head: false for a distributed run"):
        run_recipe(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_causal_lm_results_header_and_report(lm_run):
    from conftest import assert_report_rebuilds, assert_results_header

    run_dir, results, _ = lm_run
    assert_results_header(results, "causal-lm")
    assert results["transformers_version"] is not None
    assert_report_rebuilds(run_dir)


def test_potstill_eval_scores_an_exported_lm_on_your_corpus(lm_run, llama_dir, tmp_path):
    """``potstill eval`` on an exported causal LM and a corpus file: the teacher against itself
    agrees on every token with no KL; a student's perplexity is exp of its mean next-token
    NLL over the same positions, as lm_figures gives on the same token rows."""
    from typer.testing import CliRunner

    from potstill.cli import app
    from potstill.hf import load_model
    from potstill.tasks.causal_lm import api_datasets

    run_dir, results, _ = lm_run
    corpus = tmp_path / "corpus.jsonl"
    lines = [{"text": f"Line {i}: the computer said hello to the world again."} for i in range(6)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in lines))
    export = run_dir / results["rows"]["fkl"]["export"]
    base = ["--data", str(corpus), "--max-length", "16"]
    same = CliRunner().invoke(app, ["eval", str(llama_dir), *base, "--teacher", str(llama_dir)])
    assert same.exit_code == 0, same.output
    figures = json.loads(same.stdout)
    assert figures["kind"] == "causal-lm"
    assert figures["top1_agreement"] == 1.0 and abs(figures["kl_to_teacher"]) < 1e-6
    out = CliRunner().invoke(app, ["eval", str(export), *base])
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)
    model = load_model(export, "causal-lm")
    from datasets import Dataset

    rows = api_datasets(model, {"eval": Dataset.from_list(lines)}, max_length=16)["eval"]
    want = lm_figures({"m": model}, rows, batch_size=16, progress=False)["m"]
    assert got["tokens"] == want["tokens"] > 0
    assert got["perplexity"] == pytest.approx(math.exp(got["nll"]))
    assert got["nll"] == pytest.approx(want["nll"], rel=1e-6)
