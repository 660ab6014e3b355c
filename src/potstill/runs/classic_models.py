"""The models of a classic (image-classification) recipe: the built-in architecture sized for
the data, a Hugging Face image classifier (by name, folder or config) or a torchvision
architecture, for the data's classes; and the data's classes put in a pretrained teacher's
label order."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.labels import model_label_names
from ..data.splits import Splits, labels_of, relabel
from ..models import ArchSpec, build_model
from ..recipe.classic import ModelChoice
from ..vision import TorchvisionSpec, hf_image_classifier

log = logging.getLogger("potstill")


def sized(arch: ArchSpec, splits: Splits) -> ArchSpec:
    return arch.model_copy(
        update={"input_shape": list(splits.input_shape), "num_classes": len(splits.classes)}
    )


def build_classifier(
    choice: ModelChoice, splits: Splits, seed: int, who: str
) -> tuple[nn.Module, ArchSpec | TorchvisionSpec | None]:
    """The untrained (or pretrained, with a new head) model a recipe section names, for the
    data's classes and image shape, its weights drawn with ``seed``; and what its export
    needs (the built-in architecture, the torchvision spec, or None for a Hugging Face
    model, whose folder says it all)."""
    torch.manual_seed(seed)
    if choice.family == "arch":
        arch = sized(choice.arch, splits)
        return build_model(arch), arch
    if choice.family == "torchvision":
        assert choice.torchvision is not None
        tv = TorchvisionSpec(choice.torchvision, len(splits.classes))
        return tv.build(seed), tv
    model = hf_image_classifier(
        splits.classes, model=choice.model, config=choice.config, processor=choice.processor,
        input_shape=splits.input_shape, seed=seed, trust_remote_code=choice.trust_remote_code,
        who=who,
    )  # fmt: skip
    return model, None


def in_teacher_order(splits: Splits, teacher: ModelChoice) -> Splits:
    """The splits with their classes in the order of a Hugging Face teacher's labels when
    they are the same names in another order (an image folder's classes come sorted); other
    label sets are left for the teacher's check to refuse, with both named."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(teacher.model, trust_remote_code=teacher.trust_remote_code)
    names = model_label_names(config)
    if names is None or list(names) == list(splits.classes):
        return splits
    if sorted(names) != sorted(splits.classes):
        return splits
    log.info("data: classes put in the teacher's label order (%s)", ", ".join(names))
    new_index = torch.tensor([list(names).index(c) for c in splits.classes])

    def reordered(ds: Dataset) -> Dataset:
        return relabel(ds, new_index[labels_of(ds)])

    return Splits(
        reordered(splits.train), reordered(splits.val), reordered(splits.test), tuple(names),
        splits.input_shape,
    )  # fmt: skip
