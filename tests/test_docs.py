"""The docs' Python samples run: every ```python block of README.md and docs/*.md is marked
``<!-- docs-test: run -->`` (self-contained), ``<!-- docs-test: setup=NAME -->`` (run after the
setup NAME below has defined the names the text talks about: small real models and data) or
``<!-- docs-test: skip (why) -->``; an unmarked block fails this test."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"(?:<!-- docs-test: (?P<marker>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S
)


def blocks() -> list[tuple[str, int, str | None, str]]:
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in BLOCK.finditer(text):
            line = text[: m.start("code")].count("\n")
            out.append((path.name, line, m.group("marker"), m.group("code")))
    return out


def _logits(request) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "student_logits": torch.randn(4, 10, generator=g).requires_grad_(),
        "teacher_logits": torch.randn(4, 10, generator=g),
        "labels": torch.tensor([1, 2, -100, 3]),
        "mask": torch.tensor([True, True, False, True]),
    }


def _view(request) -> dict[str, Any]:
    from potstill.signal import Signal, StudentView

    g = torch.Generator().manual_seed(1)
    return {
        "student_view": StudentView(logits=torch.randn(4, 10, generator=g).requires_grad_()),
        "signal": Signal(logits=torch.randn(4, 10, generator=g)),
        "batch": {"label": torch.tensor([1, 2, -100, 3]), "index": torch.arange(4)},
    }


def _classifiers(request) -> dict[str, Any]:
    from conftest import make_mlp

    from potstill.data.splits import load_splits
    from potstill.losses.terms import hinton_objective

    splits = load_splits("digits", val_size=200)
    return {
        "train_set": splits.train, "val_set": splits.val, "teacher": make_mlp([64], seed=1),
        "assistant": make_mlp([24], seed=2), "student": make_mlp([8], seed=3),
        "objective": hinton_objective(4.0, 0.7),
    }  # fmt: skip


def _bert(request, layers: int = 12) -> dict[str, Any]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=32,
                        attn_implementation="eager")  # fmt: skip
    model = BertModel(config).eval()
    return {"bert": model, "teacher": model, "input_ids": torch.randint(0, 50, (2, 7))}


def _token_teacher(request) -> dict[str, Any]:
    from test_llm_pipeline import tiny_llama

    from potstill.llm import causal_lm_forward, fortune_examples, tokenize_examples

    tok = request.getfixturevalue("tok")
    train = tokenize_examples(fortune_examples()[:8], tok, 40, fmt="chat")
    return {"teacher": tiny_llama(len(tok), seed=1), "tok": tok, "train": train,
            "causal_lm_forward": causal_lm_forward, "torch": torch}  # fmt: skip


def _causal_lm(request) -> dict[str, Any]:
    from test_llm_pipeline import tiny_llama

    tok = request.getfixturevalue("tok")
    return {"teacher": tiny_llama(len(tok), seed=1, layers=4), "tokenizer": tok}


SETUPS = {
    "logits": _logits,
    "view": _view,
    "classifiers": _classifiers,
    "bert": _bert,
    "bert6": lambda request: _bert(request, 6),
    "token-teacher": _token_teacher,
    "causal-lm": _causal_lm,
}


def test_every_python_block_is_run_or_says_why_not():
    for doc, line, marker, _ in blocks():
        assert marker is not None, f"{doc}:{line}: mark the block run, setup=NAME or skip (why)"
        assert (
            marker == "run"
            or marker.startswith("skip (")
            or (marker.startswith("setup=") and marker[len("setup=") :] in SETUPS)
        ), f"{doc}:{line}: unknown marker {marker!r}"
    # the guide's samples all run
    assert all(not m.startswith("skip") for d, _, m, _ in blocks() if d == "guide.md")


@pytest.mark.parametrize(
    ("doc", "line", "marker", "code"),
    [b for b in blocks() if b[2] and not b[2].startswith("skip")],
    ids=[f"{b[0]}:{b[1]}" for b in blocks() if b[2] and not b[2].startswith("skip")],
)
def test_doc_sample_runs(doc, line, marker, code, request, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # samples write their run folders and caches here
    namespace: dict[str, Any] = {"__name__": "docs_sample"}
    if marker.startswith("setup="):
        namespace.update(SETUPS[marker[len("setup=") :]](request))
    exec(compile(code, f"{doc}:{line}", "exec"), namespace)
