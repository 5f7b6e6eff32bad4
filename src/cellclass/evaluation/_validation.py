"""Input checks shared by the evaluation modules.

Every check returns a cleaned array (so callers work on a known dtype and shape) or raises
an error whose message says what was wrong, the value received and what is valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cellclass.errors import EvaluationError, LabelError

# Probabilities computed in float32 may overshoot [0, 1] by a rounding error.
_PROBA_TOLERANCE = 1e-6


def as_proba(proba: ArrayLike, name: str = "proba") -> NDArray[np.float64]:
    """Return ``proba`` as a finite float64 array of shape (N, K) with values in [0, 1]."""
    arr = np.asarray(proba, dtype=np.float64)
    if arr.ndim != 2:
        raise EvaluationError(
            f"{name} must be a 2-D array of shape (n_samples, n_classes); "
            f"received shape {arr.shape}."
        )
    if arr.shape[0] == 0:
        raise EvaluationError(f"{name} is empty (shape {arr.shape}); at least one sample is needed.")
    if not np.all(np.isfinite(arr)):
        raise EvaluationError(
            f"{name} contains {int(np.sum(~np.isfinite(arr)))} NaN or infinite values; "
            "probabilities must be finite numbers in [0, 1]."
        )
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -_PROBA_TOLERANCE or hi > 1 + _PROBA_TOLERANCE:
        raise EvaluationError(
            f"{name} must hold probabilities in [0, 1]; received values in [{lo:.4g}, {hi:.4g}] "
            "(apply softmax or sigmoid to logits first)."
        )
    return np.clip(arr, 0.0, 1.0)


def check_classes(classes: Sequence[str], n_classes: int) -> list[str]:
    """Return ``classes`` as a list of strings after checking it has one name per column."""
    if isinstance(classes, str):
        raise EvaluationError(
            f"classes must be a sequence of class names; received the string {classes!r}."
        )
    names = [str(c) for c in classes]
    if len(names) != n_classes:
        raise EvaluationError(
            f"classes has {len(names)} names but proba has {n_classes} columns; "
            "give exactly one name per column, in column order."
        )
    return names


def as_labels(y_true: ArrayLike, n_samples: int, n_classes: int) -> NDArray[np.int64]:
    """Return integer class indices of shape (N,), each in ``range(n_classes)``."""
    arr = np.asarray(y_true)
    if arr.ndim != 1:
        raise LabelError(
            f"y_true must be a 1-D array of class indices; received shape {arr.shape}."
        )
    if arr.shape[0] != n_samples:
        raise EvaluationError(
            f"y_true has {arr.shape[0]} samples but proba has {n_samples} rows; "
            "both must describe the same samples."
        )
    integral = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)
    whole_floats = np.issubdtype(arr.dtype, np.floating) and bool(np.all(np.mod(arr, 1) == 0))
    if not (integral or whole_floats):
        raise LabelError(
            f"y_true must hold integer class indices; received dtype {arr.dtype} "
            f"(first values {arr[:3].tolist()}). Encode class names with the task's classes."
        )
    labels = arr.astype(np.int64)
    bad = (labels < 0) | (labels >= n_classes)
    if np.any(bad):
        raise LabelError(
            f"y_true holds class indices outside range(0, {n_classes}): "
            f"{sorted(set(labels[bad].tolist()))[:10]}; valid indices are 0..{n_classes - 1}."
        )
    return labels


def as_indicator(y_true: ArrayLike, shape: tuple[int, int], name: str = "y_true") -> NDArray[np.int64]:
    """Return a 0/1 integer indicator matrix of the given (N, K) shape."""
    arr = np.asarray(y_true)
    if arr.shape != shape:
        raise EvaluationError(
            f"{name} must be a 0/1 indicator matrix of shape {shape} (same as proba); "
            f"received shape {arr.shape}."
        )
    values = np.unique(arr)
    if not np.all(np.isin(values, [0, 1])):
        raise LabelError(
            f"{name} must hold only 0 and 1; received values {values[:10].tolist()}."
        )
    return arr.astype(np.int64)


def as_thresholds(thresholds: ArrayLike, n_classes: int) -> NDArray[np.float64]:
    """Return thresholds broadcast to shape (K,), each a finite number in [0, 1]."""
    arr = np.asarray(thresholds, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n_classes, float(arr))
    if arr.shape != (n_classes,):
        raise EvaluationError(
            f"thresholds must be one number or an array of shape ({n_classes},), one per class; "
            f"received shape {arr.shape}."
        )
    if not np.all(np.isfinite(arr)) or np.any((arr < 0) | (arr > 1)):
        raise EvaluationError(
            f"thresholds must be finite numbers in [0, 1]; received {arr.tolist()[:10]}."
        )
    return arr


def check_bootstrap_args(n_boot: int, alpha: float) -> None:
    """Check the resample count and the significance level of a bootstrap."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise EvaluationError(f"n_boot must be a positive integer; received {n_boot!r}.")
    if not 0 < alpha < 1:
        raise EvaluationError(f"alpha must lie strictly between 0 and 1; received {alpha!r}.")
