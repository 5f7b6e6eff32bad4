"""Hyperparameter sweeps on Optuna: one study, N trials, any number of worker processes.

A sweep is an Optuna study in a database (``OUT/study.db``, SQLite, by default; any
SQLAlchemy URL such as ``postgresql://`` lets workers on several machines share it). Each
trial is one training run in ``OUT/trials/NNNN`` (or a cross-validation with ``folds``),
trained by :func:`cellclass.training.loop.train` with the trial's parameters applied to
the base configuration by name. Its value is the validation metric of its best epoch
(the loop's monitor is set to the sweep's metric); a poor trial is pruned from its
per-epoch values (Optuna's median pruner by default). Each trial is a tracked run,
nested under the sweep's run (MLflow) or grouped with it (W&B).

How the count stays exact, with several workers and after a kill:

- The study holds the sweep's *target* number of trials. A worker claims a trial under a
  study lock (a lock file beside a SQLite database; a row lock in other databases):
  it counts the study's live trials and starts a new one only while fewer than the target
  exist, so two workers never start the same slot and never overshoot.
- A trial records its worker (host, process id and start time). A trial left RUNNING by a
  dead process of this machine is failed at the next claim, and an identical trial (same
  parameters, same grid point) is queued in its place; workers on other machines are
  detected by Optuna's heartbeat (a trial silent for 2 minutes). The queued trial reuses
  the dead trial's run folder, continuing from its last checkpoint and its tracked run,
  and the failed original is *retired*: it is neither counted nor reported.
- Re-running the same command therefore continues the same study: completed trials are
  kept, interrupted ones run again once, and the sweep stops at the target. A study
  remembers its search (sweep file, metric, train options) and refuses a different one.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning_fabric  # noqa: F401  (it sets its loggers' levels when imported; quiet_training overrides them)
import optuna
import pandas as pd
import torch
from optuna.samplers import BaseSampler, GridSampler, RandomSampler, TPESampler
from optuna.trial import TrialState

from cellclass.data.prepared import prepare_data
from cellclass.data.spec import DatasetSpec
from cellclass.errors import CellclassError, SweepError, TrialCrash
from cellclass.progress import ProgressFn
from cellclass.tracking.folds import FoldLogger, cv_progress
from cellclass.tracking.space import SweepSpace
from cellclass.tracking.study import (
    Heartbeat,
    StudyLock,
    live_trials,
    masked_url,
    open_storage,
    open_study,
    quiet_optuna,
    recover,
    worker_identity,
)
from cellclass.tracking.sweep_report import write_sweep_report
from cellclass.tracking.trackers import Tracker, make_tracker
from cellclass.training.config import TrainConfig
from cellclass.training.crossval import cross_validate
from cellclass.training.loop import train

log = logging.getLogger(__name__)

# Settings that change the prepared images or the split: a change means preparing again.
_DATA_KEYS = ("image_size", "fit", "channels", "split", "split_by", "val_fraction", "test_fraction", "seed")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass
class SweepJob:
    """Everything a worker needs (picklable: workers are spawned processes)."""

    spec: DatasetSpec
    base: dict[str, Any]
    space: SweepSpace
    out: Path
    storage: str
    study: str
    n_trials: int
    folds: int | None = None
    tracker: str = "mlflow"
    tracking_uri: str | None = None
    experiment: str | None = None
    parent_run_id: str | None = None
    seed: int = 0
    log_models: bool = False


def run_sweep(
    spec: DatasetSpec,
    config: Any,
    space: SweepSpace,
    out: str | os.PathLike[str],
    *,
    n_trials: int | None = None,
    n_jobs: int = 1,
    storage: str | None = None,
    study: str | None = None,
    folds: int | None = None,
    tracker: str = "mlflow",
    tracking_uri: str | None = None,
    experiment: str | None = None,
    progress: ProgressFn | None = None,
    log_models: bool = False,
) -> dict[str, Any]:
    """Run (or continue) a sweep until its study holds ``n_trials`` finished trials.

    Args:
        spec: Dataset.
        config: Base :class:`~cellclass.training.config.TrainConfig`; the sweep's parameters
            override it by name.
        space: Parsed sweep file.
        out: Sweep folder: ``trials/``, ``study.db``, the report.
        n_trials: Target number of trials in the study (default: the grid's size for a
            grid, else the file's ``run_cap``). A grid's target is at most its size.
        n_jobs: Worker processes on this machine (each gets ``cores // n_jobs`` threads).
        storage: Study database URL (default ``sqlite:///OUT/study.db``).
        study: Study name (default: the name of ``out``).
        folds: Optimise a ``folds``-fold cross-validation's mean validation metric instead of
            one run's.
        tracker: ``mlflow``, ``wandb`` or ``none``.
        tracking_uri: Tracker URI (default: the local store ``OUT/mlflow.db``).
        experiment: MLflow experiment / W&B project (default: the study name).
        progress: Progress callback (used when ``n_jobs`` is 1).
        log_models: MLflow: log every trial's network as an MLflow model (off: a sweep's
            trials stay cheap to track; register the best one with ``cellclass register``).

    Returns:
        The report summary (also written to ``OUT/sweep.json``).

    Raises:
        SweepError: When the metric is not a validation metric, the study holds another
            search, the storage cannot be opened, or a trial failed unexpectedly (which
            stops its worker); the message has one line per failed trial.
    """
    out = Path(out).resolve()
    _check_sweep(config, n_jobs, folds)
    selected = spec.select_tasks(config.tasks)
    space.check_metric([t.name for t in selected.tasks])
    base = config.override({**space.constants, "monitor": space.metric})
    target = resolve_n_trials(space, n_trials)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'study.db').as_posix()}"
    study_name = study or out.name or "cellclass-sweep"

    optuna_study = open_study(storage, study_name, space, base.to_dict(), folds)
    log.info("sweep %s: %d trial(s) in %s; %s %s", study_name, target, masked_url(storage), space.goal, space.metric)

    sweep_tracker = make_tracker(tracker, tracking_uri, experiment or study_name, run_name=study_name, root=out,
                                 tags={"cellclass.kind": "sweep", "cellclass.study": study_name}, group=study_name,
                                 record=None if tracker == "none" else out / "tracking.json", job_type="sweep")
    with sweep_tracker:
        sweep_tracker.log_params(_sweep_params(space, base.to_dict(), target, folds, study_name, storage))
        job = SweepJob(spec=spec, base=base.to_dict(), space=space, out=out, storage=storage, study=study_name,
                       n_trials=target, folds=folds, tracker=tracker, tracking_uri=tracking_uri,
                       experiment=experiment or study_name, parent_run_id=sweep_tracker.run_id, seed=int(base.seed),
                       log_models=log_models)
        failed = _run_workers(job, n_jobs, progress)
        summary = write_sweep_report(optuna_study, out, space, job.base, n_trials=target,
                                     storage=masked_url(storage), folds=folds)
        _log_summary(sweep_tracker, summary, space.metric, out)
    if failed:
        trials = "".join(f"{failure_line(f)}\n" for f in summary["failures"])
        raise SweepError(f"{trials}{failed}; {summary['finished']} of {target} trial(s) finished; the report "
                         f"in {out} covers them. Re-run the same command to continue the study")
    return summary


def _log_summary(sweep_tracker: Tracker, summary: Mapping[str, Any], metric: str, out: Path) -> None:
    """The sweep's tracked run gets the trial counts, the best trial and the report's files."""
    best = summary.get("best")
    totals = {f"trials/{k.lower()}": v for k, v in summary["counts"].items()}
    if best is not None:
        totals.update({f"best/{metric}": best["value"], "best/trial": best["trial"]})
    sweep_tracker.log_metrics(totals, step=0)
    sweep_tracker.log_artifacts(out, exclude=("trials",))


def _sweep_params(space: SweepSpace, base: Mapping[str, Any], target: int, folds: int | None, study: str,
                  storage: str) -> dict[str, Any]:
    """What the sweep's tracked run records as its parameters: the search and the base configuration."""
    return {"sweep.method": space.method, "sweep.metric": space.metric, "sweep.goal": space.goal,
            "sweep.n_trials": target, "sweep.folds": folds, "sweep.study": study,
            "sweep.storage": masked_url(storage),
            **{f"sweep.space.{p.name}": p.describe() for p in space.parameters},
            **{f"base.{k}": v for k, v in base.items()}}


def _check_sweep(config: Any, n_jobs: int, folds: int | None) -> None:
    """The checks of :func:`run_sweep`'s arguments that need no study."""
    if n_jobs < 1:
        raise SweepError(f"n_jobs = {n_jobs} is invalid; valid: an integer >= 1")
    if folds is not None and folds < 2:
        raise SweepError(f"folds = {folds} is invalid; valid: an integer >= 2, or no folds for one run per trial")
    if config.devices != 1:
        raise SweepError(f"devices = {config.devices} is invalid in a sweep: a trial is one process; valid: "
                         "devices = 1, with --n-jobs for parallel trials")


def _run_workers(job: SweepJob, n_jobs: int, progress: ProgressFn | None) -> str | None:
    """Run the job's trials in this process (``n_jobs`` 1) or in ``n_jobs`` worker processes;
    return what failed, or ``None``. A failed trial's error is in the study."""
    with quiet_training():
        if n_jobs == 1:
            try:
                work(job, 0, progress=progress)
            except TrialCrash as exc:  # its error is in the study: reported with the others
                log.debug("traceback of the failed trial", exc_info=exc.__cause__)
                return "the sweep stopped at its failed trial"
            return None
        codes = _spawn_workers(job, n_jobs)
    crashed = [f"{k} (exit code {c})" for k, c in enumerate(codes) if c != 0]
    return f"worker process(es) {', '.join(crashed)} failed" if crashed else None


def failure_line(failure: Mapping[str, Any]) -> str:
    """One failed trial of a report's ``failures``, in one line: ``trial 3 failed: ValueError: ...``."""
    return f"trial {failure['trial']} failed: {failure['error']}"


def resolve_n_trials(space: SweepSpace, n_trials: int | None) -> int:
    """The sweep's target number of trials.

    Raises:
        SweepError: When neither ``n_trials`` nor the file says how many trials to run.
    """
    grid = space.grid_size()
    n = n_trials if n_trials is not None else (grid if grid is not None else space.run_cap)
    if n is None:
        raise SweepError(f"the number of trials is not set for a {space.method} search; valid: --n-trials N "
                         "(or run_cap: N in the sweep file)")
    if n < 1:
        raise SweepError(f"n_trials = {n} is invalid; valid: an integer >= 1")
    if grid is not None and n > grid:
        log.warning("the grid has %d point(s): running %d trial(s), not %d", grid, grid, n)
        n = grid
    return n


# -- workers ---------------------------------------------------------------------------
def work(job: SweepJob, worker: int = 0, *, progress: ProgressFn | None = None, barrier: Any = None) -> int:
    """Claim and run trials until the study holds its target; return the trials run here."""
    storage = open_storage(job.storage)
    study = load_study(job, storage)
    lock = StudyLock(job.storage, job.study)
    cache = DataCache()
    if barrier is not None:  # start together, so that every worker takes a share
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=300)
    ran = 0
    while True:
        with lock:
            claimed = claim(study, storage, job)
        if claimed is None:
            break
        run_trial(job, study, storage, *claimed, cache=cache, progress=progress)
        ran += 1
    log.debug("worker %d ran %d trial(s)", worker, ran)
    return ran


def load_study(job: SweepJob, storage: Any) -> Any:
    """The job's study with the sweep's sampler and pruner."""
    with quiet_optuna():
        return optuna.load_study(study_name=job.study, storage=storage,
                                 sampler=SweepSampler(job.space, job.seed, job.n_trials), pruner=make_pruner(job.space))


def claim(study: Any, storage: Any, job: SweepJob) -> tuple[Any, dict[str, Any], int] | None:
    """Recover dead workers' trials, then start the next trial if the target is not reached.

    Call under :class:`StudyLock`. Returns the trial, its configuration values and the
    number of the trial whose run folder it uses (its own, or the one it retries).
    """
    study_id = storage.get_study_id_from_name(job.study)
    recover(study, storage, study_id)
    live = live_trials(storage.get_all_trials(study_id, deepcopy=False))
    waiting = any(t.state == TrialState.WAITING for t in live)
    if not waiting and len(live) >= job.n_trials:
        return None
    with quiet_optuna(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        trial = study.ask()
    trial.set_user_attr("worker", worker_identity())
    storage.record_heartbeat(trial._trial_id)
    params = job.space.suggest(trial)
    root = int(storage.get_trial_system_attrs(trial._trial_id).get("failed_trial", trial.number))
    return trial, params, root


class DataCache:
    """The last prepared dataset of this worker, reused while the image and split settings
    (image size, fit, channels, split and seed) stay the same."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._data: Any = None

    def get(self, spec: DatasetSpec, config: Any) -> Any:
        """Prepared data for ``spec`` (tasks already selected) and ``config``."""
        key = json.dumps([spec.name, [t.name for t in spec.tasks], {k: getattr(config, k) for k in _DATA_KEYS}],
                         default=str)
        if key != self._key:
            self._data, self._key = None, None
            self._data = prepare_data(spec, config)
            self._key = key
        else:
            log.debug("reusing prepared images")
        return self._data


class PruningTracker(Tracker):
    """Passes everything to the trial's tracker and reports the sweep metric of every epoch
    to Optuna, raising :class:`optuna.TrialPruned` when the pruner says so (never at the
    last step, where stopping would save nothing). With ``last_step`` ``None`` (``epochs:
    auto``) the last step is the epochs the run logs among its params."""

    def __init__(self, inner: Tracker, trial: Any, metric: str, last_step: int | None) -> None:
        self.inner, self.trial, self.metric, self.last_step = inner, trial, metric, last_step
        self.name = inner.name

    @property
    def run_id(self) -> str | None:
        return self.inner.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.inner.log_params(params)
        if self.last_step is None and isinstance(params.get("epochs"), int):
            self.last_step = params["epochs"]

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.inner.log_metrics(metrics, step)
        value = metrics.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            self.report(float(value), step)

    def report(self, value: float, step: int) -> None:
        """Report an intermediate value; raise ``TrialPruned`` if the trial should stop."""
        self.trial.report(value, step)
        if (self.last_step is None or step < self.last_step) and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {self.metric} = {value:.4f}")

    def log_artifacts(self, folder: Path, exclude: Any = ()) -> None:
        self.inner.log_artifacts(folder, exclude)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.inner.set_tags(tags)

    def close(self, status: str = "finished") -> None:
        self.inner.close(status)


def run_trial(job: SweepJob, study: Any, storage: Any, trial: Any, params: dict[str, Any], root: int, *,
              cache: DataCache, progress: ProgressFn | None = None) -> None:
    """Train one trial, tell the study its value (or that it was pruned or failed).

    The run folder is ``OUT/trials/NNNN`` with ``NNNN`` the trial's number, or the number
    of the interrupted trial it runs again (whose checkpoint and tracked run it continues).
    """
    folder = job.out / "trials" / f"{root:04d}"
    trial.set_user_attr("run_dir", folder.relative_to(job.out).as_posix())
    text = ", ".join(f"{k}={_short(v)}" for k, v in params.items())
    retry = " (again, after an interruption)" if root != trial.number else ""
    log.info("trial %d%s: %s", root, retry, text)
    tracker = make_tracker(job.tracker, job.tracking_uri, job.experiment, run_name=f"{job.study}-trial-{root:04d}",
                           root=job.out, tags={"cellclass.kind": "trial", "cellclass.study": job.study,
                                               "cellclass.trial": root, "optuna.trial_number": trial.number},
                           parent=job.parent_run_id, group=job.study,
                           record=None if job.tracker == "none" else folder / "tracking.json", job_type="trial",
                           log_model=job.log_models)
    with Heartbeat(storage, trial._trial_id):
        try:
            cfg = TrainConfig.from_dict(job.base).override(params)
            pruning = PruningTracker(tracker, trial, job.space.metric, last_step=job.folds or cfg.epochs)
            objective = _cv_trial if job.folds else _single_trial
            value, info = objective(job, cfg, folder, pruning, cache, progress)
        except optuna.TrialPruned as exc:
            _finish_tracker(tracker, folder, "PRUNED")
            _set_attrs(trial, {"tracked_run": tracker.run_id})
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned (%s)", root, exc)
            return
        except CellclassError as exc:
            _set_attrs(trial, {"error": error_text(exc), "tracked_run": tracker.run_id})
            tracker.close("failed")
            study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d failed: %s", root, error_text(exc))
            return
        except Exception as exc:  # a bug, not a setting: this worker stops, its trial's error kept
            _set_attrs(trial, {"error": error_text(exc), "tracked_run": tracker.run_id})
            tracker.close("failed")
            study.tell(trial, state=TrialState.FAIL)
            log.error("trial %d failed: %s", root, error_text(exc))
            raise TrialCrash(f"trial {root} failed: {error_text(exc)}") from exc
        except BaseException:
            tracker.close("killed")  # left RUNNING: the next claim re-queues it
            raise
        _set_attrs(trial, {**info, "tracked_run": tracker.run_id})
        tracker.log_metrics({"objective": value}, step=int(info.get("best_epoch") or 0))
        _finish_tracker(tracker, None, "COMPLETE", value)
        study.tell(trial, value)
    log.info("trial %d: %s = %.4f", root, job.space.metric, value)


def error_text(exc: BaseException) -> str:
    """An exception as one line: ``ValueError: what went wrong``."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _set_attrs(trial: Any, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        if value is not None:
            trial.set_user_attr(key, value)


def _finish_tracker(tracker: Tracker, folder: Path | None, state: str, value: float | None = None) -> None:
    tags: dict[str, Any] = {"optuna.state": state}
    if value is not None:
        tags["optuna.value"] = f"{value:.6g}"
    if tracker.run_id is not None or folder is not None:
        tracker.set_tags(tags)
    if folder is not None and folder.is_dir():
        tracker.log_artifacts(folder)  # a pruned run's config and per-epoch metrics
    tracker.close("finished")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_epoch_value(run: str | Path, metric: str) -> tuple[float, int]:
    """The validation ``metric`` at the run's best epoch (chosen by the loop on its monitor).

    Args:
        run: Finished run folder (``metrics.json`` and ``metrics.csv``).
        metric: Per-epoch validation metric, e.g. ``val/macro_f1``.

    Returns:
        ``(value, best_epoch)``.

    Raises:
        SweepError: When the run is unfinished or never recorded ``metric``.
    """
    run = Path(run)
    try:
        result = json.loads((run / "metrics.json").read_text())
        table = pd.read_csv(run / "metrics.csv")
    except (OSError, ValueError) as exc:
        raise SweepError(f"run folder {str(run)!r} holds no finished run ({exc})") from exc
    epoch = int(result.get("best_epoch") or table["epoch"].max())
    if metric not in table.columns:
        valid = ", ".join(c for c in table.columns if c.startswith("val"))
        raise SweepError(f"run {str(run)!r} did not record {metric!r} per epoch; valid: {valid}")
    rows = table.loc[table["epoch"] == epoch, metric]
    if rows.empty:
        raise SweepError(f"run {str(run)!r} has no metrics.csv row for its best epoch {epoch}")
    return float(rows.iloc[-1]), epoch


def _single_trial(job: SweepJob, cfg: Any, folder: Path, tracker: PruningTracker, cache: DataCache,
                  progress: ProgressFn | None) -> tuple[float, dict[str, Any]]:
    spec = job.spec.select_tasks(cfg.tasks)
    # A trial run again after an interruption continues its folder from the last checkpoint;
    # when every epoch was done, that re-runs only the final evaluation (report, test figures,
    # tracked artifacts), which the interruption may have cut short.
    resume = (folder / "checkpoints" / "last.ckpt").is_file()
    if resume:
        log.info("continuing %s from its last checkpoint", folder)
    train(spec, cfg, folder, resume=resume, tracker=tracker, data=cache.get(spec, cfg), progress=progress)
    value, epoch = best_epoch_value(folder, job.space.metric)
    result = json.loads((folder / "metrics.json").read_text())
    return value, {"best_epoch": epoch, "epochs_run": result.get("epochs_run"),
                   "train_seconds": result.get("train_seconds")}


def _cv_trial(job: SweepJob, cfg: Any, folder: Path, tracker: PruningTracker, cache: DataCache,
              progress: ProgressFn | None) -> tuple[float, dict[str, Any]]:
    n = int(job.folds or 0)
    folder.mkdir(parents=True, exist_ok=True)
    for fold in folder.glob("fold_*"):  # an interrupted fold starts again; finished ones are kept
        if fold.is_dir() and not (fold / "report.html").is_file():  # written last
            shutil.rmtree(fold)
    spec = job.spec.select_tasks(cfg.tasks)
    tracker.log_params({**cfg.to_dict(), "folds": n, "dataset": spec.name})
    values: dict[int, float] = {}

    def on_fold(k: int, run: Path) -> None:
        values[k] = best_epoch_value(run, job.space.metric)[0]
        if len(values) < n:  # pruning after the last fold would save nothing
            tracker.report(sum(values.values()) / len(values), len(values))

    folds = FoldLogger(tracker.inner, folder, n, on_fold=on_fold)
    summary = cross_validate(job.spec, cfg, folder, n_folds=n, progress=cv_progress(folds, progress))
    folds.finish(summary)
    if len(values) != n:
        raise SweepError(f"cross-validation in {str(folder)!r} finished {len(values)} of {n} folds")
    value = sum(values.values()) / n
    name = job.space.metric.rsplit("/", 1)[-1]
    test = {f"cv_test_{name}_{task}": m[name]["mean"] for task, m in summary["tasks"].items() if name in m}
    return value, {"fold_values": [values[k] for k in range(n)], **test}


# -- processes -------------------------------------------------------------------------
def threads_per_worker(n_jobs: int) -> int:
    """Torch threads of each of ``n_jobs`` workers: the cores shared out, at least 1, and no
    more than ``OMP_NUM_THREADS`` when that is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    threads = max(1, cores // n_jobs)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and 0 < int(env) < threads:
        threads = int(env)
    return threads


def _spawn_workers(job: SweepJob, n_jobs: int) -> list[int | None]:
    ctx = multiprocessing.get_context("spawn")
    threads = threads_per_worker(n_jobs)
    level = logging.getLogger("cellclass").getEffectiveLevel()
    barrier = ctx.Barrier(n_jobs)
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: str(threads) for k in _THREAD_VARS})  # read by each worker before torch loads
    procs = [ctx.Process(target=_worker_main, args=(job, k, threads, barrier, os.getpid(), level),
                         name=f"cellclass-sweep-{k}") for k in range(n_jobs)]
    log.info("starting %d worker process(es), %d torch thread(s) each", n_jobs, threads)
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return [p.exitcode for p in procs]


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _worker_main(job: SweepJob, worker: int, threads: int, barrier: Any, parent: int, level: int) -> None:
    """Entry point of a spawned worker process."""
    _die_with_parent(parent)
    for key in _THREAD_VARS:
        os.environ[key] = str(threads)
    torch.set_num_threads(threads)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[worker {worker}] %(message)s"))
    ours = logging.getLogger("cellclass")
    ours.handlers[:] = [handler]
    ours.setLevel(level)
    ours.propagate = False
    try:
        with quiet_training():
            work(job, worker, barrier=barrier)
    except TrialCrash as exc:  # logged in one line by run_trial; the traceback with --verbose
        log.debug("traceback of the failed trial", exc_info=exc.__cause__)
        sys.exit(1)
    except CellclassError as exc:
        log.error("error: %s", exc)
        sys.exit(2)


def _die_with_parent(parent: int) -> None:
    """End this worker when the sweep's main process dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            threading.Event().wait(2)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="sweep-parent-watch", daemon=True).start()


# -- sampling and pruning --------------------------------------------------------------
def make_pruner(space: SweepSpace) -> Any:
    """Optuna pruner of the sweep file (median by default)."""
    spec = dict(space.pruner)
    kind = spec.pop("type", "median")
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.get("min_resource", 1),
                                              max_resource=spec.get("max_resource", "auto"),
                                              reduction_factor=spec.get("reduction_factor", 3))
    # Steps are epochs counted from 1: the first ``warmup_epochs`` epochs are never pruned.
    return optuna.pruners.MedianPruner(n_startup_trials=spec.get("startup_trials", 2),
                                       n_warmup_steps=spec.get("warmup_epochs", 1) + 1)


class SweepSampler(BaseSampler):
    """The sweep's sampler, seeded per trial so that workers never draw alike.

    ``grid`` walks the grid of the discrete parameters (each point once, across workers
    and re-runs) and draws continuous ranges at random; ``random`` draws every parameter;
    ``bayes`` is TPE (with the constant liar, for parallel workers).
    """

    def __init__(self, space: SweepSpace, seed: int, n_trials: int) -> None:
        self.space, self.seed, self.n_trials = space, seed, n_trials
        self._number: int | None = None
        self._inner: Any = None
        self._random: Any = None

    def _for(self, trial: Any) -> Any:
        if self._number != trial.number:
            seed = (self.seed * 1_000_003 + trial.number) % (2**31)
            self._random = RandomSampler(seed=seed)
            if self.space.method == "grid":
                # One seed for every trial: the grid's order derives from it, and grid ids
                # must mean the same point in every worker and re-run.
                self._inner = GridSampler(self.space.grid(), seed=self.seed)
            elif self.space.method == "random":
                self._inner = self._random
            else:
                startup = min(10, max(2, self.n_trials // 3))
                self._inner = TPESampler(seed=seed, constant_liar=True, n_startup_trials=startup)
            self._number = trial.number
        return self._inner

    def before_trial(self, study: Any, trial: Any) -> None:
        self._for(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        inner = self._for(trial)
        if self.space.method == "grid" and param_name not in self.space.grid():
            return self._random.sample_independent(study, trial, param_name, param_distribution)
        return inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        # GridSampler's after_trial stops an optimize() loop; the sweep's own loop stops at its target.
        if self.space.method != "grid":
            self._for(trial).after_trial(study, trial, state, values)


# -- logging ---------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_training() -> Iterator[None]:
    """One line per trial instead of one per epoch: quiets the loop, Lightning's seed notes
    and Optuna, unless cellclass logs at DEBUG (``--verbose``)."""
    if logging.getLogger("cellclass").getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    names = ("cellclass.data", "cellclass.training", "cellclass.evaluation", "cellclass.models",
             "lightning.fabric", "lightning_fabric")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for logger, _ in saved:
        logger.setLevel(logging.WARNING)
    try:
        with quiet_optuna():
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)
