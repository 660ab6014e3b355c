"""The text-classification road on real models and data: a CSV of fortunes (three categories)
through a recipe — MiniLM fine-tuned as the teacher, a student derived from its layers, the
same-budget baseline — exported as plain Hugging Face classifiers that reload and predict what
the run measured; a student with another tokenizer; resume; label mismatches refused before
training; the Python API on a ``datasets.Dataset`` with no forward written."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    MINILM,
    assert_report_rebuilds,
    assert_results_header,
    card_metric,
    needs_minilm,
    read_card,
)

from potstill.data.fortunes import fortune_entries
from potstill.data.rows import DataError
from potstill.recipe import RecipeError, validate_recipe

pytestmark = needs_minilm

CLASSES = ["computers", "politics", "science"]


def write_csv(path: Path, n: int = 150, seed: int = 0) -> list[dict[str, str]]:
    entries = [(c, t) for c, t in fortune_entries() if c in CLASSES]
    random.Random(seed).shuffle(entries)
    rows = [{"sentence": t, "topic": c} for c, t in entries[:n]]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sentence", "topic"])
        w.writeheader()
        w.writerows(rows)
    return rows


def error_rate(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """A user metric, named in the recipe as ``test_text_classification:error_rate``."""
    return float((logits.argmax(-1) != labels).float().mean())


def recipe_data(csv_path: Path, **over) -> dict:
    data = {
        "kind": "text-classification",
        "name": "tiny-topics",
        "data": {
            "path": str(csv_path),
            "columns": {"text": "sentence", "label": "topic"},
            "max_length": 32,
            "val_size": 20,
            "test_size": 30,
        },
        "teacher": {
            "model": "sentence-transformers/all-MiniLM-L6-v2",
            "finetune": {"max_steps": 12, "batch_size": 8, "optimizer": {"lr": 2e-4}},
        },
        "student": {"keep": 1},
        "train": {"max_steps": 6, "batch_size": 8, "optimizer": {"lr": 2e-4}},
        "evaluation": {
            "throughput_batch": 8,
            "metrics": {"error_rate": "test_text_classification:error_rate"},
        },
    }
    for key, value in over.items():
        data[key] = value
    return data


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from potstill.runs import run

    root = tmp_path_factory.mktemp("tc")
    write_csv(root / "topics.csv")
    recipe = validate_recipe(recipe_data(root / "topics.csv"))
    results = run(recipe, root / "run")
    return root, recipe, results


def test_recipe_defaults_suit_a_transformer_and_bad_recipes_are_named(tmp_path):
    r = validate_recipe(recipe_data(tmp_path / "x.csv", train={"epochs": 1}))
    assert r.train.batch_size == 32 and r.train.optimizer.lr == 5e-5  # not TrainConfig's 1e-3
    assert r.teacher.finetune.optimizer.lr == 2e-4 and r.teacher.finetune.max_steps == 12
    assert [t.kind for t in r.objective] == ["kd", "ce"]
    with pytest.raises(RecipeError, match=r"student: .*give keep or layers"):
        validate_recipe(recipe_data(tmp_path / "x.csv", student={}))
    with pytest.raises(RecipeError, match=r"metrics.f1: cannot import 'nowhere:f1'"):
        validate_recipe(
            recipe_data(tmp_path / "x.csv", evaluation={"metrics": {"f1": "nowhere:f1"}})
        )
    with pytest.raises(RecipeError, match=r"data: .*no data given"):
        validate_recipe(recipe_data(tmp_path / "x.csv", data={"columns": {}}))


def test_run_reports_teacher_distilled_and_baseline(finished):
    root, recipe, results = finished
    assert_results_header(results, "text-classification")
    rows = results["rows"]
    assert list(rows) == ["teacher", "distilled", "baseline"]
    assert results["data"]["classes"] == CLASSES
    assert results["data"]["rows"] == {"train": 100, "validation": 20, "test": 30}
    assert rows["baseline"]["steps"] == rows["distilled"]["steps"] == 6
    assert rows["teacher"]["layers"] == 6 and rows["distilled"]["layers"] == 1
    assert rows["distilled"]["parameters"] < rows["teacher"]["parameters"]
    assert set(rows["distilled"]["per_class_f1"]) == set(CLASSES)
    f1 = rows["distilled"]["per_class_f1"]
    assert rows["distilled"]["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    assert results["data"]["cut"]["train"]["teacher"] > 0  # fortunes longer than 32 tokens
    for row in rows.values():  # the recipe's own metric, on the same test split
        assert row["metrics_yours"]["error_rate"] == pytest.approx(1 - row["accuracy"])
    for kind in ("distilled", "baseline"):  # each card's hub metadata, as the hub reads it
        card, meta = read_card(root / "run" / kind / "final", recipe)
        assert card.startswith(f"# tiny-topics: {kind}")
        assert (meta.pipeline_tag, meta.library_name) == ("text-classification", "transformers")
        assert meta.base_model == "sentence-transformers/all-MiniLM-L6-v2"
        assert card_metric(meta, "accuracy") == pytest.approx(rows[kind]["accuracy"])
        assert card_metric(meta, "f1") == pytest.approx(rows[kind]["macro_f1"])
    report = (root / "run" / "report.md").read_text()
    assert "Your metrics on the test split" in report
    assert "| distilled | 1 |" in report and "same student trained without a teacher" in report
    assert_report_rebuilds(root / "run")


def test_exported_students_reload_as_plain_classifiers_and_predict_as_measured(finished):
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from potstill.data.tables import load_table_splits

    root, recipe, results = finished
    for kind in ("distilled", "baseline"):
        folder = root / "run" / kind / "final"
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        assert model.config.id2label == dict(enumerate(CLASSES))
        assert "Test accuracy" in (folder / "README.md").read_text()
        # the test split, made again the way the recipe makes it, predicted by the export alone
        test = load_table_splits(**recipe.data.source_options(), seed=recipe.seed)["test"]
        assert len(test) == 30
        enc = tok(list(test["sentence"]), truncation=True, max_length=32, padding=True,
                  return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            pred = model(**enc).logits.argmax(-1)
        labels = torch.tensor([CLASSES.index(t) for t in test["topic"]])
        acc = float((pred == labels).float().mean())
        assert acc == pytest.approx(results["rows"][kind]["accuracy"], abs=1e-6)
    assert load_dataset  # the datasets library is what read the CSV


def test_resume_reuses_every_finished_part(finished):
    from potstill.runs import run

    root, recipe, results = finished
    final = root / "run" / "distilled" / "final" / "model.safetensors"
    before = final.stat().st_mtime_ns
    again = run(recipe, root / "run", resume=True)
    assert final.stat().st_mtime_ns == before  # not trained again
    for kind in ("teacher", "distilled", "baseline"):
        assert again["rows"][kind]["accuracy"] == results["rows"][kind]["accuracy"]


def test_teacher_with_other_classes_is_refused_before_training(finished, tmp_path):
    from potstill.runs import run

    root, _, _ = finished
    teacher = root / "run" / "teacher" / "final"
    data = recipe_data(root / "topics.csv", teacher={"model": str(teacher)})
    data["data"]["labels"] = ["computers", "politics"]
    with pytest.raises(DataError, match=r"the data has 2 classes \(computers, politics\) but "
                       r"the teacher predicts 3"):  # fmt: skip
        run(validate_recipe(data), tmp_path / "refused")
    assert not (tmp_path / "refused" / "distilled").exists()
    data["data"]["labels"] = ["politics", "computers", "science"]
    with pytest.raises(DataError, match=r"teacher's labels \(computers, politics, science\) "
                       r"are not the data's classes"):  # fmt: skip
        run(validate_recipe(data), tmp_path / "refused2")


def test_rows_without_text_are_named_as_the_file_has_them_before_anything_is_loaded(tmp_path):
    """Empty, blank and missing texts are refused with the file's row numbers (counted from 0,
    before val/test rows are carved out of it), not trained on as empty strings."""
    from potstill.runs import run

    rows = write_csv(tmp_path / "full.csv", n=90)
    rows[5]["sentence"], rows[41]["sentence"], rows[88]["sentence"] = "", "   ", ""
    with open(tmp_path / "gaps.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sentence", "topic"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "refused"
    with pytest.raises(DataError, match=r"data: column 'sentence' of the train split has no "
                       r"text in rows 5, 41, 88 \(counted from 0\); fill them in"):  # fmt: skip
        run(validate_recipe(recipe_data(tmp_path / "gaps.csv")), out)
    assert not (out / "teacher").exists()
    pair = recipe_data(tmp_path / "full.csv")  # the pair column is checked too
    pair["data"]["columns"]["text_pair"] = "topic"
    with open(tmp_path / "full.csv", "a", newline="") as f:
        csv.writer(f).writerow(["one more text", ""])
    with pytest.raises(DataError, match=r"column 'topic' of the train split has no text in "
                       r"rows 90 "):  # fmt: skip
        run(validate_recipe(pair), tmp_path / "refused-pair")


def word_level_classifier(folder: Path, texts: list[str], num_labels: int) -> Path:
    """A small BERT classifier with a word-level tokenizer of its own (another vocabulary than
    MiniLM's), saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(
        texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    )
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]",
    )  # fmt: skip
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64, num_labels=num_labels,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_student_with_another_tokenizer_learns_from_the_teachers_logits(finished, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from potstill.runs import run

    root, _, _ = finished
    rows = write_csv(tmp_path / "t.csv")
    student = word_level_classifier(tmp_path / "words", [r["sentence"] for r in rows], 3)
    data = recipe_data(
        tmp_path / "t.csv",
        teacher={"model": str(root / "run" / "teacher" / "final")},
        student={"model": str(student)},
    )
    results = run(validate_recipe(data), tmp_path / "run")
    assert set(results["data"]["cut"]["train"]) == {"teacher", "student"}
    exported = tmp_path / "run" / "distilled" / "final"
    tok = AutoTokenizer.from_pretrained(exported)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(student).get_vocab()
    model = AutoModelForSequenceClassification.from_pretrained(exported)
    assert model.config.id2label == dict(enumerate(CLASSES))
    assert results["rows"]["distilled"]["parameters"] < 1_000_000


def test_the_api_takes_a_hugging_face_classifier_and_a_datasets_table(finished):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import potstill
    from potstill.students import derive

    root, _, _ = finished
    folder = root / "run" / "teacher" / "final"
    teacher = AutoModelForSequenceClassification.from_pretrained(folder)
    student = derive(teacher, keep=1)
    rows = yaml.safe_load(yaml.safe_dump(write_csv(root / "api.csv", n=60, seed=5)))
    table = Dataset.from_list(rows)
    calls = []

    def error_rate(logits, labels):
        calls.append(len(labels))
        return float((logits.argmax(-1) != labels).float().mean())

    result = potstill.distill(
        teacher, student, table, eval_data=table.select(range(20)), epochs=1, batch_size=8,
        lr=1e-4, columns={"text": "sentence", "label": "topic"}, max_length=32,
        metrics={"error_rate": error_rate}, progress=False,
    )  # fmt: skip
    assert calls and calls[-1] == 20
    assert result.metrics["error_rate"] == pytest.approx(1 - result.metrics["accuracy"])
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok([r["sentence"] for r in rows[:20]], truncation=True, max_length=32,
              padding=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        pred = result.student.eval()(**enc).logits.argmax(-1)
    labels = torch.tensor([CLASSES.index(r["topic"]) for r in rows[:20]])
    assert result.metrics["accuracy"] == pytest.approx(float((pred == labels).float().mean()))
    rows[7]["sentence"] = " "
    with pytest.raises(DataError, match=r"column 'sentence' of the train split has no text in "
                       r"rows 7 "):  # fmt: skip
        potstill.distill(
            teacher, student, Dataset.from_list(rows), epochs=1, batch_size=8,
            columns={"text": "sentence", "label": "topic"}, progress=False,
        )  # fmt: skip


def test_dict_rows_keep_their_label():
    from potstill.data.tensors import make_batch

    rows = [
        {"x": torch.tensor([1.0, 2.0]), "label": 1},
        {"x": torch.tensor([3.0, 4.0]), "label": 0},
    ]
    batch = make_batch(rows, torch.tensor([1, 0]))  # type: ignore[arg-type]
    assert batch["label"].tolist() == [0, 1] and batch["x"].tolist() == [[3.0, 4.0], [1.0, 2.0]]
    assert MINILM is not None


def test_hidden_state_terms_reach_the_text_classifier_through_taps(finished, tmp_path):
    from potstill.runs import run

    root, _, _ = finished
    data = recipe_data(
        root / "topics.csv",
        teacher={"model": str(root / "run" / "teacher" / "final")},
        taps={"student": {"h": "bert.encoder.layer.*"}, "teacher": {"h": "bert.encoder.layer.*"}},
        objective=[
            {"kind": "kd", "weight": 0.5, "temperature": 2.0},
            {"kind": "feature", "student": "h", "teacher": "h", "layer_map": [[0, 5]],
             "name": "hidden"},
        ],
        baseline=False,
    )  # fmt: skip
    results = run(validate_recipe(data), tmp_path / "run")
    logged = (tmp_path / "run" / "distilled" / "metrics.jsonl").read_text()
    assert '"hidden"' in logged and '"kd"' in logged  # both terms trained and logged
    assert list(results["rows"]) == ["teacher", "distilled"]


def test_a_new_head_starts_from_the_same_weights_in_every_run():
    from potstill.recipe.text_classification import TeacherSpec
    from potstill.runs.text_classification import _load

    spec = TeacherSpec(model="sentence-transformers/all-MiniLM-L6-v2")
    heads = [
        _load(MINILM, spec, CLASSES, new_head=True, seed=0).classifier.weight for _ in range(2)
    ]
    other = _load(MINILM, spec, CLASSES, new_head=True, seed=1).classifier.weight
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], other)


def test_potstill_eval_scores_an_export_on_your_table_as_by_hand(finished, tmp_path):
    """``potstill eval`` on a text classifier potstill exported, a CSV of the user's and its
    teacher: accuracy and agreement equal those computed with plain transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from typer.testing import CliRunner

    from potstill.cli import app

    root, _, _ = finished
    rows = write_csv(tmp_path / "held-out.csv", n=40, seed=9)
    student, teacher = root / "run" / "distilled" / "final", root / "run" / "teacher" / "final"
    out = CliRunner().invoke(app, ["eval", str(student), "--data", str(tmp_path / "held-out.csv"),
                                   "--teacher", str(teacher), "--columns",
                                   "text=sentence,label=topic", "--max-length", "32"])  # fmt: skip
    assert out.exit_code == 0, out.output
    figures = json.loads(out.stdout)
    assert figures["kind"] == "text-classifier" and figures["examples"] == 40

    def predict(folder):
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        enc = tok([r["sentence"] for r in rows], truncation=True, max_length=32, padding=True,
                  return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            return model(**enc).logits.argmax(-1)

    s, t = predict(student), predict(teacher)
    labels = torch.tensor([CLASSES.index(r["topic"]) for r in rows])
    assert figures["accuracy"] == pytest.approx(float((s == labels).float().mean()))
    assert figures["agreement"] == pytest.approx(float((s == t).float().mean()))
    missing = CliRunner().invoke(app, ["eval", str(student)])
    assert missing.exit_code == 2 and "give --data" in missing.output
