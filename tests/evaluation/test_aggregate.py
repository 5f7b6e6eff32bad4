"""Per-cell probabilities aggregated to their fields, on hand-made cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellclass.errors import EvaluationError
from cellclass.evaluation.aggregate import aggregate_frame, aggregate_multilabel, aggregate_single

# Field "b" has three cells, field "a" two; "b" comes first.
IDS = np.array(["b", "a", "b", "a", "b"])
PROBA = np.array([
    [0.9, 0.1],
    [0.2, 0.4],
    [0.1, 0.2],
    [0.6, 0.0],
    [0.5, 0.3],
])


def test_multilabel_mean_max_in_order_of_first_cell() -> None:
    mean = aggregate_multilabel(IDS, PROBA, method="mean")
    assert mean.fields.tolist() == ["b", "a"]
    assert mean.n_cells.tolist() == [3, 2]
    np.testing.assert_allclose(mean.proba, [[0.5, 0.2], [0.4, 0.2]])
    assert mean.labels.tolist() == [[True, False], [False, False]]

    most = aggregate_multilabel(IDS, PROBA, method="max")
    np.testing.assert_allclose(most.proba, [[0.9, 0.3], [0.6, 0.4]])
    assert most.labels.tolist() == [[True, False], [True, False]]


def test_topk_mean_lies_between_mean_and_max_and_caps_k_at_the_cells() -> None:
    top2 = aggregate_multilabel(IDS, PROBA, method="topk_mean", k=2)
    # b: class 0 -> (0.9 + 0.5) / 2, class 1 -> (0.3 + 0.2) / 2; a has only two cells: its mean
    np.testing.assert_allclose(top2.proba, [[0.7, 0.25], [0.4, 0.2]])
    top1 = aggregate_multilabel(IDS, PROBA, method="topk_mean", k=1)
    np.testing.assert_allclose(top1.proba, aggregate_multilabel(IDS, PROBA, method="max").proba)
    top9 = aggregate_multilabel(IDS, PROBA, method="topk_mean", k=9)
    np.testing.assert_allclose(top9.proba, aggregate_multilabel(IDS, PROBA, method="mean").proba)


def test_topk_mean_matches_a_sort_per_field_on_random_cells() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 7, 200)
    proba = rng.random((200, 4))
    result = aggregate_multilabel(ids, proba, method="topk_mean", k=5)
    for f, row in zip(result.fields, result.proba):
        own = proba[ids == f]
        expected = np.sort(own, axis=0)[::-1][:5].mean(axis=0)
        np.testing.assert_allclose(row, expected)


def test_per_class_thresholds() -> None:
    result = aggregate_multilabel(IDS, PROBA, method="mean", thresholds=[0.45, 0.2])
    assert result.labels.tolist() == [[True, True], [False, True]]


def test_single_majority_and_mean() -> None:
    # b's cells vote 0, 1, 0 -> class 0 with 2/3; a's vote 1, 0 -> tie, broken by mean (0.4 vs 0.2)
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.6, 0.4], [0.7, 0.3]])
    majority = aggregate_single(IDS, proba, method="majority")
    np.testing.assert_allclose(majority.proba, [[2 / 3, 1 / 3], [0.5, 0.5]])
    assert majority.labels.tolist() == [0, 1]
    mean = aggregate_single(IDS, proba, method="mean")
    np.testing.assert_allclose(mean.proba, [[2 / 3, 1 / 3], [0.4, 0.6]])
    assert mean.labels.tolist() == [0, 1]


def test_majority_can_disagree_with_mean() -> None:
    # two lukewarm votes for 0 against one confident vote for 1
    proba = np.array([[0.55, 0.45], [0.55, 0.45], [0.0, 1.0]])
    ids = ["f", "f", "f"]
    assert aggregate_single(ids, proba, method="majority").labels.tolist() == [0]
    assert aggregate_single(ids, proba, method="mean").labels.tolist() == [1]


def test_frame_multilabel_and_single() -> None:
    cells = pd.DataFrame({"field_id": IDS, "p_nucleus": PROBA[:, 0], "p_cytosol": PROBA[:, 1]})
    table = aggregate_frame(cells, ["p_nucleus", "p_cytosol"], method="max")
    assert table.columns.tolist() == ["field_id", "n_cells", "p_nucleus", "p_cytosol", "p_nucleus_label",
                                      "p_cytosol_label"]
    assert table["field_id"].tolist() == ["b", "a"]
    np.testing.assert_allclose(table["p_nucleus"], [0.9, 0.6])
    assert table["p_nucleus_label"].tolist() == [True, True]
    single = aggregate_frame(cells.assign(p_cytosol=1 - cells.p_nucleus), ["p_nucleus", "p_cytosol"],
                             task_type="single")
    assert single["label"].tolist() == ["p_nucleus", "p_cytosol"]


@pytest.mark.parametrize(("call", "match"), [
    (lambda: aggregate_multilabel(IDS, PROBA, method="median"), "multi-label aggregation 'median' is invalid"),
    (lambda: aggregate_single(IDS, PROBA, method="max"), "single-label aggregation 'max' is invalid"),
    (lambda: aggregate_multilabel(IDS, PROBA, method="topk_mean", k=0), "k must be an integer >= 1"),
    (lambda: aggregate_multilabel(IDS[:3], PROBA), "one field per cell: 5 cells"),
    (lambda: aggregate_multilabel(IDS, PROBA * 2), r"\[0, 1\]"),
    (lambda: aggregate_multilabel(IDS, PROBA, thresholds=[0.5, 0.5, 0.5]), "one per class \\(2\\)"),
    (lambda: aggregate_multilabel(IDS, PROBA, thresholds=1.5), r"thresholds must lie in \[0, 1\]"),
    (lambda: aggregate_single(np.array(["a", None, "b", "a", "b"], dtype=object), PROBA), "missing value"),
    (lambda: aggregate_frame(pd.DataFrame({"f": IDS}), ["p"], field_column="f"), "no column\\(s\\) 'p'"),
    (lambda: aggregate_frame(pd.DataFrame({"field_id": IDS, "p": PROBA[:, 0]}), ["p"], task_type="regression"),
     "task type 'regression' is invalid"),
])
def test_errors(call, match: str) -> None:
    with pytest.raises(EvaluationError, match=match):
        call()
