# ruff: noqa: F811  (small_fortunes is a fixture imported from test_llm_pipeline)
"""Distributed training on PyTorch's own engine, on CPU with the gloo backend: two processes
started by torchrun end with the same weights (within 1e-5) as one process with the same global
batch — a whole classic recipe, a whole causal-LM recipe on a tiny random Llama, and the
Distiller under DDP and FSDP — and a distributed run interrupted and resumed (under the same
or another number of processes, DDP or FSDP) equals an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_llm_pipeline import recipe_dict, small_fortunes  # noqa: F401

TESTS = Path(__file__).parent
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"

pytestmark = pytest.mark.usefixtures("one_thread")


def torchrun(*args: str, processes: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N args`` on this machine (one thread per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    env.pop("WORLD_SIZE", None)
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(processes), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and "address already in use" in out.stderr.lower():  # a port race
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out


def max_difference(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


# --- the Distiller: DDP and FSDP, interrupted and resumed --------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The worker's run in this one process, uninterrupted."""
    import dist_worker

    out = tmp_path_factory.mktemp("one-process")
    dist_worker.run(out)
    return out


def test_ddp_with_half_the_batch_and_two_accumulation_steps_equals_one_process(reference, tmp_path):
    # 2 processes × micro-batches of 32 split 16/16, accumulated twice: 64 examples per step
    torchrun(
        str(TESTS / "dist_worker.py"), str(tmp_path), "--batch-size", "32", "--grad-accum", "2"
    )
    assert max_difference(reference / "final.safetensors", tmp_path / "final.safetensors") < 1e-5
    # under DDP each process holds whole weights: a copy of the student and of the teacher
    for r in placements(tmp_path):
        for model in ("student", "teacher"):
            assert all(not d and local == full for d, local, full in r[model].values()), model
    # rank 0 alone wrote the log: the same rows, with the same figures, as one process's
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(ref)
    for r, e in zip(rows, ref, strict=True):
        if "eval" in r:
            assert r["eval"] == pytest.approx(e["eval"], rel=1e-4)
        else:
            for key in ("kd", "ce", "loss"):
                assert r[key] == pytest.approx(e[key], rel=1e-5), key


def placements(run: Path) -> list[dict[str, dict[str, list]]]:
    """Each rank's parameter sizes after the first step (tests/dist_worker.py writes them)."""
    return [json.loads((run / f"placement-rank{r}.json").read_text()) for r in (0, 1)]


def assert_sharded(ranks: list[dict[str, dict[str, list]]], model: str) -> None:
    """Every parameter of ``model`` is a DTensor of which each of the two processes holds a
    part smaller than the whole, the parts adding up to the whole (FSDP2 shards dim 0)."""
    names = ranks[0][model].keys()
    assert names and all(r[model].keys() == names for r in ranks)
    for name in names:
        (d0, local0, full), (d1, local1, full1) = (r[model][name] for r in ranks)
        assert d0 and d1 and full == full1, (model, name)
        assert local0 + local1 == full and local0 < full and local1 < full, (model, name)


def test_fsdp_student_and_sharded_teacher_equal_one_process(reference, tmp_path):
    # the student under FSDP, the teacher sharded too (LiveTeacher(shard=True))
    torchrun(str(TESTS / "dist_worker.py"), str(tmp_path), "--fsdp", "--shard-teacher")
    assert max_difference(reference / "final.safetensors", tmp_path / "final.safetensors") < 1e-5
    # … and both really were sharded: each process held half of every weight
    ranks = placements(tmp_path)
    assert_sharded(ranks, "student")
    assert_sharded(ranks, "teacher")


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (("ddp", 2), ("ddp", 2)),  # the same launch again
        (("fsdp", 2), ("ddp", 1)),  # sharded states saved whole: one process resumes them
        (("ddp", 2), ("fsdp", 2)),  # and FSDP shards a whole checkpoint again
    ],
)
def test_interrupted_distributed_run_resumes_to_the_uninterrupted_result(
    reference, tmp_path, first, then
):
    def launch(mode: tuple[str, int], *extra: str) -> subprocess.CompletedProcess:
        strategy, processes = mode
        args = [str(TESTS / "dist_worker.py"), str(tmp_path), *extra]
        args += ["--fsdp"] if strategy == "fsdp" else []
        if processes == 1:
            env = {**os.environ, "PYTHONPATH": str(TESTS)}
            return subprocess.run(
                [sys.executable, *args], env=env, capture_output=True, text=True, timeout=600
            )
        return torchrun(*args, check=False)

    stopped = launch(first, "--stop-after", "15")  # the last checkpoint is step 10's
    assert stopped.returncode != 0 and "stopped after step 15" in stopped.stdout
    state = torch.load(
        tmp_path / "checkpoints" / "step-00000010" / "trainer_state.pt", weights_only=True
    )
    assert state["step"] == 10 and state["processes"] == first[1]
    resumed = launch(then, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert max_difference(reference / "final.safetensors", tmp_path / "final.safetensors") < 1e-5


# --- whole recipes -----------------------------------------------------------------------------


DIGITS = {
    "name": "dist-digits",
    "seed": 0,
    "data": {"name": "digits", "val_size": 158},  # 1,280 training examples: 20 batches of 64
    "teacher": {
        "arch": {"hidden": [64], "dropout": 0.0},
        "train": {"epochs": 2, "batch_size": 64, "progress": False},
    },
    "student": {"arch": {"hidden": [16]}},
    "objective": [{"kind": "kd", "weight": 0.7, "temperature": 2.0}, {"kind": "ce", "weight": 0.3}],
    "train": {"epochs": 2, "batch_size": 64, "progress": False, "clip_grad_norm": 1.0},
    "settings": [{"name": "main"}, {"name": "few", "labelled_fraction": 0.2}],
    "evaluation": {"measure_cache_speedup": False},
}


def test_classic_recipe_on_two_processes_equals_one(tmp_path):
    from potstill.recipe.classic import ClassicRecipe
    from potstill.runs import run as run_recipe

    one = run_recipe(ClassicRecipe.model_validate(DIGITS), tmp_path / "one")
    # two processes, micro-batches of 32 accumulated twice: the same 64 examples per step
    recipe = tmp_path / "two.yaml"
    two_train = {**DIGITS["train"], "batch_size": 32, "grad_accum": 2}
    recipe.write_text(yaml.safe_dump({**DIGITS, "train": two_train}))
    out = torchrun("-m", "potstill.cli", "distill", str(recipe), "--out", str(tmp_path / "two"))
    assert out.stdout.count("report:") == 1  # rank 0 alone prints the summary
    finals = sorted((tmp_path / "one").rglob("final/*.safetensors"))
    assert len(finals) == 5  # the teacher; baseline and distilled in both settings
    for f in finals:
        other = tmp_path / "two" / f.relative_to(tmp_path / "one")
        assert max_difference(f, other) < 1e-5, f
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    for s1, s2 in zip(one["settings"], two["settings"], strict=True):
        for kind in ("distilled", "baseline"):
            assert s2["runs"][kind]["accuracy"] == pytest.approx(s1["runs"][kind]["accuracy"])
    # the teacher's logit cache was filled as two parts (its one shard fell to rank 0's)
    parts = sorted(
        p.name for p in (tmp_path / "two" / "teacher" / "cache-train" / "parts").glob("*.json")
    )
    assert parts == ["part-00000-of-00002.json"]


@pytest.fixture(scope="module")
def llama_dir(tok, tmp_path_factory) -> Path:
    from test_llm_pipeline import save_llama

    return save_llama(tmp_path_factory.mktemp("tiny-llama"), tok, len(tok), seed=0)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_causal_lm_recipe_on_two_processes_equals_one(
    llama_dir, small_fortunes, tmp_path, strategy
):
    from potstill.recipe.causal_lm import LMRecipe
    from potstill.runs import run as run_recipe

    def recipe(**train) -> dict:
        data = recipe_dict(
            llama_dir,
            data={"folder": str(small_fortunes), "train": 6, "val": 2},
            variants={"fkl": [{"kind": "fkl"}], "ce": [{"kind": "ce"}]},
            # SGD: Adam divides each step by √v, which turns the rounding noise of near-zero
            # gradients (vocabulary rows a batch barely touches) into steps of ~1e-4 here
            train={
                "max_steps": 4,
                "batch_size": 3,
                "optimizer": {"name": "sgd", "lr": 0.5},
                **train,
            },  # fmt: skip
            generate={"prompts": ["A fortune about love."], "max_new_tokens": 2},
        )
        data["teacher"]["cache"] = {"k": 16, "shard_size": 3}
        return data

    run_recipe(LMRecipe.model_validate(recipe()), tmp_path / "one")
    path = tmp_path / "two.yaml"
    # batches of 3 sequences split 2 / 1 between the processes; tokens per sequence differ, so
    # only normalising by the step's token count across processes gives one result
    path.write_text(yaml.safe_dump(recipe(batch_size=3, distributed=strategy)))
    torchrun("-m", "potstill.cli", "distill", str(path), "--out", str(tmp_path / "two"))
    for variant in ("fkl", "ce"):
        a = tmp_path / "one" / variant / "export" / "model.safetensors"
        b = tmp_path / "two" / variant / "export" / "model.safetensors"
        assert max_difference(a, b) < 1e-5, variant
    cache = tmp_path / "two" / "teacher-cache" / "parts"
    assert sorted(p.name for p in cache.glob("*.json")) == [
        "part-00000-of-00002.json",
        "part-00001-of-00002.json",
    ]
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["rows"]["fkl"]["steps"] == 4


def test_cache_command_under_torchrun_fills_one_cache_in_parts(llama_dir, tmp_path):
    from typer.testing import CliRunner

    from potstill.cli import app

    words = ["hi", "bye", "thanks", "sorry", "yes", "no", "maybe"]
    rows = [{"prompt": f"Say {w}.", "response": f"{w.title()} to you, {i} times."}
            for i, w in enumerate(words)]  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    opts = ["--teacher", str(llama_dir), "--data", str(data), "--k", "8", "--format", "text",
            "--max-length", "32", "--shard-size", "2"]  # fmt: skip
    one = CliRunner().invoke(app, ["cache", *opts, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    # 4 shards; --shard 1/2 on 2 processes: parts 2 and 3 of 4, i.e. shards 2 and 3
    two = torchrun("-m", "potstill.cli", "cache", *opts, "--out", str(tmp_path / "two"),
                   "--shard", "1/2")  # fmt: skip
    assert two.stdout.count("shards written") == 1  # rank 0 speaks
    assert "2 of 4 shards written" in two.stdout
    parts = sorted(p.name for p in (tmp_path / "two" / "parts").glob("*.json"))
    assert parts == ["part-00002-of-00004.json", "part-00003-of-00004.json"]
    # the same tensors as one process's shards 2 and 3 (headers name their own cache)
    for j in (2, 3):
        name = f"shards/shard-{j:06d}.safetensors"
        a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "two" / "shards" / "shard-000000.safetensors").exists()


def test_a_run_folder_in_use_refuses_every_rank_at_once(tmp_path):
    """Under torchrun the ranks of one run share rank 0's lock; refused, each rank says why
    and exits 2 (none waits in a barrier for a run that cannot start)."""
    from test_locks import hold, release

    from potstill.runs.folder import LOCK_FILE

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(DIGITS))
    p = hold(tmp_path / "run" / LOCK_FILE)
    try:
        out = torchrun("-m", "potstill.cli", "distill", str(recipe), "--out",
                       str(tmp_path / "run"), check=False)  # fmt: skip
    finally:
        release(p)
    assert out.returncode != 0
    assert out.stderr.count(f"is in use by a potstill run (pid {p.pid} on ") == 2, out.stderr
    assert "exitcode  : 2" in out.stderr
    assert sorted(x.name for x in (tmp_path / "run").iterdir()) == [LOCK_FILE]
