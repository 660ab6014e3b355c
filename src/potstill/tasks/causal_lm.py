"""The causal-LM task: a batch holds ``input_ids``, ``attention_mask`` (and a ``prompt_length``:
only response tokens are predicted), the model's output is its next-token logits (or the last
hidden state and the head, fused with the token divergences), the figures are held-out
perplexity, top-1 agreement and KL to the teacher, size, forward and generation speed, and the
student is exported as a plain Hugging Face folder with its tokenizer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from ..evaluate import file_size
from ..hf import export_pretrained
from ..llm.evaluate import (
    answer_tokens,
    forward_tokens_per_s,
    greedy_generations,
    lm_figures,
    rouge_l,
    teacher_log_likelihood,
)
from ..llm.forward import causal_lm_forward
from ..models import count_parameters
from . import Task


def size_row(model: nn.Module) -> dict[str, Any]:
    """A causal LM's parameters, layers, width and file size."""
    return {
        "parameters": count_parameters(model),
        "layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
        "file_bytes": file_size(model),
    }


def metrics(
    models: Mapping[str, nn.Module],
    data: Dataset,
    *,
    teacher: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]] = (),
    max_new_tokens: int = 40,
    batch_size: int = 8,
) -> dict[str, dict[str, Any]]:
    """Each model's held-out figures against the teacher in one pass over ``data`` (perplexity,
    top-1 agreement, KL), its size, forward tokens/s at ``batch_size``, and its greedy
    continuations of ``prompts`` (``generations``, with their tokens/s)."""
    figures = lm_figures(models, data, teacher=teacher, batch_size=batch_size)
    rows = {}
    for name, model in models.items():
        texts, speed = greedy_generations(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        rows[name] = {
            **figures[name],
            **size_row(model),
            "forward_tokens_per_s": forward_tokens_per_s(model, data, batch_size),
            "generate_tokens_per_s": speed,
            "generations": texts,
        }
    return rows


def answer_metrics(
    models: Mapping[str, nn.Module],
    teacher: nn.Module,
    tok: Any,
    heldout: dict[str, Any],
    *,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Each model's greedy answers to the held-out prompts: the teacher's mean log-probability
    per answer token, ROUGE-L against the teacher's own greedy answers, mean length; and the
    first answers for the report. The teacher's own answers are those it gave when the
    references were generated (read back as ids, not generated again)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = tok.eos_token_id
    rows, shown = {}, {}
    for name, model in models.items():
        if model is teacher and heldout.get("teacher_answers") is not None:
            answers = heldout["teacher_answers"]  # generated greedily with the references
        else:
            answers = answer_tokens(
                model, heldout["ids"], pad_token_id=pad, eos_token_id=eos,
                max_new_tokens=heldout["max_new_tokens"], batch_size=batch_size,
            )  # fmt: skip
        logp, count = teacher_log_likelihood(
            teacher, heldout["ids"], answers, pad_token_id=pad, batch_size=batch_size
        )
        texts = [tok.decode(x, skip_special_tokens=True).strip() for x in answers]
        rows[name] = {
            "answer_teacher_logp": logp,
            "answer_rouge_l": rouge_l(texts, heldout["references"]),
            "answer_tokens": count / max(len(answers), 1),
        }
        shown[name] = texts[:4]
    return {"prompts": heldout["texts"][:4], "answers": shown, "rows": rows}


def export(model: nn.Module, folder: Path, *, tokenizer: Any = None) -> Path:
    """A plain Hugging Face folder (safetensors, config, tokenizer)."""
    return export_pretrained(model, folder, tokenizer=tokenizer)


TASK = Task(
    name="causal-lm",
    tokens=True,
    student_forward=causal_lm_forward,
    teacher_forward=causal_lm_forward,
    metrics=metrics,
    export=export,
)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers causal LM (``...ForCausalLM``)."""
    return type(model).__name__.endswith("ForCausalLM") and hasattr(model, "config")


def api_datasets(
    teacher: nn.Module,
    tables: Mapping[str, Any],
    *,
    tokenizer: Any = None,
    columns: Mapping[str, str] | None = None,
    max_length: int = 256,
) -> dict[str, Dataset]:
    """What ``potstill.distill`` needs to train a causal LM on rows of named fields: each table
    as token rows in the style its columns call for (a ``text`` corpus in windows; ``messages``
    or prompt + response trained as given), tokenized by the teacher's tokenizer (the student
    must share it)."""
    from ..data.tables import as_table
    from ..llm.data import pad_id
    from ..llm.user_data import infer_style, style_columns, token_dataset, token_rows
    from .text_classifier import model_tokenizer

    cols = dict(columns or {})
    tok = model_tokenizer(teacher, tokenizer, "teacher")
    out = {}
    for split, data in tables.items():
        table = as_table(data, f"{split} data")
        names = list(table.column_names)
        style = infer_style(names, cols)
        if style == "prompts":
            raise ValueError(
                f"{split} data: prompts alone need the teacher's answers first; use a "
                "causal-lm recipe (potstill distill), which generates them, or give responses"
            )
        found = style_columns(style, names, cols, "columns")
        rows, counts = token_rows(table, tok, style, found, max_length=max_length)
        counts.note(f"{split} data")
        out[split] = token_dataset(rows, pad_id(tok))
    return out
