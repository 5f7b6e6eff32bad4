"""Sweeps end to end: worker processes sharing one SQLite study, kill and re-run, the W&B
format, MLflow holding every trial, the report, and the refusals."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from cellclass.data.presets import bps
from cellclass.errors import SweepError
from cellclass.tracking.space import SweepSpace
from cellclass.tracking.study import live_trials, open_storage, open_study
from cellclass.tracking.sweep import SweepJob, claim, load_study, run_sweep
from cellclass.training.config import TrainConfig
from cellclass.training.loop import first_candidate

FAST = ["--image-size", "32", "--set", "tta=false", "--set", "workers=1", "--set", "channels_last=false"]
COMMON = ["--preset", "bps", "--task", "particle_type", "--model", "lenet5", *FAST]
BASE = TrainConfig(model="lenet5", tasks=["particle_type"], image_size=32, epochs=1, batch_size=16, workers=1,
                   tta=False, channels_last=False)

# A seed-style W&B sweep file, as W&B's agent reads it, with a validation objective.
WANDB_GRID = """\
program: train.py
method: grid
metric:
  name: val/macro_f1
  goal: maximize
parameters:
  batch_size:
    values: [16, 32]
  epochs:
    values: [1, 2]
  lr:
    min: 0.001
    max: 0.01
"""

def trials_of(out: Path, study: str | None = None) -> tuple[list[Any], list[Any]]:
    """(live trials, all trials) of the sweep in ``out``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    loaded = optuna.load_study(study_name=study or out.name, storage=f"sqlite:///{out / 'study.db'}")
    every = loaded.get_trials(deepcopy=False)
    return live_trials(every), every


def root(trial: Any) -> int:
    return int(trial.system_attrs.get("failed_trial", trial.number))


@pytest.mark.slow
def test_wandb_grid_two_workers_killed_and_rerun_every_trial_once_in_mlflow(bps_dir: Path, tmp_path: Path,
                                                                            mlflow_store) -> None:
    """The must-show sweep: a W&B-format file, unchanged; 2 worker processes sharing one SQLite
    study; the sweep killed mid-run and re-run with the same command; MLflow read back."""
    from mlflow.tracking import MlflowClient

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(WANDB_GRID)
    out = tmp_path / "grid"
    uri = mlflow_store(out)
    exe = Path(sys.executable).with_name("cellclass")
    command = [str(exe), "sweep", str(sweep_file), str(bps_dir), *COMMON, "--n-jobs", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

    # 1. Start, and kill the main process (SIGKILL) once a trial is done and others run.
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    states: list[str] = []
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.3)
            try:
                with sqlite3.connect(out / "study.db", timeout=30) as db:
                    states = [s for (s,) in db.execute("SELECT state FROM trials")]
            except sqlite3.Error:
                continue
            if "COMPLETE" in states and "RUNNING" in states:
                break
        assert first.poll() is None, f"the sweep ended before it could be killed: {states}"
        first.send_signal(signal.SIGKILL)  # the main process only: its workers must not outlive it
    finally:
        first.kill()
        first.wait()
    live, _ = trials_of(out)
    done_before = {t.number: t.value for t in live if t.state.name == "COMPLETE"}
    interrupted = {t.number: t.params for t in live if t.state.name == "RUNNING"}
    assert done_before and interrupted
    # A trial killed while being claimed may not have recorded its worker yet.
    workers = {t.user_attrs["worker"]["pid"] for t in live if "worker" in t.user_attrs}
    for pid in workers:
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"worker {pid} outlived the killed sweep")

    # 2. The same command again continues the same study up to its 4 trials (the grid's size).
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "running it again" in again.stderr
    assert "4 of 4 trial(s) finished (4 complete)" in " ".join(again.stdout.split())
    live, every = trials_of(out)
    assert len(live) == 4 and {t.state.name for t in live} == {"COMPLETE"}
    roots = sorted(root(t) for t in live)
    assert len(set(roots)) == 4  # no trial duplicated ...
    assert set(interrupted) <= set(roots)  # ... none lost: each interrupted trial ran again, once
    for t in live:
        if root(t) in interrupted:
            # same parameters (a trial killed while being claimed may have had none yet)
            assert t.number != root(t) and interrupted[root(t)].items() <= t.params.items()
        if t.number in done_before:
            assert t.value == done_before[t.number]  # finished trials were kept, not re-run
    retired = [t for t in every if t not in live]
    assert sorted(t.number for t in retired) == sorted(interrupted) and {t.state.name for t in retired} == {"FAIL"}
    # Each grid point once; lr (a range in a grid) drawn per point; both workers took trials.
    assert sorted((t.params["batch_size"], t.params["epochs"]) for t in live) == [(16, 1), (16, 2), (32, 1), (32, 2)]
    assert all(0.001 <= t.params["lr"] <= 0.01 for t in live)
    assert len(workers | {t.user_attrs["worker"]["pid"] for t in live}) >= 2
    assert sorted(int(p.name) for p in (out / "trials").iterdir()) == roots

    # 3. MLflow holds one run per trial (an interrupted trial continues its run), nested under the
    #    sweep's run, with the trial's parameters, per-epoch metrics and artifacts.
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("grid").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("cellclass.kind") == "sweep"]
    trial_runs = [r for r in runs if r.data.tags.get("cellclass.kind") == "trial"]
    children = {int(r.data.tags["cellclass.trial"]): r for r in trial_runs}
    assert len(trial_runs) == 4 and sorted(children) == roots and parent.info.status == "FINISHED"
    for t in live:
        run = children[root(t)]
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_id == t.user_attrs["tracked_run"] and run.data.tags["optuna.state"] == "COMPLETE"
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"])
        assert run.data.params["batch_size"] == str(t.params["batch_size"])
        assert run.data.params["monitor"] == "val/macro_f1"
        history = client.get_metric_history(run.info.run_id, "val/macro_f1")
        assert sorted({m.step for m in history}) == list(range(1, t.params["epochs"] + 1))
        # the trial's value is its best epoch's, chosen from first_candidate on (best_after)
        first = first_candidate(TrainConfig(epochs=t.params["epochs"]))
        assert max(m.value for m in history if m.step >= first) == pytest.approx(t.value)
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "metrics.csv", "metrics.json", "report.html", "plots", "checkpoints"} <= files
        assert "checkpoints/best.ckpt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "trials.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    # 4. The report: trials table, a ready train config, plots, HTML.
    table = pd.read_csv(out / "trials.csv")
    assert sorted(table["trial"]) == roots and set(table["state"]) == {"COMPLETE"}
    best = json.loads((out / "best.json").read_text())
    assert best["value"] == pytest.approx(table["value"].max())
    config = TrainConfig.from_yaml(out / "best_config.yaml")
    assert (config.batch_size, config.epochs) == (best["params"]["batch_size"], best["params"]["epochs"])
    assert config.monitor == "val/macro_f1" and config.image_size == 32 and config.model == "lenet5"
    for name in ("report.html", "plots/history.png", "plots/importance.png", "sweep.json"):
        assert (out / name).is_file(), name
    assert "Best trial" in (out / "report.html").read_text()


@pytest.mark.slow
def test_refuses_a_training_loss_objective(cli, bps_dir: Path, tmp_path: Path) -> None:
    sweep_file = tmp_path / "seed.yaml"
    sweep_file.write_text(WANDB_GRID.replace("val/macro_f1", "train_loss").replace("maximize", "minimize"))
    result = cli("sweep", sweep_file, bps_dir, *COMMON, "--out", tmp_path / "out")
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "sweep metric 'train_loss' is a training metric" in message
    assert "val/macro_f1" in message and "val/particle_type/macro_f1" in message and "val_loss" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_one_trial_report_untracked_and_the_study_remembers_its_search(bps_dir: Path, tmp_path: Path) -> None:
    space = SweepSpace.from_dict({"method": "random", "metric": "val/macro_f1",
                                  "parameters": {"lr": {"min": 0.001, "max": 0.01}}})
    out = tmp_path / "one"
    summary = run_sweep(bps(bps_dir), BASE, space, out, n_trials=1, tracker="none")
    assert summary["finished"] == 1 and summary["best"]["trial"] == 0
    assert "need at least 2 completed trials" in summary["importance_note"]
    assert not (out / "plots" / "importance.png").exists() and (out / "plots" / "history.png").is_file()
    assert TrainConfig.from_yaml(out / "best_config.yaml").lr == pytest.approx(summary["best"]["params"]["lr"])
    assert not list(tmp_path.rglob("mlflow.db")) and not (out / "tracking.json").exists()
    # Re-running the finished sweep runs nothing more.
    assert run_sweep(bps(bps_dir), BASE, space, out, n_trials=1, tracker="none")["finished"] == 1
    assert len(trials_of(out)[1]) == 1
    other = SweepSpace.from_dict({"method": "random", "metric": "val/macro_f1", "parameters": {"lr": [0.1, 0.2]}})
    with pytest.raises(SweepError, match=r"study 'one' in .* holds trials of another search \(space: .*; valid: "
                                         r"the same sweep file and train options"):
        run_sweep(bps(bps_dir), BASE, other, out, n_trials=2, tracker="none")
    with pytest.raises(SweepError, match=r"study 'one' .* another search \(epochs: 1 in the study, 3 now\)"):
        run_sweep(bps(bps_dir), BASE.override({"epochs": 3}), space, out, n_trials=2, tracker="none")
    with pytest.raises(SweepError, match=r"devices = 2 is invalid in a sweep"):
        run_sweep(bps(bps_dir), BASE.override({"devices": 2}), space, out, n_trials=2, tracker="none")
    with pytest.raises(SweepError, match=r"study storage 'nosuchdb://x' cannot be opened"):
        run_sweep(bps(bps_dir), BASE, space, tmp_path / "x", n_trials=1, tracker="none", storage="nosuchdb://x")


def _grid_study(tmp_path: Path, bps_dir: Path) -> tuple[SweepJob, Any, Any]:
    """A new SQLite study of the 4-trial W&B grid: the job, its storage and the loaded study."""
    space = SweepSpace.from_yaml(_write(tmp_path / "grid.yaml", WANDB_GRID))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_study(url, "s", space, BASE.to_dict(), None)
    job = SweepJob(spec=bps(bps_dir), base=BASE.to_dict(), space=space, out=tmp_path, storage=url, study="s",
                   n_trials=4)
    storage = open_storage(url)
    study = load_study(job, storage)
    return job, storage, study


@pytest.mark.slow
def test_a_dead_workers_trial_is_queued_again_with_its_parameters_and_folder(tmp_path: Path, bps_dir: Path) -> None:
    job, storage, study = _grid_study(tmp_path, bps_dir)
    trial, params, first_root = claim(study, storage, job)
    assert first_root == trial.number == 0
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    trial.set_user_attr("worker", {**trial.user_attrs["worker"], "pid": int(gone.stdout), "started": None})
    again, params_again, again_root = claim(study, storage, job)  # finds the dead worker's trial
    assert again_root == 0 and again.number == 1 and params_again == params
    assert [t.number for t in live_trials(storage.get_all_trials(storage.get_study_id_from_name("s")))] == [1]
    study.tell(again, 0.5)
    for _ in range(3):
        study.tell(claim(study, storage, job)[0], 0.5)
    assert claim(study, storage, job) is None  # the target (4) is reached: nothing more is started
    grid = [(t.params["batch_size"], t.params["epochs"]) for t in live_trials(study.get_trials())]
    assert len(grid) == 4 and len(set(grid)) == 4


@pytest.mark.slow
def test_cross_validation_objective(bps_dir: Path, tmp_path: Path, mlflow_store) -> None:
    from mlflow.tracking import MlflowClient

    from cellclass.tracking.sweep import best_epoch_value

    space = SweepSpace.from_dict({"method": "random", "metric": "val/macro_f1",
                                  "parameters": {"lr": {"min": 0.001, "max": 0.01}}})
    out = tmp_path / "cv"
    uri = mlflow_store(out)
    summary = run_sweep(bps(bps_dir), BASE, space, out, n_trials=2, folds=2)
    assert summary["finished"] == 2 and summary["folds"] == 2
    live, _ = trials_of(out)
    for t in live:
        folds = [best_epoch_value(out / "trials" / f"{t.number:04d}" / f"fold_{k}", "val/macro_f1")[0] for k in (0, 1)]
        assert t.value == pytest.approx(sum(folds) / 2) and t.user_attrs["fold_values"] == pytest.approx(folds)
    client = MlflowClient(tracking_uri=uri)
    run_id = live[0].user_attrs["tracked_run"]
    assert len(client.get_metric_history(run_id, "fold_1/val/macro_f1")) == 1
    assert "cv/particle_type/macro_f1/mean" in client.get_run(run_id).data.metrics


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_worker_threads_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from cellclass.tracking.sweep import threads_per_worker

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [threads_per_worker(k) for k in (1, 2, 3, 16)] == [8, 4, 2, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads_per_worker(2) == 1


def test_database_row_lock_runs(tmp_path: Path) -> None:
    """The lock workers on several machines share (a row held FOR UPDATE; SQLite ignores the
    clause, PostgreSQL and MySQL honour it): created once, taken and released repeatedly."""
    from cellclass.tracking.study import StudyLock

    lock = StudyLock(f"sqlite:///{tmp_path / 'shared.db'}", "study")
    for _ in range(2):
        with lock._row_lock():
            pass
    with sqlite3.connect(tmp_path / "shared.db") as db:
        assert db.execute("SELECT name FROM cellclass_sweep_locks").fetchall() == [("study",)]


def test_pruning_reports_every_epoch_and_never_stops_the_last() -> None:
    import optuna

    from cellclass.tracking.sweep import PruningTracker, make_pruner
    from cellclass.tracking.trackers import NoTracker

    class Trial:
        def __init__(self) -> None:
            self.reported: list[tuple[float, int]] = []

        def report(self, value: float, step: int) -> None:
            self.reported.append((value, step))

        def should_prune(self) -> bool:
            return True

    trial = Trial()
    tracker = PruningTracker(NoTracker(), trial, "val/macro_f1", last_step=3)
    tracker.log_metrics({"val/macro_f1": 0.5, "train_loss": 1.0}, step=3)  # the last epoch: kept
    tracker.log_metrics({"test/t/accuracy": 0.9}, step=2)  # not the sweep metric: not reported
    with pytest.raises(optuna.TrialPruned, match=r"pruned at step 2: val/macro_f1 = 0.4000"):
        tracker.log_metrics({"val/macro_f1": 0.4}, step=2)
    assert trial.reported == [(0.5, 3), (0.4, 2)]

    def pruner(extra: dict[str, Any]) -> Any:
        return make_pruner(SweepSpace.from_dict({"method": "random", "metric": "val_loss",
                                                 "parameters": {"lr": [0.1, 0.2]}, **extra}))

    assert isinstance(pruner({}), optuna.pruners.MedianPruner)
    assert isinstance(pruner({"pruner": "none"}), optuna.pruners.NopPruner)
    assert isinstance(pruner({"early_terminate": {"type": "hyperband", "min_iter": 2}}), optuna.pruners.HyperbandPruner)


def test_a_claim_cut_short_before_naming_its_worker_is_recovered(tmp_path: Path, bps_dir: Path) -> None:
    job, storage, study = _grid_study(tmp_path, bps_dir)
    study.ask()  # a process died here, inside claim(), before it named itself
    trial, params, first_root = claim(study, storage, job)
    assert first_root == 0 and trial.number == 1 and set(params) == {"batch_size", "epochs", "lr"}


SMALL_GRID = """\
method: grid
metric: {name: val/macro_f1, goal: maximize}
parameters:
  batch_size: {values: [16]}
  lr: {values: [0.001, 0.003, 0.01]}
"""


@pytest.mark.slow
def test_small_set_trains_and_a_failed_workers_trial_is_reported_in_one_line(tmp_path: Path) -> None:
    """A sweep on a small set: 160 simulated nuclei (94 training images), --epochs 1 --image-size 64,
    batches of 16: 5 optimizer steps, which one-cycle cannot warm up in (torch divided by zero).
    Trial 2's run folder is blocked by a file, a real error that no setting explains: its
    worker stops, and the sweep names the trial and the error in one line."""
    import optuna

    from cellclass.data.simulate import simulate_bps

    data = tmp_path / "bps160"
    simulate_bps(data, n_images=160, seed=0)
    sweep_file = _write(tmp_path / "small.yaml", SMALL_GRID)
    out = tmp_path / "small"
    (out / "trials").mkdir(parents=True)
    (out / "trials" / "0002").write_text("not a folder")
    exe = Path(sys.executable).with_name("cellclass")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250"}
    result = subprocess.run([str(exe), "sweep", str(sweep_file), str(data), "--preset", "bps", "--task",
                             "particle_type", "--model", "lenet5", "--epochs", "1", "--image-size", "64",
                             "--set", "tta=false", "--set", "workers=1", "--n-jobs", "2", "--tracker", "none",
                             "--out", str(out)], env=env, capture_output=True, text=True, timeout=600, check=False)
    live, _ = trials_of(out)
    states = {root(t): t.state.name for t in live}
    assert states == {0: "COMPLETE", 1: "COMPLETE", 2: "FAIL"}, result.stderr[-3000:]
    for t in live:
        if root(t) < 2:
            steps = yaml.safe_load((out / t.user_attrs["run_dir"] / "config.yaml").read_text())["runtime"]["steps"]
            assert (steps["batch_size"], steps["total_steps"], steps["schedule"]) == (16, 5, "cosine")
    error = next(t for t in live if root(t) == 2).user_attrs["error"]
    assert error.startswith("FileExistsError: ") and "0002" in error
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert sum(line.startswith("[worker ") and f"trial 2 failed: {error}" in line for line in lines) == 1
    report = [line for line in lines if line.startswith("error: ")]
    assert report == [f"error: trial 2 failed: {error}"], result.stderr[-3000:]
    assert "exit code 1) failed; 3 of 3 trial(s) finished" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["failures"] == [{"trial": 2, "error": error}]
    assert pd.read_csv(out / "trials.csv").set_index("trial").loc[2, "error"] == error
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_a_trial_failing_in_this_process_is_reported_in_one_line(bps_dir: Path, tmp_path: Path) -> None:
    space = SweepSpace.from_dict({"method": "grid", "metric": "val/macro_f1", "parameters": {"lr": [0.003, 0.01]}})
    out = tmp_path / "one"
    (out / "trials").mkdir(parents=True)
    (out / "trials" / "0000").write_text("not a folder")
    with pytest.raises(SweepError, match=r"^trial 0 failed: FileExistsError: .*0000.*\nthe sweep stopped at its "
                                         r"failed trial; 1 of 1 trial\(s\) finished"):
        run_sweep(bps(bps_dir), BASE, space, out, n_trials=1, tracker="none")
    assert json.loads((out / "sweep.json").read_text())["failures"][0]["trial"] == 0
