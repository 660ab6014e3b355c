"""What a causal-LM run reads: its teacher and tokenizer, the student before training, the
tokenized training and held-out data (prompt data answered by the teacher first), and the
teacher cache of the training data (filled when missing); ``potstill cache RECIPE`` uses the
same pieces."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import AutoConfig

from .. import distributed
from ..assets import resolve
from ..cache import CachedTeacher, CacheStatus, Encoding, cache_status, write_cache
from ..data.prompts import Prompt
from ..data.rows import DataError
from ..data.sources import load_rows
from ..data.tables import load_table_splits
from ..hf import check_same_tokenization, load_model, load_tokenizer
from ..llm.answers import GenerationSettings, encode_prompt, generate_answers, read_answers
from ..llm.data import LMExample, fortune_examples, pad_id, tokenize_examples
from ..llm.forward import causal_lm_forward
from ..llm.user_data import infer_style, style_columns, token_dataset, token_rows
from ..recipe.causal_lm import LMCacheSpec, LMRecipe
from ..students import derive
from .folder import teacher_load_options

log = logging.getLogger("potstill")

NO_ANSWERS = (
    "its prompts need the local teacher to answer them first, and a cache filled from "
    "teacher.server loads none (a server gives log-probabilities, not answers): let "
    "`potstill distill` answer them, or give prompt/response rows"
)


def initial_student(
    recipe: LMRecipe, teacher: torch.nn.Module, tok: Any
) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """The recipe's student before training, the model it comes from and that model's name:
    ``student.keep``/``layers`` of ``student.model`` (default: the teacher) with weights copied,
    or ``student.model`` itself. A student model must share the teacher's tokenization."""
    spec = recipe.student
    if spec.model is None or spec.model == recipe.teacher.model:
        base, s_name = teacher, recipe.teacher.model
    else:
        s_name = spec.model
        s_path = resolve(spec.model)
        base = load_model(
            s_path, "causal-lm", dtype=spec.dtype, trust_remote_code=spec.trust_remote_code
        )
        s_tok = load_tokenizer(s_path, trust_remote_code=spec.trust_remote_code)
        check_same_tokenization(tok, s_tok)
    torch.manual_seed(recipe.seed)
    init = derive(base, keep=spec.keep, layers=spec.layers) if spec.keep or spec.layers else None
    if init is None:
        if base is teacher:
            raise ValueError(
                "student: give keep or layers to derive a student from the teacher, or another "
                "model sharing its tokenizer"
            )
        init = base
    return init, base, s_name


def served_teacher(recipe: LMRecipe) -> Any:
    """The recipe's served teacher (``teacher.server``), checked to serve its model; None
    when the teacher is not served."""
    spec = recipe.teacher.server
    if spec is None:
        return None
    from ..served import ServedTeacher

    teacher = ServedTeacher(
        spec.url, spec.model or recipe.teacher.model, top_k=spec.top_k,
        api_key_env=spec.api_key_env, timeout=spec.timeout, retries=spec.retries,
        concurrency=spec.concurrency, request_size=spec.request_size,
    )  # fmt: skip
    teacher.check()
    log.info("teacher: served by %s as %s, top %d per position", teacher.url, teacher.model,
             teacher.k)  # fmt: skip
    return teacher


def load_lm_teacher(recipe: LMRecipe) -> tuple[torch.nn.Module, Any]:
    """The recipe's teacher model and its tokenizer."""
    t_path = resolve(recipe.teacher.model)
    teacher = load_model(
        t_path,
        "causal-lm",
        dtype=recipe.teacher.dtype,
        trust_remote_code=recipe.teacher.trust_remote_code,
        **teacher_load_options(recipe.teacher),
    )
    return teacher, load_tokenizer(t_path, trust_remote_code=recipe.teacher.trust_remote_code)


def lm_datasets(
    recipe: LMRecipe,
    tok: Any,
    *,
    teacher: torch.nn.Module | None = None,
    run_dir: Path | None = None,
) -> tuple[Dataset, Dataset, dict[str, Any] | None]:
    """The recipe's tokenized training and held-out data (shuffled with the recipe's seed), and
    for prompt data the held-out prompts with the teacher's greedy answers (else None).

    Prompt data (``instructions``, ``prompts``) needs ``teacher`` and ``run_dir``: the teacher's
    answers are generated into ``run_dir/answers/`` first (an interrupted run continues there).
    """
    d = recipe.data
    if d.source is not None:
        return _source_datasets(recipe, tok, teacher=teacher, run_dir=run_dir)
    if d.name != "fortunes":
        if teacher is None or run_dir is None:
            raise ValueError(f"data.name: {d.name}: {NO_ANSWERS}")
        return _prompt_datasets(recipe, tok, teacher, run_dir)
    examples = fortune_examples(d.folder, prompt=d.prompt, max_chars=d.max_chars)
    random.Random(recipe.seed).shuffle(examples)
    if d.train + d.val > len(examples):
        raise ValueError(f"data: train + val = {d.train + d.val} but only {len(examples)} texts")
    fmt = {"fmt": d.format, "system": d.system}
    train = tokenize_examples(examples[: d.train], tok, d.max_length, **fmt)
    val = tokenize_examples(examples[d.train : d.train + d.val], tok, d.max_length, **fmt)
    return train, val, None


def _prompt_datasets(
    recipe: LMRecipe,
    tok: Any,
    teacher: torch.nn.Module,
    run_dir: Path,
    prompts: tuple[list[Prompt], list[Prompt]] | None = None,
) -> tuple[Dataset, Dataset, dict[str, Any]]:
    d, a = recipe.data, recipe.data.answers
    if prompts is not None:
        train_p, val_p = prompts
    elif d.name == "instructions":
        rows = load_rows("instructions")
        train_p = [
            Prompt(f"train-{i}", prompt=t) for i, t in enumerate(rows["train"].column("prompt"))
        ]
        val_p = [Prompt(f"val-{i}", prompt=t) for i, t in enumerate(rows["val"].column("prompt"))]
    else:
        assert d.prompts is not None
        every = list(load_rows("prompts", path=d.prompts)["all"].column("prompt"))
        random.Random(recipe.seed + 1).shuffle(every)
        val_p, train_p = every[: d.val], every[d.val :]
    random.Random(recipe.seed).shuffle(train_p)
    if prompts is not None:  # the user's data: all of it unless the recipe caps it
        n_train = d.train if "train" in d.model_fields_set else len(train_p)
        n_val = d.val if "val" in d.model_fields_set else len(val_p)
        train_p, val_p = train_p[:n_train], val_p[:n_val]
    if d.train > len(train_p) or d.val > len(val_p):
        raise ValueError(
            f"data: train {d.train} / val {d.val} but only {len(train_p)} / {len(val_p)} prompts"
        )
    train_p, val_p = train_p[: d.train], val_p[: d.val]
    sampled = GenerationSettings(
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
        format=d.format, system=d.system, batch_size=a.batch_size,
    )  # fmt: skip
    greedy = dataclasses.replace(sampled, temperature=0.0)
    folder = run_dir / "answers"
    by_split = {}
    val_ids: list[list[int]] | None = None
    for split, prompts, settings in (("train", train_p, sampled), ("val", val_p, greedy)):
        out = folder / f"{split}.jsonl"
        with distributed.main_first():  # rank 0 answers; the others then find the answers done
            generate_answers(
                teacher, tok, prompts, out, settings, teacher_name=recipe.teacher.model
            )
        records = {r["id"]: r for r in read_answers(out)}
        by_split[split] = [LMExample(p.text(), records[p.id]["answer"]) for p in prompts]
        if split == "val":  # the teacher's greedy answers as ids (files from before: None)
            ids = [records[p.id].get("answer_ids") for p in val_p]
            val_ids = None if any(x is None for x in ids) else ids
    fmt = {"fmt": d.format, "system": d.system}
    train = tokenize_examples(by_split["train"], tok, d.max_length, **fmt)
    val = tokenize_examples(by_split["val"], tok, d.max_length, **fmt)
    heldout = {
        "texts": [p.text() for p in val_p],
        "ids": [encode_prompt(tok, p, greedy) for p in val_p],
        "references": [e.response for e in by_split["val"]],
        "max_new_tokens": a.max_new_tokens,
        "teacher_answers": val_ids,
    }
    return train, val, heldout


def _source_datasets(
    recipe: LMRecipe, tok: Any, *, teacher: torch.nn.Module | None, run_dir: Path | None
) -> tuple[Dataset, Dataset, dict[str, Any] | None]:
    """The recipe's own data (``data.source``) in its style: a corpus in windows, conversations
    as given, or prompts the teacher answers first; the validation split carved unless given."""
    d = recipe.data
    assert d.source is not None
    tables = load_table_splits(**d.source.source_options(), seed=recipe.seed, where="data.source")
    if "validation" not in tables:
        raise DataError(
            "data.source: a causal-LM run needs a validation split; give it as a file or set "
            "data.source.val_size"
        )
    cols = dict(d.source.columns)
    train_cols = list(tables["train"].column_names)
    style = d.style if d.style != "auto" else infer_style(train_cols, cols)
    on_policy = [n for n, v in recipe.variants.items() if v.on_policy > 0]
    if on_policy and style != "prompts":
        raise DataError(
            f"variants.{on_policy[0]}: on-policy sampling needs prompts; this {style} data has "
            "none (use style: prompts, or drop on_policy)"
        )
    found = style_columns(style, train_cols, cols)
    log.info("data.source: %s data (columns %s)", style, found)
    if style == "prompts":
        if teacher is None or run_dir is None:
            raise ValueError(f"data.source: {NO_ANSWERS}")
        split_prompts = tuple(
            [_prompt(f"{split}-{i}", row, found) for i, row in enumerate(tables[split])]
            for split in ("train", "validation")
        )
        return _prompt_datasets(recipe, tok, teacher, run_dir, split_prompts)  # type: ignore[arg-type]
    out = []
    for split in ("train", "validation"):
        table = tables[split].shuffle(seed=recipe.seed) if split == "train" else tables[split]
        rows, counts = token_rows(
            table, tok, style, found, max_length=d.max_length, windows=d.windows,
            fmt=d.format, system=d.system,
        )  # fmt: skip
        counts.note(f"data.source {split}")
        cap = "train" if split == "train" else "val"
        limit = getattr(d, cap) if cap in d.model_fields_set else None
        out.append(token_dataset(rows, pad_id(tok), limit))
    return out[0], out[1], None


def _prompt(pid: str, row: dict[str, Any], cols: dict[str, str]) -> Prompt:
    if "messages" in cols:
        messages = tuple(dict(m) for m in row[cols["messages"]])
        if not messages or messages[-1].get("role") != "user":
            raise DataError(f"data.source: {pid}: messages must end with the user's turn")
        return Prompt(pid, messages=messages)
    return Prompt(pid, prompt=str(row[cols["prompt"]]))


def cache_spec(recipe: LMRecipe) -> LMCacheSpec:
    """The recipe's teacher-cache settings (its defaults when the recipe trains live)."""
    return recipe.teacher.cache or LMCacheSpec()


def cache_lm_recipe(
    recipe: LMRecipe,
    path: str | Path,
    *,
    part: tuple[int, int] = (0, 1),
    progress: bool | None = None,
) -> CacheStatus:
    """Fill (this ``part`` of) the teacher cache of a recipe's training data at ``path``: what
    ``potstill cache RECIPE`` does, on one machine or as one of N."""
    c = cache_spec(recipe)
    served = served_teacher(recipe)
    if served is None:
        teacher, tok = load_lm_teacher(recipe)
        source: Any = teacher
    else:  # the server computes: only the tokenizer is loaded here
        source, teacher = served, None
        tok = load_tokenizer(
            resolve(recipe.teacher.model), trust_remote_code=recipe.teacher.trust_remote_code
        )
    try:
        train, _, _ = lm_datasets(recipe, tok, teacher=teacher, run_dir=Path(path).parent)
        return write_cache(
            source, train, path, unit="token", k=c.k,
            encoding=Encoding(logprobs=c.logprobs, compression=c.compression),
            forward=causal_lm_forward, tokenizer=tok, shard_size=c.shard_size,
            batch_size=c.batch_size, part=part, teacher_name=recipe.teacher.model,
            progress=progress, vocab_size=None if served is None else teacher_vocab(recipe, tok),
        )  # fmt: skip
    finally:
        if served is not None:
            served.close()


def teacher_vocab(recipe: LMRecipe, tok: Any) -> int:
    """The recipe teacher's vocabulary size (see :func:`config_vocab`)."""
    return config_vocab(recipe.teacher.model, tok, recipe.teacher.trust_remote_code)


def config_vocab(model: str, tok: Any, trust_remote_code: bool = False) -> int:
    """A model's vocabulary size as its config gives it (its logits' width), read without its
    weights; the tokenizer's size when the config cannot be read."""
    try:
        config = AutoConfig.from_pretrained(resolve(model), trust_remote_code=trust_remote_code)
        return int(config.vocab_size)
    except (OSError, ValueError, AttributeError) as e:
        log.warning("%s: no config to read its vocabulary size from (%s); using the "
                    "tokenizer's, %d", model, e, len(tok))  # fmt: skip
        return len(tok)


def cached_source(
    recipe: LMRecipe,
    run_dir: Path,
    teacher: torch.nn.Module,
    tok: Any,
    train: Dataset,
    served: Any = None,
) -> tuple[CachedTeacher, Dataset, dict[str, Any]]:
    """The recipe's teacher cache over ``train`` (filled first unless ``allow_incomplete``:
    by ``served``, the recipe's :class:`~potstill.served.ServedTeacher`, when given, else by
    ``teacher``), the training data it covers, and its figures for the results."""
    c = recipe.teacher.cache
    assert c is not None
    path = Path(c.path) if c.path else run_dir / "teacher-cache"
    encoding = Encoding(logprobs=c.logprobs, compression=c.compression)
    t0 = time.perf_counter()
    # write_cache checks the whole manifest against this teacher, tokenizer and data before it
    # fills anything; only a cache used as it is needs the reader to hash them
    expect: dict[str, Any] = {"k": c.k, "encoding": asdict(encoding)}
    checks: dict[str, Any] = {"tokenizer": tok, "dataset": train}
    if served is None:
        checks["teacher"] = teacher
    else:
        expect["teacher_weights"] = served.fingerprint()
    if not c.allow_incomplete:
        write_cache(
            teacher if served is None else served, train, path, unit="token", k=c.k,
            encoding=encoding, forward=causal_lm_forward, tokenizer=tok,
            shard_size=c.shard_size, batch_size=c.batch_size, teacher_name=recipe.teacher.model,
            part=(distributed.rank(), distributed.world_size()),  # under torchrun: split
            vocab_size=None if served is None else teacher_vocab(recipe, tok),
        )  # fmt: skip
        distributed.barrier()
        checks = {}
    cached = CachedTeacher(
        path,
        expect=expect,
        allow_incomplete=c.allow_incomplete,
        **checks,
    )
    if c.allow_incomplete:
        train = cached.subset(train)
        log.info("teacher cache %s: training on the %d examples it holds", path, len(train))
    status = cache_status(path)
    info = {
        "path": str(path), "k": c.k, "encoding": asdict(encoding), "bytes": status.bytes,
        "positions": status.positions, "bytes_per_token": status.bytes / max(1, status.positions),
        "examples": len(train), "ready_s": time.perf_counter() - t0,
        "filled_by": "teacher" if served is None else f"server {served.url}",
    }  # fmt: skip
    return cached, train, info
