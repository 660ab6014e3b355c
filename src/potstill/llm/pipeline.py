"""A causal-LM distillation run (``kind: causal-lm``): a Hugging Face teacher, a student derived
from it by keeping some of its layers (or another model sharing its tokenizer), several token-level
objectives at the same budget, every model evaluated against the teacher, exported students, and
a report with side-by-side generations."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import logging
import random
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from .. import distributed
from .._version import __version__
from ..assets import resolve
from ..cache import CachedTeacher, CacheStatus, Encoding, cache_status, write_cache
from ..config import TrainConfig
from ..data.instructions import instructions
from ..data.tensors import TensorDictDataset
from ..distiller import Distiller
from ..evaluate import file_size
from ..hf import (
    check_same_tokenization,
    export_pretrained,
    load_model,
    load_tokenizer,
    shared_vocab_size,
)
from ..io import atomic_write_text
from ..losses.objective import Objective, Term
from ..losses.terms import next_token_ce_term, token_term
from ..models import count_parameters
from ..pipeline import _check_run_dir, _start_run_dir
from ..recipe import _Strict
from ..report import describe_term
from ..students import derive
from ..teachers import LiveTeacher, TeacherSource
from .answers import (
    GenerationSettings,
    Prompt,
    encode_prompt,
    generate_answers,
    read_answers,
    read_prompts,
)
from .data import LMExample, fortune_examples, pack_examples, prompt_ids, tokenize_examples
from .evaluate import (
    answer_tokens,
    forward_tokens_per_s,
    greedy_generations,
    lm_figures,
    rouge_l,
    teacher_log_likelihood,
)
from .forward import causal_lm_forward, causal_lm_hidden_forward, fused_head_problem
from .onpolicy import OnPolicySampler, SamplingSpec

log = logging.getLogger("potstill")

RESERVED_ROWS = ("teacher", "derived, not distilled", "student, not distilled")


class LMTermSpec(_Strict):
    """One term of a causal-LM objective: ``ce`` (next-token cross-entropy on the data) or a
    token-level divergence to the teacher (``fkl``, ``rkl``, ``jsd`` with ``beta``, ``tvd``,
    ``skl``/``srkl`` with ``skew``, ``mse`` on logits) at ``temperature``."""

    kind: Literal["ce", "fkl", "rkl", "jsd", "tvd", "skl", "srkl", "mse"]
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.5, gt=0, lt=1)
    skew: float = Field(0.1, ge=0, le=1)
    name: str | None = None

    def build(self, chunk_size: int | None) -> Term:
        """The objective term this spec describes."""
        name = self.name or self.kind
        if self.kind == "ce":
            return next_token_ce_term(self.weight, name)
        return token_term(
            self.kind,
            temperature=self.temperature,
            beta=self.beta,
            skew=self.skew,
            weight=self.weight,
            chunk_size=chunk_size,
            name=name,
        )


class LMModelSpec(_Strict):
    """A causal LM by hub name or folder."""

    model: str
    dtype: str = "float32"
    trust_remote_code: bool = False


class LMCacheSpec(_Strict):
    """Train from a teacher cache (``potstill cache``) instead of running the teacher every
    step: the teacher's top-``k`` next-token distributions over the training data, computed once.
    ``path`` (default ``<run>/teacher-cache``) may name a shared cache; a missing or unfinished
    one is filled first (finished shards are kept), unless ``allow_incomplete``: then the run
    trains on the examples the cache holds. A cache built for another teacher, tokenizer, data,
    length, k or encoding is an error naming the field."""

    path: str | None = None
    k: int = Field(64, gt=0)
    logprobs: Literal["float32", "float16", "q8"] = "q8"
    compression: Literal["none", "zlib"] = "zlib"
    shard_size: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0, description="teacher batch size while filling the cache")
    allow_incomplete: bool = False


class LMTeacherSpec(LMModelSpec):
    """The teacher; ``cache: true`` (or cache options) trains from its cached top-k instead of
    running it live every step."""

    cache: LMCacheSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _cache_switch(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("cache"), bool):
            data = {**data, "cache": {} if data["cache"] else None}
        return data


class LMStudentSpec(_Strict):
    """The student: ``model`` (default: the teacher's), with ``keep`` layers spread evenly or
    the explicit ``layers`` kept and their weights copied (see ``potstill.students.derive``)."""

    model: str | None = None
    keep: int | None = Field(None, gt=0)
    layers: list[int] | None = None
    trust_remote_code: bool = False


class AnswerSpec(_Strict):
    """How the teacher answers prompt data (response distillation): the training answers are
    sampled with these settings; the held-out reference answers are greedy."""

    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(8, gt=0)


class LMDataSpec(_Strict):
    """Training data. ``fortunes``: prompt/response pairs from Debian's fortunes (``prompt`` may
    name ``{category}``). ``instructions`` (potstill's built-in set) or ``prompts`` (a JSONL file
    of ``{"prompt"}`` or ``{"messages"}``): prompts the teacher answers first (``answers``),
    written to ``<run>/answers/`` and reused on resume; the student learns those answers.
    ``format: chat`` uses the tokenizer's chat template (with ``system`` when given), ``text``
    plain text. Only response tokens are predicted."""

    name: Literal["fortunes", "instructions", "prompts"] = "fortunes"
    prompts: str | None = None
    answers: AnswerSpec = Field(default_factory=AnswerSpec)
    folder: str | None = None
    format: Literal["chat", "text"] = "chat"
    system: str | None = None
    prompt: str = "Tell me a fortune about {category}."
    max_chars: int = Field(300, gt=20)
    max_length: int = Field(96, gt=4)
    packing: bool = Field(
        False, description="pack short training examples into rows of max_length tokens"
    )
    train: int = Field(2000, gt=0)
    val: int = Field(200, gt=0)


class GenerateSpec(_Strict):
    """Greedy generations shown side by side in the report (prompts in the data's format)."""

    prompts: list[str] = Field(
        default_factory=lambda: [
            "Tell me a fortune about computers.",
            "Tell me a fortune about love.",
            "Tell me a fortune about science.",
        ]
    )
    max_new_tokens: int = Field(40, gt=0)


class SamplingOptions(_Strict):
    """How an on-policy student samples its completions (``temperature`` 0: greedy)."""

    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)


class LMVariantSpec(_Strict):
    """One trained student: its objective ``terms`` and, for on-policy distillation (GKD), the
    probability ``on_policy`` (λ) that a batch's responses are the student's own samples."""

    terms: list[LMTermSpec]
    on_policy: float = Field(0.0, ge=0, le=1)
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)


class LMRecipe(_Strict):
    """A causal-LM distillation run (``kind: causal-lm``)."""

    kind: Literal["causal-lm"]
    name: str = "causal-lm"
    seed: int = 0
    teacher: LMTeacherSpec
    student: LMStudentSpec = Field(default_factory=LMStudentSpec)
    data: LMDataSpec = Field(default_factory=LMDataSpec)
    variants: dict[str, LMVariantSpec]
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=60, batch_size=8))
    chunk_size: int | None = Field(
        1024, gt=0, description="positions per chunk of the divergences; null: unchunked"
    )
    fused_head: bool = Field(
        False,
        description="fuse the student's LM head with its token divergences (a live teacher): "
        "the student's full logits and their gradient are never built; saves memory at long "
        "sequences (SmolLM2 at 4 × 512 tokens), not at short ones",
    )
    eval_batch_size: int = Field(8, gt=0)
    generate: GenerateSpec = Field(default_factory=GenerateSpec)
    keep_checkpoints: bool = Field(
        False, description="keep each variant's training checkpoints (optimizer state included)"
    )

    @model_validator(mode="before")
    @classmethod
    def _variant_lists(cls, data: Any) -> Any:
        # a variant given as a plain list of terms is {terms: that list}
        if isinstance(data, dict) and isinstance(data.get("variants"), dict):
            data = {
                **data,
                "variants": {
                    k: {"terms": v} if isinstance(v, list) else v
                    for k, v in data["variants"].items()
                },
            }
        return data

    @model_validator(mode="before")
    @classmethod
    def _keep_budget_default(cls, data: Any) -> Any:
        # a partial train section keeps the default budget (as in the other recipe kinds)
        if isinstance(data, dict) and isinstance(data.get("train"), dict):
            t = data["train"]
            if "epochs" not in t and "max_steps" not in t:
                data = {**data, "train": {"max_steps": 60, **t}}
        return data

    @model_validator(mode="after")
    def _check(self) -> LMRecipe:
        if "seed" not in self.train.model_fields_set:
            self.train.seed = self.seed
        if not self.variants:
            raise ValueError("variants: give at least one, e.g. {fkl: [{kind: fkl}]}")
        folders: dict[str, str] = {}
        if self.data.name == "prompts" and not self.data.prompts:
            raise ValueError("data.prompts: give the JSONL file of prompts for name: prompts")
        for name, variant in self.variants.items():
            terms = variant.terms
            if variant.on_policy > 0 and self.data.packing:
                raise ValueError(
                    f"variants.{name}: on-policy batches are rebuilt from their prompts one "
                    "example per row; drop data.packing or on_policy"
                )
            if variant.on_policy > 0 and self.teacher.cache is not None:
                raise ValueError(
                    f"variants.{name}: on-policy samples need the live teacher to score them; "
                    "drop teacher.cache or on_policy"
                )
            if name in RESERVED_ROWS:
                raise ValueError(f"variants: {name!r} names a row of the report; rename it")
            folder = _folder_name(name)
            if folder in folders:
                raise ValueError(
                    f"variants: {folders[folder]!r} and {name!r} would share the folder "
                    f"{folder!r}; rename one"
                )
            folders[folder] = name
            if not terms:
                raise ValueError(f"variants.{name}: needs at least one term")
            names = [t.name or t.kind for t in terms]
            if len(set(names)) != len(names):
                raise ValueError(f"variants.{name}: term names must be unique, got {names}")
        return self


def _folder_name(name: str) -> str:
    return "-".join(re.findall(r"[A-Za-z0-9]+", name)).lower() or "variant"


def _size_row(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "parameters": count_parameters(model),
        "layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
        "file_bytes": file_size(model),
    }


def run_lm_recipe(
    recipe: LMRecipe, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Run a causal-LM recipe in ``run_dir``; returns the results (also in results.json), and
    writes report.md / report.html and each distilled student's export folder.

    An existing run folder is continued only with ``resume`` (finished variants are reloaded
    from their exports, an interrupted one continues from its last checkpoint) or deleted with
    ``overwrite``.
    """
    run_dir = Path(run_dir)
    if recipe.fused_head and distributed.world_size() > 1:
        raise ValueError(
            "fused_head: true runs the student's base model without its head, which DDP "
            "(torchrun) cannot synchronise; set fused_head: false for a distributed run"
        )
    _check_run_dir(run_dir, recipe, resume, overwrite)
    _start_run_dir(run_dir, recipe)
    t_start = time.perf_counter()
    teacher, tok = load_lm_teacher(recipe)
    init, base, s_name = initial_student(recipe, teacher, tok)
    if recipe.fused_head and (problem := fused_head_problem(init)) is not None:
        raise ValueError(f"fused_head: {problem}; set fused_head: false")
    vocab = shared_vocab_size(teacher, init, len(tok))  # raises when the vocabularies differ

    d = recipe.data
    train, val, heldout = lm_datasets(recipe, tok, teacher=teacher, run_dir=run_dir)
    response_tokens = int(
        (train.tensors["attention_mask"].sum(1) - train.tensors["prompt_length"]).sum()
    )
    n_examples = len(train)
    if d.packing:
        train = pack_examples(train, d.max_length)
        log.info("packed %d training examples into %d rows", n_examples, len(train))
    source: TeacherSource = LiveTeacher(teacher, forward=causal_lm_forward)
    cache_info: dict[str, Any] | None = None
    if recipe.teacher.cache is not None:
        source, train, cache_info = _cached_source(recipe, run_dir, teacher, tok, train)
    prompts = [prompt_ids(tok, p, d.format, d.system) for p in recipe.generate.prompts]

    untrained = "derived, not distilled" if init is not base else "student, not distilled"
    students: dict[str, torch.nn.Module] = {untrained: init}
    trained: dict[str, dict[str, Any]] = {}
    for name, variant in recipe.variants.items():
        terms = variant.terms
        folder = run_dir / _folder_name(name)
        done = folder / "done.json"
        if resume and done.exists():
            log.info("%s: finished before, reloading %s", name, folder / "export")
            trained[name] = json.loads(done.read_text())
            students[name] = load_model(folder / "export", "causal-lm", dtype=init.dtype)
            continue
        objective = Objective([t.build(recipe.chunk_size) for t in terms])
        student = copy.deepcopy(init)
        student.train()
        sampler = None
        if variant.on_policy > 0:
            sampler = OnPolicySampler(
                student, lam=variant.on_policy, pad_token_id=_pad_id(tok),
                eos_token_id=tok.eos_token_id, seed=recipe.seed,
                sampling=SamplingSpec(**variant.sampling.model_dump()),
            )  # fmt: skip
        fit = Distiller(
            student,
            objective,
            train,
            teacher=source if objective.needs_teacher else None,
            config=recipe.train,
            run_dir=folder,
            student_forward=causal_lm_hidden_forward if recipe.fused_head else causal_lm_forward,
            name=name,
            batch_transform=sampler,
        ).fit(resume=resume)
        students[name] = fit.student
        trained[name] = {
            "steps": fit.steps,
            "train_time_s": fit.train_time_s,
            "objective": [t.model_dump(exclude_unset=True) for t in terms],
            "on_policy": variant.on_policy,
            "metrics": str(folder.relative_to(run_dir) / "metrics.jsonl"),
            "export": str(folder.relative_to(run_dir) / "export"),
        }
        if distributed.is_main():  # every process holds the same student; rank 0 saves it
            export_pretrained(fit.student, folder / "export", tokenizer=tok)
            atomic_write_text(done, json.dumps(trained[name], indent=1))
            if not recipe.keep_checkpoints:
                shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        distributed.barrier()
    if not distributed.is_main():  # rank 0 evaluates and reports
        distributed.barrier()
        return {"kind": "causal-lm", "name": recipe.name, "rows": {}}

    t0 = time.perf_counter()
    figures = lm_figures(
        {"teacher": teacher, **students}, val, teacher=teacher, batch_size=recipe.eval_batch_size
    )
    eval_s = time.perf_counter() - t0
    rows: dict[str, dict[str, Any]] = {}
    generations: dict[str, list[str]] = {}
    for name, model in {"teacher": teacher, **students}.items():
        texts, gen_speed = greedy_generations(
            model, tok, prompts, max_new_tokens=recipe.generate.max_new_tokens
        )
        generations[name] = texts
        rows[name] = {
            **figures[name],
            **_size_row(model),
            "forward_tokens_per_s": forward_tokens_per_s(model, val, recipe.eval_batch_size),
            "generate_tokens_per_s": gen_speed,
            **trained.get(name, {}),
        }
    answers_s = time.perf_counter()
    answers = (
        _answer_figures({"teacher": teacher, **students}, teacher, tok, heldout, recipe)
        if heldout is not None
        else None
    )
    if answers is not None:
        for name, row in answers["rows"].items():
            rows[name].update(row)
    answers_s = time.perf_counter() - answers_s
    data_name = "fortunes" if d.name == "fortunes" else "prompts answered by the teacher"
    for name, row in trained.items():
        card = (
            f"# {recipe.name}: {name}\n\nDistilled by potstill {__version__} from "
            f"`{recipe.teacher.model}` into {init.config.num_hidden_layers} of its layers on "
            f"{d.train} {data_name} ({response_tokens} response tokens), {row['steps']} steps.\n\n"
            f"Held-out perplexity {rows[name]['perplexity']:.2f} (teacher "
            f"{rows['teacher']['perplexity']:.2f}); objective: "
            + ", ".join(describe_term(o) for o in row["objective"])
            + ".\n"
        )
        atomic_write_text(run_dir / row["export"] / "README.md", card)
    results = {
        "kind": "causal-lm", "name": recipe.name, "seed": recipe.seed,
        "potstill_version": __version__, "torch_version": torch.__version__,
        "threads": torch.get_num_threads(), "teacher": recipe.teacher.model, "student": s_name,
        "derived_layers": getattr(init.config, "potstill_derived_from", None),
        "vocabulary": vocab,
        "data": {
            "name": d.name, "train": n_examples, "rows": len(train), "packing": d.packing,
            "val": d.val, "max_length": d.max_length,
            "format": d.format,
            "response_tokens": response_tokens, "val_tokens": int(figures["teacher"]["tokens"]),
        },
        "train": {
            "steps": recipe.train.max_steps, "batch_size": recipe.train.batch_size,
            "lr": recipe.train.optimizer.lr, "chunk_size": recipe.chunk_size,
        },
        "teacher_cache": cache_info,
        "prompts": recipe.generate.prompts, "generations": generations,
        "answers": answers, "answers_eval_s": answers_s,
        "eval_s": eval_s, "rows": rows, "wall_time_s": time.perf_counter() - t_start,
    }  # fmt: skip
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=1, default=str))
    write_lm_report(run_dir, results)
    distributed.barrier()
    return results


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
        base = load_model(s_path, "causal-lm", trust_remote_code=spec.trust_remote_code)
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


def load_lm_teacher(recipe: LMRecipe) -> tuple[torch.nn.Module, Any]:
    """The recipe's teacher model and its tokenizer."""
    t_path = resolve(recipe.teacher.model)
    teacher = load_model(
        t_path,
        "causal-lm",
        dtype=recipe.teacher.dtype,
        trust_remote_code=recipe.teacher.trust_remote_code,
    )
    return teacher, load_tokenizer(t_path, trust_remote_code=recipe.teacher.trust_remote_code)


def _pad_id(tok: Any) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def lm_datasets(
    recipe: LMRecipe,
    tok: Any,
    *,
    teacher: torch.nn.Module | None = None,
    run_dir: Path | None = None,
) -> tuple[TensorDictDataset, TensorDictDataset, dict[str, Any] | None]:
    """The recipe's tokenized training and held-out data (shuffled with the recipe's seed), and
    for prompt data the held-out prompts with the teacher's greedy answers (else None).

    Prompt data (``instructions``, ``prompts``) needs ``teacher`` and ``run_dir``: the teacher's
    answers are generated into ``run_dir/answers/`` first (an interrupted run continues there).
    """
    d = recipe.data
    if d.name != "fortunes":
        if teacher is None or run_dir is None:
            raise ValueError(f"data.name: {d.name} needs the teacher to answer its prompts")
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
    recipe: LMRecipe, tok: Any, teacher: torch.nn.Module, run_dir: Path
) -> tuple[TensorDictDataset, TensorDictDataset, dict[str, Any]]:
    d, a = recipe.data, recipe.data.answers
    if d.name == "instructions":
        train_p = [Prompt(f"train-{i}", prompt=t) for i, t in enumerate(instructions("train"))]
        val_p = [Prompt(f"val-{i}", prompt=t) for i, t in enumerate(instructions("val"))]
    else:
        assert d.prompts is not None
        every = read_prompts(d.prompts)
        random.Random(recipe.seed + 1).shuffle(every)
        val_p, train_p = every[: d.val], every[d.val :]
    random.Random(recipe.seed).shuffle(train_p)
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


def _answer_figures(
    models: dict[str, torch.nn.Module],
    teacher: torch.nn.Module,
    tok: Any,
    heldout: dict[str, Any],
    recipe: LMRecipe,
) -> dict[str, Any]:
    """Each model's greedy answers to the held-out prompts: the teacher's mean log-probability
    per answer token, ROUGE-L against the teacher's own greedy answers, mean length; and the
    first answers for the report. The teacher's own answers are those it gave when the
    references were generated (read back as ids, not generated again)."""
    pad, eos = _pad_id(tok), tok.eos_token_id
    rows, shown = {}, {}
    for name, model in models.items():
        if model is teacher and heldout.get("teacher_answers") is not None:
            answers = heldout["teacher_answers"]  # generated greedily with the references
        else:
            answers = answer_tokens(
                model, heldout["ids"], pad_token_id=pad, eos_token_id=eos,
                max_new_tokens=heldout["max_new_tokens"], batch_size=recipe.eval_batch_size,
            )  # fmt: skip
        logp, count = teacher_log_likelihood(
            teacher, heldout["ids"], answers, pad_token_id=pad, batch_size=recipe.eval_batch_size
        )
        texts = [tok.decode(x, skip_special_tokens=True).strip() for x in answers]
        rows[name] = {
            "answer_teacher_logp": logp,
            "answer_rouge_l": rouge_l(texts, heldout["references"]),
            "answer_tokens": count / max(len(answers), 1),
        }
        shown[name] = texts[:4]
    return {"prompts": heldout["texts"][:4], "answers": shown, "rows": rows}


def cache_settings(recipe: LMRecipe) -> LMCacheSpec:
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
    c = cache_settings(recipe)
    teacher, tok = load_lm_teacher(recipe)
    train, _, _ = lm_datasets(recipe, tok, teacher=teacher, run_dir=Path(path).parent)
    return write_cache(
        teacher, train, path, unit="token", k=c.k,
        encoding=Encoding(logprobs=c.logprobs, compression=c.compression),
        forward=causal_lm_forward, tokenizer=tok, shard_size=c.shard_size,
        batch_size=c.batch_size, part=part, teacher_name=recipe.teacher.model, progress=progress,
    )  # fmt: skip


def _cached_source(
    recipe: LMRecipe,
    run_dir: Path,
    teacher: torch.nn.Module,
    tok: Any,
    train: TensorDictDataset,
) -> tuple[CachedTeacher, TensorDictDataset, dict[str, Any]]:
    """The recipe's teacher cache over ``train`` (filled first unless ``allow_incomplete``),
    the training data it covers, and its figures for the results."""
    c = recipe.teacher.cache
    assert c is not None
    path = Path(c.path) if c.path else run_dir / "teacher-cache"
    encoding = Encoding(logprobs=c.logprobs, compression=c.compression)
    t0 = time.perf_counter()
    # write_cache checks the whole manifest against this teacher, tokenizer and data before it
    # fills anything; only a cache used as it is needs the reader to hash them
    checks: dict[str, Any] = {"teacher": teacher, "tokenizer": tok, "dataset": train}
    if not c.allow_incomplete:
        write_cache(
            teacher, train, path, unit="token", k=c.k, encoding=encoding,
            forward=causal_lm_forward, tokenizer=tok, shard_size=c.shard_size,
            batch_size=c.batch_size, teacher_name=recipe.teacher.model,
            part=(distributed.rank(), distributed.world_size()),  # under torchrun: split
        )  # fmt: skip
        distributed.barrier()
        checks = {}
    cached = CachedTeacher(
        path,
        expect={"k": c.k, "encoding": asdict(encoding)},
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
    }  # fmt: skip
    return cached, train, info


def lm_markdown(results: dict[str, Any]) -> str:
    """The causal-LM run's report as Markdown."""
    d, t = results["data"], results["train"]
    teacher = results["rows"]["teacher"]
    what = (
        "fortunes"
        if d.get("name", "fortunes") == "fortunes"
        else "prompts with the teacher's answers (sampled for training, greedy held out)"
    )
    lines = [
        f"# potstill report: {results['name']}",
        "",
        f"Teacher `{results['teacher']}`; students derived from `{results['student']}` "
        f"(layers kept: {results['derived_layers']}). Training: {d['train']} {what} in "
        f"{d['format']} format ({d['response_tokens']} response tokens, prompts masked), "
        f"{t['steps']} steps of {t['batch_size']} sequences, lr {t['lr']}, the same for every "
        f"objective. Held-out: {d['val']} ({d['val_tokens']} response tokens). Seed "
        f"{results['seed']}, {results['threads']} threads, whole run "
        f"{results['wall_time_s'] / 60:.1f} min.",
        *_cache_lines(results.get("teacher_cache")),
        "",
        "| model | objective | layers | parameters | size (MB) | perplexity | top-1 agreement "
        "| KL(teacher‖model) | forward tokens/s | generation tokens/s | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["rows"].items():
        objective = ", ".join(describe_term(o) for o in r.get("objective", [])) or "—"
        if r.get("on_policy"):
            objective += f", on-policy λ = {r['on_policy']:g}"
        train_s = f"{r['train_time_s']:.0f}" if "train_time_s" in r else "—"
        lines.append(
            f"| {name} | {objective} | {r['layers']} | {r['parameters'] / 1e6:.1f}M | "
            f"{r['file_bytes'] / 1e6:.0f} | {r['perplexity']:.2f} | "
            f"{r['top1_agreement']:.3f} | {r['kl_to_teacher']:.3f} | "
            f"{r['forward_tokens_per_s']:.0f} | {r['generate_tokens_per_s']:.1f} | {train_s} |"
        )
    best = min(
        (n for n in results["rows"] if n != "teacher"),
        key=lambda n: results["rows"][n]["perplexity"],
    )
    ce = [n for n, r in results["rows"].items() if _only_ce(r)]
    lines += [
        "",
        f"Lowest held-out perplexity among students: **{best}** "
        f"({results['rows'][best]['perplexity']:.2f}; teacher {teacher['perplexity']:.2f}).",
    ]
    if ce:
        base = results["rows"][ce[0]]
        for name, r in results["rows"].items():
            if "objective" in r and not _only_ce(r):
                verdict = "better" if r["perplexity"] < base["perplexity"] else "not better"
                lines.append(
                    f"- {name}: perplexity {r['perplexity']:.2f} vs {base['perplexity']:.2f} by "
                    f"cross-entropy alone at the same steps ({verdict})."
                )
    lines += [
        "",
        "Perplexity: exp of the mean next-token loss on the held-out responses. Top-1 "
        "agreement: share of those positions where the model's most likely token is the "
        "teacher's. KL: mean per-token KL(teacher ‖ model) at temperature 1. Forward tokens/s: "
        "one batch of held-out sequences; generation: greedy decoding at batch 1. Measured on "
        "this machine's CPU in this run; short budgets like this one show early training, not "
        "converged students.",
        "",
        *_answer_lines(results.get("answers"), results["rows"]),
        "## Generations (greedy)",
        "",
        *_side_by_side(results["prompts"], results["generations"], "output"),
    ]
    return "\n".join(lines)


def _side_by_side(prompts: list[str], texts: dict[str, list[str]], column: str) -> list[str]:
    """One table per prompt: each model's text on one line."""
    lines: list[str] = []
    for i, prompt in enumerate(prompts):
        lines += [f"**{prompt}**", "", f"| model | {column} |", "|---|---|"]
        for name, by_prompt in texts.items():
            text = " ".join(by_prompt[i].split()).replace("|", "\\|")
            lines.append(f"| {name} | {text} |")
        lines.append("")
    return lines


def _answer_lines(answers: dict[str, Any] | None, rows: dict[str, Any]) -> list[str]:
    if not answers:
        return []
    lines = [
        "## Answers to held-out prompts",
        "",
        "Greedy answers of each model to the held-out prompts. Teacher log-prob: the teacher's "
        "mean log-probability per answer token (higher: the teacher finds the answer likelier). "
        "ROUGE-L: F1 against the teacher's own greedy answers. Length: mean answer tokens.",
        "",
        "| model | on-policy λ | teacher log-prob per token | ROUGE-L vs teacher | length |",
        "|---|---|---|---|---|",
    ]
    for name, r in answers["rows"].items():
        lam = rows[name].get("on_policy")
        lines.append(
            f"| {name} | {'—' if lam is None else f'{lam:g}'} | {r['answer_teacher_logp']:.3f} | "
            f"{r['answer_rouge_l']:.3f} | {r['answer_tokens']:.1f} |"
        )
    lines.append("")
    return lines + _side_by_side(answers["prompts"], answers["answers"], "answer")


def _cache_lines(cache: dict[str, Any] | None) -> list[str]:
    if not cache:
        return ["", "Teacher: run live on every training batch."]
    e = cache["encoding"]
    return [
        "",
        f"Teacher: read from its cache `{cache['path']}` (top-{cache['k']}, log-probs "
        f"{e['logprobs']}, compression {e['compression']}; {cache['bytes'] / 1e6:.1f} MB for "
        f"{cache['positions']:,} tokens, {cache['bytes_per_token']:.0f} bytes per token; ready "
        f"in {cache['ready_s']:.0f} s, filling included). The token terms compare the student "
        f"with the teacher on k + 1 buckets (the top-{cache['k']} tokens and the rest).",
    ]


def _only_ce(row: dict[str, Any]) -> bool:
    objective = row.get("objective")
    return bool(objective) and all(o["kind"] == "ce" for o in objective)


def write_lm_report(run_dir: Path, results: dict[str, Any]) -> None:
    """report.md and a self-contained report.html with the training curves."""
    from ..report import html_page, plot_metric_curves

    md = lm_markdown(results)
    curves = {name: run_dir / r["metrics"] for name, r in results["rows"].items() if "metrics" in r}
    png = plot_metric_curves(curves, "loss", "training loss (each variant's own objective)")
    atomic_write_text(run_dir / "report.md", md + "\n![training loss](losses.png)\n")
    (run_dir / "losses.png").write_bytes(base64.b64decode(png))
    atomic_write_text(run_dir / "report.html", html_page(results["name"], md, {"losses": png}))


__all__ = [
    "LMCacheSpec",
    "LMRecipe",
    "LMTermSpec",
    "cache_lm_recipe",
    "lm_datasets",
    "lm_markdown",
    "load_lm_teacher",
    "run_lm_recipe",
]
