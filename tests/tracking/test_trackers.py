"""Trackers: MLflow's store read back through MLflow's own client, W&B offline, none, errors."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from cellclass.data.presets import bps
from cellclass.errors import MissingDependencyError, TrackingError
from cellclass.tracking import MLflowTracker, NoTracker, make_tracker
from cellclass.tracking.folds import FoldLogger
from cellclass.tracking.trackers import (
    artifact_files,
    default_tracking_uri,
    flatten,
    metric_key,
)
from cellclass.training.config import TrainConfig
from cellclass.training.loop import train

FAST = ["--image-size", "32", "--set", "tta=false", "--set", "workers=1", "--set", "channels_last=false"]
CFG = {"model": "lenet5", "tasks": ["particle_type"], "image_size": 32, "batch_size": 16, "workers": 1,
       "tta": False, "channels_last": False}


def test_unknown_tracker_lists_the_valid_ones() -> None:
    with pytest.raises(TrackingError, match=r"tracker 'neptune' is unknown; valid: mlflow, wandb, none"):
        make_tracker("neptune")


def test_missing_wandb_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'cellclass\[wandb\]'"):
        make_tracker("wandb")


def test_bad_status_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match=r"run status 'done' is invalid; valid: finished, failed, killed"):
        MLflowTracker(root=tmp_path).close("done")


def test_names_and_params_are_valid_for_mlflow() -> None:
    assert metric_key("val/macro_f1") == "val/macro_f1"  # MLflow accepts slashes
    assert metric_key("val/dose (Gy)/macro_f1") == "val/dose _Gy_/macro_f1"
    assert metric_key("a//b/../c") == "a/b/c"
    flat = flatten({"lr": 1e-3, "task_weights": {"dose": 2.0}, "channels": [0, 1], "split": None})
    assert flat == {"lr": "0.001", "task_weights.dose": "2.0", "channels": "[0, 1]", "split": "None"}
    assert default_tracking_uri("/x/runs") == "sqlite:////x/runs/mlflow.db"


def test_artifacts_leave_out_training_state_and_stores(tmp_path: Path) -> None:
    for name in ("config.yaml", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "plots/a.png", "mlflow.db",
                 "study.db.lock", "tracking.json", "mlartifacts/x", ".hidden", "trials/0000/metrics.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    kept = {f"{rel}/{p.name}".lstrip("/") for p, rel in artifact_files(tmp_path, exclude=["trials"])}
    assert kept == {"config.yaml", "checkpoints/best.ckpt", "plots/a.png"}


@pytest.mark.slow
def test_mlflow_holds_params_per_epoch_metrics_and_artifacts(bps_dir: Path, tmp_path: Path, mlflow_store) -> None:
    from mlflow.tracking import MlflowClient

    uri = mlflow_store(tmp_path)
    run = tmp_path / "run"
    with MLflowTracker(root=tmp_path, experiment="tests", run_name="lenet", record=run / "tracking.json") as tracker:
        train(bps(bps_dir), TrainConfig(**CFG, epochs=2), run, tracker=tracker)
    assert tracker.uri == uri  # the default store sits in the runs root
    client = MlflowClient(tracking_uri=uri)
    info = client.get_run(tracker.run_id)
    assert info.info.status == "FINISHED" and info.info.run_name == "lenet"
    assert info.data.params["model"] == "lenet5" and info.data.params["epochs"] == "2"
    assert info.data.params["tasks"] == '["particle_type"]'
    for key in ("val/macro_f1", "val/particle_type/macro_f1", "val_loss", "train_loss"):
        history = client.get_metric_history(tracker.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    assert "test/particle_type/accuracy" in info.data.metrics
    files = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.yaml", "metrics.csv", "metrics.json", "report.html", "checkpoints", "plots"} <= files
    assert {a.path for a in client.list_artifacts(tracker.run_id, "checkpoints")} == {"checkpoints/best.ckpt"}
    assert (tmp_path / "mlartifacts").is_dir()
    # The run folder remembers its run: a resumed run continues it instead of opening another.
    assert json.loads((run / "tracking.json").read_text())["run_id"] == tracker.run_id
    again = MLflowTracker(root=tmp_path, experiment="tests", record=run / "tracking.json")
    assert again.start() == tracker.run_id
    again.close()


def test_wandb_offline_run(bps_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="W&B is optional: pip install 'cellclass[wandb]' to test its offline mode")
    from cellclass.tracking import WandbTracker

    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "runs" / "lenet"
    with make_tracker("wandb", experiment="cellclass-tests", run_name="lenet", root=run.parent,
                      record=run / "tracking.json") as tracker:
        assert isinstance(tracker, WandbTracker)
        train(bps(bps_dir), TrainConfig(**CFG, epochs=2), run, tracker=tracker)
    record = json.loads((run / "tracking.json").read_text())
    assert record["tracker"] == "wandb" and record["run_id"] == tracker.run_id
    logs = list((run.parent / "wandb").glob(f"offline-run-*-{tracker.run_id}/run-{tracker.run_id}.wandb"))
    assert len(logs) == 1
    keys = (b"val/macro_f1", b"val/particle_type/macro_f1", b"test/particle_type/accuracy", b"lr",
            f"run-{tracker.run_id}".encode())
    # W&B's own service process writes the offline file; under load it may still be
    # flushing when finish() returns (seen once in a full-suite run): wait for it, briefly.
    deadline = time.monotonic() + 30
    while not all(key in logs[0].read_bytes() for key in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    data = logs[0].read_bytes()
    for key in keys:
        assert key in data, key


def test_wandb_goes_offline_without_an_api_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("wandb", reason="W&B is optional: pip install 'cellclass[wandb]'")
    from cellclass.tracking import WandbTracker

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert WandbTracker.mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert WandbTracker.mode() == "online"


@pytest.mark.slow
def test_no_tracker_writes_nothing(bps_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "lenet"
    with make_tracker("none", root=run.parent) as tracker:
        assert isinstance(tracker, NoTracker)
        train(bps(bps_dir), TrainConfig(**CFG, epochs=1), run, tracker=tracker)
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["lenet"]
    assert not (run / "tracking.json").exists()


class Recorder(NoTracker):
    """Remembers what it was told."""

    def __init__(self) -> None:
        self.metrics: list[tuple[str, float, int]] = []
        self.artifacts: list[Path] = []

    @property
    def run_id(self) -> str | None:
        return "recorder"

    def log_metrics(self, metrics, step):
        self.metrics += [(k, v, step) for k, v in metrics.items()]

    def log_artifacts(self, folder, exclude=()):
        self.artifacts.append(folder)


def test_fold_logger_tells_each_fold_once(tmp_path: Path) -> None:
    for k in range(2):
        fold = tmp_path / f"fold_{k}"
        fold.mkdir()
        pd.DataFrame({"epoch": [1, 2], "val/macro_f1": [0.5 + k, 0.6 + k]}).to_csv(fold / "metrics.csv", index=False)
        (fold / "metrics.json").write_text(json.dumps({"best_epoch": 2, "tasks": {"t": {"accuracy": 0.7}}}))
    recorder = Recorder()
    seen = []
    logger = FoldLogger(recorder, tmp_path, 2, on_fold=lambda k, run: seen.append(k))
    assert logger.poll() == [0, 1] and logger.poll() == []
    logger.finish({"tasks": {"t": {"accuracy": {"mean": 0.7, "std": 0.0, "min": 0.7, "max": 0.7}}},
                   "holdout": {"models": {"ensemble": {"t": {"accuracy": 0.8, "task_type": "single"}}}}})
    assert seen == [0, 1]
    assert ("holdout/ensemble/t/accuracy", 0.8, 0) in recorder.metrics
    assert ("fold_1/val/macro_f1", 1.6, 2) in recorder.metrics
    assert ("fold_0/test/t/accuracy", 0.7, 2) in recorder.metrics
    assert ("cv/t/accuracy/mean", 0.7, 0) in recorder.metrics
    assert recorder.artifacts == [tmp_path]
    # A re-run of the same cross-validation into the same tracked run logs no fold twice.
    again = Recorder()
    FoldLogger(again, tmp_path, 2).poll()
    assert again.metrics == []


@pytest.fixture
def invoke():
    """Run a ``cellclass`` command in this process (the imports are already paid for), keeping
    the logging set-up the command changes."""
    import logging

    from typer.testing import CliRunner

    from cellclass.cli import app

    ours = logging.getLogger("cellclass")
    saved = (ours.handlers[:], ours.level, ours.propagate)

    def run(*args: object):
        try:
            return CliRunner().invoke(app, [str(a) for a in args])
        finally:
            ours.handlers[:], ours.level, ours.propagate = saved[0][:], saved[1], saved[2]

    return run


@pytest.mark.slow
def test_cli_train_tracks_in_mlflow_beside_the_run_folder(invoke, bps_dir: Path, tmp_path: Path,
                                                           mlflow_store) -> None:
    from mlflow.tracking import MlflowClient

    uri = mlflow_store(tmp_path / "runs")
    run = tmp_path / "runs" / "lenet"
    result = invoke("train", bps_dir, "--preset", "bps", "--task", "particle_type", "--model", "mlp", *FAST,
                    "--experiment", "cli-tests", "--out", run)
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("cli-tests")
    (tracked,) = client.search_runs([experiment.experiment_id])
    assert tracked.info.run_id == json.loads((run / "tracking.json").read_text())["run_id"]
    assert tracked.info.status == "FINISHED" and tracked.data.params["image_size"] == "32"
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "val/macro_f1")] == [1]
    assert "report.html" in {a.path for a in client.list_artifacts(tracked.info.run_id)}
    # --tracker none: the run folder and nothing else.
    quiet = tmp_path / "quiet" / "mlp"
    result = invoke("train", bps_dir, "--preset", "bps", "--task", "particle_type", "--model", "mlp", *FAST,
                    "--tracker", "none", "--out", quiet)
    assert result.exit_code == 0, result.output
    assert [p.name for p in quiet.parent.iterdir()] == ["mlp"] and (quiet / "metrics.json").is_file()
    assert not (quiet / "tracking.json").exists()


@pytest.mark.slow
def test_cli_refuses_an_unknown_tracker(cli, bps_dir: Path, tmp_path: Path) -> None:
    bad = cli("train", bps_dir, "--preset", "bps", "--tracker", "neptune", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "tracker 'neptune' is unknown; valid: mlflow, wandb, none" in bad.stderr
