"""Experiment trackers behind one small interface: MLflow (default), Weights & Biases, none.

The training loop tells a tracker three things (:class:`cellclass.training.loop.Tracker`):
the resolved parameters once, the validation metrics of every epoch, and the finished run
folder. A tracker starts its run lazily, at the first thing it is told, so a command that
fails before training leaves no empty run behind.

Where runs go:

- **MLflow** (default): ``--tracking-uri`` (or ``MLFLOW_TRACKING_URI``) names a server
  (``http://host:5000``) or a database (``sqlite:///path.db``, ``postgresql://...``).
  Without one, a local SQLite store ``mlflow.db`` sits in the *runs root* (the folder that
  holds the run folder, or a sweep's own folder) with artifacts in ``mlartifacts/`` beside
  it; ``mlflow ui --backend-store-uri sqlite:///ROOT/mlflow.db`` shows them. A finished
  run's network is also logged as an MLflow model (``model/``, see
  :mod:`cellclass.tracking.mlflow_model`) unless ``log_model`` is off.
- **Weights & Biases** (``pip install 'cellclass[wandb]'``): online when an API key is set
  up, otherwise offline (``WANDB_MODE=offline`` forces it) with files under
  ``ROOT/wandb/`` for a later ``wandb sync``.
- **none**: nothing is written beyond the run folder itself.

A run folder remembers its tracked run in ``tracking.json``, so ``train --resume`` and a
sweep trial retried after a crash continue the same tracked run instead of opening another.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from cellclass.atomic import atomic_write_text
from cellclass.errors import MissingDependencyError, TrackingError
from cellclass.tracking.mlflow_model import log_model

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

log = logging.getLogger(__name__)

TRACKERS = ("mlflow", "wandb", "none")
"""Names accepted by :func:`make_tracker` and ``--tracker``."""

STATUSES = ("finished", "failed", "killed")
"""How a tracked run can end."""

RECORD_NAME = "tracking.json"
"""File in a run folder that remembers its tracked run."""

# Not worth copying into a tracker's artifact store: training state that best.ckpt
# supersedes, tracker stores themselves, temporary files.
_SKIP_FILES = {"last.ckpt", RECORD_NAME, "tracked.json"}
_SKIP_SUFFIXES = (".tmp", ".lock", ".db", ".db-journal", ".db-wal", ".db-shm")
_SKIP_DIRS = {"mlartifacts", "mlruns", "wandb", "__pycache__"}

_KEY_BAD = re.compile(r"[^/\w.\- ]")


def default_tracking_uri(root: str | os.PathLike[str]) -> str:
    """The local MLflow store used without ``--tracking-uri``: ``sqlite:///ROOT/mlflow.db``."""
    return f"sqlite:///{(Path(root).resolve() / 'mlflow.db').as_posix()}"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested parameters to ``a.b`` keys with text values (lists as YAML-like text).

    Args:
        params: Parameters, possibly nested dicts (``task_weights``).
        prefix: Prepended to every key.

    Returns:
        One text value per leaf key; ``None`` becomes ``"None"``.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value))
        elif isinstance(value, Mapping):
            flat[name] = "{}"
        else:
            flat[name] = str(value)
    return flat


def metric_key(name: str) -> str:
    """A metric or parameter name valid in MLflow and W&B.

    MLflow accepts letters, digits, ``_ - . /`` and spaces (``val/macro_f1`` is valid);
    any other character becomes ``_``, and empty path parts are removed.
    """
    cleaned = _KEY_BAD.sub("_", str(name))
    parts = [p for p in cleaned.split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "_"


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Finite-or-NaN float metrics with valid keys; text, ``None`` and booleans dropped."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[metric_key(key)] = float(value)
    return out


def artifact_files(folder: str | os.PathLike[str], exclude: Iterable[str] = ()) -> list[tuple[Path, str]]:
    """Files of a run folder worth keeping in a tracker, with their relative folder.

    Everything a run folder holds (config, metrics, predictions, plots, report,
    ``checkpoints/best.ckpt``) except ``checkpoints/last.ckpt`` (training state, superseded
    by ``best.ckpt``), tracker stores, hidden and temporary files.

    Args:
        folder: Run folder.
        exclude: Top-level names to leave out (a sweep leaves out ``trials``).

    Returns:
        ``(path, relative parent folder)`` pairs, ``""`` for the top level, sorted.
    """
    root = Path(folder)
    skip_top = set(exclude)
    found: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        rel = here.relative_to(root).as_posix()
        rel = "" if rel == "." else rel
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")
                             and not (rel == "" and d in skip_top))
        for name in sorted(filenames):
            if (name in _SKIP_FILES or name.startswith(".") or name.endswith(_SKIP_SUFFIXES)
                    or (rel == "" and name in skip_top)):
                continue
            found.append((here / name, rel))
    return found


class Tracker:
    """What a tracked run is told; the base class tracks nothing (``--tracker none``).

    Use as a context manager: leaving the block closes the run, ``finished`` normally,
    ``failed`` on an exception, ``killed`` on an interrupt.
    """

    name = "none"

    @property
    def run_id(self) -> str | None:
        """Identifier of the tracked run, once started (``None`` when nothing is tracked)."""
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record parameters (nested dicts are flattened to ``a.b`` keys)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record metrics at a step (the epoch for per-epoch metrics)."""

    def log_artifacts(self, folder: Path, exclude: Iterable[str] = ()) -> None:
        """Copy a run folder's files (see :func:`artifact_files`) to the tracker."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Attach text tags to the run."""

    def close(self, status: str = "finished") -> None:
        """End the run as ``finished``, ``failed`` or ``killed``."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close("finished")
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            self.close("killed")
        else:
            self.close("failed")


class NoTracker(Tracker):
    """Tracks nothing and writes nothing (``--tracker none``)."""


def _check_status(status: str) -> str:
    if status not in STATUSES:
        raise TrackingError(f"run status {status!r} is invalid; valid: {', '.join(STATUSES)}")
    return status


def _read_record(record: Path | None, tracker: str) -> dict[str, Any] | None:
    if record is None or not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s", record)
        return None
    return data if isinstance(data, dict) and data.get("tracker") == tracker else None


def _write_record(record: Path | None, data: Mapping[str, Any]) -> None:
    if record is not None:
        atomic_write_text(record, json.dumps(dict(data), indent=2))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes of one machine (a lock file beside ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if fcntl is None:  # Windows
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (``None`` for other URLs and ``:memory:``)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).resolve()


class MLflowTracker(Tracker):
    """One MLflow run, written through :class:`mlflow.tracking.MlflowClient` (no global state).

    Args:
        uri: Tracking URI: a server or a database URL (``None``: ``MLFLOW_TRACKING_URI``,
            else the local store in ``root``).
        experiment: Experiment name (created when missing).
        run_name: Run name shown in the UI.
        root: Runs root holding the default store ``mlflow.db`` and ``mlartifacts/``.
        tags: Tags set when the run starts.
        parent: Run id of a parent run (the run is nested under it in the UI).
        record: ``tracking.json`` of the run folder: a run recorded there is continued.
        log_model: Log a finished run's best checkpoint as an MLflow model (``model/``, see
            :mod:`cellclass.tracking.mlflow_model`) with its other files.
    """

    name = "mlflow"

    def __init__(self, uri: str | None = None, experiment: str | None = None, run_name: str | None = None, *,
                 root: str | os.PathLike[str] | None = None, tags: Mapping[str, Any] | None = None,
                 parent: str | None = None, record: str | os.PathLike[str] | None = None,
                 log_model: bool = True) -> None:
        _require("mlflow", "mlflow", extra=None)
        root_path = Path(root) if root is not None else Path.cwd()
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root_path)
        self.local_db = sqlite_path(self.uri)
        self.artifact_root = (self.local_db.parent / "mlartifacts") if self.local_db else None
        self.experiment = experiment or "cellclass"
        self.run_name = run_name
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.parent = parent
        self.record = Path(record) if record is not None else None
        self.log_model = log_model
        self._client: Any = None
        self._run_id: str | None = None
        self._closed = False

    @property
    def run_id(self) -> str | None:
        return self._run_id

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> str:
        """Start (or continue) the run now; return its id."""
        if self._run_id is not None:
            return self._run_id
        try:
            with self._store_lock(), _quiet("mlflow.store.db.utils", "alembic"):
                client = MlflowClient(tracking_uri=self.uri)
                experiment_id = self._experiment_id(client)
        except MlflowException as exc:
            raise TrackingError(f"MLflow store {self.uri!r} cannot be used: {exc}; valid: a reachable "
                                "server (http://host:5000) or a database URL (sqlite:///path.db)") from exc
        self._client = client
        previous = _read_record(self.record, self.name)
        if previous and previous.get("uri") == self.uri and previous.get("run_id"):
            try:
                client.get_run(previous["run_id"])
                client.update_run(previous["run_id"], status="RUNNING")
                self._run_id = previous["run_id"]
                log.debug("continuing MLflow run %s", self._run_id)
            except MlflowException:
                log.warning("the MLflow run %s recorded in %s is gone; starting another",
                            previous["run_id"], self.record)
        if self._run_id is None:
            tags = dict(self.tags)
            if self.parent:
                tags["mlflow.parentRunId"] = self.parent
            tags.setdefault("mlflow.source.name", "cellclass")
            run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
            self._run_id = run.info.run_id
            _write_record(self.record, {"tracker": self.name, "uri": self.uri, "experiment": self.experiment,
                                        "experiment_id": experiment_id, "run_id": self._run_id})
        elif self.tags:
            self.set_tags(self.tags)
        return self._run_id

    def _store_lock(self) -> contextlib.AbstractContextManager[None]:
        # Two processes creating a fresh SQLite store at once race in its migrations.
        if self.local_db is None:
            return contextlib.nullcontext()
        return file_lock(self.local_db.with_name(self.local_db.name + ".lock"))

    def _experiment_id(self, client: Any) -> str:
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            if found.lifecycle_stage != "active":
                raise TrackingError(f"MLflow experiment {self.experiment!r} is deleted in {self.uri!r}; "
                                    "valid: restore it (mlflow experiments restore) or use another --experiment")
            return str(found.experiment_id)
        location = self.artifact_root.as_uri() if self.artifact_root is not None else None
        try:
            return str(client.create_experiment(self.experiment, artifact_location=location))
        except MlflowException:  # created meanwhile by another process
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return str(found.experiment_id)

    def close(self, status: str = "finished") -> None:
        _check_status(status)
        if self._run_id is None or self._closed:
            return
        self._client.set_terminated(self._run_id, status=status.upper())
        self._closed = True

    # -- logging -----------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        run_id = self.start()
        existing = self._client.get_run(run_id).data.params
        items = []
        for key, value in flatten(params).items():
            key = metric_key(key)
            value = value[:MAX_PARAM_VAL_LENGTH]
            if key in existing:
                if existing[key] != value:  # MLflow refuses to change a parameter
                    log.warning("MLflow run %s already has %s = %r; keeping it (new value %r)",
                                run_id, key, existing[key], value)
                continue
            items.append(Param(key, value))
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            try:
                self._client.log_batch(run_id, params=items[start : start + MAX_PARAMS_TAGS_PER_BATCH])
            except MlflowException as exc:
                raise TrackingError(f"MLflow refused parameters of run {run_id}: {exc}") from exc

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = numeric_metrics(metrics)
        if not values:
            return
        run_id = self.start()
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, int(step)) for k, v in values.items()]
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=items[start : start + MAX_METRICS_PER_BATCH])

    def log_artifacts(self, folder: Path, exclude: Iterable[str] = ()) -> None:
        run_id = self.start()
        for path, rel in artifact_files(folder, exclude):
            self._client.log_artifact(run_id, str(path), artifact_path=rel or None)
        if self.log_model and (Path(folder) / "checkpoints" / "best.ckpt").is_file():
            log_model(self._client, run_id, Path(folder) / "checkpoints" / "best.ckpt")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        run_id = self.start()
        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        if items:
            self._client.log_batch(run_id, tags=items)


class WandbTracker(Tracker):
    """One Weights & Biases run (``pip install 'cellclass[wandb]'``).

    Runs offline (files under ``ROOT/wandb/`` for a later ``wandb sync``) when
    ``WANDB_MODE=offline`` is set, and also when no API key is set up; online otherwise.

    Args:
        uri: Base URL of a self-hosted W&B server (``None``: W&B's default).
        experiment: W&B project.
        run_name: Run name.
        root: Folder that receives ``wandb/``.
        tags: Tags (``key=value`` W&B tags).
        group: W&B group (a sweep's study name).
        record: ``tracking.json`` of the run folder: a run recorded there is continued.
        job_type: W&B job type (``train``, ``cv``, ``trial``, ``sweep``).
    """

    name = "wandb"

    def __init__(self, uri: str | None = None, experiment: str | None = None, run_name: str | None = None, *,
                 root: str | os.PathLike[str] | None = None, tags: Mapping[str, Any] | None = None,
                 group: str | None = None, record: str | os.PathLike[str] | None = None,
                 job_type: str | None = None) -> None:
        self._wandb = _require("wandb", "wandb", extra="wandb")
        self.uri = uri
        self.project = re.sub(r"[/\\#?%:]", "-", experiment or "cellclass")
        self.run_name = run_name
        self.root = Path(root) if root is not None else Path.cwd()
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.group = group
        self.record = Path(record) if record is not None else None
        self.job_type = job_type
        self._run: Any = None
        self._last_step = -1
        self._closed = False

    @property
    def run_id(self) -> str | None:
        return None if self._run is None else str(self._run.id)

    @staticmethod
    def mode() -> str:
        """``online`` or ``offline``: ``WANDB_MODE`` when set, else offline without an API key."""
        mode = os.environ.get("WANDB_MODE")
        if mode:
            return mode
        if os.environ.get("WANDB_API_KEY"):
            return "online"
        host = re.sub(r"^\w+://", "", os.environ.get("WANDB_BASE_URL", "api.wandb.ai")).split("/")[0]
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        try:
            if host and f"machine {host}" in netrc.read_text():
                return "online"
        except OSError:
            pass
        log.info("W&B: no API key set up; logging offline under %s (upload later with `wandb sync`)",
                 Path(os.environ.get("WANDB_DIR", Path.cwd())) / "wandb")
        return "offline"

    def start(self) -> str:
        """Start (or continue) the run now; return its id."""
        if self._run is not None:
            return str(self._run.id)
        wandb = self._wandb
        self.root.mkdir(parents=True, exist_ok=True)
        previous = _read_record(self.record, self.name)
        settings: dict[str, Any] = {"console": "off", "save_code": False, "silent": True}
        if self.uri:
            settings["base_url"] = self.uri
        kwargs: dict[str, Any] = {}
        if previous and previous.get("project") == self.project and previous.get("run_id"):
            kwargs = {"id": previous["run_id"], "resume": "allow"}
        try:
            self._run = wandb.init(project=self.project, name=self.run_name, dir=str(self.root),
                                   group=self.group, job_type=self.job_type, mode=self.mode(),
                                   tags=[f"{k}={v}"[:64] for k, v in self.tags.items()],
                                   settings=wandb.Settings(**settings), reinit="create_new", **kwargs)
        except Exception as exc:  # wandb raises its own error types (network, login)
            raise TrackingError(f"W&B could not start a run in project {self.project!r}: {exc}; "
                                "valid: set WANDB_MODE=offline to log without a network") from exc
        _write_record(self.record, {"tracker": self.name, "project": self.project, "run_id": str(self._run.id),
                                    "dir": str(self._run.dir)})
        return str(self._run.id)

    def close(self, status: str = "finished") -> None:
        _check_status(status)
        if self._run is None or self._closed:
            return
        self._run.finish(exit_code=0 if status == "finished" else 1)
        self._closed = True

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.start()
        self._run.config.update(flatten(params), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = numeric_metrics(metrics)
        if not values:
            return
        self.start()
        if step < self._last_step:
            # W&B steps only go forward: figures of an earlier epoch (the best epoch's test
            # figures, logged after the last epoch) go to the run summary.
            self._run.summary.update({k: v for k, v in values.items() if not math.isnan(v)})
            return
        self._last_step = int(step)
        self._run.log(values, step=int(step))

    def log_artifacts(self, folder: Path, exclude: Iterable[str] = ()) -> None:
        files = artifact_files(folder, exclude)
        if not files:
            return
        self.start()
        artifact = self._wandb.Artifact(name=re.sub(r"[^\w.-]", "-", f"run-{self._run.id}"), type="run")
        for path, rel in files:
            artifact.add_file(str(path), name=f"{rel}/{path.name}" if rel else path.name)
        self._run.log_artifact(artifact)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.start()
        self._run.summary.update({f"tag/{k}": str(v) for k, v in tags.items()})


def make_tracker(name: str = "mlflow", uri: str | None = None, experiment: str | None = None,
                 run_name: str | None = None, *, root: str | os.PathLike[str] | None = None,
                 tags: Mapping[str, Any] | None = None, parent: str | None = None, group: str | None = None,
                 record: str | os.PathLike[str] | None = None, job_type: str | None = None,
                 log_model: bool = True) -> Tracker:
    """The tracker called ``name``: ``mlflow`` (default), ``wandb`` or ``none``.

    Args:
        name: Tracker name.
        uri: MLflow tracking URI or W&B server URL (``None``: the tracker's default; for MLflow
            the local store ``ROOT/mlflow.db``).
        experiment: MLflow experiment or W&B project (``cellclass`` when ``None``).
        run_name: Name of the run.
        root: Runs root: where the default local store (or ``wandb/``) goes; the current
            folder when ``None``.
        tags: Tags set on the run.
        parent: MLflow parent run id (nested runs; W&B ignores it, see ``group``).
        group: W&B group (MLflow records it as the tag ``cellclass.group``).
        record: ``tracking.json`` in the run folder, to continue the same run after a resume.
        job_type: W&B job type.
        log_model: MLflow: log a finished run's network as an MLflow model.

    Raises:
        TrackingError: When ``name`` is not a tracker.
        MissingDependencyError: When the tracker's package is not installed.
    """
    if name not in TRACKERS:
        raise TrackingError(f"tracker {name!r} is unknown; valid: {', '.join(TRACKERS)}")
    if name == "none":
        return NoTracker()
    if name == "wandb":
        return WandbTracker(uri, experiment, run_name, root=root, tags=tags, group=group, record=record,
                            job_type=job_type)
    all_tags = dict(tags or {})
    if group:
        all_tags.setdefault("cellclass.group", group)
    return MLflowTracker(uri, experiment, run_name, root=root, tags=all_tags, parent=parent, record=record,
                         log_model=log_model)


def _require(module: str, package: str, extra: str | None) -> Any:
    """Import an optional package or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        how = f"pip install 'cellclass[{extra}]'" if extra else f"pip install {package}"
        raise MissingDependencyError(
            f"the {module} tracker needs the package {package!r}, which is not installed ({exc}); "
            f"install it with: {how}, or choose another --tracker ({', '.join(TRACKERS)})"
        ) from exc


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Raise the named loggers to WARNING for the block (MLflow narrates its migrations)."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(max(logging.WARNING, logger.level))
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)
