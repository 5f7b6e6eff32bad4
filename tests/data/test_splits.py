"""Splits keep groups whole, approach the asked fractions, stratify, and say how they were made."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cellclass.data.splits import (
    RANDOM_ON_GROUPS_WARNING,
    Split,
    choose_split_method,
    kfold,
    make_split,
)
from cellclass.errors import SplitError


def plates(n_plates: int = 40, per_plate: int = 10, n_classes: int = 4, seed: int = 0):
    """A frame of ``n_plates`` plates; each plate holds two classes, each class many plates."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"P{i:03d}" for i in range(n_plates)], per_plate)
    labels = np.empty(len(groups), dtype=np.int64)
    for i in range(n_plates):
        pair = [i % n_classes, (i + 1) % n_classes]
        labels[i * per_plate : (i + 1) * per_plate] = rng.choice(pair, per_plate)
    frame = pd.DataFrame({"_row": np.arange(1, len(groups) + 1), "plate": groups})
    return frame, labels, groups


def _sides(split: Split) -> list[np.ndarray]:
    return [split.train, split.val, split.test]


def _assert_partition(split: Split, n: int) -> None:
    everything = np.concatenate(_sides(split))
    assert np.array_equal(np.sort(everything), np.arange(n))


@pytest.mark.parametrize("seed", range(6))
def test_group_split_never_puts_a_group_on_two_sides(seed: int) -> None:
    frame, labels, groups = plates(seed=seed)
    split = make_split(frame, labels=labels, groups=groups, method="group", seed=seed)
    _assert_partition(split, len(frame))
    train, val, test = (set(groups[s]) for s in _sides(split))
    assert not train & val and not train & test and not val & test
    assert split.describe()["groups_overlap"] is False


@pytest.mark.parametrize("seed", range(4))
def test_group_split_fractions_are_approximate(seed: int) -> None:
    frame, labels, groups = plates(n_plates=60, seed=seed)
    split = make_split(
        frame, labels=labels, groups=groups, method="group", val_fraction=0.15,
        test_fraction=0.25, seed=seed,
    )
    n = len(frame)
    assert abs(len(split.test) / n - 0.25) < 0.07
    assert abs(len(split.val) / n - 0.15) < 0.07


@pytest.mark.parametrize("seed", range(4))
def test_stratified_group_split_keeps_every_class_on_train_and_test(seed: int) -> None:
    frame, labels, groups = plates(seed=seed)
    split = make_split(frame, labels=labels, groups=groups, method="group", seed=seed)
    for side in (split.train, split.test):
        assert set(labels[side]) == {0, 1, 2, 3}


def test_group_split_without_stratification_still_keeps_groups_whole() -> None:
    frame, _, groups = plates(n_plates=3)
    split = make_split(frame, labels=None, groups=groups, method="group", seed=1)
    assert [len(set(groups[s])) for s in _sides(split)] == [1, 1, 1]


def test_zero_test_fraction_gives_an_empty_test_side() -> None:
    frame, labels, groups = plates()
    split = make_split(frame, labels=labels, groups=groups, test_fraction=0.0)
    assert len(split.test) == 0 and len(split.val) > 0
    _assert_partition(split, len(frame))


def test_describe_is_json_ready_and_complete() -> None:
    frame, labels, groups = plates()
    split = make_split(frame, labels=labels, groups=groups, seed=3, group_column="plate")
    record = split.describe(classes=["a", "b", "c", "d"])
    json.dumps(record)
    assert record["method"] == "group" and record["group_column"] == "plate"
    assert record["seed"] == 3
    assert sum(record["sizes"].values()) == len(frame)
    assert sum(record["groups"].values()) == 40
    assert record["overlapping_groups"] == 0
    assert sum(record["class_counts"]["test"].values()) == len(split.test)
    assert set(record["class_counts"]["train"]) == {"a", "b", "c", "d"}
    multi = split.describe(labels={"t": labels, "m": np.eye(4, dtype=np.uint8)[labels]})
    assert multi["class_counts"]["t"]["val"] == multi["class_counts"]["m"]["val"]


def test_random_split_of_grouped_data_records_the_overlap() -> None:
    frame, labels, groups = plates()
    split = make_split(frame, labels=labels, groups=groups, method="random")
    record = split.describe()
    assert record["method"] == "random" and record["group_column"] is None
    assert record["groups_overlap"] is True


def test_random_split_is_stratified_and_reproducible() -> None:
    frame, labels, _ = plates()
    a = make_split(frame, labels=labels, method="random", seed=5)
    b = make_split(frame, labels=labels, method="random", seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(_sides(a), _sides(b), strict=True))
    _assert_partition(a, len(frame))
    overall = np.bincount(labels) / len(labels)
    test = np.bincount(labels[a.test], minlength=4) / len(a.test)
    assert np.abs(test - overall).max() < 0.03


def test_random_split_falls_back_when_a_class_has_one_member() -> None:
    frame, labels, _ = plates()
    labels = labels.copy()
    labels[0] = 9
    split = make_split(frame, labels=labels, method="random", seed=0)
    _assert_partition(split, len(frame))


def test_multilabel_random_split_keeps_label_frequencies() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((400, 5)) < [0.5, 0.3, 0.2, 0.1, 0.05]).astype(np.uint8)
    frame = pd.DataFrame({"_row": np.arange(1, 401)})
    split = make_split(frame, labels=y, method="random", seed=0)
    _assert_partition(split, 400)
    assert abs(len(split.test) / 400 - 0.25) < 0.02
    freq = y.mean(axis=0)
    assert np.abs(y[split.test].mean(axis=0) - freq).max() < 0.03
    assert (y[split.val].sum(axis=0) > 0).all()


def test_multilabel_group_split_keeps_groups_whole() -> None:
    frame, labels, groups = plates()
    y = np.eye(4, dtype=np.uint8)[labels]
    split = make_split(frame, labels=y, groups=groups, method="group", seed=2)
    train, val, test = (set(groups[s]) for s in _sides(split))
    assert not train & val and not train & test and not val & test


def test_predefined_split_accepts_synonyms_in_any_case() -> None:
    values = np.array(["Train", "VALID", "test", " validation", "train", "val"])
    frame = pd.DataFrame({"_row": np.arange(1, 7)})
    split = make_split(frame, method="predefined", predefined=values)
    assert split.train.tolist() == [0, 4]
    assert split.val.tolist() == [1, 3, 5]
    assert split.test.tolist() == [2]
    assert split.describe()["method"] == "predefined"


def test_predefined_split_without_val_carves_it_from_train_by_group() -> None:
    frame, labels, groups = plates()
    values = np.where(np.isin(groups, ["P000", "P001", "P002", "P003"]), "test", "train")
    split = make_split(
        frame, labels=labels, groups=groups, method="predefined", predefined=values,
        group_column="plate",
    )
    assert set(groups[split.test]) == {"P000", "P001", "P002", "P003"}
    assert len(split.val) > 0
    assert not set(groups[split.val]) & set(groups[split.train])
    assert split.describe()["group_column"] == "plate"


def test_predefined_unknown_values_name_rows_and_valid_values() -> None:
    frame = pd.DataFrame({"_row": [2, 3, 4, 5]})
    with pytest.raises(SplitError, match=r"unknown value\(s\) \['holdout'\].*rows 4.*valid: train, val"):
        make_split(frame, method="predefined", predefined=np.array(["train", "test", "holdout", "val"]))
    with pytest.raises(SplitError, match="needs the split column's values"):
        make_split(frame, method="predefined")


def test_choose_split_method_rules() -> None:
    assert choose_split_method(["plate", "well"], None, None) == ("group", "plate", None)
    assert choose_split_method(["plate", "well"], "well", None) == ("group", "well", None)
    assert choose_split_method([], "site", None) == ("group", "site", None)
    assert choose_split_method([], None, None) == ("random", None, None)
    assert choose_split_method([], None, "random") == ("random", None, None)
    method, column, warning = choose_split_method(["plate"], None, "random")
    assert (method, column) == ("random", None)
    assert warning == RANDOM_ON_GROUPS_WARNING and "plate recognition" in warning
    assert choose_split_method(["plate"], None, None, split_column="split") == (
        "predefined", "plate", None)
    assert choose_split_method(["plate"], "well", None, split_column="split") == (
        "group", "well", None)
    assert choose_split_method(["plate"], None, "group", split_column="split") == (
        "group", "plate", None)


def test_choose_split_method_errors() -> None:
    with pytest.raises(SplitError, match="split method 'plates' is invalid; valid: group, random"):
        choose_split_method(["plate"], None, "plates")
    with pytest.raises(SplitError, match="contradicts --split 'random'"):
        choose_split_method(["plate"], "plate", "random")
    with pytest.raises(SplitError, match="the spec declares none"):
        choose_split_method([], None, "group")
    with pytest.raises(SplitError, match="needs the spec's 'split_column'"):
        choose_split_method(["plate"], None, "predefined")


def test_make_split_errors() -> None:
    frame, labels, groups = plates(n_plates=2)
    with pytest.raises(SplitError, match="split method 'stratified' is invalid"):
        make_split(frame, method="stratified")
    with pytest.raises(SplitError, match=r"test_fraction must be in \[0, 1\); got 1.5"):
        make_split(frame, labels=labels, test_fraction=1.5)
    with pytest.raises(SplitError, match="must leave rows to train on"):
        make_split(frame, labels=labels, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(SplitError, match="labels have 3 rows but the frame has 20"):
        make_split(frame, labels=labels[:3], method="random")
    with pytest.raises(SplitError, match="needs the group value of every row"):
        make_split(frame, labels=labels, method="group")
    with pytest.raises(SplitError, match="needs at least 3 groups; column 'plate' has 2"):
        make_split(frame, labels=labels, groups=groups, method="group", group_column="plate")


@pytest.mark.parametrize("seed", range(3))
def test_group_kfold_covers_every_row_once_without_group_overlap(seed: int) -> None:
    _, labels, groups = plates()
    folds = kfold(labels, groups, n_splits=5, seed=seed)
    assert len(folds) == 5
    tests = np.concatenate([te for _, te in folds])
    assert np.array_equal(np.sort(tests), np.arange(len(labels)))
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert len(train) + len(test) == len(labels)


def test_kfold_variants_cover_every_row_once() -> None:
    _, labels, groups = plates()
    multi = np.eye(4, dtype=np.uint8)[labels]
    for folds in (
        kfold(labels, None, n_splits=4),
        kfold(multi, None, n_splits=4),
        kfold(multi, groups, n_splits=4, multilabel=True),
        kfold(None, groups, n_splits=4),
    ):
        tests = np.concatenate([te for _, te in folds])
        assert np.array_equal(np.sort(tests), np.arange(len(labels)))
    stratified = kfold(labels, None, n_splits=4, seed=1)
    for _, test in stratified:
        assert set(labels[test]) == {0, 1, 2, 3}


def test_kfold_errors_give_the_numbers() -> None:
    _, labels, groups = plates(n_plates=3)
    with pytest.raises(SplitError, match="needs at least 5 groups; got 3 groups"):
        kfold(labels, groups, n_splits=5)
    with pytest.raises(SplitError, match="needs at least 5 rows; got 4"):
        kfold(labels[:4], None, n_splits=5)
    with pytest.raises(SplitError, match="n_splits >= 2; got 1"):
        kfold(labels, groups, n_splits=1)
    with pytest.raises(SplitError, match="needs labels or groups"):
        kfold(None, None)
