"""Experiment trackers a training run reports to besides ``metrics.jsonl``: TensorBoard, Weights
& Biases and MLflow (``train.report_to``; by default every one that is installed, said in the
log). Each gets every logged row under stable names — ``train/<term>``, ``train/loss``,
``train/lr``, ``train/examples_per_s``, ``eval/<metric>`` — at the optimizer step, and the
run's recipe as the run's configuration. The trackers' own settings come from their usual
environment variables (``WANDB_PROJECT``, ``WANDB_MODE``, ``WANDB_DIR``,
``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``); a resumed run continues the same
tracker runs (their ids are kept in ``trackers.json`` in the training folder)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .io import atomic_write_text

log = logging.getLogger("potstill")

TRACKERS = ("tensorboard", "wandb", "mlflow")
"""The trackers potstill reports to, by the names ``report_to`` takes."""
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""Each tracker's package (``mlflow-skinny`` provides ``mlflow`` too)."""
IDS_FILE = "trackers.json"
RECIPE_FILE = "recipe.yaml"


def installed() -> list[str]:
    """The trackers whose package is installed, in :data:`TRACKERS` order."""
    return [t for t in TRACKERS if importlib.util.find_spec(PACKAGES[t]) is not None]


def _wandb_set_up() -> bool:
    """Whether Weights & Biases can log without asking: an API key, a login (``~/.netrc``),
    or ``WANDB_MODE`` offline / disabled."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in (
        "offline", "disabled", "dryrun",
    ):  # fmt: skip
        return True
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def set_up() -> dict[str, bool]:
    """Each installed tracker: whether it is set up to log without a question (TensorBoard
    always; W&B with a key, a login or an offline mode; MLflow with ``MLFLOW_TRACKING_URI``)."""
    checks = {"tensorboard": lambda: True, "wandb": _wandb_set_up,
              "mlflow": lambda: bool(os.environ.get("MLFLOW_TRACKING_URI"))}  # fmt: skip
    return {t: checks[t]() for t in installed()}


HOW = {"wandb": "WANDB_API_KEY, wandb login or WANDB_MODE=offline",
       "mlflow": "MLFLOW_TRACKING_URI"}  # fmt: skip


def not_set_up() -> str:
    """The installed trackers ``auto`` leaves out and what sets each up, for the log."""
    left = [f"{t} (set {HOW[t]})" for t, ok in set_up().items() if not ok]
    return f"; installed but not set up: {', '.join(left)}" if left else ""


def resolve_report_to(value: str | Sequence[str] | None, *, tensorboard: bool = True) -> list[str]:
    """The trackers ``report_to`` names: ``auto`` (the default: those installed and set up,
    :func:`set_up`; without TensorBoard when ``tensorboard`` is off), ``all`` (every one, each
    installed), ``none``, or a list of names; ValueError naming a tracker that is unknown or not
    installed."""
    if value is None or value == "auto":
        ready = [t for t, ok in set_up().items() if ok]
        return [t for t in ready if tensorboard or t != "tensorboard"]
    if value == "none":
        return []
    names = list(TRACKERS) if value == "all" else [value] if isinstance(value, str) else list(value)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(
            f"train.report_to: {', '.join(map(repr, unknown))} is not a tracker; the trackers: "
            f"{', '.join(TRACKERS)} (or auto, all, none)"
        )
    have = installed()
    missing = [n for n in names if n not in have]
    if missing:
        raise ValueError(
            f"train.report_to: {', '.join(missing)} is not installed: pip install "
            f"{' '.join(PACKAGES[n] for n in missing)} (or leave it out of report_to)"
        )
    return names


def run_identity(
    run_dir: Path, name: str, fallback: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The tracker run's name and configuration: within a run folder (the nearest
    ``recipe.yaml`` in ``run_dir`` or above it) ``<run folder>/<training folder>`` and the
    recipe; else ``name`` and ``fallback`` (the training settings)."""
    for folder in [run_dir, *list(run_dir.parents)[:3]]:
        path = folder / RECIPE_FILE
        if path.is_file():
            data = yaml.safe_load(path.read_text())
            if isinstance(data, dict):
                inner = run_dir.relative_to(folder).as_posix()
                return f"{folder.resolve().name}/{inner}".rstrip("/."), data
    return name, dict(fallback)


def flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level of dotted names (MLflow's parameters)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, name: str, config: Mapping[str, Any], ids: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        text = yaml.safe_dump(dict(config), sort_keys=False)
        self.writer.add_text("recipe", f"```\n{text}\n```")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, name: str, config: Mapping[str, Any], ids: dict) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "potstill"), name=name, config=dict(config),
            dir=os.environ.get("WANDB_DIR", str(run_dir)), id=ids.get("wandb"), resume="allow",
            reinit="create_new",
        )  # fmt: skip
        ids["wandb"] = self.run.id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, run_dir: Path, name: str, config: Mapping[str, Any], ids: dict) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, else MLflow's default
        run_id = ids.get("mlflow")
        if run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "potstill")
            found = self.client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            params = {k: str(v)[:6000] for k, v in flat(config).items()}
            for i in range(0, len(params), 100):  # MLflow takes 100 parameters a batch
                from mlflow.entities import Param

                batch = list(params.items())[i : i + 100]
                self.client.log_batch(run_id, params=[Param(k, v) for k, v in batch])
            self.client.log_text(run_id, yaml.safe_dump(dict(config), sort_keys=False),
                                 "recipe.yaml")  # fmt: skip
        self.run_id = ids["mlflow"] = run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k.replace("@", "_at_"), float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


OPENERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}


class Trackers:
    """The trackers of one training folder: opened with their ids kept in ``trackers.json``
    (a resumed run continues the same runs), fed each row of ``metrics.jsonl``, closed."""

    def __init__(
        self, run_dir: Path, names: Sequence[str], *, name: str, config: Mapping[str, Any]
    ) -> None:
        self.run_dir = run_dir
        self.names = list(names)
        path = run_dir / IDS_FILE
        ids: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        self.open = [OPENERS[n](run_dir, name, config, ids) for n in self.names]
        if ids:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(ids, indent=1))

    def write(self, row: Mapping[str, Any]) -> None:
        """Report one ``metrics.jsonl`` row (a training row, or ``{"eval": {...}}``)."""
        data = row.get("eval", row)
        prefix = "eval/" if "eval" in row else "train/"
        metrics = {
            prefix + k: float(v)
            for k, v in data.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if metrics:
            for tracker in self.open:
                tracker.log(metrics, int(data["step"]))

    def close(self) -> None:
        """Flush and close every tracker."""
        for tracker in self.open:
            tracker.close()


__all__ = ["TRACKERS", "Trackers", "installed", "resolve_report_to", "run_identity"]
