"""Paired comparisons: bootstrap of the difference, McNemar, aligning runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from cellclass.errors import EvaluationError
from cellclass.evaluation.compare import (
    align_predictions,
    compare_predictions,
    mcnemar,
    model_table,
    paired_bootstrap,
)
from cellclass.evaluation.metrics import multilabel_metrics


@pytest.fixture
def labels() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    good = np.where(rng.random(200) < 0.9, y, (y + 1) % 4)
    poor = np.where(rng.random(200) < 0.5, y, (y + 1) % 4)
    return y, good, poor


def test_identical_predictions_give_zero_delta(labels) -> None:
    y, good, _ = labels
    result = paired_bootstrap(y, good, good, n_boot=300)
    assert result["delta"] == 0.0
    assert result["ci_low"] <= 0.0 <= result["ci_high"]
    assert result["p_value"] == 1.0
    json.dumps(result)


@pytest.mark.parametrize("metric", ["macro_f1", "accuracy"])
def test_clearly_better_model_has_ci_excluding_zero(labels, metric: str) -> None:
    y, good, poor = labels
    result = paired_bootstrap(y, good, poor, metric=metric, n_boot=500, seed=1)
    assert result["delta"] == pytest.approx(result["metric_a"] - result["metric_b"])
    assert 0 < result["ci_low"] < result["delta"] < result["ci_high"]
    assert result["p_value"] < 0.01
    swapped = paired_bootstrap(y, poor, good, metric=metric, n_boot=500, seed=1)
    assert swapped["ci_high"] < 0


def test_paired_bootstrap_accepts_class_names_and_is_reproducible(labels) -> None:
    y, good, poor = labels
    names = np.array(["G1", "S", "G2", "M"])
    by_name = paired_bootstrap(names[y], names[good], names[poor], n_boot=200, seed=4)
    by_index = paired_bootstrap(y, good, poor, n_boot=200, seed=4)
    assert by_name == by_index


def test_mcnemar_exact_by_hand() -> None:
    # 3 images only A gets right, 10 only B gets right, 7 both right: exact test.
    y = np.zeros(20, dtype=int)
    a = np.array([0] * 3 + [1] * 10 + [0] * 7)
    b = np.array([1] * 3 + [0] * 10 + [0] * 7)
    result = mcnemar(y, a, b)
    assert (result["b"], result["c"], result["method"]) == (3, 10, "exact")
    assert result["statistic"] == 3.0
    # two-sided: 2 * P(X <= 3), X ~ Binomial(13, 1/2)
    expected = 2 * sum(math.comb(13, i) for i in range(4)) / 2**13
    assert result["p_value"] == pytest.approx(expected)


def test_mcnemar_chi_square_by_hand() -> None:
    y = np.zeros(50, dtype=int)
    a = np.array([0] * 30 + [1] * 10 + [0] * 10)
    b = np.array([1] * 30 + [0] * 10 + [0] * 10)
    result = mcnemar(y, a, b)
    assert (result["b"], result["c"], result["method"]) == (30, 10, "chi2")
    assert result["statistic"] == pytest.approx((20 - 1) ** 2 / 40)
    # chi-square with 1 degree of freedom: P(X > s) = erfc(sqrt(s / 2))
    assert result["p_value"] == pytest.approx(math.erfc(math.sqrt(9.025 / 2)))


def test_mcnemar_without_discordant_images() -> None:
    y = np.array([0, 1, 1])
    result = mcnemar(y, y, y)
    assert result == {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0, "method": "exact"}


def frame(ids, y, pred) -> pd.DataFrame:
    return pd.DataFrame({"image": ids, "y_true": y, "y_pred": pred})


def test_align_joins_on_image_ids_in_any_order(labels) -> None:
    y, good, poor = labels
    ids = np.array([f"img_{i:03d}" for i in range(len(y))])
    shuffled = np.random.default_rng(2).permutation(len(y))
    frames = {"cnn": frame(ids, y, good), "logreg": frame(ids[shuffled], y[shuffled], poor[shuffled])}
    aligned = align_predictions(frames)
    assert list(aligned.columns) == ["image", "y_true", "cnn", "logreg"]
    assert len(aligned) == len(y)
    order = np.argsort(ids)
    np.testing.assert_array_equal(aligned["logreg"].to_numpy(), poor[order])


def test_compare_predictions_table(labels) -> None:
    y, good, poor = labels
    ids = np.arange(len(y))
    frames = {"cnn": frame(ids, y, good), "mlp": frame(ids[::-1], y[::-1], poor[::-1]), "same": frame(ids, y, good)}
    table = compare_predictions(frames, n_boot=200)
    assert list(zip(table["model_a"], table["model_b"], strict=True)) == [("cnn", "mlp"), ("cnn", "same"), ("mlp", "same")]
    first = table.iloc[0]
    assert first["ci_low"] > 0 and first["mcnemar_p_value"] < 0.01
    assert table.iloc[1]["delta"] == 0.0
    direct = paired_bootstrap(y, good, poor, n_boot=200)
    assert first["delta"] == pytest.approx(direct["delta"])


def test_model_table_feeds_plot_comparison(labels, tmp_path) -> None:
    from cellclass.evaluation.plots import plot_comparison

    y, good, poor = labels
    ids = np.arange(len(y))
    table = model_table({"cnn": frame(ids, y, good), "mlp": frame(ids, y, poor)}, n_boot=200)
    assert list(table.columns) == ["model", "n", "accuracy", "accuracy_ci_low", "accuracy_ci_high",
                                   "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high"]
    assert table.loc[0, "accuracy"] == pytest.approx(np.mean(good == y))
    assert (table["accuracy_ci_low"] <= table["accuracy"]).all()
    assert plot_comparison(table, "macro_f1", tmp_path / "cmp.png").stat().st_size > 1024


def test_different_test_sets_are_refused_with_counts() -> None:
    frames = {
        "a": frame(["x1", "x2", "x3", "x4"], [0, 1, 0, 1], [0, 1, 1, 1]),
        "b": frame(["x1", "x2", "x5"], [0, 1, 0], [0, 0, 0]),
    }
    with pytest.raises(EvaluationError, match=r"different test sets: 3 images differ \(2 only in 'a', 1 only in 'b'"):
        compare_predictions(frames)


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ({"a": frame([1, 2], [0, 1], [0, 1])}, "at least two runs; received 1"),
        ({"a": frame([1, 2], [0, 1], [0, 1]), "b": pd.DataFrame({"image": [1, 2], "y_true": [0, 1]})}, r"run 'b' lack columns \['y_pred'\]"),
        ({"a": frame([1, 1], [0, 1], [0, 1]), "b": frame([1, 2], [0, 1], [0, 1])}, "run 'a' list 1 image ids more than once"),
        ({"a": frame([1, 2], [0, 1], [0, 1]), "b": frame([1, 2], [0, 0], [0, 1])}, "different true labels for 1 images"),
    ],
)
def test_compare_predictions_errors(frames, match: str) -> None:
    with pytest.raises(EvaluationError, match=match):
        compare_predictions(frames, n_boot=10)


def test_align_requires_runs() -> None:
    with pytest.raises(EvaluationError, match="no runs given"):
        align_predictions({})


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: paired_bootstrap([0, 1], [0, 1], [0, 1], metric="auc"), "valid metric names are accuracy, macro_f1"),
        (lambda: paired_bootstrap([0, 1], [0, 1], [0, 1], n_boot=0), "n_boot must be a positive integer"),
        (lambda: paired_bootstrap([0, 1], [0, 1], [0, 1], alpha=0), "alpha must lie strictly between 0 and 1"),
        (lambda: paired_bootstrap([0, 1], [0, 1, 1], [0, 1]), "must have the same shape"),
        (lambda: mcnemar([], [], []), "no samples to compare"),
        (lambda: model_table({"a": frame([1], [0], [0])}, metrics=("roc_auc",)), "Unknown metric 'roc_auc'"),
    ],
)
def test_argument_errors(call, match: str) -> None:
    with pytest.raises(EvaluationError, match=match):
        call()


def test_multilabel_runs_are_compared_on_their_label_sets() -> None:
    rng = np.random.default_rng(1)
    classes = ["x", "y", "z"]
    y = rng.integers(0, 2, (60, 3))
    good = np.where(rng.random((60, 3)) < 0.9, y, 1 - y)
    poor = np.where(rng.random((60, 3)) < 0.6, y, 1 - y)

    def sets(m: np.ndarray) -> list[str]:  # as predictions.csv writes them
        return [";".join(c for c, on in zip(classes, row, strict=True) if on) for row in m]

    frames = {"good": frame(np.arange(60), sets(y), sets(good)), "poor": frame(np.arange(60), sets(y), sets(poor))}
    table = model_table(frames, n_boot=100, label_sets=classes)
    for name, pred in (("good", good), ("poor", poor)):
        direct = multilabel_metrics(y, pred.astype(float), classes)
        row = table.set_index("model").loc[name]
        assert row["macro_f1"] == pytest.approx(direct["macro_f1"])
        assert row["accuracy"] == pytest.approx(direct["subset_accuracy"])
    pair = compare_predictions(frames, n_boot=100, label_sets=classes).iloc[0]
    assert pair["delta"] == pytest.approx(table.loc[0, "macro_f1"] - table.loc[1, "macro_f1"])
    assert pair["mcnemar_b"] == int(np.sum(np.all(good == y, axis=1) & ~np.all(poor == y, axis=1)))
    frames["poor"].loc[0, "y_pred"] = "x;w"
    with pytest.raises(EvaluationError, match=r"label 'w' \(in 'x;w'\) is not one of the task's classes"):
        model_table(frames, n_boot=10, label_sets=classes)
