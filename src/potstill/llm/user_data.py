"""A causal LM's training data from the user's own table (:mod:`potstill.data.tables`), in one
of three styles:

- ``corpus``: a text column tokenized, each document ended by the EOS token, concatenated and
  cut into windows of ``max_length`` tokens (or, with ``windows: false``, one row per document
  cut at ``max_length``); every token is predicted.
- ``chat``: conversations trained as given — a ``messages`` column (every assistant turn is
  trained, the whole conversation kept as context), or ``prompt`` + ``response`` (or
  ``completion`` / ``answer``: a ``potstill generate`` answers file is such a table).
- ``prompts``: a ``prompt`` (or ``messages`` ending with the user) column only: the teacher
  answers first (response distillation).

Tokenization runs through ``datasets.map`` (cached on disk beside a file-backed table, reused
by later runs and by resume); what is not used (empty texts, the tail of a corpus shorter than a
window, conversations without an assistant turn) is counted and logged, never dropped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..data.rows import DataError
from ..data.tables import find_column
from ..data.tokenized import TokenRows, column_sum, tokens_in
from .data import LMExample, encode_example

if TYPE_CHECKING:
    from datasets import Dataset as Table

log = logging.getLogger("potstill")

STYLES = ("auto", "corpus", "chat", "prompts")
RESPONSE_COLUMNS = ("response", "completion", "answer", "output")
"""Columns that hold the answer of a ``prompt`` column, looked for in order."""
PROMPT_COLUMNS = ("prompt", "instruction", "question")
"""Columns that hold a prompt, looked for in order."""


@dataclass
class Counts:
    """What a table gave and what of it was not used, for the log and the results."""

    rows: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    cut: int = 0
    left_out: dict[str, int] = field(default_factory=dict)

    def note(self, where: str) -> None:
        """Log what was left out or cut."""
        for why, n in self.left_out.items():
            if n:
                log.info("%s: %d %s left out", where, n, why)
        if self.cut:
            log.info("%s: %d examples longer than max_length were cut", where, self.cut)


def infer_style(columns: Sequence[str], mapping: dict[str, str]) -> str:
    """The style a table's columns call for: ``messages`` or ``prompt`` + a response column →
    chat; ``prompt`` alone → prompts; ``text`` → corpus (``mapping`` names renamed columns)."""
    has = {f for f in ("text", "prompt", "messages", "response") if mapping.get(f, f) in columns}
    if "response" not in has and any(c in columns for c in RESPONSE_COLUMNS):
        has.add("response")
    if "messages" in has or {"prompt", "response"} <= has:
        return "chat"
    if "prompt" in has:
        return "prompts"
    if "text" in has:
        return "corpus"
    raise DataError(
        "data: cannot tell what to train on: give a text column (a corpus), messages or prompt "
        f"+ response columns (chat), or prompt alone (the teacher answers); the data has "
        f"columns: {', '.join(columns)}. Name them with data.columns"
    )


def corpus_table(
    table: Table, tokenizer: Any, text: str, *, max_length: int, windows: bool = True
) -> tuple[Table, Counts]:
    """Token rows (``input_ids``) of a text column: documents ended by EOS, concatenated and
    cut into windows of ``max_length`` within each block of 1,000 documents (the last, shorter
    window of a block is left out and counted) or, without ``windows``, one row per document
    cut at ``max_length``."""
    eos = tokenizer.eos_token_id
    counts = Counts(rows=len(table))

    def encode(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts = [t for t in rows[text] if isinstance(t, str) and t.strip()]
        docs = tokenizer(texts, add_special_tokens=False)["input_ids"]
        docs = [d + [eos] if eos is not None else d for d in docs]
        empty = len(rows[text]) - len(texts)
        if not windows:
            cut = sum(len(d) > max_length for d in docs)
            ids = [d[:max_length] for d in docs]
            return {"input_ids": ids, "empty": [empty] + [0] * (len(ids) - 1) if ids else [],
                    "cut": [cut] + [0] * (len(ids) - 1) if ids else [],
                    "tail": [0] * len(ids)}  # fmt: skip
        flat = [t for d in docs for t in d]
        n = len(flat) // max_length
        ids = [flat[i * max_length : (i + 1) * max_length] for i in range(n)]
        tail = len(flat) - n * max_length
        if not ids:  # a block shorter than one window: all of it is tail
            return {"input_ids": [], "empty": [], "cut": [], "tail": []}
        return {"input_ids": ids, "empty": [empty] + [0] * (n - 1), "cut": [0] * n,
                "tail": [tail] + [0] * (n - 1)}  # fmt: skip

    out = table.map(
        encode, batched=True, batch_size=1000, remove_columns=table.column_names,
        desc="tokenizing the corpus",
    )  # fmt: skip
    counts.examples = len(out)
    counts.left_out = {
        "empty texts": column_sum(out, "empty"),
        "tail tokens": column_sum(out, "tail"),
    }
    counts.cut = column_sum(out, "cut")
    out = out.remove_columns(["empty", "cut", "tail"])
    counts.tokens = counts.trained_tokens = tokens_in(out, "input_ids")
    return out, counts


def conversation(row: dict[str, Any], cols: dict[str, str], system: str | None) -> list[dict]:
    """A row's conversation as chat messages: its ``messages`` (plus the answer column's text as
    the last assistant turn when there is one: an answers file), or prompt and response."""
    if cols.get("messages"):
        messages = [dict(m) for m in row[cols["messages"]]]
        answer = row.get(cols["response"]) if cols.get("response") else None
        if answer is not None and messages and messages[-1].get("role") == "user":
            messages.append({"role": "assistant", "content": str(answer)})
    else:
        messages = [
            {"role": "user", "content": str(row[cols["prompt"]])},
            {"role": "assistant", "content": str(row[cols["response"]])},
        ]
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_ids(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of a whole conversation through the chat template: ``labels`` are the
    ids on every assistant turn's tokens and -100 elsewhere. Each turn's tokens are found as
    the difference between the conversation rendered up to it (with the generation prompt) and
    through it; a template for which these are not prefixes of one another is refused."""
    ids = _render(tokenizer, messages, False)
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        through = _render(tokenizer, messages[: i + 1], False)
        if ids[: len(through)] != through or through[: len(before)] != before:
            raise DataError(
                "the chat template does not render a conversation as the prefix of its longer "
                "turns, so the assistant's tokens cannot be found; use prompt/response data "
                "with format: text"
            )
        labels[len(before) : len(through)] = through[len(before) :]
    return ids, labels


def chat_table(
    table: Table,
    tokenizer: Any,
    cols: dict[str, str],
    *,
    max_length: int,
    fmt: str = "chat",
    system: str | None = None,
) -> tuple[Table, Counts]:
    """Token rows (``input_ids``, ``labels``: -100 on what is not trained) of conversations
    trained as given: every assistant turn of ``messages``, or the response of a prompt; cut at
    ``max_length`` (counted); rows without an assistant turn are left out and counted."""
    counts = Counts(rows=len(table))
    if fmt == "chat" and getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "data.format is chat but the tokenizer has no chat template; use format: text"
        )

    def encode(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "skip": [], "cut": []}
        for i in range(len(next(iter(rows.values())))):
            row = {k: v[i] for k, v in rows.items()}
            if fmt == "text" and not cols.get("messages"):
                ex = LMExample(str(row[cols["prompt"]]), str(row[cols["response"]]))
                ids, n_prompt = encode_example(tokenizer, ex, "text", system)
                labels = [-100] * n_prompt + ids[n_prompt:]
            else:
                messages = conversation(row, cols, system)
                if not any(m.get("role") == "assistant" for m in messages):
                    out["skip"].append(1)
                    out["input_ids"].append([])
                    out["labels"].append([])
                    out["cut"].append(0)
                    continue
                ids, labels = chat_ids(tokenizer, messages)
            out["cut"].append(int(len(ids) > max_length))
            out["input_ids"].append(ids[:max_length])
            out["labels"].append(labels[:max_length])
            out["skip"].append(0)
        return out

    mapped = table.map(
        encode, batched=True, remove_columns=table.column_names, desc="tokenizing conversations"
    )
    skipped = column_sum(mapped, "skip")
    counts.cut = column_sum(mapped, "cut")
    mapped = mapped.filter(
        lambda r: [s == 0 and any(x != -100 for x in lab) for s, lab in zip(r["skip"],
                   r["labels"], strict=True)], batched=True,
    )  # fmt: skip
    counts.left_out = {
        "conversations without an assistant turn": skipped,
        "conversations whose answer lies past max_length": counts.rows - skipped - len(mapped),
    }
    out = mapped.remove_columns(["skip", "cut"])
    counts.examples = len(out)
    counts.tokens = tokens_in(out, "input_ids")
    counts.trained_tokens = tokens_in(out, "labels", not_equal=-100)
    return out, counts


def style_columns(
    style: str, names: Sequence[str], given: dict[str, str], where: str = "data.source"
) -> dict[str, str]:
    """The columns a style reads among ``names``: those named in ``given``, or found under
    their usual names; DataError naming ``where`` and the columns there are otherwise."""

    def pick(field: str, candidates: tuple[str, ...], required: bool = True) -> str | None:
        if field in given or required:
            return find_column(list(names), field, given.get(field), candidates, where)
        return next((c for c in candidates if c in names), None)

    if style == "corpus":
        return {"text": pick("text", ("text", "content", "document"))}  # type: ignore[dict-item]
    messages = pick("messages", ("messages", "conversation"), False)
    if style == "prompts":
        if messages is not None:
            return {"messages": messages}
        return {"prompt": pick("prompt", PROMPT_COLUMNS)}  # type: ignore[dict-item]
    out = {"messages": messages, "response": pick("response", RESPONSE_COLUMNS, messages is None)}
    if messages is None:
        out["prompt"] = pick("prompt", PROMPT_COLUMNS)
    return {k: v for k, v in out.items() if v}


def token_rows(
    table: Table,
    tokenizer: Any,
    style: str,
    cols: dict[str, str],
    *,
    max_length: int,
    windows: bool = True,
    fmt: str = "chat",
    system: str | None = None,
) -> tuple[Table, Counts]:
    """A table's token rows in its style (``corpus`` or ``chat``; ``prompts`` need the
    teacher's answers first): :func:`corpus_table` or :func:`chat_table` on ``cols``."""
    if style == "corpus":
        return corpus_table(table, tokenizer, cols["text"], max_length=max_length, windows=windows)
    if style == "chat":
        return chat_table(table, tokenizer, cols, max_length=max_length, fmt=fmt, system=system)
    raise ValueError(f"style {style!r} has no token rows of its own (prompts: answer them first)")


def token_dataset(table: Table, pad_token_id: int, limit: int | None = None) -> TokenRows:
    """The first ``limit`` token rows of a table (all of them by default) as a causal-LM
    dataset read a batch at a time from the table on disk (:class:`TokenRows`):
    ``input_ids``, ``attention_mask`` (right padding, each batch to its longest row), and
    ``labels`` and ``prompt_length`` (the first trained position) when the rows have labels."""
    n = len(table) if limit is None else min(limit, len(table))
    return TokenRows(table if n == len(table) else table.select(range(n)), pad_token_id)
