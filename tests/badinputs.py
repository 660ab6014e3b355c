"""Bad inputs a user gives potstill (the fault issue): each must end in one clear message
(``error: …`` naming the field, file or folder), exit 2, no traceback, and leave the run folder
it aims at as it was. Used by tests/test_fault_injection.py and benchmarks/soak.py."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faultkit as fk
import yaml

from potstill import locks


@dataclass
class BadInput:
    """One case: the command's arguments, what its message must contain, the folder that must
    not change (a finished run), and how to set the case up."""

    name: str
    args: list[str]
    says: str
    keep: Path | None = None
    setup: Callable[[], Any] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def check(self) -> tuple[bool, str]:
        """Run the case: (whether it behaved, what went wrong)."""
        held = self.setup() if self.setup else None
        before = fk.fingerprint(self.keep) if self.keep else None
        try:
            r = subprocess.run([sys.executable, "-m", "potstill.cli", *self.args],
                               env=fk.env(**self.env), capture_output=True, text=True,
                               timeout=600)  # fmt: skip
        finally:
            if isinstance(held, locks.Lock):
                held.release()
        err = r.stderr.strip()
        lines = [err[err.rfind("error:") :]] if "error:" in err else []
        if r.returncode != 2:
            return False, f"exit {r.returncode}: {r.stderr[-400:]}"
        if "Traceback" in r.stderr:
            return False, f"a traceback: {r.stderr[-400:]}"
        if not lines or self.says not in lines[-1]:
            return False, f"the message {lines[-1:]!r} does not say {self.says!r}"
        if before is not None and fk.fingerprint(self.keep) != before:
            return False, f"{self.keep} changed"
        return True, ""


def _write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def bad_input_cases(root: Path, recipes: dict[str, Path],
                    refs: dict[str, fk.Reference]) -> list[BadInput]:  # fmt: skip
    """The cases, built under ``root`` from the harness's recipes and finished runs."""
    root.mkdir(parents=True, exist_ok=True)
    classic = yaml.safe_load(recipes["classic"].read_text())
    tc = yaml.safe_load(recipes["text-classification"].read_text())
    lm = yaml.safe_load(recipes["causal-lm"].read_text())
    done = refs["classic"].out  # a finished run: nothing of it may change
    copy = root / "finished-copy"  # one the cases may aim --overwrite at
    if not copy.exists():
        shutil.copytree(done, copy)

    def edited(name: str, base: dict, **changes: Any) -> Path:
        data = yaml.safe_load(yaml.safe_dump(base))
        for dotted, value in changes.items():
            node = data
            *head, last = dotted.split("__")
            for k in head:
                node = node.setdefault(k, {})
            node[last] = value
        return _write(root / f"{name}.yaml", data)

    outs = iter(range(1000))

    class _Out:  # a new --out folder for each case
        def __str__(self) -> str:
            return str(root / f"out-{next(outs)}")

    out = _Out()
    no_label = root / "no-label.csv"
    with open(no_label, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "category"])
        w.writerows([["a text", "x"], ["another", "y"]] * 30)
    empty_texts = root / "empty-texts.csv"
    empty_texts.write_text("sentence,topic\n" + "fine,computers\n,science\nok,politics\n" * 20)
    damaged_teacher = root / "damaged-teacher"
    if not damaged_teacher.exists():
        shutil.copytree(done / "teacher" / "final", damaged_teacher)
        fk.damage(damaged_teacher / "model.safetensors", "flip")
    a_file = _write(root / "a-file", "not a folder\n")
    not_a_run = root / "not-a-run"
    _write(not_a_run / "precious.txt", "user data\n")

    def hold() -> locks.Lock:
        return locks.Lock(done / ".potstill.lock", str(done), "wait", by="a potstill run")

    rc = str(recipes["classic"])
    return [
        BadInput("a recipe that does not exist", ["distill", "no-such-recipe", "--out", str(out)],
                 "no-such-recipe"),
        BadInput("an unknown field", ["distill", str(edited("unknown", classic, train__epohcs=2)),
                 "--out", str(out)], "epohcs"),
        BadInput("a value of the wrong type", ["distill", str(edited(
            "type", classic, train__max_steps="many")), "--out", str(out)], "max_steps"),
        BadInput("a negative step count", ["distill", str(edited(
            "negative", classic, train__max_steps=-3)), "--out", str(out)], "max_steps"),
        BadInput("YAML that does not parse", ["distill", str(_write(root / "syntax.yaml",
                 "train: {max_steps: 3\n")), "--out", str(out)], "syntax.yaml"),
        BadInput("an empty recipe file", ["distill", str(_write(root / "empty.yaml", "")),
                 "--out", str(out)], "empty.yaml"),
        BadInput("an unknown kind", ["distill", str(edited("kind", classic, kind="regression")),
                 "--out", str(out)], "regression"),
        BadInput("a data file that is missing", ["distill", str(edited(
            "missing-data", tc, data__path=str(root / "nowhere.csv"))), "--out", str(out)],
            "nowhere.csv"),
        BadInput("a data file without the label column", ["distill", str(edited(
            "no-label", tc, data__path=str(no_label))), "--out", str(out)], "topic"),
        BadInput("a data file with empty texts", ["distill", str(edited(
            "empty-texts", tc, data__path=str(empty_texts))), "--out", str(out)],
            "'sentence' of the train split has no text in rows 1, 4, 7"),
        BadInput("a teacher folder that is missing", ["distill", str(edited(
            "no-teacher", lm, teacher__model=str(root / "no-teacher"))), "--out", str(out)],
            "no-teacher"),
        BadInput("a damaged teacher export", ["distill", str(edited(
            "damaged-teacher", classic, teacher={"path": str(damaged_teacher)})),
            "--out", str(out)], "model.safetensors"),
        BadInput("a finished run again without --resume", ["distill", rc, "--out", str(done)],
                 "--resume", keep=done),
        BadInput("--resume with another recipe", ["distill", str(edited(
            "other", classic, train__max_steps=7)), "--out", str(done), "--resume"],
            "max_steps", keep=done),
        BadInput("a run folder in use", ["distill", rc, "--out", str(done), "--resume"],
                 "in use by a potstill run", keep=done, setup=hold),
        BadInput("--overwrite on a folder that is not a run", ["distill", rc, "--out",
                 str(not_a_run), "--overwrite"], "not a potstill run folder", keep=None),
        BadInput("--out names a file", ["distill", rc, "--out", str(a_file)], "a-file"),
        BadInput("--set with no value", ["distill", rc, "--out", str(out), "--set",
                 "train.max_steps"], "train.max_steps"),
        BadInput("--set of an unknown field", ["distill", rc, "--out", str(out), "--set",
                 "train.stepz=3"], "stepz"),
        BadInput("a device the machine lacks", ["distill", rc, "--out", str(out), "--device",
                 "cuda"], "cuda"),
        BadInput("a device that does not exist", ["distill", rc, "--out", str(out), "--device",
                 "tpu7"], "tpu7"),
        BadInput("a cache part out of range", ["cache", str(recipes["causal-lm"]), "--out",
                 str(root / "cache"), "--shard", "3/2"], "--shard 3/2"),
        BadInput("a progress interval that is not a number", ["distill", rc, "--out",
                 str(copy), "--resume"], "POTSTILL_PROGRESS_EVERY", keep=copy,
                 env={"POTSTILL_PROGRESS_EVERY": "soon"}),
        BadInput("a damaged recipe.yaml in the run folder", ["distill", rc, "--out",
                 str(copy), "--resume"], "recipe.yaml is damaged", keep=None,
                 setup=lambda: fk.damage(copy / "recipe.yaml", "flip")),
    ]  # fmt: skip
