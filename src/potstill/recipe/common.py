"""What every recipe kind shares: the strict base model, one term spec for every kind, taps,
one model spec for Hugging Face models, budget and seed defaults, and the checks of a list of
terms. Each kind's own schema is one file beside this one."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ..config import TrainConfig, from_training_arguments
from ..losses.feature_terms import FEATURE_TERM_KINDS
from ..losses.features import explicit_layer_map, last_k_layer_map, uniform_layer_map
from ..losses.objective import Objective, Term
from ..losses.terms import DIVERGENCE_KINDS, TERM_KINDS, build_term
from ..placement import check_device_form
from ..taps import TapSpec


class RecipeError(ValueError):
    """A recipe could not be read or is invalid; the message names the field."""


class StrictModel(BaseModel):
    """A recipe section: unknown fields are errors (a misspelt or misplaced field)."""

    # coerce numbers: `--set name=2024` is parsed as YAML and gives an int for a text field
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


DeviceSetting = Annotated[str, AfterValidator(lambda v: check_device_form(v, where=""))]
"""A device setting: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (checked against the
machine when the run starts)."""


def run_device() -> Any:
    """The ``device`` field of a recipe: where the student trains and everything is evaluated."""
    return Field(
        "auto",
        description="where the run computes: auto (a GPU when there is one, else MPS, else the "
        "CPU), cpu, cuda, cuda:N or mps; under torchrun each process takes cuda:LOCAL_RANK",
    )


class TeacherDevice(StrictModel):
    """Where a teacher runs: ``device`` (another GPU, or the CPU; default: the run's)."""

    device: DeviceSetting | None = Field(
        None, description="the teacher's device (another GPU, or cpu); default the run's"
    )


class PlacedTeacher(TeacherDevice):
    """Where a Hugging Face teacher runs: ``device`` (default: the run's), or for one too large
    for one GPU ``device_map`` (``auto``, ``balanced``, ``sequential`` or a mapping of module
    names to devices), its layers sharded over the GPUs through accelerate."""

    device_map: str | dict[str, str | int] | None = Field(
        None, description="Hugging Face teachers: shard over several GPUs (accelerate)"
    )

    @model_validator(mode="after")
    def _one_placement(self) -> PlacedTeacher:
        if self.device is not None and self.device_map is not None:
            raise ValueError("give the teacher a device or a device_map, not both")
        return self


def check_sharded_teacher(teacher: PlacedTeacher, derived_from_teacher: bool) -> None:
    """A teacher sharded by ``device_map`` is used as it is: a student cannot be derived from
    its layers (they live on several GPUs) and it is not fine-tuned."""
    if teacher.device_map is None:
        return
    if derived_from_teacher:
        raise ValueError(
            "teacher.device_map: a student derived from the teacher's layers needs the whole "
            "teacher on one device; give student.model, or drop device_map"
        )
    if getattr(teacher, "finetune", None):
        raise ValueError("teacher.device_map: a sharded teacher is not fine-tuned; drop one")


TermKind = Literal[TERM_KINDS]  # type: ignore[valid-type]


class TermSpec(StrictModel):
    """One objective term, for every recipe kind.

    On outputs (logits; a causal LM's next-token distributions; an encoder's embeddings):
    ``kd`` (Hinton soft targets, T² scaled), ``ce`` (labels, or a causal LM's next tokens), or a
    divergence ``fkl``/``rkl``/``jsd`` (``beta``)/``tvd``/``mse``/``skl``/``srkl`` (``skew``).
    On tapped features (``student``/``teacher`` name taps; ``logits`` names the output):
    ``feature`` (``loss`` mse/cosine/smooth_l1, projector when shapes differ, ``layer_map``
    uniform/last-k/explicit pairs for wildcard taps), ``attention_mse``/``attention_kl``
    (TinyBERT), ``minilm`` (three taps each: q, k, v; ``relation_heads``), ``at`` (attention
    transfer, ``p``), ``rkd_distance``, ``rkd_angle``, ``pkt``. Which kinds a recipe accepts
    depends on its task (a causal LM: ``ce`` and the divergences).
    """

    kind: TermKind
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.5, ge=0, le=1, description="jsd only: 0 < beta < 1")
    skew: float = Field(0.1, ge=0, le=1, description="skl and srkl only")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="ce only")
    name: str | None = None
    student: str | list[str] | None = Field(None, description="student tap name(s)")
    teacher: str | list[str] | None = Field(None, description="teacher tap name(s)")
    loss: Literal["mse", "cosine", "smooth_l1"] = Field("mse", description="feature only")
    normalize: bool = Field(False, description="feature only: L2-normalise first")
    layer_map: Literal["uniform", "last-k"] | list[tuple[int, int]] | None = None
    k: int | None = Field(None, gt=0, description="layer_map last-k only")
    p: float = Field(2.0, gt=0, description="at only")
    relation_heads: int | None = Field(None, gt=0, description="minilm only")

    @model_validator(mode="after")
    def _check(self) -> TermSpec:
        if self.kind == "jsd" and self.beta in (0.0, 1.0):
            raise ValueError(
                f"beta: jsd at beta {self.beta:g} is identically 0 (its mixture is one of the two "
                "distributions); give 0 < beta < 1, or use fkl or rkl for a plain KL"
            )
        if self.kind in FEATURE_TERM_KINDS:
            needs_taps = self.kind not in ("rkd_distance", "rkd_angle", "pkt")
            if needs_taps and (self.student is None or self.teacher is None):
                raise ValueError(f"a {self.kind} term needs student and teacher tap names")
            if self.kind == "minilm" and self.relation_heads is None:
                raise ValueError("a minilm term needs relation_heads")
            if self.layer_map == "last-k" and self.k is None:
                raise ValueError("layer_map last-k needs k")
            if not needs_taps and (
                isinstance(self.student, list) or isinstance(self.teacher, list)
            ):
                raise ValueError(f"a {self.kind} term reads one tap per side, not a list")
        return self

    @property
    def term_name(self) -> str:
        """The name the term is logged under: ``name``, else its kind."""
        return self.name or self.kind

    def build(
        self,
        layer_counts: dict[str, dict[str, int]] | None = None,
        *,
        tokens: bool = False,
        chunk_size: int | None = None,
    ) -> Term:
        """The loss term this entry describes (:func:`potstill.losses.terms.build_term`).
        ``layer_counts`` gives, per side, how many outputs each wildcard tap has (needed for
        ``uniform`` and ``last-k`` layer maps); ``tokens``: the task predicts next tokens (a
        causal LM), whose divergences are chunked by ``chunk_size``."""
        return build_term(
            self.kind, weight=self.weight, name=self.term_name, tokens=tokens,
            chunk_size=chunk_size, temperature=self.temperature, beta=self.beta,
            skew=self.skew, label_smoothing=self.label_smoothing, student=self.student,
            teacher=self.teacher, loss=self.loss, normalize=self.normalize,
            layer_map=self._layer_map(layer_counts), p=self.p,
            relation_heads=self.relation_heads,
        )  # fmt: skip

    def _layer_map(self, counts: dict[str, dict[str, int]] | None) -> list[tuple[int, int]] | None:
        if self.layer_map is None:
            return None
        s, t = self.student, self.teacher
        if not (isinstance(s, str) and isinstance(t, str)):
            raise RecipeError(f"{self.kind}: layer_map needs one wildcard tap name per side")
        counts = counts or {}
        n_s, n_t = counts.get("student", {}).get(s), counts.get("teacher", {}).get(t)
        if isinstance(self.layer_map, list):
            return explicit_layer_map(self.layer_map, n_s or 10**9, n_t or 10**9)
        if n_s is None or n_t is None:
            raise RecipeError(
                f"{self.kind}: layer_map {self.layer_map} needs wildcard taps {s!r} (student) and "
                f"{t!r} (teacher), e.g. taps: {{student: {{{s}: 'encoder.layer.*'}}}}"
            )
        if self.layer_map == "uniform":
            return uniform_layer_map(n_s, n_t)
        assert self.k is not None
        return last_k_layer_map(n_s, n_t, self.k)


TOKEN_TERM_KINDS: tuple[str, ...] = ("ce", *DIVERGENCE_KINDS)
"""The term kinds of a task that predicts next tokens (a causal LM)."""

FEATURE_FIELDS = ("student", "teacher", "loss", "normalize", "layer_map", "k", "p")
"""Term fields that only feature terms read."""


class TokenTermSpec(TermSpec):
    """A term of a causal-LM objective: a :class:`TermSpec` of a kind that compares next-token
    distributions (``ce``: the next-token loss; a divergence to the teacher)."""

    kind: Literal[TOKEN_TERM_KINDS]  # type: ignore[valid-type,assignment]

    @model_validator(mode="after")
    def _no_feature_fields(self) -> TokenTermSpec:
        unused = [
            f
            for f in (*FEATURE_FIELDS, "relation_heads", "label_smoothing")
            if getattr(self, f) != TermSpec.model_fields[f].default
        ]
        if unused:
            raise ValueError(
                f"{', '.join(unused)}: not a field of a causal-LM term (its terms compare "
                "next-token distributions); remove it"
            )
        return self

    def build(
        self,
        layer_counts: dict[str, dict[str, int]] | None = None,
        *,
        tokens: bool = True,
        chunk_size: int | None = None,
    ) -> Term:
        """The token term this entry describes (next-token terms, chunked by ``chunk_size``)."""
        return super().build(layer_counts, tokens=tokens, chunk_size=chunk_size)


def check_terms(
    where: str,
    terms: Sequence[TermSpec],
    *,
    example: str = "[{kind: kd}, {kind: ce}]",
) -> None:
    """A list of terms must be non-empty with unique names; ValueError naming ``where`` (e.g.
    ``objective`` or ``variants.fkl.terms``) otherwise."""
    if not terms:
        raise ValueError(f"{where}: needs at least one term, e.g. {example}")
    names = [t.term_name for t in terms]
    if len(set(names)) != len(names):
        raise ValueError(
            f"{where}: term names must be unique, got {names}; give repeated kinds a 'name'"
        )


def build_objective(
    terms: Sequence[TermSpec],
    layer_counts: dict[str, dict[str, int]] | None = None,
    *,
    tokens: bool = False,
    chunk_size: int | None = None,
) -> Objective:
    """The objective of a list of term specs (see :meth:`TermSpec.build`)."""
    return Objective([t.build(layer_counts, tokens=tokens, chunk_size=chunk_size) for t in terms])


class TapSpecModel(StrictModel):
    """A tap with an output selection."""

    path: str
    select: int | str | None = None


class TapsSpec(StrictModel):
    """Modules whose outputs terms read: name → dotted path (``*`` wildcards) or
    ``{path, select}`` (tuple index or output attribute)."""

    student: dict[str, str | TapSpecModel] = Field(default_factory=dict)
    teacher: dict[str, str | TapSpecModel] = Field(default_factory=dict)

    def as_taps(self, side: str) -> dict[str, TapSpec]:
        """The taps of one side as TapSpecs."""
        raw = self.student if side == "student" else self.teacher
        return {
            k: TapSpec(v) if isinstance(v, str) else TapSpec(v.path, v.select)
            for k, v in raw.items()
        }


class HFModelSpec(StrictModel):
    """A Hugging Face model by hub name, packaged asset or folder (``dtype``: the weights'
    dtype once loaded; ``trust_remote_code``: run the model's own code, only when you trust
    it)."""

    model: str
    dtype: str = "float32"
    trust_remote_code: bool = False


class DerivedModelSpec(HFModelSpec):
    """A student from a Hugging Face model: the model itself, or ``keep`` of its layers spread
    evenly / the explicit ``layers`` kept with their weights copied
    (:func:`potstill.students.derive`)."""

    keep: int | None = Field(None, gt=0)
    layers: list[int] | None = None

    @property
    def derived(self) -> bool:
        """Whether the student keeps only some of the model's layers."""
        return bool(self.keep or self.layers)


def budget_default(
    data: Any, path: Sequence[str], default: dict[str, Any], unless: Sequence[str] = ()
) -> Any:
    """Recipe data with ``default`` merged into the train section at ``path`` when that section
    is given partly (``train: {batch_size: 64}``) and sets none of ``unless`` (default: the keys
    of ``default``): a partial section keeps the recipe kind's budget instead of falling back
    to TrainConfig's one epoch."""
    if not isinstance(data, dict):
        return data
    *parents, key = path
    node = data
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    if not (isinstance(node, dict) and isinstance(node.get(key), dict)):
        return data
    section = from_training_arguments(node[key], ".".join(path))  # num_train_epochs is epochs
    if any(k in section for k in (unless or default)):
        return data
    out = dict(data)
    target = out
    for p in parents:
        target[p] = dict(target[p])
        target = target[p]
    target[key] = {**default, **section}
    return out


def share_seed(seed: int, *configs: TrainConfig) -> None:
    """One seed for the whole run: each train section that does not set its own gets ``seed``."""
    for cfg in configs:
        if "seed" not in cfg.model_fields_set:
            cfg.seed = seed


def folder_name(name: str) -> str:
    """The folder of a variant named ``name``: its letters and digits, lower case, joined by
    hyphens (``"PKT + hidden"`` → ``pkt-hidden``)."""
    return "-".join(re.findall(r"[A-Za-z0-9]+", name)).lower() or "variant"


def check_variant_names(names: Iterable[str], reserved: Iterable[str]) -> None:
    """Variant names must not name a report row and must give distinct folders."""
    folders: dict[str, str] = {}
    reserved = tuple(reserved)
    for name in names:
        if name in reserved:
            raise ValueError(f"variants: {name!r} names a row of the report; rename it")
        folder = folder_name(name)
        if folder in folders:
            raise ValueError(
                f"variants: {folders[folder]!r} and {name!r} would share the folder "
                f"{folder!r}; rename one"
            )
        folders[folder] = name
