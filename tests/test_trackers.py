"""Trackers users already use (``train.report_to``): a real recipe run reports every row of
``metrics.jsonl`` to TensorBoard, Weights & Biases (offline) and MLflow (a file store), each
read back from what the tracker wrote — TensorBoard's event files, W&B's offline run file,
MLflow's store through its client — with the recipe as the run's configuration; a resumed run
continues the same tracker runs; ``auto`` takes what is installed and set up."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import yaml
from test_gpu_road import DIGITS

from potstill import trackers
from potstill.logs import read_metrics_lines
from potstill.recipe import validate_recipe
from potstill.runs import run

NEEDED = ("tensorboard", "wandb", "mlflow")
have = trackers.installed()
needs_all = pytest.mark.skipif(
    any(t not in have for t in NEEDED),
    reason=f"needs {', '.join(NEEDED)} (make test installs them)",
)


def test_report_to_names_trackers_and_says_how_to_install_them(monkeypatch):
    assert trackers.resolve_report_to("none") == []
    with pytest.raises(ValueError, match=r"'neptune' is not a tracker; the trackers: tensorboard"):
        trackers.resolve_report_to(["wandb", "neptune"])
    monkeypatch.setattr(trackers, "installed", lambda: ["tensorboard"])
    with pytest.raises(
        ValueError, match=r"wandb, mlflow is not installed: pip install wandb mlflow"
    ):
        trackers.resolve_report_to("all")
    assert trackers.resolve_report_to(["tensorboard"]) == ["tensorboard"]


def test_auto_takes_the_trackers_installed_and_set_up(monkeypatch, tmp_path):
    monkeypatch.setattr(trackers, "installed", lambda: list(NEEDED))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    assert trackers.resolve_report_to("auto") == ["tensorboard"]
    assert trackers.resolve_report_to("auto", tensorboard=False) == []
    assert "wandb (set WANDB_API_KEY" in trackers.not_set_up()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}/mlruns")
    assert trackers.resolve_report_to("auto") == list(NEEDED)
    assert trackers.not_set_up() == ""


def wandb_records(run_file: Path) -> list:
    """The records of a W&B offline run file: a 7-byte W&B header, then LevelDB log blocks of
    32 KiB whose chunks (4-byte checksum, 2-byte length, 1-byte type) carry ``Record``
    protobufs (``wandb.proto.wandb_internal_pb2``); read independently of wandb's writer."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        block_left = 32768 - pos % 32768
        if block_left < 7:  # the block's tail is padding
            pos += block_left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def expected_rows(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every tracker metric a training folder's ``metrics.jsonl`` implies: name → (step, value)."""
    rows, problems = read_metrics_lines(folder / "metrics.jsonl")
    assert not problems
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        data, prefix = (row["eval"], "eval/") if "eval" in row else (row, "train/")
        for k, v in data.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(prefix + k, []).append((data["step"], float(v)))
    return out


def same_points(got: list, want: list, name: str) -> None:
    """The same steps in the same order, and the same values (float32 in some trackers)."""
    got, want = sorted(got), sorted(want)
    assert [s for s, _ in got] == [s for s, _ in want], name
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), name


@needs_all
def test_every_metric_reaches_tensorboard_wandb_and_mlflow_and_resume_continues(
    tmp_path, monkeypatch
):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps it, in maintenance
    recipe = copy.deepcopy(DIGITS)
    for section in (recipe["train"], recipe["teacher"]["train"]):
        section.update(tensorboard=True, report_to=list(NEEDED), log_every=1, eval_every=2)
    out = tmp_path / "run"
    run(validate_recipe(recipe), out)
    folder = out / "few" / "distilled"
    want = expected_rows(folder)
    assert {"train/loss", "train/lr", "train/examples_per_s", "eval/accuracy"} <= set(want)
    assert any(k.startswith("train/") and k not in ("train/loss", "train/lr") for k in want)

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    for name, points in want.items():
        same_points([(e.step, e.value) for e in events.Scalars(name)], points, name)

    ids = json.loads((folder / "trackers.json").read_text())
    client = MlflowClient(uri)
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.info.run_name == "run/few/distilled"
    assert mlrun.data.params["name"] == "gpu-digits"  # the recipe, flattened
    assert mlrun.data.params["student.arch.hidden"] == "[8]"
    for name, points in want.items():
        got = [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], name)]
        same_points(got, points, name)
    recipe_file = client.download_artifacts(ids["mlflow"], "recipe.yaml", str(tmp_path))
    assert yaml.safe_load(Path(recipe_file).read_text())["name"] == "gpu-digits"

    [run_file] = (folder / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-*.wandb")
    records = wandb_records(run_file)
    history: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in r.history.item}  # fmt: skip
            step = r.history.step.num
            for k, v in items.items():
                if not k.startswith("_"):
                    history.setdefault(k, []).append((step, v))
    for name, points in want.items():
        same_points(history[name], points, name)
    kinds = [r.WhichOneof("record_type") for r in records]
    [run_record] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    values = {i.key: json.loads(i.value_json) for i in run_record.config.update}
    assert values, kinds
    assert values["name"] == "gpu-digits" and values["student"]["arch"]["hidden"] == [8]

    # a resumed run reports to the same tracker runs
    (out / "few" / "distilled" / "done.json").unlink()
    run(validate_recipe(recipe), out, resume=True)
    assert json.loads((folder / "trackers.json").read_text()) == ids
    assert len(client.search_runs([mlrun.info.experiment_id])) == 3  # teacher, baseline, distilled


def test_the_cli_and_a_chain_set_report_to_in_every_training(tmp_path):
    from typer.testing import CliRunner

    from potstill.cli import app
    from potstill.recipe import load_recipe, set_report_to

    r = set_report_to(load_recipe("default"), ["tensorboard"])
    assert r.train.report_to == r.teacher.train.report_to == ["tensorboard"]
    chain = set_report_to(load_recipe("fashion-assistant"), "none")
    assert chain.base["train"]["report_to"] == "none"
    assert chain.base_recipe().train.report_to == "none"
    if "tensorboard" not in have:
        pytest.skip("tensorboard not installed")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(DIGITS))
    out = CliRunner().invoke(app, ["distill", str(path), "--out", str(tmp_path / "run"),
                                   "--report-to", "tensorboard"])  # fmt: skip
    assert out.exit_code == 0, out.output
    for part in ("teacher", "few/distilled", "few/baseline"):
        assert list((tmp_path / "run" / part / "tensorboard").glob("events.out.tfevents.*"))
    bad = CliRunner().invoke(app, ["distill", str(path), "--out", str(tmp_path / "x"),
                                   "--report-to", "neptune"])  # fmt: skip
    assert bad.exit_code == 2 and "--report-to: invalid recipe" in bad.output
    assert "Input should be 'tensorboard', 'wandb' or 'mlflow' (got 'neptune')" in bad.output
