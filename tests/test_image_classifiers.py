"""Hugging Face image classifiers on the classic road: the wrapper preprocesses exactly as the
model's own image processor does; a recipe trains a ResNet teacher and a ViT student built from
configs on an image folder, exports plain ``AutoModelForImageClassification`` folders that
predict as measured, and resumes; a pretrained teacher is used as it is, in its own label
order, and matches a plain Hugging Face pipeline; a teacher of other classes is refused (or
fine-tuned when asked); the API distills one Hugging Face image classifier into another on a
``datasets`` image folder; torchvision is an optional extra, skipped with its reason here."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_fashion_mnist
from test_image_tables import write_image_folder

from potstill.data.rows import DataError

RESNET = {"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1]}
VIT = {"model_type": "vit", "patch_size": 7, "hidden_size": 32, "num_hidden_layers": 1,
       "num_attention_heads": 2, "intermediate_size": 64}  # fmt: skip
QUICK = {"batch_size": 25, "progress": False}


def recipe_data(folder: Path, **over):
    return {
        "kind": "image-classification",
        "name": "hf-images",
        "data": {"source": {"path": str(folder)}, "val_size": 50},
        "teacher": {"config": RESNET, "train": {"epochs": 6, "optimizer": {"lr": 1e-2}, **QUICK}},
        "student": {"config": VIT},
        "train": {"epochs": 3, "optimizer": {"lr": 3e-3}, **QUICK},
        "evaluation": {"throughput_batch": 32, "measure_cache_speedup": False},
        **over,
    }


def folder_split(root: Path, split: str):
    """The split as a plain Hugging Face pipeline reads it: PIL images, class names."""
    from datasets import load_dataset

    ds = load_dataset("imagefolder", data_dir=str(root), split=split)
    names = ds.features["label"].names
    return list(ds["image"]), [names[i] for i in ds["label"]]


def hf_predictions(folder: Path, images) -> list[str]:
    """Class names predicted by the exported folder through its own processor, no potstill."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    if (folder / "preprocessor_config.json").exists():
        proc = AutoImageProcessor.from_pretrained(folder, backend="pil")
        mode = "L" if model.config.num_channels == 1 else "RGB"
        pixels = proc(images=[i.convert(mode) for i in images], return_tensors="pt")
        x = pixels["pixel_values"]
    else:  # a model built from a config reads the images as they are, in [0, 1]
        x = torch.from_numpy(np.stack([np.asarray(i)[None] for i in images]) / 255.0).float()
        x = x.expand(-1, model.config.num_channels, -1, -1)
    with torch.no_grad():
        pred = model(pixel_values=x).logits.argmax(-1)
    return [model.config.id2label[int(p)] for p in pred]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist-folder")
    write_image_folder(root)
    return root


@pytest.fixture(scope="module")
def finished(image_folder, tmp_path_factory):
    from potstill.recipe import validate_recipe
    from potstill.runs import run

    root = tmp_path_factory.mktemp("hf-image-run")
    recipe = validate_recipe(recipe_data(image_folder))
    return root, recipe, run(recipe, root / "run")


def test_the_wrapper_preprocesses_exactly_as_the_models_own_processor():
    from PIL import Image
    from transformers import (
        AutoConfig,
        AutoModelForImageClassification,
        ConvNextImageProcessorPil,
        ViTImageProcessorPil,
    )

    from potstill.vision import ImageClassifier

    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(4, 28, 28, generator=g) * 255).to(torch.uint8).numpy()
    images = [Image.fromarray(p, mode="L") for p in pixels]
    x = torch.from_numpy(pixels[:, None].astype(np.float32) / 255)  # the classic batch
    cfg = AutoConfig.for_model("vit", image_size=32, patch_size=8, hidden_size=32,
                               num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, num_labels=3)  # fmt: skip
    model = AutoModelForImageClassification.from_config(cfg).eval()
    for proc in (
        ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                             image_std=[0.2, 0.3, 0.4]),
        ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=0.875),
    ):  # fmt: skip
        wrapped = ImageClassifier(model, proc)
        ref = proc(images=[i.convert("RGB") for i in images], return_tensors="pt")
        assert torch.equal(wrapped.preprocess(x), ref["pixel_values"])
        with torch.no_grad():
            assert torch.allclose(wrapped(x), model(**ref).logits)
    rgb = ImageClassifier(model, None)
    assert torch.equal(rgb.preprocess(x), x.expand(-1, 3, -1, -1))  # gray repeated to RGB
    with pytest.raises(DataError, match="mode: L"):
        gray = AutoConfig.for_model("resnet", num_channels=1, hidden_sizes=[8], depths=[1],
                                    embedding_size=8)  # fmt: skip
        ImageClassifier(AutoModelForImageClassification.from_config(gray)).preprocess(
            torch.rand(2, 3, 8, 8)
        )


@needs_fashion_mnist
def test_a_recipe_distills_a_hugging_face_resnet_into_a_vit(finished, image_folder):
    from transformers import AutoModelForImageClassification

    root, _, results = finished
    run_dir = root / "run"
    rows = {"teacher": results["teacher"], **results["settings"][0]["runs"]}
    _, names = folder_split(image_folder, "test")
    assert results["teacher"]["source"] == "trained in this run"
    assert results["student_arch"] == {"kind": "config", "name": None, "config": VIT}
    assert results["teacher"]["accuracy"] > 0.3  # ten classes: chance is 0.1
    for kind, part in (("teacher", "teacher"), ("distilled", "main/distilled"),
                       ("baseline", "main/baseline")):  # fmt: skip
        final = run_dir / part / "final"
        config = json.loads((final / "config.json").read_text())
        assert config["model_type"] == ("resnet" if kind == "teacher" else "vit")
        assert list(config["id2label"].values()) == sorted(set(names))  # the folder's classes
        images, truth = folder_split(image_folder, "test")
        predicted = hf_predictions(final, images)  # a plain Hugging Face pipeline, no potstill
        accuracy = np.mean([p == t for p, t in zip(predicted, truth, strict=True)])
        assert accuracy == pytest.approx(rows[kind]["accuracy"], abs=1e-6)
        reloaded = AutoModelForImageClassification.from_pretrained(final)
        assert rows[kind]["parameters"] == reloaded.num_parameters()
    card = (run_dir / "main" / "distilled" / "final" / "README.md").read_text()
    assert "a Hugging Face vit built from a config" in card
    assert (run_dir / "report.md").read_text().startswith("# potstill report: hf-images")


@needs_fashion_mnist
def test_resume_reloads_the_exported_folders(finished):
    from potstill.runs import run

    root, recipe, results = finished
    final = root / "run" / "main" / "distilled" / "final" / "model.safetensors"
    before = final.stat().st_mtime_ns
    again = run(recipe, root / "run", resume=True)
    assert final.stat().st_mtime_ns == before  # not trained again
    assert again["teacher"]["accuracy"] == results["teacher"]["accuracy"]
    for kind in ("distilled", "baseline"):
        assert (
            again["settings"][0]["runs"][kind]["accuracy"]
            == results["settings"][0]["runs"][kind]["accuracy"]
        )


def _relabelled(src: Path, out: Path, order: list[str], processor: bool) -> Path:
    """The teacher of ``src`` saved with its classes in ``order`` (head rows permuted with
    them, so it predicts the same names; or other names, the head kept) and, with
    ``processor``, an image processor that leaves 28×28 images as they are."""
    from transformers import AutoModelForImageClassification, ViTImageProcessorPil

    model = AutoModelForImageClassification.from_pretrained(src)
    old = [model.config.id2label[i] for i in range(model.config.num_labels)]
    same = sorted(old) == sorted(order)  # a new order (else new names: the head is kept)
    perm = torch.tensor([old.index(c) for c in order] if same else range(len(old)))
    head = model.classifier[-1]
    with torch.no_grad():
        head.weight.copy_(head.weight[perm])
        head.bias.copy_(head.bias[perm])
    model.config.id2label = dict(enumerate(order))
    model.config.label2id = {c: i for i, c in enumerate(order)}
    model.save_pretrained(out)
    if processor:
        ViTImageProcessorPil(size={"height": 28, "width": 28}, do_normalize=False).save_pretrained(
            out
        )
    return out


@needs_fashion_mnist
def test_a_pretrained_teacher_is_used_as_it_is_in_its_own_label_order(
    finished, image_folder, tmp_path, caplog
):
    from potstill.recipe import validate_recipe
    from potstill.runs import run

    root, _, results = finished
    trained = root / "run" / "teacher" / "final"
    names = sorted(json.loads((trained / "config.json").read_text())["id2label"].values())
    order = names[::-1]  # not the folder's (sorted) order
    teacher = _relabelled(trained, tmp_path / "teacher", order, processor=True)
    data = recipe_data(image_folder, teacher={"model": str(teacher)},
                       train={"max_steps": 2, **QUICK}, baseline=False)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="potstill"):
        out = run(validate_recipe(data), tmp_path / "run")
    assert "classes put in the teacher's label order" in caplog.text
    assert out["teacher"]["source"] == str(teacher)
    assert not (tmp_path / "run" / "teacher" / "final").exists()  # loaded, not trained
    assert out["teacher"]["accuracy"] == pytest.approx(results["teacher"]["accuracy"], abs=1e-6)
    images, truth = folder_split(image_folder, "test")
    plain = np.mean([p == t for p, t in zip(hf_predictions(teacher, images), truth, strict=True)])
    assert out["teacher"]["accuracy"] == pytest.approx(plain, abs=1e-6)
    student = json.loads((tmp_path / "run" / "main" / "distilled" / "final" / "config.json")
                         .read_text())  # fmt: skip
    assert list(student["id2label"].values()) == order  # the student speaks the teacher's order


@needs_fashion_mnist
def test_a_teacher_of_other_classes_is_refused_before_training_or_fine_tuned(
    finished, image_folder, tmp_path
):
    from potstill.recipe import validate_recipe
    from potstill.runs import run

    root, _, _ = finished
    trained = root / "run" / "teacher" / "final"
    other = _relabelled(trained, tmp_path / "other", [f"thing {i}" for i in range(10)], False)
    data = recipe_data(image_folder, teacher={"model": str(other)}, train={"max_steps": 1})
    with pytest.raises(DataError, match=r"the teacher's labels \(thing 0.*are not the data's"):
        run(validate_recipe(data), tmp_path / "refused")
    assert not (tmp_path / "refused" / "main").exists()  # nothing trained
    tuned = recipe_data(image_folder, baseline=False, train={"max_steps": 1, **QUICK},
                        teacher={"model": str(other), "finetune": True,
                                 "train": {"max_steps": 4, **QUICK}})  # fmt: skip
    out = run(validate_recipe(tuned), tmp_path / "tuned")
    assert out["teacher"]["source"] == "fine-tuned in this run"
    assert out["teacher"]["steps"] == 4
    head = json.loads((tmp_path / "tuned" / "teacher" / "final" / "config.json").read_text())
    _, names = folder_split(image_folder, "train")
    assert list(head["id2label"].values()) == sorted(set(names))


def test_recipes_name_what_is_wrong_with_a_model_section(tmp_path):
    from potstill.recipe import RecipeError, validate_recipe

    cases = {
        "one of arch, model, config or torchvision": {
            "student": {"arch": {"hidden": [8]}, "model": "x"}
        },  # fmt: skip
        "only a Hugging Face model .teacher.model. is fine-tuned": {
            "teacher": {"config": RESNET, "finetune": True}
        },
        "processor: only a Hugging Face model": {
            "student": {"torchvision": "resnet18", "processor": "p"}
        },  # fmt: skip
        "give path .a saved teacher. or a model": {"teacher": {"path": "t", "model": "m"}},
    }
    for message, data in cases.items():
        with pytest.raises(RecipeError, match=message):
            validate_recipe({"kind": "image-classification", **data})
    assert validate_recipe({"kind": "image-classification"}).kind == "image-classification"


def test_a_config_transformers_cannot_build_names_the_section():
    from potstill.vision import hf_image_classifier

    with pytest.raises(DataError, match="student.config: transformers cannot build .*convnext"):
        hf_image_classifier(["a", "b"], config={"model_type": "convnext", "hidden_sizes": [8]})
    with pytest.raises(DataError, match="needs model_type"):
        hf_image_classifier(["a", "b"], config={"hidden_sizes": [8]})


def test_torchvision_is_an_optional_extra_with_a_clear_error(monkeypatch):
    from potstill import vision

    monkeypatch.setattr(vision, "torchvision_loads", lambda: False)
    with pytest.raises(RuntimeError, match=r"resnet18.*potstill\[vision\]"):
        vision.torchvision_classifier("resnet18", 10)


@pytest.mark.skipif(
    not __import__("potstill.vision").vision.torchvision_loads(),
    reason="torchvision does not load with this torch (its wheels on the index are built for "
    "the CUDA torch: 'operator torchvision::nms does not exist')",
)
def test_a_torchvision_student_trains_exports_and_reloads(tmp_path):
    from potstill.vision import TorchvisionSpec, load_classifier

    spec = TorchvisionSpec("resnet18", 10)
    model = spec.build(seed=0)
    spec.save(model, tmp_path / "tv")
    again = load_classifier(tmp_path / "tv")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again(x))


@needs_fashion_mnist
def test_the_api_distills_one_hugging_face_image_classifier_into_another(finished, image_folder):
    from datasets import load_dataset
    from transformers import AutoConfig, AutoModelForImageClassification

    import potstill
    from potstill.data.labels import head_config

    root, _, _ = finished
    teacher = AutoModelForImageClassification.from_pretrained(root / "run" / "teacher" / "final")
    names = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
    cfg = AutoConfig.for_model(**{**VIT, "image_size": 28, "num_channels": 1},
                               **head_config(names))  # fmt: skip
    torch.manual_seed(0)
    student = AutoModelForImageClassification.from_config(cfg)
    train = load_dataset("imagefolder", data_dir=str(image_folder), split="train")
    test = load_dataset("imagefolder", data_dir=str(image_folder), split="test")
    result = potstill.distill(teacher, student, train, eval_data=test, epochs=2, batch_size=25,
                              lr=3e-3, baseline=True, progress=False)  # fmt: skip
    assert result.student is student  # the Hugging Face model, trained in place
    assert type(result.baseline).__name__ == "ViTForImageClassification"
    images, truth = folder_split(image_folder, "test")
    x = torch.from_numpy(np.stack([np.asarray(i)[None] for i in images]) / 255.0).float()
    with torch.no_grad():
        pred = student.eval()(pixel_values=x).logits.argmax(-1)
        t_pred = teacher.eval()(pixel_values=x).logits.argmax(-1)
    labels = torch.tensor([names.index(t) for t in truth])
    assert result.metrics["accuracy"] == pytest.approx(float((pred == labels).float().mean()))
    assert result.metrics["agreement"] == pytest.approx(float((pred == t_pred).float().mean()))
    with pytest.raises(DataError, match=r"no column for image .*has columns: pixels, label"):
        potstill.distill(teacher, student, train.rename_column("image", "pixels"), epochs=1)
