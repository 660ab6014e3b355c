"""Teacher answers for response distillation (potstill.llm.answers, ``potstill generate``): a tiny
random Llama with the real SmolLM2 tokenizer and chat template. Greedy answers equal a
one-prompt-at-a-time reference; sampled answers are reproducible; an interrupted run continues
to the file an uninterrupted run writes; files from other settings are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_llm_pipeline import tiny_llama

from potstill.data.prompts import Prompt, read_prompts
from potstill.llm.answers import GenerationSettings, encode_prompt, generate_answers, read_answers

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "Name a colour.",
    "Write one word about the sea.",
    "Say something kind.",
    "What is two plus two?",
    "Give me a fortune about computers.",
]


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), seed=3)


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p} for p in PROMPTS[:4]]
    rows.append({"id": "chat-1", "messages": [{"role": "user", "content": PROMPTS[4]}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_prompts_and_errors(prompts_file, tmp_path):
    prompts = read_prompts(prompts_file)
    assert [p.id for p in prompts] == ["1", "2", "3", "4", "chat-1"]
    assert prompts[4].messages is not None and prompts[4].text() == PROMPTS[4]
    bad = tmp_path / "bad.jsonl"
    for text, message in [
        ('{"question": "x"}\n', "bad.jsonl:1: needs 'prompt' or 'messages'"),
        ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}\n', "bad.jsonl:2: id '1'"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}\n', "ending with the user"),
        ("not json\n", "bad.jsonl:1: not JSON"),
    ]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_prompts(bad)


def test_greedy_answers_equal_one_prompt_at_a_time(model, tok, prompts_file, tmp_path):
    settings = GenerationSettings(max_new_tokens=6, temperature=0, batch_size=3, system="Be brief.")
    prompts = read_prompts(prompts_file)
    out = tmp_path / "answers.jsonl"
    stats = generate_answers(
        model, tok, prompts, out, settings, teacher_name="tiny", progress=False
    )
    records = read_answers(out)
    assert stats.prompts == 5 and stats.answers == 5 and len(records) == 5
    for p, r in zip(prompts, records, strict=True):
        ids = torch.tensor([encode_prompt(tok, p, settings)])
        ref = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
            do_sample=False, pad_token_id=tok.pad_token_id,
        )[0, ids.shape[1] :].tolist()  # fmt: skip
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id)]
        assert r["answer"] == tok.decode(ref, skip_special_tokens=True).strip(), p.id
        assert r["tokens"] == len(ref) and r["finish"] in ("stop", "length")
        assert r["settings"]["temperature"] == 0 and r["teacher"]["name"] == "tiny"
    assert records[4]["messages"][-1]["content"] == PROMPTS[4] and "prompt" not in records[4]
    # the chat template with the system message was applied
    text = tok.decode(encode_prompt(tok, prompts[0], settings))
    assert "Be brief." in text and "Name a colour." in text and text.rstrip().endswith("assistant")


class _Interrupt(Exception):
    pass


def test_an_interrupted_run_continues_to_the_same_answers(model, tok, prompts_file, tmp_path):
    settings = GenerationSettings(
        max_new_tokens=5, temperature=1.0, top_p=0.9, n=2, seed=7, batch_size=2
    )
    prompts = read_prompts(prompts_file)
    whole = tmp_path / "whole.jsonl"
    generate_answers(model, tok, prompts, whole, settings, progress=False)

    cut = tmp_path / "cut.jsonl"
    calls = {"n": 0}
    original = model.generate

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Interrupt
        return original(*args, **kwargs)

    model.generate = failing
    try:
        with pytest.raises(_Interrupt):
            generate_answers(model, tok, prompts, cut, settings, progress=False)
    finally:
        del model.generate
    assert len(read_answers(cut)) == 4  # the first batch: 2 prompts × 2 answers
    with open(cut, "a") as f:
        f.write('{"id": "3", "answ')  # a write torn by a kill
    stats = generate_answers(model, tok, prompts, cut, settings, progress=False)
    assert stats.skipped == 2 and stats.prompts == 3
    assert cut.read_text() == whole.read_text()
    answers = read_answers(whole)
    assert [r["answer_index"] for r in answers[:2]] == [0, 1]
    # a third run has nothing left to do
    assert generate_answers(model, tok, prompts, cut, settings, progress=False).prompts == 0


def test_answers_from_other_settings_are_refused(model, tok, prompts_file, tmp_path):
    prompts = read_prompts(prompts_file)
    out = tmp_path / "a.jsonl"
    base = GenerationSettings(max_new_tokens=3, temperature=0)
    generate_answers(model, tok, prompts[:2], out, base, progress=False)
    with pytest.raises(ValueError, match="settings.max_new_tokens=3, not 4"):
        generate_answers(
            model, tok, prompts, out, GenerationSettings(max_new_tokens=4, temperature=0)
        )
    other = tiny_llama(len(tok), seed=4)
    with pytest.raises(ValueError, match="teacher.weights_sha256"):
        generate_answers(other, tok, prompts, out, base, progress=False)
    with pytest.raises(ValueError, match="n > 1 answers per prompt need sampling"):
        GenerationSettings(n=2, temperature=0)


def test_cli_generate(model, tok, prompts_file, tmp_path):
    from typer.testing import CliRunner

    from potstill.cli import app

    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "answers.jsonl"
    args = ["generate", "--prompts", str(prompts_file), "--out", str(out), "--teacher", str(folder)]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "3", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert "5 answers to 5 prompts (0 answered before)" in result.output
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "3", "--temperature", "0"])
    assert "0 answers to 0 prompts (5 answered before)" in result.output
    result = CliRunner().invoke(app, [*args, "--top-p", "0"])
    assert result.exit_code == 2 and "top_p" in result.output
    assert all(isinstance(r, dict) for r in read_answers(out))
    assert Prompt("x", prompt="hi").text() == "hi"


def test_generates_answers_are_read_by_cache_as_they_are(model, tok, prompts_file, tmp_path):
    """``potstill generate``'s file goes straight into ``potstill cache --data`` (its
    ``answer`` and a one-turn ``messages`` read as prompt and response, each line's check
    verified), and its examples are the prompts and answers generated."""
    from typer.testing import CliRunner

    from potstill.cache import cache_status
    from potstill.cli import app
    from potstill.llm.data import read_jsonl_examples

    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    answers = tmp_path / "answers.jsonl"
    gen = ["generate", "--prompts", str(prompts_file), "--out", str(answers), "--teacher",
           str(folder), "--max-new-tokens", "4", "--temperature", "0"]  # fmt: skip
    assert CliRunner().invoke(app, gen).exit_code == 0
    records = read_answers(answers)
    examples = read_jsonl_examples(answers)
    assert [(e.prompt, e.response) for e in examples] == [
        (r.get("prompt") or r["messages"][0]["content"], r["answer"]) for r in records
    ]
    assert examples[4].prompt == PROMPTS[4]  # the chat prompt's user turn
    cache = ["cache", "--teacher", str(folder), "--data", str(answers), "--k", "4",
             "--max-length", "64", "--out", str(tmp_path / "cache")]  # fmt: skip
    result = CliRunner().invoke(app, cache)
    assert result.exit_code == 0, result.output
    assert cache_status(tmp_path / "cache").complete
    lines = answers.read_text().splitlines()
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text("\n".join([lines[0], lines[1].replace('"answer": "', '"answer": "x')]))
    with pytest.raises(ValueError, match=r"damaged.jsonl:2: the line differs from its check"):
        read_jsonl_examples(damaged)
    chat = tmp_path / "chat.jsonl"
    two = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat.write_text(json.dumps({"messages": two, "answer": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:1: 'messages' here must be one user turn"):
        read_jsonl_examples(chat)


# --- evaluating answers to held-out prompts ---


def test_answer_tokens_teacher_likelihood_and_rouge(model, tok):
    import torch.nn.functional as F

    from potstill.llm.evaluate import answer_tokens, rouge_l, teacher_log_likelihood

    settings = GenerationSettings(temperature=0)
    prompts = [
        encode_prompt(tok, Prompt(str(i), prompt=p), settings) for i, p in enumerate(PROMPTS)
    ]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    answers = answer_tokens(model, prompts, pad_token_id=pad, eos_token_id=eos, max_new_tokens=7,
                            batch_size=2)  # fmt: skip
    teacher = tiny_llama(len(tok), seed=9)
    want_total, want_count = 0.0, 0
    for p, a in zip(prompts, answers, strict=True):
        ids = torch.tensor([p])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=7,
                             do_sample=False, pad_token_id=pad)[0, len(p):].tolist()  # fmt: skip
        assert a == (ref[: ref.index(eos) + 1] if eos in ref else ref)
        # the teacher's log-probabilities of the answer tokens, one unpadded sequence at a time
        with torch.no_grad():
            logp = F.log_softmax(teacher(input_ids=torch.tensor([p + a])).logits[0].float(), -1)
        want_total += sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(a))
        want_count += len(a)
    mean, count = teacher_log_likelihood(teacher, prompts, answers, pad_token_id=pad, batch_size=3)
    assert count == want_count
    assert mean == pytest.approx(want_total / want_count, abs=1e-4)
    assert rouge_l(["the cat sat on the mat"], ["the cat lay on a mat"]) == pytest.approx(4 / 6)
    assert rouge_l(["same words here", "x"], ["same words here", "y"]) == pytest.approx(0.5)
