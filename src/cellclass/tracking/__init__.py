"""Experiment tracking and hyperparameter sweeps.

- :mod:`~cellclass.tracking.trackers`: the :class:`Tracker` interface with MLflow (default,
  a local SQLite store), Weights & Biases and no tracking; :func:`make_tracker`.
- :mod:`~cellclass.tracking.space`: sweep files (the W&B sweep format) and the rule that a
  sweep optimises a validation metric.
- :mod:`~cellclass.tracking.sweep`: :func:`run_sweep` on an Optuna study shared by worker
  processes (and machines), resumable after a kill.
- :mod:`~cellclass.tracking.report`: the sweep report.
- :mod:`~cellclass.tracking.mlflow_model`: runs as MLflow pyfunc models (logged by the MLflow
  tracker), registration by name, ``models:/`` URIs resolved to checkpoints.

Only light modules are imported here; MLflow, W&B and Optuna load when used.
"""

from __future__ import annotations

from typing import Any

from cellclass.tracking.space import SweepSpace, valid_metrics
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


def run_sweep(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run or continue a sweep; see :func:`cellclass.tracking.sweep.run_sweep`."""
    from cellclass.tracking.sweep import run_sweep as _run_sweep

    return _run_sweep(*args, **kwargs)
