"""A run's folder, the same for every recipe kind: the guard (an existing run continues only with
``--resume`` and the same recipe, ``--overwrite`` deletes it), a lock against a second process
running in it, ``recipe.yaml``, markers of finished parts, and ``results.json`` with one header
(kind, name, seed, versions, machine, threads, processes, wall time)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import torch
import yaml
from pydantic import BaseModel

from .. import distributed, progress
from .._version import __version__
from ..checkpoints import BEST_DIR, CHECKPOINTS_DIR
from ..io import atomic_write_text
from ..locks import Lock
from ..placement import Placement, describe_device, resolve_device
from ..recipe.common import RecipeError
from ..sealed import damage, is_sealed

log = logging.getLogger("potstill")

M = TypeVar("M", bound=torch.nn.Module)

RECIPE_FILE = "recipe.yaml"
RESULTS_FILE = "results.json"
DONE_FILE = "done.json"
LOCK_FILE = ".potstill.lock"
LOG_FILE = "run.log"
SUM_PREFIX = "# sha256 of the lines below: "
"""The first line of a run folder's ``recipe.yaml`` (a YAML comment): its checksum."""
SEALED_KEY = "sealed"
"""The key of ``done.json`` that lists the part's sealed subfolders."""

HEADER_KEYS = (
    "kind", "name", "seed", "potstill_version", "torch_version", "transformers_version",
    "python", "machine", "threads", "processes", "device", "teacher_device", "precision",
    "wall_time_s",
)  # fmt: skip
"""The keys every run's results.json starts with, whatever its kind (a GPU run adds its
``device_name``, ``device_memory_gb`` and ``compute_capability`` after them)."""

PLACEMENT_FIELDS = ("device", "device_map", "report_to", "tensorboard", "progress")
"""Recipe fields that say where a run computes or reports, not what: a run resumes on another
device, or reporting to other trackers."""


class RunFolder:
    """The folder ``path`` of a run of ``recipe``.

    Opening it checks the folder (see the module doc), takes its lock (rank 0; a second
    process gets a :class:`~potstill.recipe.common.RecipeError` saying the folder is in use)
    and, with ``overwrite``, empties it. :meth:`start` writes ``recipe.yaml`` once the run's
    inputs have loaded (so a run that could not start does not block a retry). Use it as a
    context manager: the lock is released on exit.
    """

    def __init__(
        self, path: str | os.PathLike, recipe: BaseModel, *, resume: bool = False,
        overwrite: bool = False,
    ) -> None:  # fmt: skip
        self.path = Path(path)
        self.recipe = recipe
        self.resume = resume
        self.t_start = time.perf_counter()
        self._lock: Lock | None = None
        # where the run computes, resolved before anything loads: a device the machine lacks
        # is an error naming the field at once
        self.placement, self.teacher_device = run_devices(recipe)
        self._log: logging.Handler | None = None
        self._check(overwrite)
        self._open_log()

    # -- the guard ------------------------------------------------------------------------------

    def _check(self, overwrite: bool) -> None:
        # decided once, before rank 0 creates the folder for its lock, so every process takes
        # the same barriers below
        existed = self.path.exists()
        saved = self.path / RECIPE_FILE
        if saved.exists() and not overwrite:
            if not self.resume:
                raise RecipeError(
                    f"{self.path} already holds a run; pass --resume to continue it "
                    "(finished parts are reused) or --overwrite to start again"
                )
            before = type(self.recipe).model_validate(read_saved_recipe(saved))
            diff = sorted(
                f
                for f in _diff_fields(before.model_dump(), self.recipe.model_dump())
                if f.rsplit(".", 1)[-1] not in PLACEMENT_FIELDS
            )
            if diff:
                raise RecipeError(
                    f"{self.path} was started with another recipe (fields that differ: "
                    f"{', '.join(diff)}); use a new --out folder or --overwrite"
                )
        if overwrite and existed:
            others = [p for p in self.path.iterdir() if p.name != LOCK_FILE]
            if not saved.exists() and others:
                raise RecipeError(
                    f"--overwrite: {self.path} is not a potstill run folder (no recipe.yaml) "
                    "and is not empty; refusing to delete it. Choose another --out folder."
                )
        self._take_lock()
        if self.resume and existed and distributed.is_main():
            self._remove_cut_writes()
        if overwrite and existed:
            distributed.barrier()  # every process has checked the folder before it goes
            if distributed.is_main():
                for p in self.path.iterdir():
                    if p.name != LOCK_FILE:
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
        distributed.barrier()  # and before rank 0 writes a new recipe.yaml into it

    def _remove_cut_writes(self) -> None:
        """Remove the temporary files of writes a killed run cut short (``.NAME.*.tmp``: never
        renamed into place, so never read); the folder is locked, so none is being written.
        Checkpoints kept aside as damaged keep theirs."""
        cut = [p for p in self.path.rglob(".*.tmp")
               if not any(part.startswith("damaged-") for part in p.parts)]  # fmt: skip
        for p in cut:
            p.unlink(missing_ok=True)
        if cut:
            log.info("%s: removed %d file(s) a killed run left half-written", self.path, len(cut))

    def _take_lock(self) -> None:
        """Rank 0 locks the folder for the whole run; under torchrun the other ranks share its
        lock and, refused, raise the same error (none waits in a barrier for a run that
        cannot start)."""
        refused = None
        if distributed.is_main():
            try:
                self._lock = Lock(
                    self.path / LOCK_FILE, str(self.path),
                    "wait for it to finish or choose another --out folder",
                    by="a potstill run", error=RecipeError,
                )  # fmt: skip
            except RecipeError as e:
                refused = str(e)
        refused = distributed.broadcast_object(refused)
        if refused is not None:
            raise RecipeError(refused)

    def _open_log(self) -> None:
        """Rank 0 copies what potstill logs (and each progress line) to ``run.log``, appended
        on ``--resume``."""
        if not distributed.is_main():
            return
        handler = logging.FileHandler(self.path / LOG_FILE, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        handler.setLevel(logging.INFO)
        handler.handle(
            self._record(
                f"potstill {__version__}: {'resuming' if self.resume else 'starting'} {self.path}"
            )
        )
        logging.getLogger("potstill").addHandler(handler)
        progress.add_sink(handler)
        self._log = handler

    @staticmethod
    def _record(text: str, level: int = logging.INFO) -> logging.LogRecord:
        return log.makeRecord(log.name, level, __file__, 0, "%s", (text,), None)

    def close(self, error: BaseException | None = None) -> None:
        """Release the folder's lock and close ``run.log`` (naming ``error``, when the run
        stopped on one)."""
        if self._log is not None:
            if error is not None:
                what = "interrupted" if isinstance(error, KeyboardInterrupt) else "stopped"
                self._log.handle(self._record(f"{what}: {error!r}"[:2000], logging.ERROR))
            logging.getLogger("potstill").removeHandler(self._log)
            progress.remove_sink(self._log)
            self._log.close()
            self._log = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close(exc)

    # -- placement ------------------------------------------------------------------------------

    def place_teacher(self, teacher: M) -> M:
        """``teacher`` on ``teacher.device`` (default: the run's device): :func:`place_teacher`."""
        return place_teacher(teacher, self.teacher_device)

    def place_student(self, student: M) -> M:
        """``student`` on the run's device."""
        return self.placement.model(student)

    # -- writing --------------------------------------------------------------------------------

    def start(self) -> None:
        """Write ``recipe.yaml`` (rank 0)."""
        if not distributed.is_main():
            return
        self.path.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False)
        atomic_write_text(self.path / RECIPE_FILE, f"{SUM_PREFIX}{_digest(text)}\n{text}")

    def finished(self, part: str | os.PathLike) -> dict[str, Any] | None:
        """What the finished part in subfolder ``part`` recorded, when the run resumes and the
        part finished before (its ``done.json`` exists) and its sealed folders (its exports)
        are intact; else None. A part whose export or marker is damaged is rebuilt: a warning
        names the damaged files, the marker and the damaged folders go (rank 0), and the part
        trains again from its newest intact checkpoint, to the same weights (from its first
        step when its ``best/`` copy is damaged, which only such a run writes again)."""
        done = self.path / part / DONE_FILE
        if not (self.resume and done.exists()):
            return None
        try:
            info = json.loads(done.read_text())
            sealed = info.pop(SEALED_KEY, [])
            problems = {sub: damage(self.path / part / sub) for sub in sealed}
        except (ValueError, AttributeError) as e:
            problems = {".": [f"{done} is damaged ({e})"]}
        problems = {sub: p for sub, p in problems.items() if p}
        if not problems:
            return info
        # the best evaluation's copy is written again only by a run from the first step
        again = BEST_DIR in problems
        log.warning(
            "%s: finished earlier, but %s: rebuilding it%s",
            part, "; ".join(p for ps in problems.values() for p in ps),
            f" from the first step ({BEST_DIR}/ holds the weights of an evaluation its "
            "checkpoints are past)" if again else "",
        )  # fmt: skip
        distributed.barrier()  # every process has read the marker before it goes
        if distributed.is_main():
            done.unlink()
            for sub in [*problems, *([CHECKPOINTS_DIR] if again else [])]:
                if sub != ".":
                    shutil.rmtree(self.path / part / sub, ignore_errors=True)
        distributed.barrier()
        return None

    def mark_finished(self, part: str | os.PathLike, info: dict[str, Any]) -> None:
        """Record that the part in subfolder ``part`` is finished, with ``info`` and the
        sealed folders it exported (their ``SHA256SUMS`` are verified on reuse) (rank 0)."""
        if distributed.is_main():
            folder = self.path / part
            sealed = sorted(p.name for p in folder.iterdir() if p.is_dir() and is_sealed(p))
            text = json.dumps({**info, SEALED_KEY: sealed}, indent=1)
            atomic_write_text(folder / DONE_FILE, text)

    @property
    def rerun_command(self) -> str:
        """The command that reproduces this run (finished parts reused)."""
        return f"potstill distill {self.path / RECIPE_FILE} --out {self.path} --resume"

    def header(self) -> dict[str, Any]:
        """The common head of results.json (see :data:`HEADER_KEYS`)."""
        try:
            import transformers

            hf_version: str | None = transformers.__version__
        except ImportError:
            hf_version = None
        recipe = self.recipe
        gpu = describe_device(self.placement.device)
        seed = getattr(recipe, "seed", None)
        if seed is None and isinstance(getattr(recipe, "base", None), dict):  # a chain
            seed = recipe.base.get("seed", 0)  # type: ignore[attr-defined]
        return {
            "kind": getattr(recipe, "kind", "classic"),
            "name": getattr(recipe, "name", None),
            "seed": seed,
            "potstill_version": __version__,
            "torch_version": torch.__version__,
            "transformers_version": hf_version,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "processes": distributed.world_size(),
            "device": gpu.pop("device"),
            "teacher_device": str(self.teacher_device),
            "precision": getattr(getattr(recipe, "train", None), "precision", None),
            "wall_time_s": time.perf_counter() - self.t_start,
            **gpu,
        }

    def write_results(self, body: dict[str, Any]) -> dict[str, Any]:
        """The header followed by ``body`` (whose keys win), written to results.json by rank 0;
        returns them."""
        results = {**self.header(), **body}
        if distributed.is_main():
            text = json.dumps(results, indent=1, default=str)
            atomic_write_text(self.path / RESULTS_FILE, text)
        return results


def _diff_fields(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_fields(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if a != b else []


def run_devices(recipe: Any) -> tuple[Placement, torch.device]:
    """The placement of a recipe's student (its ``device``) and its teacher's device
    (``teacher.device``, default the same), resolved on this machine; a chain's come from its
    base recipe. ValueError naming the field for a device the machine lacks."""
    if hasattr(recipe, "base_recipe"):
        recipe = recipe.base_recipe()
    placement = Placement.of(getattr(recipe, "device", None), "device")
    asked = getattr(getattr(recipe, "teacher", None), "device", None)
    teacher = resolve_device(asked, "teacher.device") if asked else placement.device
    return placement, teacher


def place_teacher(teacher: M, device: torch.device) -> M:
    """``teacher`` on ``device``; a Hugging Face model loaded with a ``device_map`` stays
    sharded where accelerate put it."""
    if getattr(teacher, "hf_device_map", None) is None:
        teacher.to(device)
    return teacher


def teacher_load_options(spec: Any) -> dict[str, Any]:
    """What ``from_pretrained`` gets for the teacher section ``spec``: its ``device_map``
    (sharded over the GPUs through accelerate) when it has one."""
    device_map = getattr(spec, "device_map", None)
    return {} if device_map is None else {"device_map": device_map}


def fit_info(result: Any, examples: int) -> dict[str, Any]:
    """What a trained part records in its done marker and its report row: steps, training time,
    throughput, the last and the best validation figures, and how many training examples."""
    return {
        "steps": result.steps,
        "train_time_s": result.train_time_s,
        "examples_per_s": result.examples_per_s,
        "val_final": result.final_eval,
        "val_best": result.best,
        "examples": examples,
        **({"skipped_steps": n} if (n := getattr(result, "skipped_steps", 0)) else {}),
        **trained_on(result),
    }


def trained_on(result: Any) -> dict[str, Any]:
    """Where a training part ran: its ``device`` and, on a GPU, ``peak_memory_gb`` (the most
    memory it allocated)."""
    peak = getattr(result, "peak_memory_gb", None)
    return {"device": result.device, **({} if peak is None else {"peak_memory_gb": peak})}


def note_run_log(run_dir: str | os.PathLike, text: str) -> None:
    """Append ``text`` to a run's ``run.log`` (what the command line prints after the run);
    nothing where the folder has no log or on ranks other than 0."""
    file = Path(run_dir) / LOG_FILE
    if not distributed.is_main() or not file.exists():
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(file, "a", encoding="utf-8") as f:
        f.writelines(f"{stamp} {line}\n" for line in text.splitlines())


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_saved_recipe(file: Path) -> dict[str, Any]:
    """A run folder's ``recipe.yaml``, checked against the checksum on its first line (files
    written before it are read as they are); RecipeError naming the file when damaged."""
    fix = "restore it, or start again with --overwrite (finished parts then train again)"
    try:
        text = file.read_bytes().decode("utf-8")
        first, _, rest = text.partition("\n")
        if first.startswith(SUM_PREFIX) and first[len(SUM_PREFIX) :] != _digest(rest):
            raise ValueError("its checksum differs")
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError("not a recipe")
    except (ValueError, yaml.YAMLError) as e:
        raise RecipeError(f"{file} is damaged ({e}); {fix}") from None
    return data
