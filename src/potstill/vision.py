"""Image classifiers beyond the built-in ones, on the classic road: a Hugging Face image
classifier (``AutoModelForImageClassification``: ResNet, ViT, ConvNeXt, … by hub name, folder or
config) with its own image processor, and torchvision architectures by name where torchvision
loads. Each takes the classic batch (images as floats in [0, 1], ``(N, C, H, W)``) and returns
logits, so the teacher cache, the loop, the evaluation and the report treat them like the
built-in MLPs and CNNs; each is exported as the folder its library reloads."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.image_tables import ImageTable
from .data.labels import check_teacher_labels, head_config
from .data.rows import DataError
from .hf import no_hub_kernels
from .models import SPEC_FILE, save_model_folder
from .placement import cpu_state
from .sealed import verify

log = logging.getLogger("potstill")

PROCESSOR_FILE = "preprocessor_config.json"


class ImageClassifier(nn.Module):
    """A Hugging Face image classifier with its own preprocessing: ``forward(images)`` takes
    floats in [0, 1] of shape ``(N, C, H, W)``, matches the channels the model reads (a
    grayscale image repeated to RGB), applies the model's image processor (its resizing,
    cropping and normalisation, with rescaling off since the input is in [0, 1]) and returns
    the logits. Without a processor the images go in as they are.

    Its module paths (for taps) are the Hugging Face model's under ``model.``, e.g.
    ``model.resnet.encoder.stages.1``."""

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        super().__init__()
        self.model = model
        self.processor = processor

    @property
    def channels(self) -> int:
        """The number of image channels the model reads."""
        return int(getattr(self.model.config, "num_channels", 3))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The model's ``pixel_values`` for a batch of images in [0, 1]."""
        c = images.shape[1]
        if c != self.channels:
            if c != 1:
                raise DataError(
                    f"the images have {c} channels but {type(self.model).__name__} reads "
                    f"{self.channels}; convert them with data.source mode: "
                    f"{'L' if self.channels == 1 else 'RGB'}"
                )
            images = images.expand(-1, self.channels, -1, -1)
        if self.processor is None:
            return images
        out = self.processor(
            images=list(images.float()), return_tensors="pt", do_rescale=False,
            input_data_format="channels_first",
        )  # fmt: skip
        return out["pixel_values"].to(images.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The logits of the model on ``images`` (floats in [0, 1], ``(N, C, H, W)``)."""
        return self.model(pixel_values=self.preprocess(images)).logits

    def save(self, folder: str | os.PathLike) -> Path:
        """A plain Hugging Face folder: ``save_pretrained`` (safetensors, the config with the
        label names) and the image processor; ``AutoModelForImageClassification`` reloads it."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        state = cpu_state(self.model)  # type: ignore[arg-type]
        self.model.save_pretrained(out, state_dict=state)  # type: ignore[operator]
        if self.processor is not None:
            self.processor.save_pretrained(out)
        return out


def is_image_classifier(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers image classifier."""
    return type(model).__name__.endswith("ForImageClassification") and hasattr(model, "config")


def load_image_processor(path: str | os.PathLike, *, trust_remote_code: bool = False) -> Any:
    """The image processor saved at ``path`` (a folder or hub name), or None when there is
    none (a model built from a config). The PIL backend is used when torchvision does not
    load (the default backend needs it)."""
    from transformers import AutoImageProcessor

    local = Path(path)
    if local.is_dir() and not (local / PROCESSOR_FILE).exists():
        return None
    import transformers

    options: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if int(transformers.__version__.split(".")[0]) >= 5 and not torchvision_loads():
        options["backend"] = "pil"  # transformers 5 defaults to torchvision's; 4 has only PIL
    try:
        return AutoImageProcessor.from_pretrained(str(path), **options)
    except OSError as e:
        if local.is_dir():
            raise
        log.info("no image processor for %s (%s); images go in as they are", path, e)
        return None


def torchvision_loads() -> bool:
    """Whether torchvision imports and its C operators work with this torch."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # a torchvision built for another torch fails in its C ops, not ImportError
        return False
    return True


def hf_image_classifier(
    classes: Sequence[str],
    *,
    model: str | None = None,
    config: Mapping[str, Any] | None = None,
    processor: str | None = None,
    new_head: bool = True,
    input_shape: Sequence[int] = (3, 224, 224),
    seed: int = 0,
    trust_remote_code: bool = False,
    who: str = "student",
) -> ImageClassifier:
    """A Hugging Face image classifier for ``classes``: ``model`` (hub name or folder; with
    ``new_head`` its head is replaced by one for ``classes``, else its labels must be them) or
    ``config`` (a config dict with ``model_type``, built untrained; ``num_channels`` and a
    missing ``image_size`` follow ``input_shape``). Its processor is read from ``processor``,
    else from ``model``; a model from a config has none unless given. New weights are drawn
    with ``seed``."""
    from transformers import AutoConfig, AutoModelForImageClassification

    torch.manual_seed(seed)
    if (model is None) == (config is None):
        raise ValueError(f"{who}: give model (hub name or folder) or config, not both")
    if config is not None:
        options = dict(config)
        kind = options.pop("model_type", None)
        if not kind:
            raise DataError(
                f"{who}.config: needs model_type (resnet, vit, convnext, …: a transformers "
                "model type)"
            )
        options.setdefault("num_channels", int(input_shape[0]))
        try:
            cfg = AutoConfig.for_model(kind, **options, **head_config(classes))
            if hasattr(cfg, "image_size") and "image_size" not in config:
                cfg.image_size = int(input_shape[-1])
            net = AutoModelForImageClassification.from_config(cfg)
        except (ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
            raise DataError(
                f"{who}.config: transformers cannot build an image classifier of model_type "
                f"{kind!r} from {dict(config)}: {type(e).__name__}: {e}. Check the fields "
                f"against transformers' {kind} config"
            ) from e
        proc = load_image_processor(processor) if processor else None
        return ImageClassifier(net, proc).eval()
    assert model is not None
    extra = {**head_config(classes), "ignore_mismatched_sizes": True} if new_head else {}
    net = AutoModelForImageClassification.from_pretrained(
        model, trust_remote_code=trust_remote_code, **no_hub_kernels(), **extra
    )
    if not new_head:
        check_teacher_labels(list(classes), net.config, who=who)
    proc = load_image_processor(processor or model, trust_remote_code=trust_remote_code)
    return ImageClassifier(net, proc).eval()


def torchvision_classifier(name: str, num_classes: int, *, seed: int = 0) -> nn.Module:
    """A torchvision architecture by name (``resnet18``, ``mobilenet_v3_small``, …) with a
    head for ``num_classes``, untrained (torchvision's own initialisation, drawn with ``seed``).
    It reads normalised RGB images; give the data ``mode: RGB``."""
    if not torchvision_loads():
        raise RuntimeError(
            f"torchvision model {name!r}: torchvision does not load with this torch "
            f"({torch.__version__}); install the torchvision build made for it "
            "(pip install 'potstill[vision]' on a machine whose torch comes from the same "
            "index), or use a Hugging Face image classifier (model: or config:)"
        )
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


@dataclass(frozen=True)
class TorchvisionSpec:
    """A torchvision architecture by name and its number of classes."""

    name: str
    classes: int

    def build(self, seed: int = 0) -> nn.Module:
        """The architecture, untrained (see :func:`torchvision_classifier`)."""
        return torchvision_classifier(self.name, self.classes, seed=seed)

    def save(self, model: nn.Module, folder: str | os.PathLike) -> Path:
        """The model's folder: weights in safetensors, this spec beside them."""
        return save_model_folder(model, folder, extra={"torchvision": asdict(self)})


def load_classifier(folder: str | os.PathLike) -> nn.Module:
    """A classifier folder written by potstill: a Hugging Face image classifier (its
    ``config.json``; rewrapped with its processor), a torchvision model or a built-in one."""
    from safetensors.torch import load_model

    from .models import WEIGHTS_FILE, load_model_folder

    folder = Path(folder)
    verify(folder, "classifier folder")
    if (folder / "config.json").exists() and not (folder / SPEC_FILE).exists():
        from transformers import AutoModelForImageClassification

        net = AutoModelForImageClassification.from_pretrained(folder, **no_hub_kernels())
        return ImageClassifier(net, load_image_processor(folder)).eval()
    meta_path = folder / SPEC_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("torchvision"):
        model = TorchvisionSpec(**meta["torchvision"]).build()
        load_model(model, str(folder / WEIGHTS_FILE))
        return model.eval()
    return load_model_folder(folder)[0]


def model_image_processor(model: nn.Module, given: Any, who: str) -> Any:
    """``given``, else the image processor saved with ``model`` (its ``name_or_path``), else
    None (the model reads the images as they are)."""
    if given is not None:
        return given
    path = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not path:
        return None
    try:
        return load_image_processor(path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot read the {who}'s image processor from {path!r} ({e}); pass it "
            f"({who}_image_processor=... / image_processor=...)"
        ) from e


@dataclass
class ImageSplits:
    """What ``potstill.distill`` needs for two Hugging Face image classifiers: the splits
    (images read batch by batch), both models wrapped with their processors, the class names."""

    splits: dict[str, ImageTable]
    teacher: ImageClassifier
    student: ImageClassifier
    classes: list[str]


def api_image_splits(
    teacher: nn.Module,
    student: nn.Module,
    tables: Mapping[str, Any],
    *,
    columns: Mapping[str, str] | None = None,
    image_size: Sequence[int] | None = None,
    image_mode: str | None = None,
    image_processor: Any = None,
    student_image_processor: Any = None,
) -> ImageSplits:
    """Rows of named fields (a ``datasets.Dataset`` with an image and a label column, or any
    Dataset of dict rows) for two image classifiers: images decoded to floats in [0, 1]
    (converted to ``image_mode`` and resized to ``image_size`` when given; each model's
    processor does the rest), labels mapped to the teacher's classes (by name through its
    ``id2label``, or as indices), both heads checked against them."""
    from .data.image_tables import IMAGE_COLUMNS, image_table
    from .data.labels import classifier_tables

    encoded, image, names = classifier_tables(
        tables, teacher.config, student.config, columns, "image", IMAGE_COLUMNS
    )
    splits: dict[str, ImageTable] = {}
    shape = None
    fix = "pass image_size=(H, W) (and image_mode='RGB')"
    for split, table in encoded.items():
        y = torch.tensor(table.data.column("label").to_numpy(), dtype=torch.int64)
        splits[split] = image_table(
            table, image, y, mode=image_mode, size=image_size, shape=shape, split=split, fix=fix
        )
        shape = splits[split].shape
    return ImageSplits(
        splits,
        ImageClassifier(teacher, model_image_processor(teacher, image_processor, "teacher")),
        ImageClassifier(student, model_image_processor(student, student_image_processor,
                                                       "student")),
        names,
    )  # fmt: skip
