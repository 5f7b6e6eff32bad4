"""Threshold tuning on data where the best threshold is known."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cellclass.errors import EvaluationError, LabelError
from cellclass.evaluation.metrics import multilabel_metrics
from cellclass.evaluation.thresholds import apply_thresholds, tune_thresholds

# Class 0: positives at 0.3, negatives at 0.1 -> any threshold in (0.1, 0.3] is perfect,
# 0.5 predicts nothing. Class 1 has no positive and must keep 0.5.
Y = np.array([[1, 0], [1, 0], [1, 0], [0, 0], [0, 0], [0, 0], [0, 0]])
P = np.array([[0.3, 0.6], [0.3, 0.2], [0.3, 0.1], [0.1, 0.7], [0.1, 0.1], [0.1, 0.3], [0.1, 0.2]])


@pytest.mark.parametrize("grid", [None, np.linspace(0.01, 0.99, 99)])
def test_f1_threshold_lands_between_negatives_and_positives(grid) -> None:
    t = tune_thresholds(Y, P, method="f1", grid=grid)
    assert t.shape == (2,) and t.dtype == np.float64
    assert 0.1 < t[0] <= 0.3
    assert t[1] == 0.5
    tuned = multilabel_metrics(Y, P, ["a", "b"], thresholds=t)
    default = multilabel_metrics(Y, P, ["a", "b"], thresholds=0.5)
    assert tuned["per_class"]["a"]["f1"] == 1.0
    assert default["per_class"]["a"]["f1"] == 0.0


def test_f1_threshold_is_the_midpoint_of_the_gap() -> None:
    assert tune_thresholds(Y, P)[0] == pytest.approx(0.2)


def test_f1_threshold_beats_every_grid_value_on_noisy_data() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((400, 3)) < [0.1, 0.3, 0.5]).astype(int)
    p = np.clip(0.35 * y + rng.uniform(0, 0.6, y.shape), 0, 1)
    t = tune_thresholds(y, p)

    def f1_at(k: int, th: float) -> float:
        pred = p[:, k] >= th
        return 2 * np.sum(pred & (y[:, k] == 1)) / (pred.sum() + y[:, k].sum())

    for k in range(3):
        assert f1_at(k, t[k]) >= max(f1_at(k, g) for g in np.linspace(0.01, 0.99, 99)) - 1e-12


def test_prevalence_matches_positive_rate() -> None:
    rng = np.random.default_rng(1)
    y = np.zeros((200, 2), dtype=int)
    y[:60, 0] = 1  # prevalence 0.30
    y[:10, 1] = 1  # prevalence 0.05
    p = rng.random((200, 2))  # distinct values: the rate can be matched exactly
    t = tune_thresholds(y, p, method="prevalence")
    rates = apply_thresholds(p, t).mean(axis=0)
    np.testing.assert_allclose(rates, [0.30, 0.05])


def test_prevalence_with_ties_comes_as_close_as_possible() -> None:
    y = np.array([[1], [0], [0], [0]])
    p = np.array([[0.8], [0.8], [0.2], [0.1]])
    t = tune_thresholds(y, p, method="prevalence")
    # One positive is wanted but the two top scores tie: the nearest reachable rate predicts
    # the tied pair, with the threshold in the middle of the gap below it.
    assert apply_thresholds(p, t).sum() == 2
    assert t[0] == pytest.approx(0.5)


def test_apply_thresholds_per_class_and_at_least_one() -> None:
    p = np.array([[0.2, 0.4], [0.6, 0.1], [0.5, 0.5]])
    np.testing.assert_array_equal(apply_thresholds(p, 0.5), [[0, 0], [1, 0], [1, 1]])
    np.testing.assert_array_equal(apply_thresholds(p, [0.55, 0.3]), [[0, 1], [1, 0], [0, 1]])
    forced = apply_thresholds(p, 0.5, at_least_one=True)
    np.testing.assert_array_equal(forced, [[0, 1], [1, 0], [1, 1]])
    assert forced.dtype == np.int64


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: tune_thresholds(Y, P, method="youden"), EvaluationError, "valid methods are f1, prevalence"),
        (lambda: tune_thresholds(Y, P, grid=[0.2, 1.5]), EvaluationError, r"grid must be .* in \[0, 1\]"),
        (lambda: tune_thresholds(Y, P, grid=[]), EvaluationError, "grid must be a non-empty"),
        (lambda: tune_thresholds(Y[:, 0], P), EvaluationError, r"shape \(7, 2\)"),
        (lambda: tune_thresholds(Y * 3, P), LabelError, "only 0 and 1"),
        (lambda: apply_thresholds(P, [0.5, 0.5, 0.5]), EvaluationError, r"shape \(2,\), one per class"),
        (lambda: apply_thresholds(P[:, 0], 0.5), EvaluationError, "must be a 2-D array"),
    ],
)
def test_error_paths(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


def test_classes_without_a_positive_are_named_on_one_line(caplog: pytest.LogCaptureFixture) -> None:
    y = np.zeros((6, 12), dtype=int)
    y[:3, 0] = y[3:, 5] = 1  # ten of the twelve classes have no positive
    p = np.linspace(0.05, 0.95, 72).reshape(6, 12)
    names = [f"class {chr(97 + k)}" for k in range(12)]
    with caplog.at_level(logging.INFO, logger="cellclass.evaluation.thresholds"):
        tuned = tune_thresholds(y, p, classes=names)
        tune_thresholds(y, p)
    lines = [r.getMessage() for r in caplog.records if "no positive" in r.getMessage()]
    empty = [k for k in range(12) if k not in (0, 5)]
    assert lines == [
        "10 of 12 classes have no positive sample, so their thresholds stay 0.50: "
        + ", ".join(names[k] for k in empty),
        "10 of 12 classes have no positive sample, so their thresholds stay 0.50: " + ", ".join(map(str, empty)),
    ]
    assert tuned[empty].tolist() == [0.5] * 10


def test_no_line_when_every_class_has_a_positive(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cellclass.evaluation.thresholds"):
        tune_thresholds(np.eye(3, dtype=int), np.eye(3) * 0.8 + 0.1, classes=["a", "b", "c"])
    assert not [r for r in caplog.records if "no positive" in r.getMessage()]
