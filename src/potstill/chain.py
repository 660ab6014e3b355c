"""Multi-stage recipes (``kind: chain``): a list of ordinary runs (classic or causal-LM) in which
each stage's distilled student is the next stage's teacher: teacher assistants planned between a
large teacher and a small student, or born-again generations of one architecture. Every stage
keeps its own run folder and report; the chain report puts all models side by side with the gain
of each step. A rerun with ``--resume`` skips finished stages."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from . import distributed
from .io import atomic_write_text
from .models import ArchSpec
from .recipe import Recipe, _Strict
from .stages import plan_arch, plan_layers

log = logging.getLogger("potstill")


class ChainStage(_Strict):
    """One stage: a name and the fields it changes in the chain's ``base`` recipe (e.g. its
    ``student`` architecture or layers kept, ``objective``/``variants`` or ``train`` budget)."""

    name: str
    set: dict[str, Any] = Field(default_factory=dict)


class ChainRecipe(_Strict):
    """A chain of runs (``kind: chain``). ``base`` is a classic recipe, or a causal-LM recipe
    (``kind: causal-lm``), shared by every stage; the stages come from exactly one of ``stages``
    (explicit), ``assistants`` (that many teacher assistants planned geometrically between the
    teacher and the student — built-in architectures by depth and width, derived LLM students by
    layers kept — then the student) or ``generations`` (born-again: that many stages of the
    base student). Stage 1 learns from the base teacher; each later stage from the previous
    stage's distilled student in setting (classic) or variant (causal-LM) ``from_setting``
    (default: the first). ``direct: true`` (or a mapping of changes, e.g. a larger
    ``train`` budget) adds a stage that distills the last stage's student straight from the
    base teacher, for comparison; ``ensemble: true`` (classic, with ``generations``) a last stage
    taught by the ensemble of all generations (the mean of their logits).

    Causal-LM stages: every student is derived from the base teacher (``student.keep`` layers of
    it, the same initial weights as a direct student would get) unless ``student.model`` names
    another model; its teacher is the previous stage's exported student."""

    kind: Literal["chain"]
    name: str = "chain"
    base: dict[str, Any]
    stages: list[ChainStage] | None = None
    assistants: int | None = Field(None, ge=1)
    generations: int | None = Field(None, ge=1)
    from_setting: str | None = None
    direct: bool | dict[str, Any] = False
    ensemble: bool = False

    @model_validator(mode="after")
    def _check(self) -> ChainRecipe:
        given = [x is not None for x in (self.stages, self.assistants, self.generations)]
        if sum(given) != 1:
            raise ValueError("give exactly one of stages, assistants or generations")
        if self.ensemble and self.generations is None:
            raise ValueError("ensemble: true combines born-again generations; give generations")
        base = self.base_recipe()
        if self.causal_lm:
            if self.ensemble:
                raise ValueError(
                    "ensemble: the ensemble of generations is built for classic chains; a "
                    "causal-LM chain cannot use it yet"
                )
            if self.assistants is not None and (
                base.student.keep is None
                and base.student.layers is None
                or base.student.model not in (None, base.teacher.model)
            ):
                raise ValueError(
                    "assistants: planning needs a student derived from the teacher "
                    "(base.student.keep); give stages explicitly for another student model"
                )
        names = [s.name for s in self._stage_names()]
        if len(set(names)) != len(names) or {"direct", "ensemble"} & set(names):
            raise ValueError(
                f"stage names must be unique and not 'direct' or 'ensemble', got {names}"
            )
        settings = self.settings()
        if self.from_setting is not None and self.from_setting not in settings:
            what = "variant" if self.causal_lm else "setting"
            raise ValueError(f"from_setting: {self.from_setting!r} is not a {what} ({settings})")
        if not (self.causal_lm and self.assistants is not None):  # planned when run
            for stage in self.planned():
                self.stage_recipe(stage.set)  # each stage must validate
        if isinstance(self.direct, dict):
            self.stage_recipe(self.direct)
        return self

    @property
    def causal_lm(self) -> bool:
        """Whether the stages are causal-LM runs."""
        return self.base.get("kind") == "causal-lm"

    def base_recipe(self) -> Any:
        """The shared recipe (a classic ``Recipe`` or an ``LMRecipe``)."""
        return self.stage_recipe({})

    def stage_recipe(self, changes: dict[str, Any]) -> Any:
        """The base recipe with ``changes`` merged in, validated."""
        data = _merged(self.base, changes)
        if self.causal_lm:
            from .llm.pipeline import LMRecipe

            return LMRecipe.model_validate(data)
        return Recipe.model_validate(data)

    def settings(self) -> list[str]:
        """The names a stage's student can be taken from: settings (classic) or variants."""
        base = self.base_recipe()
        return list(base.variants) if self.causal_lm else [s.name for s in base.settings]

    def _stage_names(self) -> list[ChainStage]:
        if self.causal_lm and self.assistants is not None:
            names = [f"assistant-{i + 1}" for i in range(self.assistants)] + ["student"]
            return [ChainStage(name=n) for n in names]
        return self.planned()

    def planned(self, teacher_layers: int | None = None) -> list[ChainStage]:
        """The stages to run, in order (planned assistants or generations expanded). A
        causal-LM chain with ``assistants`` needs the teacher's ``teacher_layers``."""
        if self.stages is not None:
            return self.stages
        base = self.base_recipe()
        if self.generations is not None:
            return [ChainStage(name=f"generation-{i + 1}") for i in range(self.generations)]
        assert self.assistants is not None
        if self.causal_lm:
            if teacher_layers is None:
                raise ValueError("planning LLM assistants needs the teacher's layer count")
            spec = base.student
            keep = spec.keep if spec.keep is not None else len(spec.layers)
            plan = plan_layers(teacher_layers, keep, self.assistants)
            stages = [
                ChainStage(name=f"assistant-{i + 1}", set={"student": {"keep": n, "layers": None}})
                for i, n in enumerate(plan)
            ]
            return stages + [ChainStage(name="student")]
        plan = plan_arch(base.teacher.arch, base.student.arch, self.assistants)
        stages = [
            ChainStage(name=f"assistant-{i + 1}", set={"student": {"arch": _arch_dict(a)}})
            for i, a in enumerate(plan)
        ]
        return stages + [ChainStage(name="student")]


def _arch_dict(arch: ArchSpec) -> dict[str, Any]:
    return arch.model_dump(include={"kind", "hidden", "channels", "dropout"})


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def lm_layer_count(model: str, *, trust_remote_code: bool = False) -> int:
    """The number of hidden layers of a causal LM (hub name, packaged asset or folder), read
    from its config without loading the weights."""
    from transformers import AutoConfig

    from .assets import resolve

    config = AutoConfig.from_pretrained(resolve(model), trust_remote_code=trust_remote_code)
    return int(config.num_hidden_layers)


def _link_copy(source: Path, target: Path) -> None:
    """Give ``target`` the files of ``source`` (hard links where possible), when ``source``
    exists and ``target`` does not: a stage with the same teacher and data reuses a cache or
    answers instead of computing them again (its run still checks them)."""
    if not source.exists() or target.exists() or not distributed.is_main():
        distributed.barrier()
        return

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp-link")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=link)
    os.replace(tmp, target)
    distributed.barrier()


def run_chain(
    chain: ChainRecipe, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Run every stage of ``chain`` in ``run_dir/<stage>`` (each an ordinary run) and write the
    chain's results.json and report.md; returns the results."""
    from .pipeline import _check_run_dir, _start_run_dir

    run_dir = Path(run_dir)
    _check_run_dir(run_dir, chain, resume, overwrite)
    _start_run_dir(run_dir, chain)
    t0 = time.perf_counter()
    setting = chain.from_setting or chain.settings()[0]
    main = distributed.is_main()  # every process trains each stage; rank 0 reports
    if chain.causal_lm:
        done, order = _run_lm_stages(chain, run_dir, setting, resume)
        rows = _lm_rows(chain, run_dir, done, order, setting) if main else []
    else:
        done, order = _run_classic_stages(chain, run_dir, setting, resume)
        rows = _rows(done, setting) if main else []
    out = {
        "kind": "chain",
        "name": chain.name,
        "base_kind": "causal-lm" if chain.causal_lm else "classic",
        "setting": setting,
        "stages": order,
        "rows": rows,
        "wall_time_s": time.perf_counter() - t0,
    }
    if main:
        atomic_write_text(run_dir / "results.json", json.dumps(out, indent=1, default=str))
        report = lm_chain_markdown(out) if chain.causal_lm else chain_markdown(out)
        atomic_write_text(run_dir / "report.md", report)
    distributed.barrier()
    return out


def _order(chain: ChainRecipe, stages: list[ChainStage]) -> list[tuple[str, dict[str, Any], str]]:
    order = [(s.name, s.set, "chained") for s in stages]
    if chain.direct is not False:
        extra = chain.direct if isinstance(chain.direct, dict) else {}
        order.append(("direct", _merged(stages[-1].set, extra), "first"))
    if chain.ensemble:
        order.append(("ensemble", stages[-1].set, "ensemble"))
    return order


def _run_classic_stages(
    chain: ChainRecipe, run_dir: Path, setting: str, resume: bool
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    from .pipeline import run_recipe

    teacher_dir: Path | None = None
    first_teacher: Path | None = None
    first_folder: Path | None = None
    done: dict[str, dict[str, Any]] = {}
    generations: list[str] = []
    order = _order(chain, chain.planned())
    for name, changes, source in order:
        data = _merged(chain.base, changes)
        data["name"] = f"{chain.name}/{name}"
        teacher_path: str | list[str] | None = None
        folder = run_dir / name
        if source == "chained" and teacher_dir is not None:
            teacher_path = str(teacher_dir)
        elif source == "first":
            teacher_path = str(first_teacher)
            if first_folder is not None:  # same teacher, same data: its logit cache fits
                cache = Path("teacher") / "cache-train"
                _link_copy(first_folder / cache, folder / cache)
        elif source == "ensemble":
            teacher_path = generations
        if teacher_path is not None:
            data["teacher"] = {**data.get("teacher", {}), "path": teacher_path}
        recipe = Recipe.model_validate(data)
        log.info("chain %s: stage %s", chain.name, name)
        results = run_recipe(recipe, folder, resume=resume or (folder / "results.json").exists())
        done[name] = results
        if first_teacher is None:
            first_folder = folder
            first_teacher = folder / "teacher" / "final"
            if isinstance(recipe.teacher.path, str):
                first_teacher = Path(recipe.teacher.path)
        if source == "chained":
            teacher_dir = folder / setting / "distilled" / "final"
            generations.append(str(teacher_dir))
    return done, [n for n, _, _ in order]


def _run_lm_stages(
    chain: ChainRecipe, run_dir: Path, setting: str, resume: bool
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each stage's results, with its ``recipe`` and the stage it learned from (``taught_by``:
    a stage name or "teacher"), and the stage order."""
    from .llm.pipeline import LMRecipe, _folder_name, run_lm_recipe

    base = chain.base_recipe()
    first_model = base.teacher.model
    layers = None
    if chain.assistants is not None:
        layers = lm_layer_count(first_model, trust_remote_code=base.teacher.trust_remote_code)
    order = _order(chain, chain.planned(layers))
    done: dict[str, dict[str, Any]] = {}
    previous: str | None = None
    prev_name: str | None = None
    first_cache: str | None = None
    first_folder: Path | None = None
    for name, changes, source in order:
        data = _merged(chain.base, changes)
        data["name"] = f"{chain.name}/{name}"
        folder = run_dir / name
        student = data.setdefault("student", {})
        if student.get("model") is None:  # derived from the first teacher, as a direct one
            student["model"] = first_model
            student.setdefault("trust_remote_code", base.teacher.trust_remote_code)
        teacher = data["teacher"]
        cache = teacher.get("cache")
        if source == "chained" and previous is not None:
            teacher["model"] = previous
            if isinstance(cache, dict):  # a shared cache path belongs to the first teacher
                cache.pop("path", None)
        elif source == "first" and first_folder is not None:
            _link_copy(first_folder / "answers", folder / "answers")
            if cache not in (None, False) and first_cache is not None:
                teacher["cache"] = {**(cache if isinstance(cache, dict) else {}),
                                    "path": first_cache}  # fmt: skip
        recipe = LMRecipe.model_validate(data)
        log.info("chain %s: stage %s (teacher %s)", chain.name, name, recipe.teacher.model)
        results = run_lm_recipe(recipe, folder, resume=resume or (folder / "results.json").exists())
        taught_by = prev_name if source == "chained" and prev_name is not None else "teacher"
        done[name] = {"results": results, "recipe": recipe, "taught_by": taught_by}
        if first_folder is None:
            first_folder = folder
            if recipe.teacher.cache is not None:
                first_cache = recipe.teacher.cache.path or str(folder / "teacher-cache")
        if source == "chained":
            previous = str(folder / _folder_name(setting) / "export")
            prev_name = name
    return done, [n for n, _, _ in order]


def _lm_rows(
    chain: ChainRecipe,
    run_dir: Path,
    done: dict[str, dict[str, Any]],
    order: list[str],
    setting: str,
) -> list[dict[str, Any]]:
    """Every model of an LLM chain measured in one pass against the first teacher on the base
    recipe's held-out data: the teacher, the last student before distillation, and each
    stage's distilled student (variant ``setting``)."""
    from .hf import load_model
    from .llm.evaluate import lm_figures
    from .llm.pipeline import _folder_name, _size_row, initial_student, lm_datasets, load_lm_teacher

    base = chain.base_recipe()
    teacher, tok = load_lm_teacher(base)
    _, val, _ = lm_datasets(base, tok, teacher=teacher, run_dir=run_dir / order[0])
    chained = [n for n in order if n not in ("direct", "ensemble")]
    last = done[chained[-1]]
    untrained_recipe = last["recipe"].model_copy(update={"teacher": base.teacher})
    init, _, _ = initial_student(untrained_recipe, teacher, tok)
    untrained = f"{chained[-1]} (not distilled)"
    models: dict[str, torch.nn.Module] = {"teacher": teacher, untrained: init}
    for name in order:
        folder = run_dir / name / _folder_name(setting) / "export"
        models[name] = load_model(folder, "causal-lm", dtype=teacher.dtype)
    log.info("chain %s: measuring every model against the first teacher", chain.name)
    figures = lm_figures(models, val, teacher=teacher, batch_size=base.eval_batch_size)
    first_rows = done[order[0]]["results"]["rows"]
    last_rows = last["results"]["rows"]
    untrained_row = next(r for k, r in last_rows.items() if k.endswith("not distilled"))
    keys = ("perplexity", "top1_agreement", "kl_to_teacher")
    rows = []
    for name, model in models.items():
        if name == "teacher":
            speed, stage, by, extra = first_rows["teacher"], "—", "—", {}
        elif name == untrained:
            speed, stage, by, extra = untrained_row, chained[-1], "—", {}
        else:
            row = done[name]["results"]["rows"][setting]
            speed, stage, by = row, name, done[name]["taught_by"]
            extra = {"steps": row.get("steps"), "train_time_s": row.get("train_time_s")}
        rows.append({
            "model": name, "stage": stage, "taught_by": by, **_size_row(model),
            **{k: figures[name].get(k) for k in keys},
            "forward_tokens_per_s": speed.get("forward_tokens_per_s"), **extra,
        })  # fmt: skip
    return rows


def lm_chain_markdown(results: dict[str, Any]) -> str:
    """An LLM chain's report: every model measured against the first teacher, and the change
    in held-out perplexity from the model that taught it."""
    lines = [
        f"# potstill chain report: {results['name']}",
        "",
        f"Stages in order: {', '.join(results['stages'])}; each stage's teacher is the previous "
        f"stage's distilled student (variant {results['setting']}); 'direct' (when present) "
        "learns from the first teacher. Every model measured here in one pass on the held-out "
        "data: perplexity of the data's responses, top-1 agreement and KL(teacher‖model) with "
        "the first teacher. 'vs its teacher': the perplexity divided by its teacher's. Whole "
        f"chain {results['wall_time_s'] / 60:.1f} min.",
        "",
        "| model | taught by | layers | parameters | perplexity | vs its teacher | top-1 "
        "agreement | KL (nats) | forward tokens/s | steps | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ppl = {r["model"]: r["perplexity"] for r in results["rows"]}
    for r in results["rows"]:
        by = r["taught_by"]
        change = f"×{r['perplexity'] / ppl[by]:.2f}" if by in ppl else "—"
        steps = "—" if r.get("steps") is None else str(r["steps"])
        time_s = "—" if r.get("train_time_s") is None else f"{r['train_time_s']:.0f}"
        lines.append(
            f"| {r['model']} | {by} | {r['layers']} | {r['parameters'] / 1e6:.1f}M | "
            f"{r['perplexity']:,.1f} | {change} | {r['top1_agreement']:.3f} | "
            f"{r['kl_to_teacher']:.3f} | {r['forward_tokens_per_s']:,.0f} | {steps} | {time_s} |"
        )
    return "\n".join(lines) + "\n"


def _rows(done: dict[str, dict[str, Any]], setting: str) -> list[dict[str, Any]]:
    """Teacher, then per stage its distilled student (and the baseline without a teacher)."""
    first = next(iter(done.values()))
    keys = ("accuracy", "parameters", "file_bytes", "latency_ms", "throughput")
    rows = [{"model": "teacher", "stage": "—", **{k: first["teacher"].get(k) for k in keys}}]
    for name, results in done.items():
        runs = next(s["runs"] for s in results["settings"] if s["name"] == setting)
        for kind in ("distilled", "baseline"):
            if kind in runs:
                label = "distilled" if kind == "distilled" else "without teacher"
                rows.append({"model": f"{name} ({label})", "stage": name,
                             **{k: runs[kind].get(k) for k in keys}})  # fmt: skip
    return rows


def chain_markdown(results: dict[str, Any]) -> str:
    """The chain's report: every model side by side, and the change of each step."""
    lines = [
        f"# potstill chain report: {results['name']}",
        "",
        f"Stages in order: {', '.join(results['stages'])}; each stage's teacher is the previous "
        f"stage's distilled student (setting {results['setting']}); 'direct' (when present) "
        "learns from the first teacher, 'ensemble' from the mean of all generations. Test "
        "accuracy; latency at batch 1, throughput at the recipe's batch. Whole chain "
        f"{results['wall_time_s'] / 60:.1f} min.",
        "",
        "| model | parameters | test accuracy | change from its teacher | latency (ms) | "
        "throughput (ex/s) |",
        "|---|---|---|---|---|---|",
    ]
    teacher = previous = results["rows"][0]["accuracy"]
    for row in results["rows"]:
        change = "—"
        if row["model"].endswith("(distilled)"):
            # a chained stage learned from the stage before it; 'direct' from the first
            # teacher; 'ensemble' from all generations (compared with the last one)
            source = teacher if row["stage"] == "direct" else previous
            change = f"{100 * (row['accuracy'] - source):+.2f} points"
            if row["stage"] not in ("direct", "ensemble"):
                previous = row["accuracy"]
        lines.append(
            f"| {row['model']} | {row['parameters']:,} | {100 * row['accuracy']:.2f}% | {change} "
            f"| {row['latency_ms']:.3f} | {row['throughput']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


__all__ = [
    "ChainRecipe",
    "ChainStage",
    "chain_markdown",
    "lm_chain_markdown",
    "lm_layer_count",
    "run_chain",
]
