"""Prompts as a data source: a JSON Lines file of ``{"prompt"}`` or ``{"messages"}`` records
(with an optional ``id``), read line by line with errors that name the file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .rows import Rows


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-empty line of a JSON Lines file; ValueError naming
    the file and line for a line that is not a JSON object."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: expected an object, got {type(record).__name__}")
            yield n, record


@dataclass(frozen=True)
class Prompt:
    """One prompt: ``prompt`` text, or a chat ``messages`` list ending with the user's turn."""

    id: str
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    def text(self) -> str:
        """The user's last message (or the prompt)."""
        return self.prompt if self.messages is None else self.messages[-1]["content"]


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Prompts from JSON Lines: ``{"prompt": ...}`` or ``{"messages": [...]}`` per line, with an
    optional ``"id"`` (default: the line number). Errors name the file and line."""
    prompts, seen = [], set()
    for n, record in iter_jsonl(path):
        if "prompt" not in record and "messages" not in record:
            raise ValueError(f"{path}:{n}: needs 'prompt' or 'messages'")
        pid = str(record.get("id", n))
        if pid in seen:
            raise ValueError(f"{path}:{n}: id {pid!r} appears twice")
        seen.add(pid)
        messages = record.get("messages")
        if messages is None:
            prompts.append(Prompt(pid, prompt=str(record["prompt"])))
            continue
        if not (
            isinstance(messages, list)
            and messages
            and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages)
            and messages[-1]["role"] == "user"
        ):
            raise ValueError(
                f"{path}:{n}: messages must be a list of {{role, content}} ending with the "
                "user's turn"
            )
        prompts.append(Prompt(pid, messages=tuple(dict(m) for m in messages)))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def prompt_rows(path: str | os.PathLike) -> dict[str, Rows]:
    """A prompts file as a data source: ``all`` rows with the columns ``id`` and ``prompt`` (a
    :class:`Prompt`: text, or chat messages)."""
    prompts = read_prompts(path)
    return {"all": Rows({"id": [p.id for p in prompts], "prompt": prompts}, str(path))}
