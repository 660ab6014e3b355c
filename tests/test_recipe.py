"""Tests for recipes: the built-in default, ``--set`` overrides, and error messages that name the
field, the bad value and what is accepted."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import yaml

from potstill.losses.objective import Objective
from potstill.recipe import RecipeError, apply_overrides, builtin_recipes, load_recipe
from potstill.recipe.classic import ClassicRecipe


def test_builtin_default_recipe_validates():
    assert "default" in builtin_recipes()
    r = load_recipe("default")
    assert isinstance(r, ClassicRecipe)
    assert r.name == "fashion-mnist-default"
    assert r.data.name == "fashion-mnist"
    assert r.teacher.arch.hidden == [1024, 1024]
    assert r.teacher.train.schedule.warmup_steps == 100
    assert r.student.arch.hidden == [32]
    raw = yaml.safe_load((resources.files("potstill") / "recipes" / "default.yaml").read_text())
    assert [(t.kind, t.weight, t.temperature) for t in r.objective] == [
        (o["kind"], o["weight"], o.get("temperature", 1.0)) for o in raw["objective"]
    ]
    assert [t.kind for t in r.objective] == ["kd", "ce"]
    assert [(s.name, s.labelled_fraction) for s in r.settings] == [
        ("few-labels", 0.05),
        ("same-data", 1.0),
    ]
    objective = r.build_objective()
    assert isinstance(objective, Objective)
    assert [(t.name, t.weight, t.needs_teacher) for t in objective.terms] == [
        ("kd", raw["objective"][0]["weight"], True),
        ("ce", raw["objective"][1]["weight"], False),
    ]


def test_overrides_take_effect():
    r = load_recipe(
        "default",
        [
            "train.epochs=2",
            "objective.0.temperature=8",
            "train.optimizer.name=sgd",
            "teacher.arch.hidden=[64, 32]",
            "data.name=digits",
            "settings.1.labelled_fraction=0.5",
            "baseline=false",
        ],
    )
    assert r.train.epochs == 2
    assert r.objective[0].temperature == 8.0
    assert r.objective[0].weight == load_recipe("default").objective[0].weight  # siblings kept
    assert r.train.optimizer.name == "sgd"
    assert r.train.optimizer.lr == 0.003
    assert r.teacher.arch.hidden == [64, 32]
    assert r.teacher.arch.dropout == 0.2
    assert r.data.name == "digits"
    assert r.settings[1].labelled_fraction == 0.5
    assert r.baseline is False
    # the built-in file itself is not changed by overrides
    assert load_recipe("default").train.epochs == 10


def test_override_values_are_parsed_as_yaml():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=[1, 2]", "a.c=true", "a.d=0.5", "e.f=x"])
    assert data == {"a": {"b": [1, 2], "c": True, "d": 0.5}, "e": {"f": "x"}}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.optimizer.name=adamx", ["train.optimizer.name", "'adamx'", "'adamw'", "'sgd'"]),
        ("train.optimizer.lr=-1", ["train.optimizer.lr", "greater than 0", "-1"]),
        ("objective.0.kind=kld", ["objective.0.kind", "'kld'", "'kd'", "'jsd'", "'mse'"]),
        ("settings.0.labelled_fraction=0", ["settings.0.labelled_fraction", "greater than 0"]),
        ("train.batch_size=abc", ["train.batch_size", "integer", "'abc'"]),
        ("objective.1.label_smoothing=1", ["objective.1.label_smoothing", "less than 1"]),
        ("train.epoch=3", ["train.epoch", "unknown field"]),
        ("teacher.arch.kind=rnn", ["teacher.arch.kind", "'rnn'", "'mlp'", "'cnn'"]),
    ],
)
def test_bad_value_names_field_value_and_accepted(override, expected):
    with pytest.raises(RecipeError) as info:
        load_recipe("default", [override])
    message = str(info.value)
    assert "built-in recipe 'default'" in message
    for part in expected:
        assert part in message, (part, message)


def test_several_problems_are_reported_together():
    with pytest.raises(RecipeError) as info:
        load_recipe("default", ["train.epoch=3", "train.batch_size=0"])
    lines = str(info.value).splitlines()
    assert any(line.strip().startswith("train.epoch:") for line in lines)
    assert any(line.strip().startswith("train.batch_size:") for line in lines)


@pytest.mark.parametrize(
    "override, match",
    [
        ("objective.5.weight=1", r"objective is a list of 2; '5' is not an index"),
        ("settings.x.name=a", r"settings is a list of 2; 'x' is not an index"),
        ("train.epochs.x=3", r"train.epochs is a value, not a section"),
        ("train.epochs", r"expected key=value"),
    ],
)
def test_malformed_overrides(override, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe("default", [override])


def test_recipe_file_that_is_a_list(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- name: a\n- name: b\n")
    with pytest.raises(RecipeError, match="must be a mapping.*got list") as info:
        load_recipe(path)
    assert str(path) in str(info.value)


def test_recipe_file_with_bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {epochs: 3\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_an_empty_recipe_file_is_refused_and_an_empty_mapping_gives_the_defaults(tmp_path):
    """An empty file is a mistake far more often than a wish to run every default (a truncated
    or unsaved file): refused, naming it; ``{}`` asks for the defaults."""
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(RecipeError, match=r"empty\.yaml is empty; .*`\{\}` runs the classic"):
        load_recipe(path)
    path.write_text("{}\n")
    assert load_recipe(path) == ClassicRecipe()


def test_unknown_recipe_name_lists_builtins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as info:
        load_recipe("no-such-recipe")
    message = str(info.value)
    assert "'no-such-recipe'" in message
    assert "built-in: default" in message


def test_recipe_from_file_with_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "mine",
                "data": {"name": "digits"},
                "objective": [{"kind": "jsd", "beta": 0.3}, {"kind": "ce"}],
                "train": {"epochs": 4, "batch_size": 32},
            }
        )
    )
    r = load_recipe(path, ["objective.0.beta=0.9", "train.batch_size=16"])
    assert r.name == "mine"
    assert r.objective[0].beta == 0.9
    assert r.train.batch_size == 16
    assert r.train.epochs == 4
    terms = r.build_objective().terms
    assert [t.name for t in terms] == ["jsd", "ce"]


def test_duplicate_term_and_setting_names_are_refused():
    with pytest.raises(RecipeError, match="term names must be unique"):
        load_recipe("default", ["objective.1.kind=kd"])
    # a name tells two terms of one kind apart
    r = load_recipe("default", ["objective.1.kind=kd", "objective.1.name=kd2"])
    assert [t.name for t in r.build_objective().terms] == ["kd", "kd2"]
    with pytest.raises(RecipeError, match="settings: names must be unique"):
        load_recipe("default", ["settings.1.name=few-labels"])
    with pytest.raises(RecipeError, match="at least one term"):
        load_recipe("default", ["objective=[]"])


def test_string_field_can_be_set_to_a_numeric_looking_value():
    assert load_recipe("default", ["name=2024"]).name == "2024"


# --- one schema for every kind ---------------------------------------------------------------

BEFORE = Path(__file__).parent / "data" / "builtin_recipes_before.json"
# fields the one schema added: the kind of classic recipes, a dtype on every Hugging Face model
# spec, a classic data source's columns, and the term fields every kind now shares (at their
# defaults in causal-LM terms)
ADDED = {"kind", "dtype", "columns", "label_smoothing", "student", "teacher", "loss", "normalize",
         "layer_map", "k", "p", "relation_heads",
         # issue 18: the user's data (data.source, style, windows) and embedding pooling
         "source", "style", "windows", "mode", "pairs",
         # issue 18: Hugging Face and torchvision image classifiers on the classic road
         "model", "config", "torchvision", "processor", "trust_remote_code",
         "finetune",
         # issue 19: where a run computes and in what precision
         "device", "device_map", "tf32", "compile",
         # issue 20: fallback checkpoints
         "checkpoints_kept", "nonfinite",
         # issue 21: experiment trackers
         "report_to",
         # issue 22: a served teacher
         "server"}  # fmt: skip
# fields dropped: an embedding teacher's keep / layers, accepted before and never used (a
# teacher is not derived); they were unset (None) in every built-in recipe
REMOVED = {("teacher", "keep"), ("teacher", "layers")}


def _leaves(data, prefix=()):
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _leaves(value, (*prefix, i))
    else:
        yield prefix, data


@pytest.mark.parametrize("name", builtin_recipes())
def test_builtin_recipes_validate_to_the_same_settings_as_before(name):
    """Every built-in recipe gives the settings it gave before the schemas became one package
    (tests/data/builtin_recipes_before.json, dumped by that code); the only new fields are the
    documented additions, at their defaults."""
    recorded = json.loads(BEFORE.read_text())
    if name not in recorded:  # a recipe added since: it validates, and has nothing to keep
        assert load_recipe(name).kind in ("text-classification", "image-classification"), name
        return
    before = dict(_leaves(recorded[name]))
    now = dict(_leaves(load_recipe(name).model_dump(mode="json")))
    for path in REMOVED & set(before):
        assert before.pop(path) is None and path not in now
    assert {p: now.get(p, "<missing>") for p in before} == before
    added = {p for p in now if p not in before}
    assert {p[-1] for p in added} <= ADDED, sorted(added)


def test_every_kind_loads_through_one_union():
    from potstill.recipe import RECIPE_KINDS, recipe_kind, validate_recipe

    assert list(RECIPE_KINDS) == [
        "classic", "image-classification", "embed", "causal-lm", "chain", "text-classification"
    ]  # fmt: skip
    for name in builtin_recipes():
        r = load_recipe(name)
        assert type(r) is RECIPE_KINDS[recipe_kind(r)]
    assert type(validate_recipe({})) is RECIPE_KINDS["classic"]  # no kind: classic
    assert type(validate_recipe({"kind": "classic"})) is RECIPE_KINDS["classic"]


def test_unknown_kind_lists_the_kinds_accepted(tmp_path):
    from typer.testing import CliRunner

    from potstill.cli import app

    path = tmp_path / "r.yaml"
    path.write_text("kind: distill-everything\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "kind: unknown recipe kind 'distill-everything'" in msg
    assert "accepted kinds: classic, image-classification, embed, causal-lm, chain" in msg
    result = CliRunner().invoke(app, ["distill", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "accepted kinds" in result.output
    assert not (tmp_path / "run").exists()


def test_errors_name_fields_without_the_kind_tag(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"kind": "causal-lm", "variants": {"x": [{"kind": "fkl"}]}}))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "\n  teacher: Field required" in str(err.value)  # not "causal-lm.teacher"


@pytest.mark.parametrize("beta", [0, 1])
def test_jsd_at_an_end_of_beta_is_refused_in_every_kind(beta):
    """jsd at beta 0 or 1 is identically 0 whatever the student: a term that teaches nothing
    (TRL's GKD calls beta 0 its forward KL), refused with the fix in classic and causal-LM."""
    from potstill.recipe import validate_recipe

    classic = {"objective": [{"kind": "jsd", "beta": beta}, {"kind": "ce"}]}
    lm = {"kind": "causal-lm", "teacher": {"model": "m"},
          "variants": {"x": [{"kind": "jsd", "beta": beta}]}}  # fmt: skip
    for data in (classic, lm):
        with pytest.raises(RecipeError, match="identically 0.*give 0 < beta < 1, or use fkl"):
            validate_recipe(data)
    assert validate_recipe({"objective": [{"kind": "jsd", "beta": 0.3}]}).objective[0].beta == 0.3


def test_causal_lm_terms_accept_only_token_kinds_and_fields():
    from potstill.recipe import validate_recipe

    def lm(term):
        return {"kind": "causal-lm", "teacher": {"model": "m"}, "variants": {"x": [term]}}

    with pytest.raises(RecipeError, match=r"variants\.x\.terms\.0\.kind: Input should be 'ce'"):
        validate_recipe(lm({"kind": "pkt"}))
    with pytest.raises(RecipeError, match="label_smoothing: not a field of a causal-LM term"):
        validate_recipe(lm({"kind": "ce", "label_smoothing": 0.1}))
    with pytest.raises(RecipeError, match="student, teacher: not a field of a causal-LM term"):
        validate_recipe(lm({"kind": "fkl", "student": "h", "teacher": "h"}))
    term = validate_recipe(lm({"kind": "skl", "skew": 0.2})).variants["x"].terms[0]
    assert (term.kind, term.skew) == ("skl", 0.2)


def test_term_names_must_be_unique_in_every_kind():
    from potstill.recipe import validate_recipe

    two = [{"kind": "pkt"}, {"kind": "pkt"}]
    embed = {"kind": "embed", "teacher": {"model": "t"}, "student": {"model": "s"},
             "variants": {"v": two}}  # fmt: skip
    for data in ({"objective": two}, embed):
        with pytest.raises(RecipeError, match="term names must be unique"):
            validate_recipe(data)


def test_a_chain_base_must_be_a_stage_kind():
    from potstill.recipe import validate_recipe

    with pytest.raises(RecipeError, match="base.kind: a chain's stages are runs of kind classic"):
        validate_recipe({"kind": "chain", "generations": 1, "base": {"kind": "embed"}})
