"""Causal-LM training data: prompt/response pairs formatted with the model's chat template (or
as plain text) and tokenized together with the prompt length, so losses read only the response."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from ..data.prompts import iter_jsonl
from ..data.sources import load_rows
from ..data.tensors import TensorDictDataset, make_batch
from ..io import CHECK_KEY, record_check

log = logging.getLogger("potstill")

Format = Literal["chat", "text"]


@dataclass(frozen=True)
class LMExample:
    """One training example: the user's ``prompt`` (may be empty) and the ``response`` the
    model should produce. Only the response's tokens are predicted by the losses."""

    prompt: str
    response: str


def fortune_examples(
    folder: str | Path | None = None,
    *,
    prompt: str = "Tell me a fortune about {category}.",
    min_chars: int = 20,
    max_chars: int = 400,
) -> list[LMExample]:
    """Debian's fortunes as examples: the prompt names the entry's category (``{category}`` in
    ``prompt`` becomes the file name, e.g. ``computers``), the response is the fortune."""
    if "{" in prompt.replace("{category}", ""):
        raise ValueError(f"data.prompt may hold only the field {{category}}, got {prompt!r}")
    rows = load_rows("fortunes", folder=folder, min_chars=min_chars, max_chars=max_chars)["all"]
    return [
        LMExample(prompt.replace("{category}", category), text)
        for category, text in zip(rows.column("category"), rows.column("text"), strict=True)
    ]


def first_fit(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit bin packing in order: each item goes into the first row (in opening order) with
    room for it, else opens a new row; returns the rows as lists of item indices.

    A max segment tree over the rows' free room finds that row in O(log n) steps (the plain
    scan over open rows is quadratic: minutes for 100k examples); the rows are the same.
    """
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    room = [0] * (2 * size)  # leaves size.. : each row's free room; a row not yet opened: width
    room[size : size + len(lengths)] = [width] * len(lengths)
    for node in range(size - 1, 0, -1):
        room[node] = max(room[2 * node], room[2 * node + 1])
    rows: list[list[int]] = []
    for i, n in enumerate(lengths):
        if n > room[1]:
            raise ValueError(f"item {i} of length {n} does not fit a row of {width}")
        node = 1
        while node < size:  # down to the leftmost row with room >= n
            node = 2 * node if room[2 * node] >= n else 2 * node + 1
        r = node - size
        if r == len(rows):
            rows.append([])
        rows[r].append(i)
        room[node] -= n
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return rows


def trained_tokens(data: Dataset) -> int:
    """How many tokens of a causal-LM dataset are trained: those whose label is not -100, or,
    without labels, every token after each row's prompt."""
    if not isinstance(data, TensorDictDataset):
        return data.trained_tokens()  # type: ignore[attr-defined]
    t = data.tensors
    if "labels" in t:
        return int((t["labels"] != -100).sum())
    return int((t["attention_mask"].sum(1) - t["prompt_length"]).sum())


def in_memory(data: Dataset) -> TensorDictDataset:
    """A token dataset's rows as one in-memory dataset (a token table read whole)."""
    if isinstance(data, TensorDictDataset):
        return data
    batch = make_batch(data, torch.arange(len(data)))  # type: ignore[arg-type]
    batch.pop("index")
    return TensorDictDataset(batch, trim_by="attention_mask")


def pack_examples(data: Dataset, max_length: int | None = None) -> TensorDictDataset:
    """Short examples packed into rows of at most ``max_length`` tokens (default: the data's
    width), first fit in order, so batches carry far less padding.

    A row holds ``input_ids``, ``attention_mask`` (1 on real tokens), ``position_ids`` (from 0
    in each example), ``segment`` (1, 2, … per example; 0 on padding) and ``labels`` (the ids,
    with -100 on every prompt token and on each example's first token, so no loss crosses an
    example's start). :func:`~potstill.llm.forward.causal_lm_forward` turns ``segment`` into a
    block-diagonal causal mask: each example sees only itself, as unpacked.
    """
    data = in_memory(data)  # packing rewrites every row: it holds them
    width = max_length or int(data.tensors["input_ids"].shape[1])
    lengths = data.tensors["attention_mask"].sum(1).tolist()
    if max(lengths) > width:
        raise ValueError(f"an example has {max(lengths)} tokens, more than max_length={width}")
    rows = first_fit(lengths, width)
    shape = (len(rows), width)
    out = {
        "input_ids": torch.zeros(shape, dtype=torch.long),
        "attention_mask": torch.zeros(shape, dtype=torch.long),
        "position_ids": torch.zeros(shape, dtype=torch.long),
        "segment": torch.zeros(shape, dtype=torch.long),
        "labels": torch.full(shape, -100, dtype=torch.long),
    }
    ids, prompts = data.tensors["input_ids"], data.tensors["prompt_length"]
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members, 1):
            n, p = int(lengths[i]), int(prompts[i])
            span = slice(at, at + n)
            out["input_ids"][r, span] = ids[i, :n]
            out["attention_mask"][r, span] = 1
            out["position_ids"][r, span] = torch.arange(n)
            out["segment"][r, span] = s
            out["labels"][r, at + max(p, 1) : at + n] = ids[i, max(p, 1) : n]
            at += n
    return TensorDictDataset(out, trim_by="attention_mask")


def pad_id(tokenizer: Any) -> int:
    """The id that pads token rows: the tokenizer's pad token, else its EOS token, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def right_pad(
    rows: Sequence[Sequence[int]], pad_token_id: int, dtype: torch.dtype = torch.long
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as ``(input_ids, attention_mask)`` of shape ``(len(rows), longest)``, padded on
    the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(list(row), dtype=dtype)
        mask[b, : len(row)] = 1
    return ids, mask


def _one_turn(messages: Any, where: str) -> str:
    """The user's message of a one-turn chat ``[{role: user, content}]``."""
    if (
        isinstance(messages, list) and len(messages) == 1 and isinstance(messages[0], dict)
        and messages[0].get("role") == "user" and "content" in messages[0]
    ):  # fmt: skip
        return str(messages[0]["content"])
    raise ValueError(
        f"{where}: 'messages' here must be one user turn; a conversation with a system "
        "message or several turns is read by a causal-lm recipe (data.source, style: chat)"
    )


def read_jsonl_examples(path: str | Path) -> list[LMExample]:
    """Examples from a JSON Lines file: one object per line with ``prompt`` and ``response``,
    or ``text`` alone (an empty prompt); the answers ``potstill generate`` writes (``prompt``
    or a one-turn ``messages``, and ``answer``) too, each line's check verified. Errors name
    the file and line."""
    examples = []
    for n, record in iter_jsonl(path):
        where = f"{path}:{n}"
        key = "response" if "response" in record else "answer" if "answer" in record else None
        if CHECK_KEY in record and record_check(record) != record[CHECK_KEY]:
            raise ValueError(f"{where}: the line differs from its check (a damaged answer line)")
        if "text" in record and key is None:
            examples.append(LMExample("", str(record["text"])))
        elif key is not None:
            prompt = record.get("prompt")
            if prompt is None and "messages" in record:
                prompt = _one_turn(record["messages"], where)
            examples.append(LMExample(str(prompt or ""), str(record[key])))
        else:
            raise ValueError(
                f"{where}: needs 'prompt' and 'response' (or 'answer', as potstill generate "
                f"writes, or 'text'), has {sorted(record)}"
            )
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def _chat(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    # the template writes the special tokens as text; adding them again would double a BOS
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(
    tokenizer: Any, prompt: str, fmt: Format = "chat", system: str | None = None
) -> list[int]:
    """The token ids a model is given to answer ``prompt``: in ``chat`` format the chat template
    with the generation prompt (and ``system`` message when given), in ``text`` format the
    tokenized prompt (with the tokenizer's own special tokens, e.g. a BOS)."""
    if fmt == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "data.format is 'chat' but the tokenizer has no chat template; use "
                "format: text, or a tokenizer that has one"
            )
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return _chat(tokenizer, messages, generation_prompt=True)
    # an empty prompt still gives what the tokenizer puts before any text (a BOS, or nothing)
    return list(tokenizer(prompt)["input_ids"])


def encode_example(
    tokenizer: Any, example: LMExample, fmt: Format = "chat", system: str | None = None
) -> tuple[list[int], int]:
    """``(ids, prompt_length)``: the whole example's token ids and how many of them belong to
    the prompt. In ``chat`` format the conversation (system, user, assistant) goes through the
    chat template, whose tokens must begin with the prompt's; in ``text`` format the response's
    tokens (tokenized on their own) follow the prompt's and end with the EOS token."""
    head = prompt_ids(tokenizer, example.prompt, fmt, system)
    if fmt == "text":
        # prompt and response tokenized apart: a BPE merge across the boundary (a trailing
        # space joining the response's first word) cannot blur which tokens are the prompt's
        ids = head + list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return ids, len(head)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": example.prompt},
        {"role": "assistant", "content": example.response},
    ]
    ids = _chat(tokenizer, messages, generation_prompt=False)
    if ids[: len(head)] != head:
        raise ValueError(
            f"the chat template's tokens for the conversation do not begin with those of the "
            f"prompt alone ({head[-5:]} vs {ids[len(head) - 5 : len(head)]} at the boundary), "
            "so the prompt cannot be masked; use format: text or another chat template"
        )
    return ids, len(head)


def tokenize_examples(
    examples: Sequence[LMExample],
    tokenizer: Any,
    max_length: int,
    *,
    fmt: Format = "chat",
    system: str | None = None,
) -> TensorDictDataset:
    """Examples as a dataset of ``input_ids``, ``attention_mask`` (right padding to
    ``max_length``, batches trimmed to their longest row) and ``prompt_length``.

    A response that does not fit is cut at ``max_length`` tokens (the count is logged); an
    example whose prompt leaves no room for a response token raises ValueError.
    """
    if not examples:
        raise ValueError("no examples to tokenize")
    pad = pad_id(tokenizer)
    ids = torch.full((len(examples), max_length), pad, dtype=torch.long)
    mask = torch.zeros((len(examples), max_length), dtype=torch.long)
    prompt_len = torch.zeros(len(examples), dtype=torch.long)
    cut = 0
    for i, example in enumerate(examples):
        row, n_prompt = encode_example(tokenizer, example, fmt, system)
        if n_prompt >= max_length:
            raise ValueError(
                f"data.max_length={max_length} leaves no room for the response: the prompt "
                f"{example.prompt!r} alone is {n_prompt} tokens"
            )
        if len(row) > max_length:
            cut += 1
            row = row[:max_length]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        prompt_len[i] = n_prompt
    if cut:
        log.info(
            "%d of %d examples were longer than data.max_length=%d tokens and were cut",
            cut, len(examples), max_length,
        )  # fmt: skip
    return TensorDictDataset(
        {"input_ids": ids, "attention_mask": mask, "prompt_length": prompt_len},
        trim_by="attention_mask",
    )
