"""Experiment tracking and hyperparameter sweeps.

- :mod:`~cellclass.tracking.trackers`: the :class:`Tracker` interface with MLflow (default,
  a local SQLite store), Weights & Biases and no tracking; :func:`make_tracker`.
- :mod:`~cellclass.tracking.space`: sweep files (the W&B sweep format) and the rule that a
  sweep optimises a validation metric.
- :mod:`~cellclass.tracking.sweep`: :func:`run_sweep` on an Optuna study shared by worker
  processes (and machines), resumable after a kill.
- :mod:`~cellclass.tracking.study`: the Optuna study the workers share (storage, lock,
  recovery of dead workers' trials).
- :mod:`~cellclass.tracking.sweep_report`: the sweep report.
- :mod:`~cellclass.tracking.folds`: a cross-validation's folds told to its tracker.
- :mod:`~cellclass.tracking.mlflow_model`: runs as MLflow pyfunc models (logged by the MLflow
  tracker), registration by name, ``models:/`` URIs resolved to checkpoints.

W&B, an optional extra, is imported when its tracker is made.
"""

from __future__ import annotations

from cellclass.tracking.space import SweepSpace, valid_metrics
from cellclass.tracking.sweep import run_sweep
from cellclass.tracking.trackers import (
    TRACKERS,
    MLflowTracker,
    NoTracker,
    Tracker,
    WandbTracker,
    default_tracking_uri,
    make_tracker,
)

__all__ = [
    "TRACKERS",
    "MLflowTracker",
    "NoTracker",
    "SweepSpace",
    "Tracker",
    "WandbTracker",
    "default_tracking_uri",
    "make_tracker",
    "run_sweep",
    "valid_metrics",
]
