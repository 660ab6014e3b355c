"""Response and on-policy distillation recipes end to end with a tiny random Llama teacher and the
real SmolLM2 tokenizer: the teacher answers the built-in instructions (or a prompts file), the
students learn those answers (cross-entropy, token-level KD, on-policy λ = 1), and every model's
answers to held-out prompts are scored by the teacher and by ROUGE-L against its answers."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from test_llm_pipeline import recipe_dict, save_llama

from potstill.data.instructions import instructions
from potstill.llm.answers import read_answers
from potstill.recipe.causal_lm import LMRecipe
from potstill.runs import run as run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_dir(tok, tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("tiny-llama"), tok, len(tok), seed=0)


def _recipe(llama_dir: Path, **over: Any) -> LMRecipe:
    fields: dict[str, Any] = {
        "data": {"name": "instructions", "train": 6, "val": 3, "max_length": 64,
                 "answers": {"max_new_tokens": 5, "batch_size": 3}},
        "variants": {
            "response": [{"kind": "ce"}],
            "token KD": [{"kind": "fkl"}],
            "on-policy": {"terms": [{"kind": "fkl"}], "on_policy": 1.0,
                          "sampling": {"max_new_tokens": 4}},
        },
        "train": {"max_steps": 2, "batch_size": 3},
        "generate": {"prompts": ["Say hi."], "max_new_tokens": 2},
    }  # fmt: skip
    teacher = over.pop("teacher", None)
    data = recipe_dict(llama_dir, **{**fields, **over})
    if teacher is not None:
        data["teacher"] = teacher
    return LMRecipe.model_validate(data)


@pytest.fixture(scope="module")
def run(llama_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("responses")
    return run_dir, run_recipe(_recipe(llama_dir), run_dir)


def test_the_teacher_answers_first_and_students_learn_its_answers(run, tok):
    run_dir, results = run
    train = read_answers(run_dir / "answers" / "train.jsonl")
    val = read_answers(run_dir / "answers" / "val.jsonl")
    assert len(train) == 6 and len(val) == 3
    assert {r["prompt"] for r in train} <= set(instructions("train"))
    assert {r["prompt"] for r in val} <= set(instructions("val"))
    assert all(r["settings"]["temperature"] == 0.7 for r in train)
    assert all(r["settings"]["temperature"] == 0 for r in val)  # held-out references: greedy
    assert results["data"]["name"] == "instructions" and results["data"]["train"] == 6
    assert results["rows"]["on-policy"]["on_policy"] == 1.0
    assert results["rows"]["response"]["on_policy"] == 0.0


def test_only_the_teachers_answer_tokens_carry_loss(run, llama_dir, tok):
    import torch

    from potstill.losses.tokens import batch_token_mask
    from potstill.runs.lm_data import lm_datasets, load_lm_teacher

    run_dir, _ = run
    recipe = _recipe(llama_dir)
    teacher, _ = load_lm_teacher(recipe)
    train, _, _ = lm_datasets(recipe, tok, teacher=teacher, run_dir=run_dir)  # answers reused
    answers = {r["prompt"]: r["answer"] for r in read_answers(run_dir / "answers" / "train.jsonl")}
    batch = train.batch(torch.arange(len(train)))
    scored = batch_token_mask(batch)
    for b in range(len(train)):
        targets = batch["input_ids"][b, 1:][scored[b, :-1]].tolist()
        head = batch["input_ids"][b, : int(batch["prompt_length"][b])].tolist()
        prompt = tok.decode(head, skip_special_tokens=True)
        answer = next(a for p, a in answers.items() if p in prompt)
        # the scored targets are exactly the answer and its end of turn, nothing of the prompt
        assert tok.decode(targets, skip_special_tokens=True).strip() == answer.strip()
        assert targets[-2:] == tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]


def test_answers_to_held_out_prompts_are_scored(run):
    run_dir, results = run
    answers = results["answers"]
    assert set(answers["rows"]) == {"teacher", "derived, not distilled", "response",
                                    "token KD", "on-policy"}  # fmt: skip
    for name, row in answers["rows"].items():
        assert row["answer_teacher_logp"] < 0 and 0 <= row["answer_rouge_l"] <= 1, name
        assert 0 < row["answer_tokens"] <= 5
    # the teacher's greedy answers are the references: its own ROUGE-L is 1
    assert answers["rows"]["teacher"]["answer_rouge_l"] == pytest.approx(1.0)
    md = (run_dir / "report.md").read_text()
    assert "## Answers to held-out prompts" in md and "on-policy λ = 1" in md
    assert json.loads((run_dir / "results.json").read_text())["answers"]["prompts"]


def test_answer_scores_equal_a_plain_transformers_computation(run, llama_dir, tok):
    """Each model's held-out answer figures computed again without potstill: its greedy
    answers with ``generate`` one prompt at a time (the teacher's are those in
    answers/val.jsonl, which ``generate`` gives again), the teacher's mean log-probability per
    answer token from its logits, ROUGE-L with rouge-score against the teacher's answers."""
    import torch
    from rouge_score import rouge_scorer
    from transformers import AutoModelForCausalLM

    run_dir, results = run
    val = read_answers(run_dir / "answers" / "val.jsonl")
    system = val[0]["settings"]["system"]
    prompts = []
    for r in val:
        messages = [{"role": "system", "content": system}] if system else []
        text = tok.apply_chat_template(messages + [{"role": "user", "content": r["prompt"]}],
                                       tokenize=False, add_generation_prompt=True)  # fmt: skip
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    teacher = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rows = results["answers"]["rows"]
    folders = {name: run_dir / row["export"] for name, row in results["rows"].items()
               if row.get("export")}  # fmt: skip
    assert set(folders) == {"response", "token KD", "on-policy"}
    for name in ("teacher", *folders):
        model = teacher if name == "teacher" else AutoModelForCausalLM.from_pretrained(
            folders[name]).eval()  # fmt: skip
        answers = []
        for ids, record in zip(prompts, val, strict=True):
            x = torch.tensor([ids])
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                     max_new_tokens=5, pad_token_id=tok.eos_token_id)  # fmt: skip
            new = out[0, len(ids) :].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id) + 1]
            if name == "teacher":
                assert new == record["answer_ids"]  # the references are its greedy answers
            answers.append(new)
        total, count = 0.0, 0
        for ids, new in zip(prompts, answers, strict=True):
            with torch.no_grad():
                logp = teacher(torch.tensor([ids + new])).logits[0].float().log_softmax(-1)
            for i, t in enumerate(new):
                total += float(logp[len(ids) + i - 1, t])
            count += len(new)
        texts = [tok.decode(a, skip_special_tokens=True).strip() for a in answers]
        pairs = zip(texts, val, strict=True)
        rouge = [scorer.score(r["answer"], t)["rougeL"].fmeasure for t, r in pairs]
        got = rows[name]
        assert got["answer_teacher_logp"] == pytest.approx(total / count, rel=1e-5), name
        assert got["answer_rouge_l"] == pytest.approx(sum(rouge) / len(rouge), abs=1e-12), name
        assert got["answer_tokens"] == pytest.approx(count / len(answers), abs=1e-12), name


def test_resume_reuses_the_teachers_answers(run, llama_dir):
    run_dir, _ = run
    files = {p: p.stat().st_mtime_ns for p in (run_dir / "answers").iterdir()}
    run_recipe(_recipe(llama_dir), run_dir, resume=True)
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "answers").iterdir()} == files


def test_prompts_file_and_recipe_errors(llama_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(8)))
    recipe = _recipe(
        llama_dir,
        data={"name": "prompts", "prompts": str(prompts), "train": 5, "val": 2,
              "answers": {"max_new_tokens": 3}},
        variants={"response": [{"kind": "ce"}]},
    )  # fmt: skip
    results = run_recipe(recipe, tmp_path / "run")
    assert results["data"]["train"] == 5 and len(results["answers"]["prompts"]) == 2
    with pytest.raises(ValidationError, match="data.prompts"):
        _recipe(llama_dir, data={"name": "prompts"})
    with pytest.raises(ValidationError, match="on-policy samples need the live teacher"):
        _recipe(llama_dir, teacher={"model": str(llama_dir), "cache": True})
    with pytest.raises(ValueError, match="train 9 / val 1 but only 7 / 1 prompts"):
        run_recipe(
            _recipe(llama_dir, data={"name": "prompts", "prompts": str(prompts), "train": 9,
                                     "val": 1}),
            tmp_path / "too-many",
        )  # fmt: skip


# --- packing ---


def _unpacked(tok):
    from potstill.llm.data import LMExample, tokenize_examples

    texts = instructions("train")[:7]
    examples = [LMExample(t, "Answer number " + "x " * (i % 4)) for i, t in enumerate(texts)]
    return tokenize_examples(examples, tok, 64, fmt="chat")


def test_packed_rows_give_each_example_its_unpacked_logits_and_loss(tok):
    import torch
    from test_llm_pipeline import tiny_llama

    from potstill.llm.data import pack_examples
    from potstill.llm.forward import causal_lm_forward
    from potstill.losses.terms import next_token_ce_term, token_term
    from potstill.losses.tokens import batch_token_mask
    from potstill.signal import Signal, StudentView

    data = _unpacked(tok)
    packed = pack_examples(data, 128)
    assert len(packed) < len(data)
    model, teacher = tiny_llama(len(tok), seed=2), tiny_llama(len(tok), seed=3)
    full = data.batch(torch.arange(len(data)))
    rows = packed.batch(torch.arange(len(packed)))
    with torch.no_grad():
        separate = causal_lm_forward(model, full)
        together = causal_lm_forward(model, rows)
    lengths = full["attention_mask"].sum(1)
    for r in range(len(packed)):
        for s in rows["segment"][r].unique().tolist():
            if s == 0:
                continue
            where = rows["segment"][r] == s
            ids = rows["input_ids"][r][where]
            i = next(i for i in range(len(data)) if int(lengths[i]) == len(ids)
                     and torch.equal(full["input_ids"][i, : len(ids)], ids))  # fmt: skip
            torch.testing.assert_close(
                together[r][where], separate[i, : len(ids)], atol=2e-5, rtol=1e-4
            )
    # the same tokens are scored (no loss across an example's start), and the losses agree
    assert int(batch_token_mask(rows).sum()) == int(batch_token_mask(full).sum())
    ce = next_token_ce_term()
    torch.testing.assert_close(
        ce.fn(StudentView(together), None, rows), ce.fn(StudentView(separate), None, full)
    )
    with torch.no_grad():
        t_sep, t_tog = causal_lm_forward(teacher, full), causal_lm_forward(teacher, rows)
    kd = token_term("fkl", chunk_size=50)
    torch.testing.assert_close(
        kd.fn(StudentView(together), Signal(logits=t_tog), rows),
        kd.fn(StudentView(separate), Signal(logits=t_sep), full),
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip


def test_recipe_with_packing(llama_dir, tmp_path):
    recipe = _recipe(
        llama_dir,
        data={"name": "instructions", "train": 6, "val": 2, "max_length": 96, "packing": True,
              "answers": {"max_new_tokens": 3}},
        variants={"response": [{"kind": "ce"}], "token KD": [{"kind": "fkl"}]},
    )  # fmt: skip
    results = run_recipe(recipe, tmp_path / "run")
    assert results["data"]["packing"] and results["data"]["rows"] < results["data"]["train"] == 6
    with pytest.raises(ValidationError, match="drop data.packing or on_policy"):
        _recipe(llama_dir, data={"name": "instructions", "packing": True})


def _first_fit_by_scan(lengths: list[int], width: int) -> list[list[int]]:
    """The plain quadratic first fit, as a reference."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i, n in enumerate(lengths):
        for r, total in enumerate(used):
            if total + n <= width:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_first_fit_packs_exactly_as_the_plain_scan(seed):
    from potstill.llm.data import first_fit

    g = random.Random(seed)
    width = g.choice([1, 7, 64, 128])
    n = g.choice([0, 1, 5, 300, 2000])
    lengths = [g.choice([1, width, g.randint(1, width), g.randint(1, max(1, width // 8))])
               for _ in range(n)]  # fmt: skip
    assert first_fit(lengths, width) == _first_fit_by_scan(lengths, width)
    with pytest.raises(ValueError, match="does not fit"):
        first_fit([width + 1], width)


def test_teacher_row_reads_its_recorded_answers(run, llama_dir, tok, monkeypatch):
    """The answers files keep the generated ids; the held-out teacher row uses them instead of
    generating the teacher's greedy answers again, with the same figures."""
    import potstill.runs.lm_data as data
    import potstill.tasks.causal_lm as task
    from potstill.llm.evaluate import answer_tokens

    run_dir, results = run
    val = read_answers(run_dir / "answers" / "val.jsonl")
    for r in val:
        assert tok.decode(r["answer_ids"], skip_special_tokens=True).strip() == r["answer"]
        assert len(r["answer_ids"]) == r["tokens"] + (r["finish"] == "stop")
    # generated again now, the teacher's greedy answers are the recorded ids
    teacher, _ = data.load_lm_teacher(_recipe(llama_dir))
    _, _, heldout = data._prompt_datasets(_recipe(llama_dir), tok, teacher, run_dir)
    again = answer_tokens(teacher, heldout["ids"], pad_token_id=data.pad_id(tok),
                          eos_token_id=tok.eos_token_id, max_new_tokens=5)  # fmt: skip
    assert heldout["teacher_answers"] == again
    calls = []
    monkeypatch.setattr(task, "answer_tokens", lambda *a, **k: calls.append(1) or again)
    batch = _recipe(llama_dir).eval_batch_size
    figures = task.answer_metrics({"teacher": teacher}, teacher, tok, heldout, batch_size=batch)
    assert calls == []  # nothing generated for the teacher
    assert figures["rows"]["teacher"] == results["answers"]["rows"]["teacher"]
