"""Device placement without a GPU: the ``device`` setting resolves or is refused with the field
named; a teacher whose weights are fake CUDA tensors (PyTorch's ``FakeTensorMode``, which makes
them on a CPU-only build and raises on any mix of devices) runs each batch on its own device,
is evaluated there with its logits brought back, and fills a teacher cache from there; a
teacher's signal lands on the student's device; the CPU road is untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from potstill.placement import CPU, Placement, resolve_device
from potstill.signal import Signal, TopK

NO_CUDA = not torch.cuda.is_available()


def fake_cuda(model: nn.Module) -> nn.Module:
    """``model`` with every parameter a frozen fake CUDA tensor (call inside the mode)."""
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                fake = torch.empty(p.shape, dtype=p.dtype, device="cuda")
                m._parameters[name] = nn.Parameter(fake, requires_grad=False)
    return model


@pytest.fixture
def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU: auto resolves to it")
def test_device_settings_resolve_or_name_the_field():
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=rf"teacher.device: {spec} was asked for but CUDA is"):
            resolve_device(spec, "teacher.device")
    for spec in ("gpu", "cuda:x", "tpu", ""):
        with pytest.raises(ValueError, match="device: unknown device .*auto, cpu, cuda, cuda:N"):
            resolve_device(spec)
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(ValueError, match="mps was asked for"):
            resolve_device("mps")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
def test_the_api_and_the_loop_refuse_a_missing_gpu_before_training(digits):
    import potstill
    from potstill.distiller import Distiller
    from potstill.losses.terms import labels_only_objective

    student = nn.Linear(64, 10)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match="^device: cuda was asked for"):
        potstill.distill(nn.Linear(64, 10), student, digits.train, epochs=1, device="cuda")
    with pytest.raises(ValueError, match="^teacher_device: cuda:0 was asked for"):
        potstill.distill(nn.Linear(64, 10), student, digits.train, teacher_device="cuda:0")
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    with pytest.raises(ValueError, match="^device: cuda was asked for"):
        Distiller(student, labels_only_objective(), digits.train, device="cuda")
    with pytest.raises(ValueError, match="device or placement, not both"):
        Distiller(student, labels_only_objective(), digits.train, device="cpu",
                  placement=Placement(torch.device("cpu")))  # fmt: skip


def test_a_teacher_on_a_fake_gpu_runs_its_batches_there(fake_mode):
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    from potstill.teachers import LiveTeacher

    teacher = fake_cuda(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    batch = {"input": torch.randn(5, 3), "index": torch.arange(5)}  # as the loader gives it
    with pytest.raises(FakeTensorDeviceMismatchError):
        teacher(batch["input"])  # what a placement that forgot the batch would do
    signal = LiveTeacher(teacher, taps={"h": "0"}).signal(batch)
    assert signal.logits.device.type == "cuda" and signal.features["h"].device.type == "cuda"
    moved = CPU.signal(signal)  # to a student on the CPU
    assert moved.logits.device.type == "cpu" and moved.features["h"].device.type == "cpu"


def test_evaluation_and_a_cache_run_on_the_models_device(fake_mode, tmp_path):
    from potstill.evaluate import predict_logits
    from potstill.teachers import PrecomputedTeacher

    teacher = fake_cuda(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    data = TensorDataset(torch.randn(7, 3), torch.zeros(7, dtype=torch.long))
    logits, labels = predict_logits(teacher, data, batch_size=3)
    assert logits.device.type == "cpu" and logits.shape == (7, 2)
    assert labels is not None and labels.device.type == "cpu"
    pre = PrecomputedTeacher(teacher, data, lambda m, b: m(b["input"]), batch_size=3)
    assert pre.logits.device.type == "cpu" and pre.logits.shape == (7, 2)


def test_a_signal_lands_on_the_students_device_and_stays_put_when_it_is_there():
    meta = Placement(torch.device("meta"))
    topk = TopK.from_logits(torch.randn(2, 3, 5), k=2)
    signal = Signal(topk=topk, features={"h": torch.randn(2, 4)})
    moved = meta.signal(signal)
    assert moved.topk is not None and {moved.topk.ids.device.type, moved.topk.tail_mass.device.type,
                                       moved.features["h"].device.type} == {"meta"}  # fmt: skip
    assert meta.signal(moved) is moved  # already there: not copied again
    dense = Signal(logits=torch.randn(2, 5))
    assert CPU.signal(dense) is dense  # the CPU road: the very same tensors
    assert meta.batch({"input": torch.ones(2), "n": 3})["input"].device.type == "meta"
