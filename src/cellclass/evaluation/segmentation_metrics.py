"""Instance segmentation against ground truth: objects matched one-to-one by IoU.

A predicted object and a true object match when their intersection over union (IoU) is at
least the threshold; the matching is one-to-one and maximises the number of matches
(Hungarian assignment on the pairs above the threshold, as StarDist's ``matching`` does).
At a threshold above 0.5 no object can overlap two others that much, so the assignment is
unique. From the matches of one field:

- precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN);
- average precision at a threshold, as the Data Science Bowl 2018 and the Cellpose and
  StarDist papers define it: TP / (TP + FP + FN).

A field with no true and no predicted object scores 1 on every measure (nothing to find,
nothing invented). Every function returns plain Python values, ready for JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from cellclass.errors import EvaluationError

__all__ = [
    "DEFAULT_THRESHOLDS",
    "iou_matrix",
    "match_objects",
    "mean_over_fields",
    "score_fields",
]

#: IoU thresholds of the sweep: 0.5, 0.55, ..., 0.9 (the DSB 2018 range stops at 0.95).
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU of every true object with every predicted object.

    Args:
        true: Integer label image ``(H, W)``; 0 is background, any other value an object
            (values need not be consecutive).
        pred: Integer label image of the same shape.

    Returns:
        ``(n_true, n_pred)`` float64 array, rows in increasing order of the true labels
        present, columns likewise for the predicted ones.

    Raises:
        EvaluationError: If the images differ in shape, are not 2-D or not integer.
    """
    true_ids, true_codes = _codes(true, "true")
    pred_ids, pred_codes = _codes(pred, "pred")
    if true.shape != pred.shape:
        raise EvaluationError(
            f"label images differ in shape: true {true.shape}, pred {pred.shape}; they must be equal"
        )
    n_true, n_pred = len(true_ids), len(pred_ids)
    # Codes include background (0), so the joint histogram holds every pixel once and the
    # object areas are its margins.
    joint = np.bincount(
        true_codes.ravel() * (n_pred + 1) + pred_codes.ravel(), minlength=(n_true + 1) * (n_pred + 1)
    ).reshape(n_true + 1, n_pred + 1)
    inter = joint[1:, 1:].astype(np.float64)
    area_true = joint[1:, :].sum(axis=1)
    area_pred = joint[:, 1:].sum(axis=0)
    union = area_true[:, None] + area_pred[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_objects(
    true: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = (0.5,)
) -> dict[str, Any]:
    """Match the objects of one field at each IoU threshold and score the matches.

    Args:
        true: Ground-truth label image ``(H, W)`` (0 background).
        pred: Predicted label image of the same shape.
        thresholds: IoU thresholds, each in (0, 1].

    Returns:
        ``n_true``, ``n_pred`` and, under ``by_threshold`` keyed by the threshold as a
        string (``"0.5"``), ``tp``, ``fp``, ``fn``, ``precision``, ``recall``, ``f1``,
        ``average_precision`` and ``mean_matched_iou`` (None without a match).

    Raises:
        EvaluationError: On images of different shapes, non-integer images or a threshold
            outside (0, 1].
    """
    thresholds = _check_thresholds(thresholds)
    iou = iou_matrix(true, pred)
    n_true, n_pred = iou.shape
    out: dict[str, Any] = {"n_true": n_true, "n_pred": n_pred, "by_threshold": {}}
    for t in thresholds:
        matched = _matched_ious(iou, t)
        tp = len(matched)
        out["by_threshold"][_key(t)] = {
            **_scores(tp, n_pred - tp, n_true - tp),
            "mean_matched_iou": float(np.mean(matched)) if tp else None,
        }
    return out


def score_fields(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[str, Any]:
    """Score many fields and average them: the mean over fields, and the pooled counts.

    Args:
        pairs: ``(true, pred)`` label images, one pair per field.
        thresholds: IoU thresholds of the sweep (the first is the headline one).

    Returns:
        ``n_fields``; ``mean`` (per threshold, the mean over fields of precision, recall,
        F1 and average precision); ``pooled`` (per threshold, the same measures from the
        counts summed over fields); ``fields`` (each field's :func:`match_objects`); and
        ``f1``/``average_precision`` shortcuts: the mean over fields at the first threshold,
        and ``mean_average_precision``, the mean over thresholds of the mean AP.

    Raises:
        EvaluationError: If there are no fields, or on any error of :func:`match_objects`.
    """
    thresholds = _check_thresholds(thresholds)
    fields = [match_objects(t, p, thresholds) for t, p in pairs]
    if not fields:
        raise EvaluationError("no fields to score; pass at least one (true, pred) pair")
    mean = {_key(t): mean_over_fields(fields, t) for t in thresholds}
    pooled = {}
    for t in thresholds:
        tp, fp, fn = (sum(f["by_threshold"][_key(t)][k] for f in fields) for k in ("tp", "fp", "fn"))
        pooled[_key(t)] = _scores(tp, fp, fn)
    first = _key(thresholds[0])
    return {
        "n_fields": len(fields),
        "thresholds": [float(t) for t in thresholds],
        "f1": mean[first]["f1"],
        "average_precision": mean[first]["average_precision"],
        "mean_average_precision": float(np.mean([mean[_key(t)]["average_precision"] for t in thresholds])),
        "mean": mean,
        "pooled": pooled,
        "fields": fields,
    }


def mean_over_fields(fields: Sequence[dict[str, Any]], threshold: float = 0.5) -> dict[str, float]:
    """Mean over fields of precision, recall, F1 and average precision at one threshold.

    Args:
        fields: Results of :func:`match_objects` that include ``threshold``.
        threshold: The IoU threshold to read.

    Raises:
        EvaluationError: If ``fields`` is empty or a field lacks the threshold.
    """
    if not fields:
        raise EvaluationError("no fields to average; pass at least one match_objects result")
    key = _key(threshold)
    try:
        rows = [f["by_threshold"][key] for f in fields]
    except KeyError:
        have = sorted(fields[0]["by_threshold"])
        raise EvaluationError(
            f"IoU threshold {threshold} was not scored; scored thresholds: {', '.join(have)}"
        ) from None
    return {k: float(np.mean([r[k] for r in rows])) for k in ("precision", "recall", "f1", "average_precision")}


def _matched_ious(iou: np.ndarray, threshold: float) -> np.ndarray:
    """IoUs of a one-to-one assignment of the pairs at or above ``threshold`` with most matches."""
    candidate = iou >= threshold
    if not candidate.any():
        return np.empty(0)
    rows = np.flatnonzero(candidate.any(axis=1))
    cols = np.flatnonzero(candidate.any(axis=0))
    sub_iou = iou[np.ix_(rows, cols)]
    sub_ok = candidate[np.ix_(rows, cols)]
    # Each candidate pair is worth 1 (the count of matches comes first) plus a fraction of
    # its IoU that can never outweigh one more match: ties go to the better overlap.
    weight = np.where(sub_ok, 1.0 + sub_iou / (2.0 * max(sub_ok.shape)), 0.0)
    r, c = linear_sum_assignment(weight, maximize=True)
    keep = sub_ok[r, c]
    return sub_iou[r[keep], c[keep]]


def _codes(labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Object ids present (background excluded) and the image recoded to 0..n."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise EvaluationError(f"{name} label image must be 2-D (H, W); got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise EvaluationError(f"{name} label image must hold integers; got dtype {labels.dtype}")
    ids, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(labels.shape)
    if ids.size and ids[0] == 0:
        return ids[1:], codes
    return ids, codes + 1


def _check_thresholds(thresholds: Sequence[float]) -> list[float]:
    values = [float(t) for t in thresholds]
    if not values:
        raise EvaluationError("no IoU thresholds given; pass at least one in (0, 1]")
    for t in values:
        if not 0.0 < t <= 1.0:
            raise EvaluationError(f"IoU threshold {t} is out of range; valid: 0 < threshold <= 1")
    return values


def _key(threshold: float) -> str:
    return f"{float(threshold):g}"


def _scores(tp: int, fp: int, fn: int) -> dict[str, Any]:
    """Counts and the measures made from them; nothing true and nothing predicted scores 1."""
    if tp + fp + fn == 0:
        return {"tp": 0, "fp": 0, "fn": 0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "average_precision": 1.0}

    def ratio(num: int, den: int) -> float:
        return float(num / den) if den else 0.0

    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "average_precision": ratio(tp, tp + fp + fn),
    }
