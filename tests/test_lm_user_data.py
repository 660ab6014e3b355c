"""A causal LM on the user's own data, with SmolLM2's real tokenizer and chat template: a text
corpus concatenated into windows (every token predicted, the tail counted), conversations
trained as given (every assistant turn, the whole conversation kept), prompt/response pairs
and a ``potstill generate`` answers file taken as they are, prompts answered by the teacher;
then whole recipe runs on a folder of text files and a JSONL of conversations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_results_header
from test_llm_pipeline import llama_dir, recipe_dict  # noqa: F401  (fixture)

from potstill.data.rows import DataError
from potstill.data.tables import load_table_splits
from potstill.llm.user_data import (
    chat_ids,
    chat_table,
    corpus_table,
    infer_style,
    token_dataset,
)
from potstill.recipe import RecipeError, validate_recipe

DOCS = [
    "Never trust a computer you cannot throw out of a window.",
    "",
    "Love conquers all things except poverty and toothache.",
    "To err is human; to really foul things up takes a computer.",
    "Science is what you know; philosophy is what you don't.",
]

CONVERSATIONS = [
    {"messages": [
        {"role": "user", "content": "Tell me a fortune."},
        {"role": "assistant", "content": "You will write many tests."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "They will all pass."},
    ]},
    {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
    ]},
    {"messages": [{"role": "user", "content": "No answer here"}]},
]  # fmt: skip


def _table(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


def test_corpus_windows_hold_every_token_in_order_and_count_the_tail(tok):
    table = _table([{"text": t} for t in DOCS])
    rows, counts = corpus_table(table, tok, "text", max_length=8)
    flat = [
        t
        for d in DOCS
        if d
        for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ]
    windows = list(rows["input_ids"])
    assert all(len(w) == 8 for w in windows) and len(windows) == len(flat) // 8
    assert [t for w in windows for t in w] == flat[: 8 * len(windows)]
    assert counts.left_out == {"empty texts": 1, "tail tokens": len(flat) % 8}
    docs, dcounts = corpus_table(table, tok, "text", max_length=12, windows=False)
    assert len(docs) == 4 and dcounts.cut == sum(
        len(tok(d, add_special_tokens=False)["input_ids"]) + 1 > 12 for d in DOCS if d
    )
    data = token_dataset(rows, tok.pad_token_id)
    whole = data.batch(torch.arange(len(data)))
    assert int(whole["prompt_length"].sum()) == 0  # every token is predicted
    assert "labels" not in whole
    assert data.trained_tokens() == 8 * len(windows)


def _in_memory_reference(table, pad):
    """The token rows padded whole, as the road held them before (an independent build)."""
    from potstill.data.tensors import TensorDictDataset
    from potstill.llm.data import right_pad

    ids, mask = right_pad(table["input_ids"], pad)
    tensors = {"input_ids": ids, "attention_mask": mask}
    if "labels" in table.column_names:
        labels, _ = right_pad(table["labels"], -100)
        first = [next((j for j, x in enumerate(r) if x != -100), 0) for r in table["labels"]]
        tensors.update(labels=labels, prompt_length=torch.tensor(first))
    else:
        tensors["prompt_length"] = torch.zeros(len(table), dtype=torch.long)
    return TensorDictDataset(tensors, trim_by="attention_mask")


def test_token_rows_batch_as_the_in_memory_rows_and_read_only_their_rows(tok):
    from potstill.data.tensors import fingerprint, token_width

    corpus, _ = corpus_table(_table([{"text": t} for t in DOCS]), tok, "text", max_length=12,
                             windows=False)  # fmt: skip
    chats, _ = chat_table(_table(CONVERSATIONS), tok, {"messages": "messages"}, max_length=200)
    g = torch.Generator().manual_seed(0)
    for table in (corpus, chats):
        rows = token_dataset(table, tok.pad_token_id)
        ref = _in_memory_reference(table, tok.pad_token_id)
        assert len(rows) == len(ref) and token_width(rows) == token_width(ref)
        for _ in range(5):
            index = torch.randperm(len(rows), generator=g)[: max(1, len(rows) // 2)]
            got, want = rows.batch(index), ref.batch(index)
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), key
        assert fingerprint(rows) == fingerprint(token_dataset(table, tok.pad_token_id))
        some = rows.select(torch.tensor([1, 0]), cache_index=torch.tensor([1, 0]))
        assert some.max_length == rows.max_length  # what the cache of the whole recorded
        assert torch.equal(some.batch(torch.tensor([0]))["cache_index"], torch.tensor([1]))
        assert torch.equal(some.batch(torch.tensor([0]))["input_ids"],
                           rows.batch(torch.tensor([1]))["input_ids"])  # fmt: skip
    assert token_dataset(chats, tok.pad_token_id, limit=1).max_length == len(chats["input_ids"][0])


def test_every_assistant_turn_is_trained_and_the_conversation_kept(tok):
    messages = CONVERSATIONS[0]["messages"]
    ids, labels = chat_ids(tok, messages)
    whole = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    assert ids == whole["input_ids"]  # nothing of the conversation cut
    spans, current = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != -100:
            assert lab == i
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    texts = [tok.decode(s, skip_special_tokens=True).strip() for s in spans]
    assert texts == ["You will write many tests.", "They will all pass."]
    assert all("user" not in tok.decode(s) for s in spans)


def test_chat_table_counts_conversations_without_an_answer(tok):
    rows, counts = chat_table(_table(CONVERSATIONS), tok, {"messages": "messages"}, max_length=200)
    assert len(rows) == 2 and counts.left_out["conversations without an assistant turn"] == 1
    data = token_dataset(rows, tok.pad_token_id)
    whole = data.batch(torch.arange(len(data)))
    labelled = (whole["labels"] != -100).sum(1)
    assert labelled.tolist() == [sum(x != -100 for x in r) for r in rows["labels"]]
    assert (whole["prompt_length"] > 0).all()
    assert data.trained_tokens() == int(labelled.sum())
    short, scounts = chat_table(_table(CONVERSATIONS[:2]), tok, {"messages": "messages"},
                                max_length=20)  # fmt: skip
    assert scounts.cut == 2 and len(short) == 1  # the second's answer lies past 20 tokens
    assert scounts.left_out["conversations whose answer lies past max_length"] == 1


def test_prompt_response_text_format_masks_the_prompt(tok):
    table = _table([{"prompt": "Q: 2+2?", "response": "4"}])
    rows, _ = chat_table(table, tok, {"prompt": "prompt", "response": "response"}, max_length=50,
                         fmt="text")  # fmt: skip
    ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    n_prompt = len(tok("Q: 2+2?")["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id


def test_styles_follow_the_columns(tmp_path):
    assert infer_style(["text"], {}) == "corpus"
    assert infer_style(["messages"], {}) == "chat"
    assert infer_style(["prompt", "completion"], {}) == "chat"
    assert infer_style(["id", "prompt", "answer", "tokens"], {}) == "chat"  # a generate file
    assert infer_style(["prompt"], {}) == "prompts"
    assert infer_style(["body"], {"text": "body"}) == "corpus"
    with pytest.raises(DataError, match="the data has columns: a, b"):
        infer_style(["a", "b"], {})


def _run(recipe_data, out):
    from potstill.runs import run

    return run(validate_recipe(recipe_data), out)


def test_a_recipe_trains_on_a_folder_of_text_files(llama_dir, tmp_path):  # noqa: F811
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text("\n".join(DOCS * 3) + "\n")
    data = recipe_dict(llama_dir, data={"source": {"path": str(corpus), "val_size": 0.25},
                                        "max_length": 16})  # fmt: skip
    for key in ("system", "prompt", "train", "val"):
        data["data"].pop(key)
    data["variants"] = {"ce": [{"kind": "ce"}], "fkl": [{"kind": "fkl"}]}
    data["generate"] = {"prompts": ["Never trust"], "max_new_tokens": 2}
    data["data"]["format"] = "text"
    results = _run(data, tmp_path / "run")
    assert_results_header(results, "causal-lm")
    tables = load_table_splits(path=str(corpus), val_size=0.25, seed=0)
    expected_train = corpus_table(tables["train"].shuffle(seed=0), _tok(llama_dir), "text",
                                  max_length=16)[0]  # fmt: skip
    assert results["data"]["train"] == len(expected_train)
    assert results["data"]["response_tokens"] == 16 * len(expected_train)
    assert set(results["rows"]) >= {"teacher", "ce", "fkl"}


def _tok(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_a_recipe_trains_on_conversations_and_refuses_on_policy(llama_dir, tmp_path):  # noqa: F811
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS * 4))
    data = recipe_dict(llama_dir, data={"source": {"path": str(path), "val_size": 3},
                                        "max_length": 64})  # fmt: skip
    for key in ("system", "prompt", "train", "val"):
        data["data"].pop(key)
    data["variants"] = {"fkl": [{"kind": "fkl"}]}
    results = _run(data, tmp_path / "run")
    answered = sum(1 for c in CONVERSATIONS * 4 if len(c["messages"]) > 1)  # 8 of 12
    assert results["data"]["train"] + results["data"]["val"] == answered
    assert results["data"]["style"] == "auto" and results["data"]["source"]["val_size"] == 3
    data["variants"] = {"gkd": {"terms": [{"kind": "fkl"}], "on_policy": 0.5}}
    data["data"]["style"] = "chat"
    with pytest.raises(RecipeError, match="on-policy sampling needs prompts"):
        validate_recipe(data)
    data["data"]["style"] = "auto"
    with pytest.raises(DataError, match="on-policy sampling needs prompts; this chat data"):
        _run(data, tmp_path / "run2")


def test_source_and_name_together_are_refused(llama_dir):  # noqa: F811
    data = recipe_dict(llama_dir, data={"name": "fortunes", "source": {"path": "x.txt"}})
    with pytest.raises(RecipeError, match="give name .* or source .*, not both"):
        validate_recipe(data)
    assert torch.is_tensor(torch.zeros(1))


def test_the_api_takes_a_causal_lm_and_a_datasets_table(tok):
    from datasets import Dataset
    from test_llm_pipeline import tiny_llama

    import potstill
    from potstill.students import derive

    teacher = tiny_llama(len(tok), seed=1, layers=2)
    student = derive(teacher, keep=1)
    corpus = Dataset.from_list([{"text": t} for t in [d for d in DOCS if d] * 6])
    result = potstill.distill(
        teacher, student, corpus, eval_data=corpus.select(range(4)), tokenizer=tok,
        max_length=12, epochs=1, batch_size=4, lr=1e-3, progress=False,
    )  # fmt: skip
    assert set(result.metrics) == {"perplexity", "agreement", "kl_to_teacher"}
    # perplexity by hand, with transformers' own loss, on the same windows
    rows, _ = corpus_table(corpus.select(range(4)), tok, "text", max_length=12)
    ids = torch.tensor(list(rows["input_ids"]))
    with torch.no_grad():
        loss = result.student.eval()(input_ids=ids, labels=ids).loss
    assert result.metrics["perplexity"] == pytest.approx(float(torch.exp(loss)), rel=1e-4)
    history = result.history
    assert history and {"kd", "ce"} <= set(history[-1])
    chats = Dataset.from_list([c for c in CONVERSATIONS if len(c["messages"]) > 1] * 2)
    out = potstill.distill(teacher, derive(teacher, keep=1), chats, tokenizer=tok,
                           max_length=64, epochs=1, batch_size=2, progress=False)  # fmt: skip
    assert out.fit is not None and out.fit.steps == 2
    with pytest.raises(ValueError, match="prompts alone need the teacher's answers first"):
        potstill.distill(teacher, student, Dataset.from_list([{"prompt": "hi"}]), tokenizer=tok)
