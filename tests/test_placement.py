"""Device placement without a GPU: the ``device`` setting resolves or is refused with the field
named; on the fake GPU of :mod:`fakegpu` (real values, and an error on any CPU tensor that meets
a GPU one) a teacher runs each batch on its own device, evaluation and a teacher cache run where
the model is and bring results back, the loop trains, checkpoints and resumes with the CPU
road's figures bit for bit, and a tensor left behind is caught."""

from __future__ import annotations

import pytest
import torch
from conftest import make_mlp, quiet_config
from fakegpu import DeviceMismatch, on_fake
from torch import nn
from torch.utils.data import TensorDataset

from potstill.config import OptimizerConfig
from potstill.placement import CPU, Placement, resolve_device
from potstill.signal import Signal, TopK

NO_CUDA = not torch.cuda.is_available()
GPU = "fakegpu"


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
    # an out-of-tree accelerator (PrivateUse1: Ascend's npu, the suite's fakegpu) is named too
    assert resolve_device("fakegpu") == resolve_device("FakeGPU:0") == torch.device(GPU, 0)
    with pytest.raises(ValueError, match="device: fakegpu:1 was asked for but this machine has 1"):
        resolve_device("fakegpu:1")
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


def test_a_teacher_on_the_gpu_runs_its_batches_there():
    from potstill.teachers import LiveTeacher

    teacher = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    ref = LiveTeacher(teacher, taps={"h": "0"}).signal({"input": torch.randn(5, 3)})
    teacher.to(GPU)
    torch.manual_seed(0)
    batch = {"input": torch.randn(5, 3), "index": torch.arange(5)}  # as the loader gives it
    with pytest.raises(DeviceMismatch, match="a cpu tensor of shape \\(5, 3\\) met a fakegpu"):
        teacher(batch["input"])  # what a placement that forgot the batch would do
    signal = LiveTeacher(teacher, taps={"h": "0"}).signal(batch)
    assert on_fake(signal.logits) and on_fake(signal.features["h"])
    moved = CPU.signal(signal)  # to a student on the CPU
    assert moved.logits.device.type == "cpu" and moved.features["h"].device.type == "cpu"
    torch.manual_seed(0)
    again = LiveTeacher(teacher.cpu(), taps={"h": "0"}).signal({"input": torch.randn(5, 3)})
    assert torch.equal(again.logits, moved.logits) and ref.logits.shape == moved.logits.shape


def test_evaluation_and_a_cache_run_on_the_models_device():
    from potstill.evaluate import predict_logits
    from potstill.teachers import PrecomputedTeacher

    teacher = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    data = TensorDataset(torch.randn(7, 3), torch.zeros(7, dtype=torch.long))
    cpu_logits, _ = predict_logits(teacher, data, batch_size=3)
    teacher.to(GPU)
    logits, labels = predict_logits(teacher, data, batch_size=3)
    assert logits.device.type == "cpu" and torch.equal(logits, cpu_logits)
    assert labels is not None and labels.device.type == "cpu"
    pre = PrecomputedTeacher(teacher, data, lambda m, b: m(b["input"]), batch_size=3)
    assert pre.logits.device.type == "cpu" and torch.equal(pre.logits, cpu_logits)


def _fit(digits, student_device, teacher_device, *, steps=3, run_dir=None, stop_at=None,
         resume=False, dropout=0.0):  # fmt: skip
    from potstill.distiller import Distiller
    from potstill.evaluate import classification_eval
    from potstill.losses.terms import hinton_objective
    from potstill.teachers import LiveTeacher

    teacher = make_mlp([64], seed=1).to(teacher_device)
    # fused=False: the CPU's default fused AdamW is another kernel than the multi-tensor one
    # a non-CPU device gets; with one implementation on both the figures are bitwise equal
    cfg = quiet_config(max_steps=steps, batch_size=32, eval_every=2,
                       optimizer=OptimizerConfig(fused=False))  # fmt: skip
    d = Distiller(make_mlp([32], dropout=dropout, seed=2), hinton_objective(4.0, 0.5),
                  digits.train, teacher=LiveTeacher(teacher), config=cfg, device=student_device,
                  evaluate=classification_eval(digits.val), run_dir=run_dir)  # fmt: skip

    def stop(step, row):
        if step == stop_at:
            raise KeyboardInterrupt

    d.callbacks.append(stop)
    try:
        return d.fit(resume=resume)
    except KeyboardInterrupt:
        return None


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("teacher_device", ["fakegpu", "cpu"])
def test_training_on_the_gpu_gives_the_cpu_figures(digits, teacher_device):
    """Student, batches, objective and teacher signals on the (fake) GPU, the teacher there or
    on the CPU: the same losses, evaluations and weights as the CPU road, bit for bit; any
    tensor left on the CPU would have raised."""
    cpu = _fit(digits, "cpu", "cpu")
    gpu = _fit(digits, "fakegpu", teacher_device)
    assert on_fake(next(gpu.student.parameters()))
    assert [r["loss"] for r in gpu.history] == [r["loss"] for r in cpu.history]
    assert gpu.evals == cpu.evals
    g = _cpu_state(gpu.student)
    assert all(torch.equal(v, g[k]) for k, v in cpu.student.state_dict().items())


def test_a_gpu_run_checkpoints_and_resumes_exactly(digits, tmp_path):
    whole = _fit(digits, "fakegpu", "fakegpu", steps=4, run_dir=tmp_path / "a", dropout=0.2)
    assert _fit(digits, "fakegpu", "fakegpu", steps=4, run_dir=tmp_path / "b", stop_at=3,
                dropout=0.2) is None  # fmt: skip
    resumed = _fit(digits, "fakegpu", "fakegpu", steps=4, run_dir=tmp_path / "b", resume=True,
                   dropout=0.2)  # fmt: skip
    assert resumed is not None and resumed.evals == whole.evals
    assert resumed.history[-1]["loss"] == whole.history[-1]["loss"]
    a, b = _cpu_state(whole.student), _cpu_state(resumed.student)
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    # the checkpoint holds CPU tensors only: it loads (weights_only) on a machine without GPU
    state = torch.load(tmp_path / "b" / "checkpoints" / "step-00000004" / "trainer_state.pt",
                       weights_only=True)  # fmt: skip
    tensors = [v for st in state["optimizer"]["state"].values() for v in st.values()]
    assert tensors and all(t.device.type == "cpu" for t in tensors)


def test_a_tied_model_on_the_gpu_saves_each_weight_once_and_loads_back(tmp_path):
    from potstill.io import atomic_save_module, load_module

    def tied() -> nn.Module:
        m = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
        m[1].weight = m[0].weight
        return m

    torch.manual_seed(0)
    cpu = tied()
    atomic_save_module(cpu, tmp_path / "cpu.safetensors")
    atomic_save_module(cpu.to(GPU), tmp_path / "gpu.safetensors")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "cpu.safetensors"), load_file(tmp_path / "gpu.safetensors")
    assert list(a) == list(b) == ["0.weight"] and torch.equal(a["0.weight"], b["0.weight"])
    back = tied().to(GPU)
    load_module(back, tmp_path / "gpu.safetensors")
    assert on_fake(back[1].weight) and torch.equal(back[1].weight.cpu(), a["0.weight"])
    with pytest.raises(ValueError, match="gpu.safetensors: the weights do not fit the model"):
        load_module(nn.Linear(3, 3), tmp_path / "gpu.safetensors")


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


def _precision_fit(digits, tmp_path, name, stop_at=None, resume=False, **train):
    from potstill.distiller import Distiller
    from potstill.losses.terms import hinton_objective
    from potstill.teachers import LiveTeacher

    cfg = quiet_config(max_steps=4, batch_size=32, eval_every=2, **train)
    d = Distiller(make_mlp([32], seed=2), hinton_objective(4.0, 0.5), digits.train,
                  teacher=LiveTeacher(make_mlp([64], seed=1)), config=cfg,
                  run_dir=tmp_path / name)  # fmt: skip

    def stop(step, row):
        if step == stop_at:
            raise KeyboardInterrupt

    d.callbacks.append(stop)
    try:
        return d, d.fit(resume=resume)
    except KeyboardInterrupt:
        return d, None


def test_fp16_trains_with_a_loss_scale_that_checkpoints_and_resumes(digits, tmp_path):
    """fp16 (autocast + gradient scaler; on the CPU here, the same code as on a GPU): near the
    fp32 figures, the scale in the checkpoint, and a resumed run equal to an uninterrupted one."""
    _, fp32 = _precision_fit(digits, tmp_path, "fp32")
    d, fp16 = _precision_fit(digits, tmp_path, "fp16", precision="fp16")
    assert d.scaler.is_enabled() and d.scaler.get_scale() > 1
    assert fp16 is not None and fp32 is not None
    assert fp16.history[-1]["loss"] == pytest.approx(fp32.history[-1]["loss"], rel=1e-2)
    assert fp16.history[-1]["loss"] != fp32.history[-1]["loss"]  # it did run in float16
    _precision_fit(digits, tmp_path, "cut", stop_at=3, precision="fp16")
    _, resumed = _precision_fit(digits, tmp_path, "cut", resume=True, precision="fp16")
    assert resumed is not None and resumed.history[-1]["loss"] == fp16.history[-1]["loss"]
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step-00000004" / "trainer_state.pt",
                       weights_only=True)  # fmt: skip
    assert state["scaler"]["scale"] == d.scaler.get_scale()


def test_a_compiled_student_trains_as_the_eager_one_and_a_failed_compile_falls_back(
    digits, tmp_path, caplog
):
    import torch._dynamo

    @torch._dynamo.register_backend(name="potstill_test_broken")
    def broken(gm, inputs):
        raise RuntimeError("this backend compiles nothing")

    _, eager = _precision_fit(digits, tmp_path, "eager")
    d, compiled = _precision_fit(digits, tmp_path, "compiled", compile="eager")  # dynamo traced
    assert d._compiled and compiled is not None and eager is not None
    assert [r["loss"] for r in compiled.history] == [r["loss"] for r in eager.history]
    for backend in ("potstill_test_broken", "no-such-backend"):
        with caplog.at_level("WARNING", logger="potstill"):
            d, fallen = _precision_fit(digits, tmp_path, backend, compile=backend)
        assert not d._compiled and fallen is not None
        assert "train.compile: the student did not compile" in caplog.text
        assert [r["loss"] for r in fallen.history] == [r["loss"] for r in eager.history]
        caplog.clear()
