# ruff: noqa: F811  (small_fortunes is a fixture imported from test_llm_pipeline)
"""Causal-LM chains (``kind: chain`` with a ``causal-lm`` base): a teacher assistant planned by
layers kept between a tiny 4-layer Llama teacher and a 1-layer derived student, each stage an
ordinary causal-LM run taught by the previous stage's export, the direct comparison with its own
budget, the chain report measuring every model against the first teacher, and resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_llm_pipeline import merged, recipe_dict, small_fortunes, tiny_llama  # noqa: F401

from potstill.recipe.chain import ChainRecipe
from potstill.runs import run as run_recipe
from potstill.runs.chain import lm_layer_count

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama4(tok, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama4")
    tiny_llama(len(tok), seed=0, layers=4).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _chain(llama4: Path, fortunes: Path, **over: Any) -> ChainRecipe:
    base = recipe_dict(
        llama4,
        data={"folder": str(fortunes), "train": 6, "val": 2},
        variants={"fkl": [{"kind": "fkl"}], "ce": [{"kind": "ce"}]},
        generate={"prompts": ["A fortune about love."], "max_new_tokens": 2},
    )
    base = merged(base, over.pop("base", {}))
    return ChainRecipe.model_validate({"kind": "chain", "name": "lm-chain", "base": base, **over})


@pytest.fixture(scope="module")
def chain_run(llama4, small_fortunes, tmp_path_factory):
    chain = _chain(
        llama4, small_fortunes, assistants=1, direct={"train": {"max_steps": 4}},
        base={"teacher": {"cache": {"k": 8}}},
    )  # fmt: skip
    run_dir = tmp_path_factory.mktemp("lm-chain") / "run"
    return chain, run_dir, run_recipe(chain, run_dir)


def _recipe(run_dir: Path, stage: str) -> dict[str, Any]:
    return yaml.safe_load((run_dir / stage / "recipe.yaml").read_text())


def test_assistant_is_planned_by_layers_and_each_stage_learns_from_the_one_before(chain_run):
    chain, run_dir, out = chain_run
    assert out["stages"] == ["assistant-1", "student", "direct"]
    assert out["base_kind"] == "causal-lm" and out["setting"] == "fkl"  # the first variant
    assistant, student, direct = (_recipe(run_dir, s) for s in out["stages"])
    # plan_layers(4, 1) = [2]: the assistant keeps 2 of the teacher's 4 layers
    assert assistant["student"]["keep"] == 2 and student["student"]["keep"] == 1
    first = chain.base["teacher"]["model"]
    assert assistant["teacher"]["model"] == first
    assert student["teacher"]["model"] == str(run_dir / "assistant-1" / "fkl" / "export")
    assert direct["teacher"]["model"] == first
    # every student is derived from the first teacher (the same start as the direct student)
    for stage, kept in (("assistant-1", 2), ("student", 1), ("direct", 1)):
        config = json.loads((run_dir / stage / "fkl" / "export" / "config.json").read_text())
        assert config["num_hidden_layers"] == kept
        assert config["potstill_derived_from"]["teacher_layers"] == 4
    # the direct stage has its own budget; the chained stages the base's
    steps = {s: json.loads((run_dir / s / "fkl" / "done.json").read_text())["steps"]
             for s in out["stages"]}  # fmt: skip
    assert steps == {"assistant-1": 2, "student": 2, "direct": 4}


def test_direct_stage_reuses_the_first_teachers_cache(chain_run):
    _, run_dir, _ = chain_run
    assistant, student, direct = (_recipe(run_dir, s) for s in ("assistant-1", "student", "direct"))
    first_cache = str(run_dir / "assistant-1" / "teacher-cache")
    assert direct["teacher"]["cache"]["path"] == first_cache
    assert not (run_dir / "direct" / "teacher-cache").exists()
    # the student stage's teacher is the assistant: a cache of its own
    assert (run_dir / "student" / "teacher-cache" / "manifest.json").exists()
    results = json.loads((run_dir / "direct" / "results.json").read_text())
    assert results["teacher_cache"]["path"] == first_cache


def test_chain_report_measures_every_model_against_the_first_teacher(chain_run, llama4):
    _, run_dir, out = chain_run
    rows = {r["model"]: r for r in out["rows"]}
    assert list(rows) == ["teacher", "student (not distilled)", "assistant-1", "student", "direct"]
    assert [r["layers"] for r in rows.values()] == [4, 1, 2, 1, 1]
    assert rows["teacher"]["top1_agreement"] == pytest.approx(1.0)
    assert rows["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert (
        rows["student"]["taught_by"] == "assistant-1" and rows["direct"]["taught_by"] == "teacher"
    )
    # stages whose teacher is the first one measured the same figures in their own runs
    for stage in ("assistant-1", "direct"):
        own = json.loads((run_dir / stage / "results.json").read_text())["rows"]["fkl"]
        for key in ("perplexity", "top1_agreement", "kl_to_teacher"):
            assert rows[stage][key] == pytest.approx(own[key], rel=1e-5, abs=1e-6)
    # perplexity does not depend on the teacher: the student stage's own run agrees
    own = json.loads((run_dir / "student" / "results.json").read_text())["rows"]
    assert rows["student"]["perplexity"] == pytest.approx(own["fkl"]["perplexity"], rel=1e-5)
    assert rows["student (not distilled)"]["perplexity"] == pytest.approx(
        own["derived, not distilled"]["perplexity"], rel=1e-5
    )
    assert rows["assistant-1"]["parameters"] > rows["student"]["parameters"]
    md = (run_dir / "report.md").read_text()
    assert "| student | assistant-1 | 1 |" in md and "vs its teacher" in md
    ratio = rows["student"]["perplexity"] / rows["assistant-1"]["perplexity"]
    assert f"×{ratio:.2f}" in md


def test_resumed_chain_retrains_nothing(chain_run):
    chain, run_dir, out = chain_run
    exports = sorted(run_dir.glob("*/*/export/*.safetensors"))
    assert len(exports) == 6  # two variants in each of three stages
    stamps = {p: p.stat().st_mtime_ns for p in exports}
    again = run_recipe(chain, run_dir, resume=True)
    assert {p: p.stat().st_mtime_ns for p in exports} == stamps
    assert [r["perplexity"] for r in again["rows"]] == pytest.approx(
        [r["perplexity"] for r in out["rows"]], rel=1e-6
    )


def test_lm_chain_errors_and_born_again(llama4, small_fortunes):
    assert lm_layer_count(str(llama4)) == 4
    born = _chain(llama4, small_fortunes, generations=2, from_setting="ce")
    assert [s.name for s in born.planned()] == ["generation-1", "generation-2"]
    with pytest.raises(ValueError, match="from_setting: 'nope' is not a variant"):
        _chain(llama4, small_fortunes, generations=2, from_setting="nope")
    with pytest.raises(ValueError, match="ensemble"):
        _chain(llama4, small_fortunes, generations=2, ensemble=True)
    with pytest.raises(ValueError, match="student derived from the teacher"):
        _chain(llama4, small_fortunes, assistants=1, base={"student": {"model": "other"}})
    with pytest.raises(ValueError, match="no room for 3 assistants"):
        _chain(llama4, small_fortunes, assistants=3).planned(4)
    with pytest.raises(ValueError, match="max_steps"):
        _chain(llama4, small_fortunes, stages=[{"name": "a", "set": {"train": {"max_steps": 0}}}])


@pytest.mark.parametrize(
    ("recipe", "field"),
    [
        ("default", "data.data_dir"),
        ("smollm2-fortunes", "data.folder"),
        ("fashion-assistant", "base.data.data_dir"),
        ("smollm2-assistant", "base.data.folder"),
    ],
)
def test_data_dir_option_reaches_every_recipe_kind(recipe, field, tmp_path):
    from potstill.cli import data_dir_override
    from potstill.recipe import load_recipe

    override = data_dir_override(recipe, str(tmp_path))
    assert override == f"{field}={tmp_path}"
    loaded: Any = load_recipe(recipe, [override])
    if field.startswith("base."):
        loaded = loaded.base_recipe()
    data = loaded.data
    assert str(tmp_path) == (data.folder if field.endswith("folder") else data.data_dir)


def test_data_dir_option_for_a_recipe_that_names_kind_classic(tmp_path):
    from potstill.cli import data_dir_override

    path = tmp_path / "r.yaml"
    path.write_text("kind: classic\nname: x\n")
    assert data_dir_override(str(path), "/d") == "data.data_dir=/d"


def test_chain_results_header_and_report(chain_run):
    from conftest import assert_report_rebuilds, assert_results_header

    _, run_dir, out = chain_run
    assert_results_header(out, "chain")
    assert_report_rebuilds(run_dir)
    for stage in out["stages"]:  # each stage is an ordinary run with the same header
        stage_results = json.loads((run_dir / stage / "results.json").read_text())
        assert_results_header(stage_results, "causal-lm")
