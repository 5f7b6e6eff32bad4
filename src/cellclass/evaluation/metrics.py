"""Metrics for single-label, binary and multi-label tasks.

Every function returns a dictionary of plain Python ``float``/``int``/``None``/``list``/
``dict`` values, so it can be written with :func:`json.dumps` as it is. A metric that
cannot be computed on the data (ROC AUC with one class present, say) is ``None``, never
NaN.

Macro averages (F1, precision, recall) are taken over the classes whose F1 is defined:
classes that occur in ``y_true`` or in the predictions. A class that is neither true nor
predicted for any sample of the evaluated set has F1 = 0/0; counting it as 0 would lower the
score of a test split merely for lacking a rare class. A class predicted but absent from
``y_true`` does count (its F1 is 0), so false positives are never hidden. Per-class
values use ``zero_division=0`` and cover every class, in class order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import average_precision_score, roc_auc_score

from cellclass.errors import EvaluationError, LabelError
from cellclass.evaluation._validation import (
    as_indicator,
    as_labels,
    as_proba,
    as_thresholds,
    check_bootstrap_args,
    check_classes,
)

__all__ = [
    "LABEL_METRICS",
    "TASK_TYPES",
    "accuracy",
    "binary_metrics",
    "bootstrap_ci",
    "calibration_bins",
    "expected_calibration_error",
    "macro_f1",
    "multilabel_metrics",
    "resolve_label_metric",
    "single_label_metrics",
    "task_metrics",
]

logger = logging.getLogger(__name__)

TASK_TYPES: tuple[str, ...] = ("single", "binary", "multilabel")

# Probabilities are clipped here before the logarithm, as scikit-learn does.
_LOG_EPS = 1e-15


def _ratio(num: NDArray[np.float64], den: NDArray[np.float64]) -> NDArray[np.float64]:
    """Element-wise num / den with 0 where den is 0 (``zero_division=0``)."""
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _mean_or_none(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _class_scores(
    tp: NDArray[np.int64], support: NDArray[np.int64], predicted: NDArray[np.int64]
) -> dict[str, Any]:
    """Per-class precision, recall, F1 and the macro/micro/weighted averages."""
    tp_f = tp.astype(np.float64)
    precision = _ratio(tp_f, predicted.astype(np.float64))
    recall = _ratio(tp_f, support.astype(np.float64))
    f1 = _ratio(2 * tp_f, (support + predicted).astype(np.float64))
    active = (support + predicted) > 0
    total_support = int(support.sum())
    micro_den = float(support.sum() + predicted.sum())
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "macro_f1": float(f1[active].mean()) if active.any() else 0.0,
        "macro_precision": float(precision[active].mean()) if active.any() else 0.0,
        "macro_recall": float(recall[active].mean()) if active.any() else 0.0,
        "micro_f1": 2 * float(tp.sum()) / micro_den if micro_den > 0 else 0.0,
        "weighted_f1": float((f1 * support).sum() / total_support) if total_support else 0.0,
    }


def _per_class(
    classes: Sequence[str], scores: dict[str, Any], support: NDArray[np.int64]
) -> dict[str, dict[str, float | int]]:
    return {
        name: {
            "precision": float(scores["precision"][k]),
            "recall": float(scores["recall"][k]),
            "f1": float(scores["f1"][k]),
            "support": int(support[k]),
        }
        for k, name in enumerate(classes)
    }


def calibration_bins(
    confidence: ArrayLike, correct: ArrayLike, n_bins: int = 15
) -> dict[str, Any]:
    """Group predictions into equal-width confidence bins, as in a reliability diagram.

    Bin ``b`` holds confidences in ``(b / n_bins, (b + 1) / n_bins]``; a confidence of
    exactly 0 falls in the first bin.

    Args:
        confidence: Predicted probability of the predicted outcome, shape (N,).
        correct: Whether each prediction was right (0/1 or bool), shape (N,).
        n_bins: Number of bins.

    Returns:
        ``edges`` (n_bins + 1,), and per bin ``count``, mean ``confidence`` and
        ``accuracy`` (n_bins,), where empty bins have confidence and accuracy NaN; and
        ``ece``, the expected calibration error: the count-weighted mean of
        |accuracy - confidence| over the filled bins.

    Raises:
        EvaluationError: If ``n_bins`` < 1 or the arrays differ in length.
    """
    if n_bins < 1:
        raise EvaluationError(f"n_bins must be a positive integer; received {n_bins}.")
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    hit = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != hit.shape:
        raise EvaluationError(
            f"confidence and correct must have the same length; received {conf.size} and {hit.size}."
        )
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(bins, weights=hit, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        acc = np.where(count > 0, hit_sum / count, np.nan)
    filled = count > 0
    gaps = np.abs(acc[filled] - mean_conf[filled])
    ece = float(np.sum(count[filled] * gaps) / conf.size) if conf.size else 0.0
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
        "count": count,
        "confidence": mean_conf,
        "accuracy": acc,
        "ece": ece,
    }


def _ece_from(confidence: NDArray[np.float64], correct: NDArray[np.float64], n_bins: int) -> float:
    return float(calibration_bins(confidence, correct, n_bins)["ece"])


def expected_calibration_error(y_true: ArrayLike, proba: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error of a single-label classifier.

    The confidence of a sample is its largest class probability; ECE is the mean, weighted
    by bin size, of |accuracy - mean confidence| over ``n_bins`` equal-width bins.

    Args:
        y_true: Class indices, shape (N,).
        proba: Class probabilities, shape (N, K).
        n_bins: Number of confidence bins.

    Returns:
        ECE in [0, 1].
    """
    p = as_proba(proba)
    y = as_labels(y_true, p.shape[0], p.shape[1])
    return _ece_from(p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64), n_bins)


def _ranking_scores(
    y_onehot: NDArray[np.int64], proba: NDArray[np.float64]
) -> tuple[float | None, float | None]:
    """Macro one-vs-rest ROC AUC and macro average precision.

    ROC AUC is averaged over the classes having both positives and negatives; average
    precision over the classes having positives. Each is None when no class qualifies.
    """
    n = y_onehot.shape[0]
    aucs: list[float] = []
    aps: list[float] = []
    for k in range(y_onehot.shape[1]):
        pos = int(y_onehot[:, k].sum())
        if pos == 0:
            continue
        aps.append(float(average_precision_score(y_onehot[:, k], proba[:, k])))
        if pos < n:
            aucs.append(float(roc_auc_score(y_onehot[:, k], proba[:, k])))
    return _mean_or_none(aucs), _mean_or_none(aps)


def _metrics_from_predictions(
    y: NDArray[np.int64], y_pred: NDArray[np.int64], p: NDArray[np.float64], classes: list[str]
) -> dict[str, Any]:
    """All single-label metrics, given labels, hard predictions and probabilities."""
    n, k = p.shape
    cm = np.bincount(y * k + y_pred, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(np.int64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    scores = _class_scores(tp, support, predicted)
    present = support > 0
    roc_auc, average_precision = _ranking_scores(np.eye(k, dtype=np.int64)[y], p)
    p_true = np.clip(p[np.arange(n), y], _LOG_EPS, 1.0)
    return {
        "n": int(n),
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(scores["recall"][present].mean()),
        "macro_f1": scores["macro_f1"],
        "micro_f1": scores["micro_f1"],
        "weighted_f1": scores["weighted_f1"],
        "macro_precision": scores["macro_precision"],
        "macro_recall": scores["macro_recall"],
        "roc_auc": roc_auc,
        "map": average_precision,
        "log_loss": float(-np.mean(np.log(p_true))),
        "ece": _ece_from(p.max(axis=1), (y_pred == y).astype(np.float64), 15),
        "per_class": _per_class(classes, scores, support),
        "confusion_matrix": cm.tolist(),
    }


def single_label_metrics(
    y_true: ArrayLike, proba: ArrayLike, classes: Sequence[str], predictions: ArrayLike | None = None
) -> dict[str, Any]:
    """Metrics of a single-label (softmax) task; the prediction is the argmax class unless given.

    ``roc_auc`` is the macro one-vs-rest AUC over classes with both positives and negatives
    in ``y_true`` (None if there are none); ``map`` the macro average precision over
    classes present in ``y_true``; ``balanced_accuracy`` the mean recall over those
    classes; ``ece`` uses 15 bins on the largest probability. See the module docstring for
    how macro averages treat absent classes.

    Args:
        y_true: Class indices in ``range(K)``, shape (N,).
        proba: Class probabilities, shape (N, K).
        classes: K class names, in column order.
        predictions: The predicted class indices, shape (N,), where they are not the
            argmax of ``proba`` (a field's majority vote with its ties broken).

    Returns:
        Keys ``n, accuracy, balanced_accuracy, macro_f1, micro_f1, weighted_f1,
        macro_precision, macro_recall, roc_auc, map, log_loss, ece``, ``per_class``
        (name -> precision, recall, f1, support) and ``confusion_matrix`` (K lists of K
        counts; rows are true classes, columns predicted, in class order).

    Raises:
        EvaluationError: If shapes disagree or probabilities are outside [0, 1].
        LabelError: If ``y_true`` holds anything but indices in ``range(K)``.
    """
    p = as_proba(proba)
    names = check_classes(classes, p.shape[1])
    y = as_labels(y_true, p.shape[0], p.shape[1])
    y_pred = p.argmax(axis=1).astype(np.int64) if predictions is None else as_labels(predictions, p.shape[0],
                                                                                      p.shape[1])
    return _metrics_from_predictions(y, y_pred, p, names)


def binary_metrics(
    y_true: ArrayLike, proba: ArrayLike, classes: Sequence[str], threshold: float = 0.5
) -> dict[str, Any]:
    """Metrics of a binary task: the single-label metrics plus positive-class scores.

    The positive class is ``classes[1]``; a sample is predicted positive when its
    positive-class probability is >= ``threshold``.

    Args:
        y_true: 0/1 labels, shape (N,).
        proba: Probabilities of shape (N, 2), or of the positive class only, shape (N,).
        classes: The two class names, negative first.
        threshold: Decision threshold on the positive-class probability.

    Returns:
        Everything :func:`single_label_metrics` returns (with predictions made at
        ``threshold``), where ``roc_auc`` and ``map`` are the positive class's ROC AUC and
        average precision, plus ``positive_class``, ``threshold``, ``precision``,
        ``recall`` and ``f1`` of the positive class.

    Raises:
        EvaluationError: If shapes disagree, there are not two classes, or the threshold
            is outside [0, 1].
        LabelError: If ``y_true`` holds anything but 0 and 1.
    """
    arr = np.asarray(proba, dtype=np.float64)
    if arr.ndim == 1:
        arr = np.stack([1.0 - arr, arr], axis=1)
    p = as_proba(arr)
    if p.shape[1] != 2:
        raise EvaluationError(
            f"binary metrics need probabilities of shape (N, 2) or (N,); received shape {p.shape}."
        )
    names = check_classes(classes, 2)
    t = float(as_thresholds(threshold, 1)[0])
    y = as_labels(y_true, p.shape[0], 2)
    y_pred = (p[:, 1] >= t).astype(np.int64)
    out = _metrics_from_predictions(y, y_pred, p, names)
    positive = out["per_class"][names[1]]
    n_pos = int(y.sum())
    out.update(
        positive_class=names[1],
        threshold=t,
        precision=positive["precision"],
        recall=positive["recall"],
        f1=positive["f1"],
        roc_auc=float(roc_auc_score(y, p[:, 1])) if 0 < n_pos < y.size else None,
        map=float(average_precision_score(y, p[:, 1])) if n_pos > 0 else None,
    )
    return out


def multilabel_metrics(
    y_true: ArrayLike,
    proba: ArrayLike,
    classes: Sequence[str],
    thresholds: ArrayLike | float = 0.5,
) -> dict[str, Any]:
    """Metrics of a multi-label (sigmoid) task.

    A label is predicted when its probability is >= its class threshold. Per sample, F1 and
    Jaccard of a sample with no true and no predicted label are 1 (a correct empty
    prediction). ``macro_roc_auc`` averages over classes with both values present,
    ``micro_roc_auc`` pools every (sample, class) pair; ``map`` is the macro average
    precision over classes with positives. Each is None when it cannot be computed.

    Args:
        y_true: 0/1 indicator matrix, shape (N, K).
        proba: Per-class probabilities, shape (N, K).
        classes: K class names, in column order.
        thresholds: One threshold for all classes or one per class, shape (K,).

    Returns:
        Keys ``n, macro_f1, micro_f1, weighted_f1, samples_f1, macro_precision,
        macro_recall, jaccard_samples, hamming_loss, subset_accuracy, macro_roc_auc,
        micro_roc_auc, map``, ``per_class`` (name -> precision, recall, f1, support,
        threshold) and ``thresholds`` (list of K floats).

    Raises:
        EvaluationError: If shapes disagree or values are out of range.
        LabelError: If ``y_true`` holds anything but 0 and 1.
    """
    p = as_proba(proba)
    n, k = p.shape
    names = check_classes(classes, k)
    y = as_indicator(y_true, (n, k))
    t = as_thresholds(thresholds, k)
    pred = (p >= t).astype(np.int64)

    tp = (y & pred).sum(axis=0)
    support = y.sum(axis=0)
    predicted = pred.sum(axis=0)
    scores = _class_scores(tp, support, predicted)

    tp_s = (y & pred).sum(axis=1)
    wrong_s = (y ^ pred).sum(axis=1)  # false positives + false negatives per sample
    empty = (tp_s + wrong_s) == 0
    samples_f1 = np.where(empty, 1.0, _ratio(2.0 * tp_s, 2.0 * tp_s + wrong_s))
    jaccard = np.where(empty, 1.0, _ratio(tp_s.astype(np.float64), (tp_s + wrong_s).astype(np.float64)))

    macro_auc, average_precision = _ranking_scores(y, p)
    flat = y.ravel()
    micro_auc = float(roc_auc_score(flat, p.ravel())) if 0 < flat.sum() < flat.size else None

    per_class = _per_class(names, scores, support)
    for name, value in zip(names, t, strict=True):
        per_class[name]["threshold"] = float(value)
    return {
        "n": int(n),
        "macro_f1": scores["macro_f1"],
        "micro_f1": scores["micro_f1"],
        "weighted_f1": scores["weighted_f1"],
        "samples_f1": float(samples_f1.mean()),
        "macro_precision": scores["macro_precision"],
        "macro_recall": scores["macro_recall"],
        "jaccard_samples": float(jaccard.mean()),
        "hamming_loss": float((y != pred).mean()),
        "subset_accuracy": float(np.all(y == pred, axis=1).mean()),
        "macro_roc_auc": macro_auc,
        "micro_roc_auc": micro_auc,
        "map": average_precision,
        "per_class": per_class,
        "thresholds": [float(v) for v in t],
    }


def task_metrics(
    task_type: str,
    y_true: ArrayLike,
    proba: ArrayLike,
    classes: Sequence[str],
    thresholds: ArrayLike | float | None = None,
    predictions: ArrayLike | None = None,
) -> dict[str, Any]:
    """Metrics of one label task, dispatched on its type.

    Args:
        task_type: ``"single"``, ``"binary"`` or ``"multilabel"``.
        y_true: Class indices (N,) for single and binary tasks, indicator matrix (N, K)
            for multilabel.
        proba: Probabilities, shape (N, K) (binary also accepts (N,)).
        classes: Class names in column order.
        thresholds: None for the default 0.5; for binary one number (or a size-1 array),
            for multilabel one number or one per class. Single-label tasks take none.
        predictions: Single-label tasks: the predicted class indices where they are not
            the argmax of ``proba`` (see :func:`single_label_metrics`).

    Returns:
        The dictionary of the matching ``*_metrics`` function, with ``task_type`` added.

    Raises:
        EvaluationError: If ``task_type`` is unknown, thresholds are given to a
            single-label task or predictions to another.
    """
    if predictions is not None and task_type != "single":
        raise EvaluationError(f"predictions apply to single-label tasks; received them for a {task_type!r} task, "
                              "whose prediction follows its thresholds.")
    if task_type == "single":
        if thresholds is not None:
            raise EvaluationError(
                f"thresholds apply to binary and multilabel tasks; received {thresholds!r} "
                "for a single-label task, whose prediction is the argmax class."
            )
        out = single_label_metrics(y_true, proba, classes, predictions)
    elif task_type == "binary":
        if thresholds is None:
            threshold = 0.5
        else:
            arr = np.asarray(thresholds, dtype=np.float64).ravel()
            if arr.size != 1:
                raise EvaluationError(
                    "a binary task takes one threshold (on the positive-class probability); "
                    f"received {arr.size} values."
                )
            threshold = float(arr[0])
        out = binary_metrics(y_true, proba, classes, threshold=threshold)
    elif task_type == "multilabel":
        out = multilabel_metrics(y_true, proba, classes, 0.5 if thresholds is None else thresholds)
    else:
        raise EvaluationError(
            f"Unknown task_type {task_type!r}; valid task types are {', '.join(TASK_TYPES)}."
        )
    out["task_type"] = task_type
    return out


# --- label-only metrics, fast enough to be called thousands of times in a bootstrap ---


def _label_arrays(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[NDArray[Any], NDArray[Any]]:
    y = np.asarray(y_true)
    p = np.asarray(y_pred)
    if y.shape != p.shape or y.ndim not in (1, 2):
        raise EvaluationError(
            "y_true and y_pred must have the same shape, (N,) class indices or (N, K) "
            f"indicators; received {y.shape} and {p.shape}."
        )
    return y, p


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of samples predicted exactly right (subset accuracy for (N, K) indicators).

    Args:
        y_true: Class indices (N,) or 0/1 indicator matrix (N, K).
        y_pred: Predictions of the same shape.

    Returns:
        Accuracy in [0, 1].
    """
    y, p = _label_arrays(y_true, y_pred)
    hit = y == p if y.ndim == 1 else np.all(y == p, axis=1)
    return float(hit.mean())


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Macro F1 over the classes that are true or predicted for at least one sample.

    Args:
        y_true: Non-negative class indices (N,) or 0/1 indicator matrix (N, K).
        y_pred: Predictions of the same shape.

    Returns:
        Macro F1 in [0, 1].
    """
    y, p = _label_arrays(y_true, y_pred)
    if y.ndim == 2:
        yi, pi = y.astype(bool), p.astype(bool)
        tp, support, predicted = (yi & pi).sum(axis=0), yi.sum(axis=0), pi.sum(axis=0)
    else:
        y, p = y.astype(np.int64), p.astype(np.int64)
        if y.size and min(y.min(), p.min()) < 0:
            raise LabelError(f"class indices must be non-negative; received minimum {min(y.min(), p.min())}.")
        k = int(max(y.max(), p.max())) + 1 if y.size else 0
        tp = np.bincount(y[y == p], minlength=k)
        support = np.bincount(y, minlength=k)
        predicted = np.bincount(p, minlength=k)
    return _class_scores(tp, support, predicted)["macro_f1"]


LABEL_METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "accuracy": accuracy,
    "macro_f1": macro_f1,
}
"""Metrics computed from hard predictions alone, by name (used by bootstrap and compare)."""


def resolve_label_metric(
    metric: str | Callable[[ArrayLike, ArrayLike], float],
) -> Callable[[ArrayLike, ArrayLike], float]:
    """Return ``metric`` if callable, else the function of that name in :data:`LABEL_METRICS`.

    Raises:
        EvaluationError: If the name is unknown.
    """
    if callable(metric):
        return metric
    try:
        return LABEL_METRICS[metric]
    except KeyError:
        raise EvaluationError(
            f"Unknown metric {metric!r}; valid metric names are {', '.join(LABEL_METRICS)} "
            "(or pass a function f(y_true, y_pred) -> float)."
        ) from None


def bootstrap_ci(
    metric_fn: str | Callable[[Any, Any], float | None],
    y_true: ArrayLike,
    pred: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float | int]:
    """Percentile bootstrap confidence interval of a metric, resampling samples (rows).

    Resamples on which the metric is undefined (``metric_fn`` returns None or NaN, for
    instance ROC AUC on a resample with one class) are left out of the interval; their
    number is ``n_boot - n_valid``.

    Args:
        metric_fn: A name from :data:`LABEL_METRICS` or a function
            ``f(y_true, pred) -> float`` taking arrays indexed along their first axis.
        y_true: True labels, (N,) or (N, K).
        pred: Predictions or probabilities with N rows.
        n_boot: Number of bootstrap resamples.
        seed: Seed of the random generator, for reproducible intervals.
        alpha: One minus the confidence level (0.05 gives a 95% interval).

    Returns:
        ``estimate`` (the metric on all samples), ``ci_low``, ``ci_high``, ``alpha``,
        ``n_boot`` and ``n_valid``.

    Raises:
        EvaluationError: If arguments are out of range, the arrays differ in length, or the
            metric is undefined on the full data or on every resample.
    """
    fn = resolve_label_metric(metric_fn) if isinstance(metric_fn, str) else metric_fn
    y = np.asarray(y_true)
    p = np.asarray(pred)
    check_bootstrap_args(n_boot, alpha)
    if y.shape[0] != p.shape[0] or y.shape[0] == 0:
        raise EvaluationError(
            f"y_true and pred must have the same, non-zero number of rows; received {y.shape[0]} "
            f"and {p.shape[0]}."
        )
    estimate = fn(y, p)
    if estimate is None or not math.isfinite(estimate):
        raise EvaluationError(
            f"the metric is undefined on the full data (returned {estimate!r}); "
            "no confidence interval can be computed."
        )
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, y.shape[0], y.shape[0])
        value = fn(y[idx], p[idx])
        if value is not None and math.isfinite(value):
            values.append(float(value))
    if not values:
        raise EvaluationError(f"the metric was undefined on all {n_boot} bootstrap resamples.")
    if len(values) < n_boot:
        logger.warning("metric undefined on %d of %d bootstrap resamples", n_boot - len(values), n_boot)
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return {
        "estimate": float(estimate),
        "ci_low": float(low),
        "ci_high": float(high),
        "alpha": float(alpha),
        "n_boot": int(n_boot),
        "n_valid": len(values),
    }

