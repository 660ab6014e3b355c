"""Teacher answers for response distillation: prompts from JSON Lines answered in batches (the
model's chat template applied), sampled or greedy, appended to a JSONL file one batch at a time so
an interrupted run continues where it stopped and gives the same answers as an uninterrupted one."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .. import faults
from ..data.prompts import Prompt
from ..evaluate import eval_mode
from ..io import CHECK_KEY, atomic_write_bytes, record_check
from ..placement import model_device
from ..progress import Progress
from ..teachers import model_fingerprint
from .data import prompt_ids

log = logging.getLogger("potstill")


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated. ``temperature`` 0 is greedy decoding; ``n`` answers per
    prompt; ``seed`` fixes the sampling (each batch of prompts draws from its own seeded
    stream, so a resumed run samples what an uninterrupted one would)."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    n: int = 1
    seed: int = 0
    format: Literal["chat", "text"] = "chat"
    system: str | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "n": self.n >= 1,
            "batch_size": self.batch_size >= 1,
            "format": self.format in ("chat", "text"),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"generation setting {name}={getattr(self, name)!r} is invalid")
        if self.n > 1 and self.temperature == 0:
            raise ValueError("n > 1 answers per prompt need sampling: set temperature > 0")

    def sampling(self) -> dict[str, Any]:
        """What changes the answers (batch size and format excluded: the record shows them)."""
        return asdict(self)


def encode_prompt(tokenizer: Any, p: Prompt, settings: GenerationSettings) -> list[int]:
    """The ids the model is given for ``p``: the chat template with the generation prompt (and
    the settings' system message unless the messages bring their own), or the plain text."""
    if p.messages is None:
        return prompt_ids(tokenizer, p.prompt or "", settings.format, settings.system)
    if settings.format != "chat":
        raise ValueError(f"prompt {p.id}: chat messages need format 'chat'")
    messages = list(p.messages)
    if settings.system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": settings.system})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    n: int = 1,
) -> list[list[int]]:
    """The new tokens ``model`` generates after each prompt (token ids), ``n`` per prompt in
    prompt order, in one left-padded batch: greedy when ``temperature`` is 0, else sampled with
    ``top_p`` from the global torch RNG, in eval mode (the model's mode is restored after).
    Sequences that stop early are padded after their end token; cut them at it."""
    width = max(len(x) for x in prompts)
    device = model_device(model)  # generated where the model is
    input_ids = torch.tensor([[pad_token_id] * (width - len(x)) + list(x) for x in prompts],
                             device=device)  # fmt: skip
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts], device=device)
    sample = temperature > 0
    with eval_mode(model):
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            num_return_sequences=n,
            pad_token_id=pad_token_id,
        )
    return generated[:, width:].tolist()


@dataclass
class GenerationStats:
    """What one call did: prompts answered now, answers written, new tokens, seconds."""

    prompts: int
    answers: int
    new_tokens: int
    seconds: float
    skipped: int

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of generation."""
        return self.new_tokens / max(self.seconds, 1e-9)


def _damaged_line(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The record of one line and what is wrong with it (None when it is whole)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except ValueError as e:
        return None, f"not JSON ({e})"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if CHECK_KEY in record and record[CHECK_KEY] != record_check(record):
        return None, "its checksum differs (the line was changed after it was written)"
    return record, None


def _existing(out: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Records already in ``out``; a torn last line (a run killed mid-write) is cut off. A
    damaged line (not JSON, or not matching its ``check``) is an error naming it; with
    ``repair`` (the generator, which can answer again) the file is moved aside to
    ``<name>.damaged`` and the records before the damaged line are kept, to be continued."""
    if not out.exists():
        return []
    raw = out.read_bytes()
    good = raw[: raw.rfind(b"\n") + 1]
    if len(good) != len(raw):
        log.warning("%s: dropping an incomplete last line (an interrupted write)", out)
        with open(out, "r+b") as f:
            f.truncate(len(good))
    records = []
    lines = good.splitlines(keepends=True)
    for n, line in enumerate(lines, 1):
        record, why = _damaged_line(line)
        if why is None:
            records.append(record)
            continue
        where = f"{out}:{n}: {why}"
        if not repair:
            raise ValueError(f"{where}; not a potstill answers file, or a damaged one (answer "
                             "the prompts again with `potstill answer`)")  # fmt: skip
        aside = out.with_name(out.name + ".damaged")
        os.replace(out, aside)
        atomic_write_bytes(out, b"".join(lines[: n - 1]))
        log.warning(
            "%s; kept the %d records before it, moved the file aside to %s, answering the "
            "rest again", where, n - 1, aside,
        )  # fmt: skip
        return records
    return records


def _check_same_run(out: Path, first: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in ("teacher", "settings"):
        for field, value in expected[key].items():
            if key == "settings" and field == "batch_size":
                continue  # answers do not depend on it… except through the batches' seeds
            if first.get(key, {}).get(field) != value:
                raise ValueError(
                    f"{out} holds answers generated with {key}.{field}="
                    f"{first.get(key, {}).get(field)!r}, not {value!r}: continue with the same "
                    "settings, or write to another file"
                )


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    out: str | os.PathLike,
    settings: GenerationSettings | None = None,
    *,
    teacher_name: str | None = None,
    progress: bool | None = None,
) -> GenerationStats:
    """Answer ``prompts`` with ``model`` and append one JSON record per answer to ``out``:
    ``id``, ``prompt`` (or ``messages``), ``answer``, ``answer_index`` (0 … n−1), ``tokens``,
    ``answer_ids`` (the generated token ids, with the end token when the model stopped),
    ``finish`` (``stop`` at EOS, ``length`` at the token limit), ``settings``, ``teacher`` (name
    and weight fingerprint), ``check`` (the record's checksum: a changed line is detected).

    Prompts are answered in fixed batches of ``settings.batch_size`` in input order, left-padded;
    each batch is appended (and synced) as a whole. Rerunning with the same arguments skips
    batches already answered, so an interrupted run continues and gives the same file an
    uninterrupted one would; an answers file written with other settings or another teacher is
    refused with the field named.
    """
    settings = settings or GenerationSettings()
    out = Path(out)
    teacher = {"name": teacher_name, "weights_sha256": model_fingerprint(model)}
    expected = {"settings": settings.sampling(), "teacher": teacher}
    existing = _existing(out, repair=True)
    if existing:
        _check_same_run(out, existing[0], expected)
    done: dict[str, int] = {}
    for r in existing:
        done[r["id"]] = done.get(r["id"], 0) + 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    bs = settings.batch_size
    batches = [list(prompts[i : i + bs]) for i in range(0, len(prompts), bs)]
    todo = [(b, batch) for b, batch in enumerate(batches) if any(
        done.get(p.id, 0) < settings.n for p in batch
    )]  # fmt: skip
    skipped = len(prompts) - sum(len(batch) for _, batch in todo)
    if skipped:
        log.info("%s: %d prompts already answered, skipping them", out, skipped)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = Progress(
        sum(len(batch) for _, batch in todo), "teacher answers", "prompt", enabled=progress
    )
    stats = GenerationStats(0, 0, 0, 0.0, skipped)
    try:
        for b, batch in todo:
            ids = [encode_prompt(tokenizer, p, settings) for p in batch]
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(settings.seed * 1_000_003 + b)
                generated = sample_completions(
                    model, ids, pad_token_id=pad, max_new_tokens=settings.max_new_tokens,
                    temperature=settings.temperature, top_p=settings.top_p, n=settings.n,
                )  # fmt: skip
            stats.seconds += time.perf_counter() - t0
            lines = []
            for row, p in enumerate(batch):
                for j in range(settings.n):
                    new = generated[row * settings.n + j]
                    stop = new.index(eos) if eos is not None and eos in new else None
                    tokens = new[:stop] if stop is not None else new
                    stats.new_tokens += len(tokens) + (stop is not None)
                    if j < done.get(p.id, 0):
                        continue  # written before (a file edited by hand)
                    record: dict[str, Any] = {"id": p.id}
                    record.update(
                        {"prompt": p.prompt}
                        if p.messages is None
                        else {"messages": list(p.messages)}
                    )
                    record.update(
                        answer=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                        answer_index=j,
                        tokens=len(tokens),
                        # the generated ids, the end token kept when the model stopped
                        answer_ids=new[: stop + 1] if stop is not None else list(new),
                        finish="stop" if stop is not None else "length",
                        **expected,
                    )
                    record[CHECK_KEY] = record_check(record)
                    lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            with open(out, "a", encoding="utf-8") as f:
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
            faults.point("answers")
            stats.prompts += len(batch)
            stats.answers += len(lines)
            bar.update(len(batch))
            bar.set_postfix({"tok/s": f"{stats.tokens_per_s:.1f}"})
    finally:
        bar.close()
    return stats


def read_answers(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of an answers file written by :func:`generate_answers` (or by hand: records
    without ``check`` are taken as they are); ValueError naming the line of a damaged one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"answers file {path} does not exist")
    return _existing(path)


__all__ = [
    "GenerationSettings",
    "GenerationStats",
    "encode_prompt",
    "generate_answers",
    "read_answers",
    "sample_completions",
]
