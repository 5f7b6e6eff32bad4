"""Field answers of a cell model: aggregations parsed and checked per task, the field's truth from its
cells, thresholds tuned on validation fields, and the metrics and table of the field level."""

from __future__ import annotations

import numpy as np
import pytest

from cellclass.data.labels import TaskEncoder
from cellclass.errors import EvaluationError
from cellclass.evaluation.fields import (
    STORED_AGGREGATIONS,
    Aggregation,
    answer_fields,
    choose_thresholds,
    evaluate_fields,
    field_column,
    field_metrics,
    field_targets,
    parse_aggregation,
    task_aggregations,
    tune_field_thresholds,
)
from cellclass.evaluation.metrics import task_metrics

MULTI = TaskEncoder(name="loc", type="multilabel", classes=["a", "b", "c"])
SINGLE = TaskEncoder(name="phase", type="single", classes=["G1", "S", "M"])


@pytest.mark.parametrize(("text", "expected"), [
    ("mean", Aggregation("mean")), ("MAX", Aggregation("max")), ("majority", Aggregation("majority")),
    ("topk", Aggregation("topk_mean", 3)), ("topk:5", Aggregation("topk_mean", 5)),
    (" topk_mean:2 ", Aggregation("topk_mean", 2)), (None, None),
])
def test_aggregations_are_parsed(text: str | None, expected: Aggregation | None) -> None:
    assert parse_aggregation(text) == expected


@pytest.mark.parametrize(("text", "match"), [
    ("median", r"aggregation 'median' is invalid; valid: mean, max, topk or topk:K \(multi-label\); majority"),
    ("topk:0", r"aggregation 'topk:0': k must be an integer >= 1; valid: e.g. topk:3"),
    ("topk:x", "k must be an integer >= 1"),
    ("mean:3", "aggregation 'mean:3' is invalid"),
])
def test_a_mistaken_aggregation_is_refused(text: str, match: str) -> None:
    with pytest.raises(EvaluationError, match=match):
        parse_aggregation(text)


def test_each_task_takes_its_default_or_a_choice_that_fits_it() -> None:
    encoders = {"loc": MULTI, "phase": SINGLE}
    assert task_aggregations(encoders, None) == {"loc": Aggregation("mean"), "phase": Aggregation("majority")}
    assert task_aggregations(encoders, Aggregation("mean")) == {"loc": Aggregation("mean"), "phase": Aggregation("mean")}
    with pytest.raises(EvaluationError, match="aggregation 'max' does not apply to task 'phase', which is "
                                              "single-label; valid for it: majority, mean"):
        task_aggregations(encoders, Aggregation("max"))
    with pytest.raises(EvaluationError, match=r"'majority' does not apply to task 'loc', which is multi-label; "
                                              r"valid for it: mean, max, topk\[:K\]"):
        task_aggregations(encoders, Aggregation("majority"))


def test_the_field_column_is_field_id_or_the_one_named() -> None:
    assert field_column(["crop", "field_id"], None) == "field_id"
    assert field_column(["crop", "well"], None) is None
    assert field_column(["crop", "well", "field_id"], "well") == "well"
    with pytest.raises(EvaluationError, match="--aggregate-by 'plate' is not a column of the dataset; valid: one "
                                              "of crop, well$"):
        field_column(["_row", "crop", "well"], "plate")


def test_cells_are_aggregated_to_fields_in_order_of_their_first_cell() -> None:
    ids = ["f2", "f1", "f2", "f1", "f1"]
    p = np.array([[0.9, 0.1, 0.2], [0.2, 0.8, 0.1], [0.7, 0.3, 0.4], [0.4, 0.6, 0.1], [0.3, 0.1, 0.9]])
    answers = answer_fields("field_id", ids, {"loc": p}, {"loc": MULTI}, {"loc": Aggregation("max")},
                            {"loc": [0.5, 0.5, 0.95]})
    assert answers.fields.tolist() == ["f2", "f1"] and answers.n_cells.tolist() == [2, 3]
    assert answers.codes.tolist() == [0, 1, 0, 1, 1]
    np.testing.assert_allclose(answers.probs["loc"], [[0.9, 0.3, 0.4], [0.4, 0.8, 0.9]])
    assert answers.labels["loc"].tolist() == [[True, False, False], [False, True, False]]  # 0.9 < its 0.95
    assert answers.decoded({"loc": MULTI})["loc"] == [["a"], ["b"]]
    assert answers.thresholds == {"loc": [0.5, 0.5, 0.95]}


def test_a_fields_truth_is_the_union_or_the_commonest_label_of_its_cells() -> None:
    codes = np.array([0, 0, 1, 1, 1])
    y_multi = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
    y_single = np.array([2, 2, 0, 1, 1])
    truth, mixed = field_targets(codes, 2, {"loc": y_multi, "phase": y_single}, {"loc": MULTI, "phase": SINGLE})
    assert truth["loc"].tolist() == [[1, 1, 0], [0, 0, 1]]
    assert truth["phase"].tolist() == [2, 1]
    assert mixed == {"loc": 1, "phase": 1}
    unlabeled, _ = field_targets(np.array([0, 1]), 2, {"phase": np.array([-1, 0])}, {"phase": SINGLE})
    assert unlabeled["phase"].tolist() == [-1, 0]


def test_single_label_metrics_score_the_majority_vote_with_its_tie_broken() -> None:
    # Field f: one cell votes G1 (p 0.6), one votes S (p 0.9): a tie the mean probability breaks for S.
    p = np.array([[0.6, 0.4, 0.0], [0.05, 0.9, 0.05]])
    answers = answer_fields("field_id", ["f", "f"], {"phase": p}, {"phase": SINGLE},
                            {"phase": Aggregation("majority")})
    assert answers.labels["phase"].tolist() == [1]
    np.testing.assert_allclose(answers.probs["phase"], [[0.5, 0.5, 0.0]])
    metrics = field_metrics({"phase": SINGLE}, answers, {"phase": np.array([1])})["phase"]
    assert metrics["accuracy"] == 1.0  # the argmax of the vote shares (G1) would score 0
    assert metrics["confusion_matrix"][1][1] == 1 and metrics["n_unlabeled_skipped"] == 0
    with pytest.raises(EvaluationError, match="predictions apply to single-label tasks"):
        task_metrics("multilabel", np.array([[1, 0, 0]]), np.array([[0.6, 0.2, 0.1]]), MULTI.classes,
                     predictions=np.array([0]))


def _validation_cells() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Six fields of four cells: class a in fields 0-2, where one cell in four is sure of it."""
    rng = np.random.default_rng(0)
    ids = np.repeat([f"v{i}" for i in range(6)], 4)
    p = rng.uniform(0.0, 0.2, (24, 3))
    y = np.zeros((24, 3), np.int64)
    for f in range(3):
        p[4 * f, 0] = 0.95
        y[4 * f:4 * f + 4, 0] = 1  # every cell inherits its field's label
    y[:, 1] = np.tile([1, 1, 1, 1], 6) * (np.repeat(np.arange(6), 4) >= 5)
    p[20:24, 1] = 0.7
    return ids, p, y


def test_field_thresholds_are_tuned_on_the_validation_fields() -> None:
    ids, p, y = _validation_cells()
    tuned = tune_field_thresholds({"loc": MULTI, "phase": SINGLE}, ids, {"loc": p, "phase": np.eye(3)[[0] * 24]},
                                  {"loc": y, "phase": np.zeros(24, np.int64)}, STORED_AGGREGATIONS, "f1")
    assert set(tuned) == {"loc"} and set(tuned["loc"]) == {"mean", "max", "topk_mean:3"}
    fields, _ = field_targets(np.repeat(np.arange(6), 4), 6, {"loc": y}, {"loc": MULTI})
    for key, method in (("max", "max"), ("mean", "mean")):
        agg = answer_fields("field_id", ids, {"loc": p}, {"loc": MULTI}, {"loc": Aggregation(method)},
                            {"loc": tuned["loc"][key]})
        assert (agg.labels["loc"][:, :2] == fields["loc"][:, :2].astype(bool)).all()  # perfect on validation
    assert tuned["loc"]["max"][0] > 0.2 and tuned["loc"]["mean"][0] < tuned["loc"]["max"][0]
    assert tuned["loc"]["mean"][2] == 0.5  # no validation field shows class c
    flat = tune_field_thresholds({"loc": MULTI}, ids, {"loc": p}, {"loc": y}, [Aggregation("mean")], "none")
    assert flat == {"loc": {"mean": [0.5, 0.5, 0.5]}}
    assert tune_field_thresholds({"phase": SINGLE}, ids, {"phase": p}, {"phase": y[:, 0]}, [Aggregation("mean")],
                                 "f1") == {}


def test_thresholds_come_from_the_validation_fields_then_the_cells_then_half() -> None:
    encoders = {"loc": MULTI, "phase": SINGLE}
    stored = {"loc": {"mean": [0.2, 0.3, 0.4]}}
    chosen, sources = choose_thresholds(encoders, task_aggregations(encoders, None), stored, {"loc": [0.6] * 3})
    assert chosen == {"loc": [0.2, 0.3, 0.4]} and set(sources) == {"loc"}
    assert sources["loc"] == "per class, tuned on the validation fields (mean of their cells)"
    chosen, sources = choose_thresholds({"loc": MULTI}, {"loc": Aggregation("topk_mean", 5)}, stored,
                                        {"loc": [0.6] * 3})
    assert chosen == {"loc": [0.6] * 3}
    assert "the run holds no field thresholds for topk_mean:5" in sources["loc"]
    chosen, sources = choose_thresholds({"loc": MULTI}, {"loc": Aggregation("max")}, {}, {})
    assert chosen == {"loc": [0.5] * 3} and "0.5 for every class" in sources["loc"]


def test_the_field_level_block_and_table() -> None:
    ids, p, y = _validation_cells()
    phase = np.zeros(24, np.int64)
    probs = {"loc": p, "phase": np.tile([0.7, 0.2, 0.1], (24, 1))}
    encoders = {"loc": MULTI, "phase": SINGLE}
    aggregations = task_aggregations(encoders, None)
    block, table = evaluate_fields(encoders, "field_id", ids, probs, {"loc": y, "phase": phase}, aggregations,
                                   {"loc": [0.5, 0.5, 0.5]}, {"loc": "fixed"}, on="test fields", side="test")
    assert block["n_fields"] == 6 and block["n_cells"] == 24 and block["on"] == "test fields"
    assert block["cells_per_field"] == {"min": 4, "median": 4.0, "max": 4}
    loc, single = block["tasks"]["loc"], block["tasks"]["phase"]
    assert loc["aggregation"] == "mean" and loc["thresholds_from"] == "fixed" and loc["n"] == 6
    assert "fixed_threshold_0.5" in loc and loc["n_fields_mixed_labels"] == 0
    assert single["aggregation"] == "majority" and single["accuracy"] == 1.0
    assert single["thresholds_from"] == "argmax (single-label task)"
    assert len(table) == 6 and table.field_id.tolist() == [f"v{i}" for i in range(6)]
    assert table.columns[:3].tolist() == ["field_id", "n_cells", "split"]
    assert table["loc__true"].tolist() == ["a", "a", "a", "", "", "b"]
    assert table["phase__pred"].tolist() == ["G1"] * 6 and (table["phase__p__G1"] == 1.0).all()


def test_no_cell_is_refused() -> None:
    with pytest.raises(EvaluationError, match="no cell to aggregate"):
        answer_fields("field_id", [], {"loc": np.zeros((0, 3))}, {"loc": MULTI}, {"loc": Aggregation("mean")})
