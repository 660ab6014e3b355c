"""The fault-injection suite (the fault issue, item 7): every run kind — classic with teacher
training, text classification, embed, causal LM with a teacher cache and teacher answers,
chain — run from the command line in fresh processes, SIGKILLed once in each of its phases
(each model's training, the teacher cache, the answers, each export, the report, the files
written) at a random point, resumed after each kill, and compared with an uninterrupted run:
the same weights, caches and answers bit for bit, the same logged figures and results; a full
disk in the middle of a checkpoint names the folder, loses nothing and resumes. The longer
randomised soak is ``benchmarks/soak.py``.

The points are drawn from ``POTSTILL_FAULT_SEED`` (default 0), named in every failure."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import faultkit as fk
import pytest
from conftest import MINILM

from potstill import assets, faults

SEED = int(os.environ.get("POTSTILL_FAULT_SEED", "0"))

pytestmark = [
    pytest.mark.skipif(MINILM is None, reason="all-MiniLM-L6-v2 not packaged here"),
    pytest.mark.skipif(assets.smollm2_gguf() is None, reason="SmolLM2 not packaged here"),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def recipes(root) -> dict[str, Path]:
    return fk.recipes(root / "recipes")


_references: dict[str, fk.Reference] = {}


def reference(kind: str, recipes: dict[str, Path], root: Path) -> fk.Reference:
    if kind not in _references:
        _references[kind] = fk.reference(recipes[kind], root / f"reference-{kind}")
    return _references[kind]


@pytest.mark.parametrize("kind", fk.KINDS)
def test_a_run_killed_in_every_phase_resumes_to_the_uninterrupted_result(kind, recipes, root):
    ref = reference(kind, recipes, root)
    expected = {"train", "export", "report", "write"} | (
        {"cache"} if kind != "embed" else set()
    ) | ({"answers"} if kind == "causal-lm" else set()) | (
        {"best"} if kind in ("classic", "text-classification") else set()  # best/'s seal
    )  # fmt: skip
    assert {p.split(":")[0] for p in ref.phases()} == expected  # every phase has its points
    rng = random.Random(f"{SEED}-{kind}")
    out = root / f"killed-{kind}"
    tried = fk.kill_through_phases(recipes[kind], out, ref, rng)
    where = f"POTSTILL_FAULT_SEED={SEED}, kills {[k.target for k in tried]}"
    assert sum(k.killed for k in tried) >= len(ref.phases()) - 2, where  # all but redone ones
    got = fk.finish(recipes[kind], out)
    assert fk.differences(ref.fingerprint, got) == [], where
    left = [p for p in out.rglob(".*.tmp") if "damaged-" not in str(p)]  # (kept for a look)
    assert left == [], where  # a write cut short leaves nothing behind


def test_a_kill_at_any_moment_from_outside_resumes_to_the_same_result(recipes, root):
    """SIGKILL sent from outside at random times (anywhere, not only at the fault points)."""
    ref = reference("classic", recipes, root)
    rng = random.Random(f"{SEED}-outside")
    out = root / "outside-classic"
    moments = sorted(rng.uniform(2.0, ref.seconds) for _ in range(2))
    kills = [fk.killed_run(recipes["classic"], out, resume=i > 0, after_s=t)
             for i, t in enumerate(moments)]  # fmt: skip
    got = fk.finish(recipes["classic"], out)
    assert fk.differences(ref.fingerprint, got) == [], [k.target for k in kills]


def test_a_full_disk_names_the_folder_loses_nothing_and_resumes(recipes, root):
    ref = reference("classic", recipes, root)
    out = root / "full-classic"
    # the distilled student's first checkpoint fails to write its weights
    n = ref.occurrence("write:student.safetensors", after="train:main/distilled")
    r = fk.run(recipes["classic"], out, **{faults.ENV_ENOSPC: f"write:student.safetensors@{n}"})
    assert r.returncode == 2, r.stderr[-2000:]
    message = r.stderr.strip().splitlines()[-1]
    assert message.startswith("error: [Errno 28] No space left on device writing "
                              "student.safetensors in "), message  # fmt: skip
    assert f"{out}/" in message and "--resume" in message and "intact" in message
    assert not list(out.rglob(".*.tmp"))  # the half-written file is gone
    before = fk.fingerprint(out)  # what was finished is intact, and stays so
    assert (
        before["teacher/final/model.safetensors"]
        == ref.fingerprint["teacher/final/model.safetensors"]
    )
    got = fk.finish(recipes["classic"], out)
    assert fk.differences(ref.fingerprint, got) == []


def test_the_kill_settings_are_checked(monkeypatch):
    monkeypatch.setenv(faults.ENV_KILL, "train:student")
    with pytest.raises(ValueError, match="POTSTILL_FAULT_KILL must look like NAME@N"):
        faults.point("train:student")
    assert faults.write_point("/x/step-00000012/meta.json") == "write:meta.json"
    assert faults.write_point("shard-000003.safetensors") == "write:shard-######.safetensors"


def teardown_module() -> None:
    for ref in _references.values():
        shutil.rmtree(ref.out, ignore_errors=True)


# damaged files of a run interrupted in its last model, one of each kind a resume reads
DAMAGED = [
    ("classic", "main/baseline/checkpoints/step-00000002/student.safetensors", "flip"),
    ("classic", "main/baseline/checkpoints/step-00000002/meta.json", "delete"),
    ("classic", "teacher/final/model.safetensors", "truncate"),
    ("classic", "main/distilled/final/model.safetensors", "flip"),  # (cache shards: test_cache)
    ("classic", "main/distilled/done.json", "flip"),
    ("classic", "main/baseline/metrics.jsonl", "flip"),
    ("classic", "recipe.yaml", "flip"),
    ("causal-lm", "answers/train.jsonl", "flip"),
]


@pytest.mark.parametrize(("kind", "file", "how"), DAMAGED)
def test_a_damaged_file_is_named_and_rebuilt_or_refused(kind, file, how, recipes, root):
    ref = reference(kind, recipes, root)
    state = root / f"interrupted-{kind}"
    if not state.exists():
        fk.interrupted(recipes[kind], state, ref)
    assert (state / file).exists(), sorted(map(str, fk.damage_targets(state)))
    o = fk.damage_case(recipes[kind], state, root / "damaged", Path(file), how, ref)
    assert o.verdict == "named", o


def test_bad_inputs_are_one_clear_error_with_exit_2_and_lose_nothing(recipes, root):
    from badinputs import bad_input_cases

    refs = {"classic": reference("classic", recipes, root)}
    failed = [(c.name, why) for c in bad_input_cases(root / "bad", recipes, refs)
              for ok, why in [c.check()] if not ok]  # fmt: skip
    assert failed == []
