"""The CLI explains itself: ``--version``, ``recipes`` with what each does, ``validate`` without
running, ``new`` templates that validate as written, a JSON schema that the built-in, README
and template recipes satisfy (checked with ``jsonschema``, as an editor would), shell
completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version

import pytest
import yaml
from test_readme_recipes import RECIPES as README_RECIPES
from typer.testing import CliRunner

from potstill.cli import app
from potstill.recipe import (
    RECIPE_KINDS,
    builtin_recipes,
    load_recipe,
    read_recipe_data,
    recipe_kind,
    validate_recipe,
)

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_version_is_the_installed_packages():
    out = invoke("--version")
    assert out.exit_code == 0
    assert out.output.strip() == f"potstill {version('potstill')}"


def test_recipes_lists_each_with_its_kind_and_first_sentence():
    out = invoke("recipes")
    assert out.exit_code == 0
    lines = out.output.strip().splitlines()
    assert len(lines) == len(builtin_recipes())
    for line, name in zip(lines, builtin_recipes(), strict=True):
        first, kind, what = line.split(maxsplit=2)
        assert first == name and kind == recipe_kind(read_recipe_data(name)[0])
        assert len(what) > 20
    default = next(line for line in lines if line.startswith("default "))
    assert "The built-in default: Fashion-MNIST" in default


def test_validate_prints_the_resolved_recipe_or_each_bad_field(tmp_path):
    out = invoke("validate", "default", "--set", "train.max_steps=7")
    assert out.exit_code == 0, out.output
    body = out.output.split("\n", 1)[1]
    resolved = validate_recipe(yaml.safe_load(body))
    assert resolved == load_recipe("default", ["train.max_steps=7"])
    assert resolved.train.max_steps == 7
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: {max_steps: -1, epohcs: 2}\n")
    out = invoke("validate", str(bad))
    assert out.exit_code == 2
    assert "train.max_steps: Input should be greater than 0 (got -1)" in out.output
    assert "train.epohcs: unknown field" in out.output
    assert str(bad) in out.output


@pytest.mark.parametrize("kind", list(RECIPE_KINDS))
def test_a_new_template_validates_as_written_and_says_what_fields_mean(kind, tmp_path):
    out = invoke("new", kind, "--out", str(tmp_path / "t.yaml"))
    assert out.exit_code == 0, out.output
    text = (tmp_path / "t.yaml").read_text()
    recipe = validate_recipe(yaml.safe_load(text))
    assert recipe.kind == kind
    described = "# also distil the last student" if kind == "chain" else "# where the run computes"
    assert described in text  # a field's description, as a comment
    assert text.count("\n#") + text.count("\n  #") > 5
    again = invoke("new", kind, "--out", str(tmp_path / "t.yaml"))
    assert again.exit_code == 2 and "exists" in again.output  # never over a file
    assert invoke("new", kind).output == text  # to stdout, the same text


def test_a_template_keeps_the_example_it_starts_from():
    from potstill.recipe.explain import example_for, template

    for kind in RECIPE_KINDS:
        name = example_for(kind)
        data = read_recipe_data(name)[0]
        want = validate_recipe({**data, "kind": kind})
        assert validate_recipe(yaml.safe_load(template(kind))) == want
    out = invoke("new", "regression")
    assert out.exit_code == 2 and "unknown recipe kind 'regression'" in out.output


def test_the_schema_accepts_every_recipe_potstill_ships_and_refuses_bad_ones(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from potstill.recipe.explain import template

    out = invoke("schema", "--out", str(tmp_path / "s.json"))
    assert out.exit_code == 0
    schema = json.loads((tmp_path / "s.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    check = jsonschema.Draft202012Validator(schema)
    shipped = {name: read_recipe_data(name)[0] for name in builtin_recipes()}
    shipped |= {f"README {n}": yaml.safe_load(t) for n, t in README_RECIPES.items()}
    shipped |= {f"new {k}": yaml.safe_load(template(k)) for k in RECIPE_KINDS}
    for name, data in shipped.items():
        errors = [e.message[:200] for e in check.iter_errors(data)]
        assert not errors, (name, errors)
    lm = read_recipe_data("smollm2-fortunes")[0]
    assert check.is_valid({**lm, "teacher": {**lm["teacher"], "cache": True}})  # the shorthand
    bad = [
        {**shipped["default"], "train": {"epohcs": 3}},
        {**shipped["default"], "seed": "zero"},
        {**lm, "variants": {"x": [{"kind": "fkll"}]}},
        {**lm, "kind": "regression"},
    ]
    for data in bad:  # what potstill refuses, the schema refuses too
        assert not check.is_valid(data)
        with pytest.raises(ValueError):
            validate_recipe(data)
    assert json.loads(invoke("schema").output) == schema


def test_shell_completion_completes_commands():
    env = {**os.environ, "_POTSTILL_COMPLETE": "complete_bash", "COMP_WORDS": "potstill va",
           "COMP_CWORD": "1"}  # fmt: skip
    script = "from potstill.cli import main; main()"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["validate"]
    # the script `--show-completion` prints (asked for bash by name: with shellingham installed
    # that option detects the calling shell, which a test process may not have)
    source = {**os.environ, "_POTSTILL_COMPLETE": "source_bash"}
    shown = subprocess.run([sys.executable, "-c", script], env=source, capture_output=True,
                           text=True)  # fmt: skip
    assert "complete -o default -F _potstill_completion potstill" in shown.stdout


def test_a_missing_hugging_face_package_is_one_line_with_the_install_command(tmp_path):
    """Without transformers (blocked in the process), ``potstill generate`` and a Hugging Face
    recipe say which package and which extra, exit 2, no traceback."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    block = "import sys; sys.modules['transformers'] = None; from potstill.cli import main; main()"
    for args in (["generate", "--prompts", str(prompts), "--out", str(tmp_path / "a.jsonl"),
                  "--teacher", "HuggingFaceTB/SmolLM2-135M-Instruct"],
                 ["distill", "fortunes-topics", "--out", str(tmp_path / "run")]):  # fmt: skip
        out = subprocess.run([sys.executable, "-c", block, *args], capture_output=True,
                             text=True, cwd=tmp_path)  # fmt: skip
        assert out.returncode == 2, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
        assert out.stderr.strip().splitlines()[-1] == (
            "error: this needs transformers, which is not installed: pip install 'potstill[hf]'"
        )
