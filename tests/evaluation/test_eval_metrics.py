"""Metrics checked against small hand-computed examples."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    hamming_loss,
    jaccard_score,
    log_loss,
    roc_auc_score,
)

from cellclass.errors import CellclassError, EvaluationError, LabelError
from cellclass.evaluation.metrics import (
    accuracy,
    binary_metrics,
    bootstrap_ci,
    calibration_bins,
    expected_calibration_error,
    macro_f1,
    multilabel_metrics,
    single_label_metrics,
    task_metrics,
)

CLASSES = ["a", "b", "c"]
# 6 samples, 3 classes; argmax predictions are [0, 1, 1, 1, 2, 0].
Y = np.array([0, 0, 1, 1, 2, 2])
P = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.4, 0.5, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.6, 0.2],
        [0.1, 0.1, 0.8],
        [0.5, 0.2, 0.3],
    ]
)


def test_single_label_matches_hand_computation() -> None:
    m = single_label_metrics(Y, P, CLASSES)
    assert m["n"] == 6
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["micro_f1"] == pytest.approx(4 / 6)
    # precision [1/2, 2/3, 1], recall [1/2, 1, 1/2], F1 [1/2, 4/5, 2/3]
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert m["per_class"]["c"]["precision"] == pytest.approx(1.0)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx(m["macro_f1"])  # equal supports
    assert m["macro_precision"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["macro_recall"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.7, 0.4, 0.8, 0.6, 0.8, 0.3])))
    assert m["log_loss"] == pytest.approx(log_loss(Y, P))
    # confidences .7 .5 .8 .6 .8 .5 fall in four bins: gaps .3, .5 (x2), .2 (x2), .4
    assert m["ece"] == pytest.approx((0.3 + 2 * 0.5 + 2 * 0.2 + 0.4) / 6)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(Y, P, multi_class="ovr", average="macro"))
    expected_map = np.mean([average_precision_score(Y == k, P[:, k]) for k in range(3)])
    assert m["map"] == pytest.approx(expected_map)


def test_single_label_agrees_with_sklearn_on_random_data() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 200)
    p = rng.dirichlet(np.ones(5), 200)
    m = single_label_metrics(y, p, list("vwxyz"))
    pred = p.argmax(axis=1)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert m["ece"] == pytest.approx(expected_calibration_error(y, p))


def test_absent_class_is_reported_but_left_out_of_macro_averages() -> None:
    p4 = np.hstack([P, np.zeros((6, 1))])
    m = single_label_metrics(Y, p4, CLASSES + ["d"])
    reference = single_label_metrics(Y, P, CLASSES)
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx(reference["macro_f1"])
    assert m["roc_auc"] == pytest.approx(reference["roc_auc"])
    assert len(m["confusion_matrix"]) == 4 and all(len(r) == 4 for r in m["confusion_matrix"])


def test_class_predicted_but_absent_counts_against_macro_f1() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.1, 0.0], [0.1, 0.1, 0.8], [0.1, 0.9, 0.0], [0.2, 0.8, 0.0]])
    m = single_label_metrics(y, p, CLASSES)
    # F1: a = 2/3, b = 1, c = 0 (predicted once, never true)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["macro_f1"] == pytest.approx(f1_score(y, p.argmax(axis=1), average="macro"))


def test_single_class_present_gives_none_auc_and_json() -> None:
    m = single_label_metrics(np.zeros(3, dtype=int), P[:3], CLASSES)
    assert m["roc_auc"] is None
    json.dumps(m, allow_nan=False)


def test_metric_dicts_are_json_serialisable() -> None:
    y_ml = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    for m in (
        single_label_metrics(Y, P.astype(np.float32), CLASSES),
        binary_metrics(np.array([0, 1, 1]), np.array([0.2, 0.7, 0.4]), ["neg", "pos"]),
        multilabel_metrics(y_ml, np.full((4, 3), 0.6, dtype=np.float32), CLASSES, np.float32(0.5)),
        task_metrics("single", Y, P, CLASSES),
    ):
        text = json.dumps(m, allow_nan=False)
        assert json.loads(text) == m


def test_binary_metrics_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.9])
    m = binary_metrics(y, p1, ["neg", "pos"])
    assert (m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5)
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["positive_class"] == "pos"
    low = binary_metrics(y, np.stack([1 - p1, p1], axis=1), ["neg", "pos"], threshold=0.35)
    assert low["precision"] == pytest.approx(2 / 3)
    assert low["recall"] == 1.0
    assert low["f1"] == pytest.approx(0.8)
    assert low["confusion_matrix"] == [[1, 1], [0, 2]]


Y_ML = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
PRED_ML = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 0]])


def test_multilabel_matches_hand_computation() -> None:
    rng = np.random.default_rng(0)
    proba = np.where(PRED_ML == 1, 0.7, 0.3) + rng.uniform(-0.1, 0.1, PRED_ML.shape)
    m = multilabel_metrics(Y_ML, proba, CLASSES)
    assert m["hamming_loss"] == pytest.approx(2 / 12)
    assert m["subset_accuracy"] == pytest.approx(0.5)
    assert m["jaccard_samples"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)
    assert m["samples_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1 + 1) / 4)
    assert m["macro_f1"] == pytest.approx(2 / 3)
    assert m["micro_f1"] == pytest.approx(0.8)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "threshold": 0.5}
    assert m["thresholds"] == [0.5, 0.5, 0.5]
    # cross-checks against scikit-learn
    assert m["hamming_loss"] == pytest.approx(hamming_loss(Y_ML, PRED_ML))
    assert m["jaccard_samples"] == pytest.approx(jaccard_score(Y_ML, PRED_ML, average="samples", zero_division=1))
    assert m["macro_roc_auc"] == pytest.approx(roc_auc_score(Y_ML, proba, average="macro"))
    assert m["micro_roc_auc"] == pytest.approx(roc_auc_score(Y_ML, proba, average="micro"))


def test_multilabel_per_class_thresholds_change_predictions() -> None:
    proba = np.array([[0.9, 0.2, 0.3], [0.1, 0.8, 0.1], [0.7, 0.6, 0.2], [0.2, 0.1, 0.25]])
    m = multilabel_metrics(Y_ML, proba, CLASSES, thresholds=np.array([0.5, 0.5, 0.28]))
    assert m["per_class"]["c"]["f1"] == 1.0
    assert m["subset_accuracy"] == 1.0 and m["hamming_loss"] == 0.0
    assert m["thresholds"] == [0.5, 0.5, 0.28]


def test_multilabel_class_without_positives_has_no_auc() -> None:
    y = np.array([[1, 0], [0, 0], [1, 0]])
    m = multilabel_metrics(y, np.full((3, 2), 0.2), ["a", "b"])
    assert m["macro_roc_auc"] == pytest.approx(0.5)  # only class a counts
    assert m["per_class"]["b"]["support"] == 0
    json.dumps(m, allow_nan=False)


def test_task_metrics_dispatches() -> None:
    assert task_metrics("single", Y, P, CLASSES)["task_type"] == "single"
    binary = task_metrics("binary", np.array([0, 1]), np.array([0.3, 0.6]), ["n", "p"], thresholds=np.array([0.7]))
    assert binary["threshold"] == 0.7 and binary["recall"] == 0.0
    ml = task_metrics("multilabel", Y_ML, np.full((4, 3), 0.6), CLASSES)
    assert ml["thresholds"] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: task_metrics("regression", Y, P, CLASSES), EvaluationError, "valid task types are single, binary, multilabel"),
        (lambda: task_metrics("single", Y, P, CLASSES, thresholds=0.3), EvaluationError, "thresholds apply to binary"),
        (lambda: task_metrics("binary", [0, 1], [0.2, 0.9], ["n", "p"], thresholds=[0.2, 0.3]), EvaluationError, "one threshold"),
        (lambda: single_label_metrics(Y, P, ["a", "b"]), EvaluationError, "classes has 2 names but proba has 3 columns"),
        (lambda: single_label_metrics(Y[:5], P, CLASSES), EvaluationError, "y_true has 5 samples but proba has 6"),
        (lambda: single_label_metrics(np.array([0, 1, 2, 3, 0, 1]), P, CLASSES), LabelError, r"outside range\(0, 3\): \[3\]"),
        (lambda: single_label_metrics(np.array([0, 1, 2, 0, 1, -1]), P, CLASSES), LabelError, "outside range"),
        (lambda: single_label_metrics(np.array(list("abcabc")), P, CLASSES), LabelError, "integer class indices"),
        (lambda: single_label_metrics(Y, P * 3 - 1, CLASSES), EvaluationError, "apply softmax or sigmoid"),
        (lambda: single_label_metrics(Y, np.full((6, 3), np.nan), CLASSES), EvaluationError, "18 NaN or infinite"),
        (lambda: single_label_metrics(Y, P[:, 0], CLASSES), EvaluationError, r"received shape \(6,\)"),
        (lambda: multilabel_metrics(Y_ML * 2, np.full((4, 3), 0.5), CLASSES), LabelError, "only 0 and 1"),
        (lambda: multilabel_metrics(Y_ML, np.full((4, 3), 0.5), CLASSES, [0.5, 0.5]), EvaluationError, r"shape \(3,\)"),
        (lambda: multilabel_metrics(Y_ML, np.full((4, 3), 0.5), CLASSES, 1.5), EvaluationError, r"in \[0, 1\]"),
        (lambda: binary_metrics([0, 1], np.full((2, 3), 0.3), ["n", "p"]), EvaluationError, r"shape \(N, 2\)"),
        (lambda: calibration_bins([0.5], [1], n_bins=0), EvaluationError, "n_bins must be a positive integer"),
        (lambda: macro_f1([0, 1], [0, 1, 1]), EvaluationError, "same shape"),
    ],
)
def test_error_paths(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


def test_errors_are_cellclass_errors() -> None:
    with pytest.raises(CellclassError):
        task_metrics("nope", Y, P, CLASSES)


def test_label_metrics() -> None:
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    assert macro_f1([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(f1_score([0, 1, 2, 2], [0, 1, 1, 2], average="macro"))
    assert accuracy(Y_ML, PRED_ML) == 0.5
    assert macro_f1(Y_ML, PRED_ML) == pytest.approx(2 / 3)


def test_bootstrap_ci_is_reproducible_and_brackets_estimate() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.integers(0, 3, 300))
    first = bootstrap_ci("accuracy", y, pred, n_boot=300, seed=5)
    assert first == bootstrap_ci(accuracy, y, pred, n_boot=300, seed=5)
    assert first["estimate"] == pytest.approx(np.mean(y == pred))
    assert first["ci_low"] < first["estimate"] < first["ci_high"]
    assert first["n_valid"] == 300
    json.dumps(first)


def test_bootstrap_ci_skips_resamples_where_metric_is_undefined() -> None:
    y = np.array([0, 0, 0, 0, 0, 1])
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9])

    def auc(yt, s):
        return roc_auc_score(yt, s) if 0 < yt.sum() < len(yt) else None

    ci = bootstrap_ci(auc, y, score, n_boot=200, seed=0)
    assert ci["estimate"] == 1.0
    assert 0 < ci["n_valid"] < 200


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_boot": 0}, "n_boot must be a positive integer"),
        ({"alpha": 1.5}, "alpha must lie strictly between 0 and 1"),
        ({"metric_fn": "auc"}, "valid metric names are accuracy, macro_f1"),
        ({"metric_fn": lambda y, p: math.nan}, "undefined on the full data"),
        ({"pred": np.zeros(4)}, "same, non-zero number of rows"),
    ],
)
def test_bootstrap_ci_errors(kwargs, match) -> None:
    args = {"metric_fn": "accuracy", "y_true": np.zeros(5), "pred": np.zeros(5)} | kwargs
    with pytest.raises(EvaluationError, match=match):
        bootstrap_ci(**args)


def test_bootstrap_ci_refuses_when_every_resample_is_undefined() -> None:
    calls = iter(range(10**6))

    def defined_once(yt, p):
        return 1.0 if next(calls) == 0 else None

    with pytest.raises(EvaluationError, match="undefined on all 20 bootstrap resamples"):
        bootstrap_ci(defined_once, np.zeros(4), np.zeros(4), n_boot=20)


def test_float_labels_with_integer_values_are_accepted() -> None:
    assert single_label_metrics(Y.astype(float), P, CLASSES) == single_label_metrics(Y, P, CLASSES)
