"""The Optuna study a sweep's workers share: its storage, its lock, and its trials' lives.

The study lives in a database (SQLite by default, any SQLAlchemy URL for workers on
several machines). Trial claims are serialised by :class:`StudyLock`; a running trial
records a :class:`Heartbeat`; :func:`recover` fails the trials of dead workers and queues
each again, and :func:`live_trials` leaves out the failed originals so that they are
neither counted nor reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import optuna
import sqlalchemy as sa
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from cellclass.errors import SweepError
from cellclass.tracking.space import SweepSpace
from cellclass.tracking.trackers import file_lock, sqlite_path

log = logging.getLogger(__name__)

HEARTBEAT_S = 30
"""Seconds between a running trial's heartbeats in the study database."""
GRACE_S = 120
"""A trial whose heartbeat is this old is failed and queued again (other machines' workers)."""
MAX_RETRIES = 3
"""Times an interrupted trial is queued again before it stays failed."""

# Settings that depend on the machine, not on the search: they may differ between the
# runs (or machines) that share one study.
_HARDWARE = {"workers", "devices", "accelerator", "precision", "strategy", "channels_last"}


def open_storage(url: str) -> Any:
    """An Optuna RDB storage with heartbeats and re-queueing of interrupted trials.

    Raises:
        SweepError: When the URL cannot be opened (the message hides any password).
    """
    engine_kwargs: dict[str, Any] = {}
    db = sqlite_path(url)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 120}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES, inherit_intermediate_values=True)
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                              grace_period=GRACE_S, heartbeat_stale_trial_callback=retry)
    except ImportError as exc:
        raise SweepError(f"study storage {masked_url(url)!r} needs a database driver that is not installed ({exc}); "
                         "for PostgreSQL: pip install 'cellclass[postgres]'") from exc
    except Exception as exc:  # SQLAlchemy's argument and connection errors
        raise SweepError(f"study storage {masked_url(url)!r} cannot be opened: {exc}; valid: sqlite:///PATH.db, "
                         "postgresql://USER:PASSWORD@HOST/DB, mysql://...") from exc


def open_study(storage_url: str, name: str, space: SweepSpace, base: Mapping[str, Any], folds: int | None) -> Any:
    """Create the study, or load it and check it holds the same search.

    Raises:
        SweepError: When the stored study was made by another sweep file, metric, train
            options or number of folds.
    """
    storage = open_storage(storage_url)
    fingerprint = _jsonable({"space": space.fingerprint(), "folds": folds,
                             "base": {k: v for k, v in base.items() if k not in _HARDWARE}})
    with StudyLock(storage_url, name), quiet_optuna():
        study = optuna.create_study(study_name=name, storage=storage, direction=space.goal, load_if_exists=True)
        stored = study.user_attrs.get("cellclass_sweep")
        if stored is None:
            study.set_user_attr("cellclass_sweep", fingerprint)
        elif stored != fingerprint:
            raise SweepError(f"study {name!r} in {masked_url(storage_url)} holds trials of another search "
                             f"({_difference(stored, fingerprint)}); valid: the same sweep file and train options "
                             "to continue it, or another --study or --out for a new sweep")
        if study.direction.name.lower() != space.goal:
            raise SweepError(f"study {name!r} was created to {study.direction.name.lower()}; the sweep file asks to "
                             f"{space.goal}; valid: another --study")
    return study


def _difference(stored: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    parts = []
    for key in ("space", "folds"):
        if stored.get(key) != now.get(key):
            parts.append(f"{key}: {json.dumps(stored.get(key))[:200]} in the study, "
                         f"{json.dumps(now.get(key))[:200]} now")
    old, new = stored.get("base", {}), now.get("base", {})
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            parts.append(f"{key}: {old.get(key)!r} in the study, {new.get(key)!r} now")
    return "; ".join(parts[:6])


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def masked_url(url: str) -> str:
    """A storage URL as shown in logs, reports and messages: any password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # not a URL SQLAlchemy understands: show it as given
        return url


class StudyLock:
    """Serialises trial claims between all workers of one study.

    SQLite databases are local files: an exclusive lock file beside the database. Other
    databases (shared by machines): a row of the table ``cellclass_sweep_locks`` held with
    ``SELECT ... FOR UPDATE`` for the duration of the block.
    """

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self._db = sqlite_path(url)
        self._engine: Any = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> Self:
        self._stack = contextlib.ExitStack()
        if self._db is not None:
            self._stack.enter_context(file_lock(self._db.with_name(self._db.name + ".lock")))
        elif not self.url.startswith("sqlite"):
            self._stack.enter_context(self._row_lock())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.close()

    @contextlib.contextmanager
    def _row_lock(self) -> Iterator[None]:
        if self._engine is None:
            self._engine = sa.create_engine(self.url, pool_pre_ping=True)
            meta = sa.MetaData()
            self._table = sa.Table("cellclass_sweep_locks", meta, sa.Column("name", sa.String(255), primary_key=True))
            meta.create_all(self._engine, checkfirst=True)
            with contextlib.suppress(sa.exc.IntegrityError), self._engine.begin() as conn:
                conn.execute(self._table.insert().values(name=self.name))
        with self._engine.begin() as conn:
            conn.execute(sa.select(self._table).where(self._table.c.name == self.name).with_for_update())
            yield


def live_trials(trials: list[Any]) -> list[Any]:
    """A study's trials less the retired ones (failed originals of re-queued trials)."""
    retired = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if t.number not in retired]


def recover(study: Any, storage: Any, study_id: int) -> list[int]:
    """Fail the RUNNING trials of dead workers and queue each again; return their numbers.

    Dead workers of this machine are found by process id at once; those of other machines
    by Optuna's heartbeat after :data:`GRACE_S` seconds. Call under :class:`StudyLock`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    me = worker_identity()
    requeue = storage.get_heartbeat_stale_trial_callback()
    recovered = []
    for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        who = t.user_attrs.get("worker")
        # A claim names its worker before it releases the study lock, which the caller holds:
        # a running trial with no worker is a claim cut short by its process's death.
        if isinstance(who, dict) and not _is_dead(who, me):
            continue
        who = who if isinstance(who, dict) else {}
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        log.warning("trial %d was left running by worker %s (pid %s), which is gone: running it again",
                    t.system_attrs.get("failed_trial", t.number), who.get("host"), who.get("pid"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            requeue(study, storage.get_trial(t._trial_id))
        recovered.append(t.number)
    return recovered


def worker_identity() -> dict[str, Any]:
    """Host, boot, process id and process start time of this process."""
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "started": _start_time(os.getpid())}


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _is_dead(who: Mapping[str, Any], me: Mapping[str, Any]) -> bool:
    """Whether the worker that claimed a trial is certainly gone (same machine only)."""
    if who.get("host") != me["host"] or who.get("boot") != me["boot"]:
        return False  # another machine: the heartbeat decides
    pid = who.get("pid")
    if not isinstance(pid, int):
        return False
    if pid == me["pid"]:
        return who.get("started") == me["started"]  # this process claims one trial at a time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    started = _start_time(pid)
    return started is not None and who.get("started") is not None and started != who.get("started")


class Heartbeat:
    """Records a running trial's heartbeat every :data:`HEARTBEAT_S` seconds."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        self._storage, self._trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sweep-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._storage.record_heartbeat(self._trial_id)
            except (StorageInternalError, SQLAlchemyError, OSError) as exc:  # a hiccup must not end the trial
                log.debug("heartbeat failed: %s", exc)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's log quieted to warnings for the duration of the block."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(previous, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)
