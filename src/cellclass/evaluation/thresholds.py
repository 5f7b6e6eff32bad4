"""Per-class decision thresholds for multi-label (and binary) tasks.

Thresholds are tuned on validation data, never on the test set, and stored with the
checkpoint so that serving predicts exactly as evaluation did. Throughout cellclass a label
is predicted when ``proba >= threshold``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cellclass.errors import EvaluationError
from cellclass.evaluation._validation import (
    as_indicator,
    as_proba,
    as_thresholds,
)

__all__ = ["DEFAULT_THRESHOLD", "THRESHOLD_METHODS", "apply_thresholds", "tune_thresholds"]

logger = logging.getLogger(__name__)

THRESHOLD_METHODS: tuple[str, ...] = ("f1", "prevalence")
DEFAULT_THRESHOLD = 0.5


def _candidates(scores: NDArray[np.float64], grid: NDArray[np.float64] | None) -> NDArray[np.float64]:
    """Candidate thresholds, descending.

    Without a grid: the midpoint between each pair of consecutive distinct scores (so a
    threshold sits in the middle of the gap it separates rather than on a validation
    score), plus the lowest score (predict every sample positive).
    """
    if grid is not None:
        return np.sort(grid)[::-1]
    distinct = np.unique(scores)[::-1]
    mids = (distinct[:-1] + distinct[1:]) / 2
    # Two adjacent floats have no midpoint strictly between them; fall back to the upper one.
    mids = np.where(mids > distinct[1:], mids, distinct[:-1])
    return np.concatenate([mids, distinct[-1:]])


def _counts_at(
    scores: NDArray[np.float64], positive: NDArray[np.bool_], candidates: NDArray[np.float64]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Predicted positives and true positives at each candidate threshold (``>=``)."""
    all_sorted = np.sort(scores)
    pos_sorted = np.sort(scores[positive])
    n_pred = all_sorted.size - np.searchsorted(all_sorted, candidates, side="left")
    tp = pos_sorted.size - np.searchsorted(pos_sorted, candidates, side="left")
    return n_pred.astype(np.int64), tp.astype(np.int64)


def _as_grid(grid: ArrayLike | None) -> NDArray[np.float64] | None:
    if grid is None:
        return None
    arr = np.unique(np.asarray(grid, dtype=np.float64).ravel())
    if arr.size == 0 or not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
        raise EvaluationError(
            "grid must be a non-empty sequence of finite thresholds in [0, 1] "
            f"(for instance np.linspace(0.01, 0.99, 99)); received {np.asarray(grid).ravel()[:10].tolist()}."
        )
    return arr


def tune_thresholds(
    y_true: ArrayLike,
    proba: ArrayLike,
    method: Literal["f1", "prevalence"] = "f1",
    grid: ArrayLike | None = None,
    classes: Sequence[str] | None = None,
) -> NDArray[np.float64]:
    """Choose one decision threshold per class on validation data.

    Methods:
        ``"f1"``: the threshold maximising the class's own F1. Among thresholds with the
        same best F1 the middle one is taken.
        ``"prevalence"``: the threshold whose predicted positive rate is closest to the
        class's prevalence in ``y_true`` (exact unless tied scores straddle it).

    Candidates are, by default, the midpoints between consecutive distinct probabilities of
    the class (plus its lowest probability), which searches every distinct decision; with
    ``grid`` they are the grid values. Classes without any positive in ``y_true`` keep
    0.5: the data say nothing about them (one log line names them all).

    Args:
        y_true: 0/1 indicator matrix, shape (N, K). For a binary task pass the labels as
            ``y[:, None]`` and the positive-class probability as ``p[:, None]``.
        proba: Probabilities, shape (N, K).
        method: ``"f1"`` or ``"prevalence"``.
        grid: Optional candidate thresholds in [0, 1].
        classes: The class names, for the log line naming the classes without a positive
            (default: their column numbers).

    Returns:
        Thresholds, float64 array of shape (K,).

    Raises:
        EvaluationError: If ``method`` is unknown, the grid is invalid or shapes disagree.
        LabelError: If ``y_true`` holds anything but 0 and 1.
    """
    if method not in THRESHOLD_METHODS:
        raise EvaluationError(
            f"Unknown threshold method {method!r}; valid methods are {', '.join(THRESHOLD_METHODS)}."
        )
    p = as_proba(proba)
    y = as_indicator(y_true, p.shape).astype(bool)
    candidate_grid = _as_grid(grid)
    n = p.shape[0]
    out = np.full(p.shape[1], DEFAULT_THRESHOLD)
    _log_without_positives(y, classes)
    for k in range(p.shape[1]):
        n_pos = int(y[:, k].sum())
        if n_pos == 0:
            continue
        cands = _candidates(p[:, k], candidate_grid)
        n_pred, tp = _counts_at(p[:, k], y[:, k], cands)
        if method == "f1":
            f1 = 2 * tp / (n_pos + n_pred)
            best = np.flatnonzero(np.isclose(f1, f1.max(), rtol=0, atol=1e-12))
        else:
            gap = np.abs(n_pred - n_pos)
            best = np.flatnonzero(gap == gap.min())
            # Prefer the fewer-positives side when two thresholds miss by the same count.
            best = best[:1]
        out[k] = cands[best[len(best) // 2]]
        logger.debug("class %d: threshold %.4f (%s, %d positives of %d)", k, out[k], method, n_pos, n)
    return out


def _log_without_positives(y: NDArray[np.bool_], classes: Sequence[str] | None) -> None:
    """One line naming every class that has no positive sample (its threshold stays the default)."""
    empty = np.flatnonzero(~y.any(axis=0))
    if not len(empty):
        return
    names = [str(k) if classes is None else str(classes[k]) for k in empty]
    logger.info("%d of %d classes have no positive sample, so their thresholds stay %.2f: %s", len(empty),
                y.shape[1], DEFAULT_THRESHOLD, ", ".join(names))


def apply_thresholds(
    proba: ArrayLike, thresholds: ArrayLike | float, at_least_one: bool = False
) -> NDArray[np.int64]:
    """Turn probabilities into 0/1 predictions: label k is on when ``proba[:, k] >= thresholds[k]``.

    Args:
        proba: Probabilities, shape (N, K).
        thresholds: One threshold for all classes or one per class, shape (K,).
        at_least_one: For multi-label tasks where every sample has at least one label
            (HPA, say): a sample with no probability above its threshold gets its most
            probable class instead of an empty prediction.

    Returns:
        int64 array of shape (N, K) holding 0 and 1.

    Raises:
        EvaluationError: If shapes disagree or values are outside [0, 1].
    """
    p = as_proba(proba)
    t = as_thresholds(thresholds, p.shape[1])
    pred = (p >= t).astype(np.int64)
    if at_least_one:
        empty = ~pred.any(axis=1)
        pred[np.flatnonzero(empty), p[empty].argmax(axis=1)] = 1
    return pred
