"""The causal-LM recipe (``kind: causal-lm``): a Hugging Face teacher, a student derived from it
(or another model sharing its tokenizer), training data (fortunes, or prompts the teacher
answers), token-level objectives (variants, on-policy optional) at the same budget, a teacher
cache, and the report's generations."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, GetJsonSchemaHandler, field_validator, model_validator

from ..config import TrainConfig
from ..llm.user_data import STYLES
from .common import (
    DerivedModelSpec,
    DeviceSetting,
    HFModelSpec,
    PlacedTeacher,
    StrictModel,
    TokenTermSpec,
    budget_default,
    check_sharded_teacher,
    check_terms,
    check_variant_names,
    run_device,
    share_seed,
)
from .data import TableSpec

RESERVED_ROWS = ("teacher", "derived, not distilled", "student, not distilled")
"""Rows every causal-LM report has: variants may not take these names."""


class LMCacheSpec(StrictModel):
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


def _also_true_or_false(schema: dict[str, Any]) -> None:
    """The JSON schema of a section that ``true`` / ``false`` also switch on / off."""
    schema["anyOf"].append({"type": "boolean"})


class LMServerSpec(StrictModel):
    """A teacher behind an OpenAI-compatible server (vLLM) that training asks for its top-k
    log-probabilities (:class:`potstill.served.ServedTeacher`); ``teacher.model`` still names
    the tokenizer, and the local copy the evaluation compares with."""

    url: str = Field(description="the server, e.g. http://gpu-host:8000")
    model: str | None = Field(None, description="the name it serves (default: teacher.model)")
    top_k: int = Field(20, ge=1, description="log-probabilities per position (≤ --max-logprobs)")
    api_key_env: str | None = Field(
        None, description="environment variable holding the API key (never written anywhere)"
    )
    timeout: float = Field(120.0, gt=0, description="seconds per request")
    retries: int = Field(4, ge=0, description="retries of a request on timeouts and 5xx")
    concurrency: int = Field(4, ge=1, description="requests in flight")
    request_size: int = Field(8, ge=1, description="sequences per request")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from ..served import base_url

        base_url(v)  # names the field when it is not an http(s) URL
        return v


class LMTeacherSpec(HFModelSpec, PlacedTeacher):
    """The teacher; ``cache: true`` (or cache options) trains from its cached top-k instead of
    running it live every step; ``server:`` asks a vLLM server for it. Both: the cache is
    filled from the server (``cache.k`` defaults to ``server.top_k`` and may not exceed it),
    and training reads the cache."""

    cache: LMCacheSpec | None = Field(None, json_schema_extra=_also_true_or_false)
    server: LMServerSpec | None = None

    @model_validator(mode="after")
    def _served_cache(self) -> LMTeacherSpec:
        if self.server is None or self.cache is None:
            return self
        if "k" not in self.cache.model_fields_set:
            self.cache = self.cache.model_copy(update={"k": self.server.top_k})
        elif self.cache.k > self.server.top_k:
            raise ValueError(
                f"teacher.cache.k = {self.cache.k} is more than the server is asked for "
                f"(teacher.server.top_k = {self.server.top_k}): a cache filled from the server "
                "keeps at most its top_k; lower cache.k or raise server.top_k"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _cache_switch(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("cache"), bool):
            data = {**data, "cache": {} if data["cache"] else None}
        return data


class LMStudentSpec(DerivedModelSpec):
    """The student: ``model`` (default: the teacher's), with ``keep`` layers spread evenly or
    the explicit ``layers`` kept and their weights copied (see ``potstill.students.derive``)."""

    model: str | None = None  # type: ignore[assignment]


class AnswerSpec(StrictModel):
    """How the teacher answers prompt data (response distillation): the training answers are
    sampled with these settings; the held-out reference answers are greedy."""

    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(8, gt=0)


class LMTableSpec(TableSpec):
    """The user's own data for a causal LM (see :class:`~potstill.recipe.data.TableSpec`):
    a validation split is carved from the training rows unless given; no test split."""

    test_size: float | None = Field(None, gt=0, description="not used by causal-LM runs")


class LMDataSpec(StrictModel):
    """Training data. ``fortunes``: prompt/response pairs from Debian's fortunes (``prompt`` may
    name ``{category}``). ``instructions`` (potstill's built-in set) or ``prompts`` (a JSONL file
    of ``{"prompt"}`` or ``{"messages"}``): prompts the teacher answers first (``answers``),
    written to ``<run>/answers/`` and reused on resume; the student learns those answers.
    ``format: chat`` uses the tokenizer's chat template (with ``system`` when given), ``text``
    plain text. Only response tokens are predicted."""

    name: Literal["fortunes", "instructions", "prompts"] = "fortunes"
    source: LMTableSpec | None = Field(
        None,
        description="the user's own data (files, a folder, a hub dataset) instead of a "
        "built-in name; its columns say the style",
    )
    style: Literal[STYLES] = Field(  # type: ignore[valid-type]
        "auto",
        description="source only: corpus (text, every token predicted), chat (messages, or "
        "prompt + response: trained as given), prompts (the teacher answers); auto: from the "
        "columns",
    )
    windows: bool = Field(
        True, description="corpus: concatenate documents and cut windows of max_length"
    )
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


class GenerateSpec(StrictModel):
    """Greedy generations shown side by side in the report (prompts in the data's format)."""

    prompts: list[str] = Field(
        default_factory=lambda: [
            "Tell me a fortune about computers.",
            "Tell me a fortune about love.",
            "Tell me a fortune about science.",
        ]
    )
    max_new_tokens: int = Field(40, gt=0)


class SamplingOptions(StrictModel):
    """How an on-policy student samples its completions (``temperature`` 0: greedy)."""

    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)


class LMVariantSpec(StrictModel):
    """One trained student: its objective ``terms`` and, for on-policy distillation (GKD), the
    probability ``on_policy`` (λ) that a batch's responses are the student's own samples."""

    terms: list[TokenTermSpec]
    on_policy: float = Field(0.0, ge=0, le=1)
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)

    @classmethod
    def __get_pydantic_json_schema__(cls, core: Any, handler: GetJsonSchemaHandler) -> Any:
        # a variant may also be given as the plain list of its terms
        schema = handler(core)
        return {"anyOf": [schema, handler.resolve_ref_schema(schema)["properties"]["terms"]]}


class LMRecipe(StrictModel):
    """A causal-LM distillation run (``kind: causal-lm``)."""

    kind: Literal["causal-lm"]
    name: str = "causal-lm"
    seed: int = 0
    device: DeviceSetting = run_device()
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
        return budget_default(data, ("train",), {"max_steps": 60}, unless=("epochs", "max_steps"))

    @model_validator(mode="after")
    def _check(self) -> LMRecipe:
        share_seed(self.seed, self.train)
        check_sharded_teacher(self.teacher, derived_from_teacher=self.student.model is None)
        if not self.variants:
            raise ValueError("variants: give at least one, e.g. {fkl: [{kind: fkl}]}")
        d = self.data
        if d.source is not None and "name" in d.model_fields_set:
            raise ValueError("data: give name (a built-in set) or source (your data), not both")
        if self.data.name == "prompts" and not self.data.prompts:
            raise ValueError("data.prompts: give the JSONL file of prompts for name: prompts")
        check_variant_names(self.variants, RESERVED_ROWS)
        for name, variant in self.variants.items():
            if variant.on_policy > 0 and d.source is not None and d.style in ("corpus", "chat"):
                raise ValueError(
                    f"variants.{name}: on-policy sampling needs prompts; a {d.style} source has "
                    "none (use style: prompts, or drop on_policy)"
                )
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
            check_terms(f"variants.{name}.terms", variant.terms, example="[{kind: fkl}]")
        return self
