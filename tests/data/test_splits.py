"""Splits keep groups whole, approach the asked fractions, stratify, and say how they were made."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellclass.data.labels import encode_frame, fit_encoders
from cellclass.data.prepared import prepare_data, read_split, write_split
from cellclass.data.presets import load_spec
from cellclass.data.splits import (
    RANDOM_ON_GROUPS_WARNING,
    Split,
    _represent_classes,
    choose_split_method,
    kfold,
    make_split,
)
from cellclass.errors import SplitError
from cellclass.training.config import TrainConfig


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


# -- every class with enough groups on every side ------------------------------------------
RARE = ["a", "b", "rare"]


def rare_plates(rare: tuple[int, ...], n_plates: int = 30, per_plate: int = 10, seed: int = 0):
    """Classes ``a`` and ``b`` on every plate; ``rare`` (6 rows a plate) on plates ``rare`` only."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"P{i:02d}" for i in range(n_plates)], per_plate)
    labels = rng.integers(0, 2, len(groups))
    for p in rare:
        labels[p * per_plate : p * per_plate + 6] = 2
    frame = pd.DataFrame({"_row": np.arange(1, len(groups) + 1), "plate": groups})
    return frame, labels, groups


def _groups_whole(split: Split, groups: np.ndarray) -> None:
    train, val, test = (set(groups[s]) for s in _sides(split))
    assert not train & val and not train & test and not val & test


def test_a_class_the_draw_left_off_validation_gets_a_plate_moved_from_train() -> None:
    frame, labels, groups = rare_plates((0, 1, 2, 3))
    plain = make_split(frame, labels=labels, groups=groups, group_column="plate", represent_classes=False)
    split = make_split(frame, labels=labels, groups=groups, group_column="plate", classes=RARE)
    assert 2 not in labels[plain.val] and plain.moves == []  # the plain draw leaves "rare" off validation
    assert split.moves == [{"group": "P00", "images": 10, "class_images": 6, "from": "train", "to": "val",
                            "class": "rare"}]
    assert np.array_equal(split.test, plain.test)  # the test side is the draw's
    moved = np.flatnonzero(groups == "P00")
    assert np.array_equal(split.val, np.sort(np.concatenate([plain.val, moved])))
    assert np.array_equal(split.train, np.setdiff1d(plain.train, moved))
    for side in _sides(split):
        assert set(labels[side]) == {0, 1, 2}
    _assert_partition(split, len(frame))
    _groups_whole(split, groups)
    record = split.describe(classes=RARE)
    json.dumps(record)
    assert record["moved_groups"][0]["note"] == (
        "moved plate P00 (10 images, 6 of class rare) from training to validation so rare is represented "
        "on the validation side")
    assert record["class_counts"]["val"]["rare"] == 6


def test_the_move_is_the_same_for_the_same_seed() -> None:
    frame, labels, groups = rare_plates((0, 1, 2, 3))
    a, b = (make_split(frame, labels=labels, groups=groups, seed=0, classes=RARE) for _ in range(2))
    assert all(np.array_equal(x, y) for x, y in zip(_sides(a), _sides(b), strict=True))
    assert a.moves == b.moves and a.moves


def test_test_side_gets_a_plate_only_when_it_lacks_the_class_itself() -> None:
    frame, labels, groups = rare_plates((0, 1, 2))
    plain = make_split(frame, labels=labels, groups=groups, represent_classes=False)
    split = make_split(frame, labels=labels, groups=groups, classes=RARE)
    assert 2 not in labels[plain.test]
    assert [(m["group"], m["from"], m["to"]) for m in split.moves] == [("P00", "train", "test")]
    assert np.array_equal(split.val, plain.val)  # validation already had "rare"
    for side in _sides(split):  # three plates of "rare": one on each side
        assert len(set(groups[side][labels[side] == 2])) == 1
    _groups_whole(split, groups)


@pytest.mark.parametrize("seed", range(6))
def test_multilabel_group_split_puts_every_label_with_three_groups_on_every_side(seed: int) -> None:
    frame, labels, groups = rare_plates((0, 1, 2), seed=seed)
    y = np.eye(3, dtype=np.uint8)[labels]
    split = make_split(frame, labels=y, groups=groups, seed=seed, classes=RARE)
    for side in _sides(split):
        assert (y[side].sum(axis=0) > 0).all()
    _assert_partition(split, len(frame))
    _groups_whole(split, groups)


def test_a_class_in_too_few_groups_is_left_where_it_fell_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    frame, labels, groups = rare_plates((0, 7))
    with caplog.at_level(logging.WARNING, logger="cellclass.data.splits"):
        split = make_split(frame, labels=labels, groups=groups, classes=RARE)
    assert split.moves == [] and 2 not in labels[split.val]
    assert "the validation side holds no row of rare (2 group(s)): a class needs 3 groups to be on every side" \
        in caplog.text


def test_a_class_no_group_can_leave_for_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    """"rare" is on three plates: T1 (train's only "a"), E1 (test's only "b") and E2 (test's only
    "a"). Any move would take a class off its side, so validation stays without "rare" and the
    warning says why; a validation side the split column gives is never changed."""
    groups = np.array(["T1", "T1", "T2", "V1", "V1", "E1", "E1", "E2", "E2"])
    labels = np.array([2, 0, 1, 0, 1, 2, 1, 2, 0])
    values = np.array(["train"] * 3 + ["val"] * 2 + ["test"] * 4)
    frame = pd.DataFrame({"_row": np.arange(1, 10)})
    with caplog.at_level(logging.WARNING, logger="cellclass.data.splits"):
        given = make_split(frame, labels=labels, groups=groups, method="predefined", predefined=values)
    assert given.moves == [] and given.val.tolist() == [3, 4] and caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="cellclass.data.splits"):
        again = _represent_classes(given, {"train": 3.0, "val": 2.0, "test": 4.0}, RARE)
    assert again is given
    assert caplog.messages == [("the validation side holds no row of rare: no group of it could move there "
                                "without leaving another class off its side")]


def test_a_validation_side_carved_from_predefined_train_gets_the_class_test_kept() -> None:
    frame, labels, groups = rare_plates((0, 1, 2, 3))
    values = np.where(np.isin(groups, ["P03", "P20", "P21", "P22", "P23", "P24"]), "test", "train")
    plain = make_split(frame, labels=labels, groups=groups, method="predefined", predefined=values,
                       represent_classes=False)
    split = make_split(frame, labels=labels, groups=groups, method="predefined", predefined=values, classes=RARE)
    assert 2 not in labels[plain.val]
    assert [(m["from"], m["to"], m["class"]) for m in split.moves] == [("train", "val", "rare")]
    assert np.array_equal(split.test, plain.test)
    assert 2 in labels[split.val] and 2 in labels[split.train]
    _groups_whole(split, groups)


def test_a_run_records_the_move_and_a_resumed_run_keeps_it(tmp_path: Path) -> None:
    frame, labels, groups = rare_plates((0, 1, 2, 3))
    for i in range(len(frame)):
        np.save(tmp_path / f"im{i}.npy", np.full((1, 4, 4), i % 7, dtype=np.uint8))
    manifest = tmp_path / "labels.csv"
    pd.DataFrame({"filename": [f"im{i}.npy" for i in range(len(frame))], "kind": np.array(RARE)[labels],
                  "plate": groups}).to_csv(manifest, index=False)
    spec = load_spec(manifest, image_col="filename", tasks=["kind"], groups=["plate"])
    data = prepare_data(spec, TrainConfig(image_size=4, workers=1, cache=False, tasks=["kind"]))
    record = data.describe_split()
    assert record["warning"].startswith("moved plate P00 (10 images, 6 of class rare) from training to validation")
    assert record["class_counts"]["kind"]["val"]["rare"] == 6
    write_split(tmp_path / "split.json", data)
    again = prepare_data(spec, TrainConfig(image_size=4, workers=1, cache=False, tasks=["kind"]),
                         split_override=read_split(tmp_path / "split.json"))
    assert again.split.moves == data.split.moves and again.describe_split()["warning"] == record["warning"]
    assert np.array_equal(again.split.val, data.split.val)


@pytest.mark.shared_data
def test_mitocheck_plate_split_has_every_phenotype_on_validation(shared_data: Path) -> None:
    """The default split of ``train M --image-col filename --task phenotype --group plate``: the
    draw leaves OutOfFocus (7 plates) off validation; one of its train plates moves there and
    the test side stays the draw's (813 images, 19 plates). A random split has every class on
    every side already."""
    spec = load_spec(shared_data / "mitocheck_h2b_phenotypes" / "labels.csv", image_col="filename",
                     tasks=["phenotype"], groups=["plate"])
    frame = spec.load_manifest()
    encoders = fit_encoders(spec, frame)
    y = encode_frame(spec, frame, encoders)["phenotype"]
    method, column, _ = choose_split_method(spec.groups, None, None, split_column=spec.split_column)
    config = TrainConfig()
    options = {"labels": y, "groups": frame[column].astype(str).to_numpy(), "method": method, "seed": config.seed,
               "val_fraction": config.val_fraction, "test_fraction": config.test_fraction, "group_column": column}
    plain = make_split(frame, **options, represent_classes=False)
    split = make_split(frame, **options, classes=encoders["phenotype"].classes)
    before, after = plain.describe(classes=encoders["phenotype"].classes), split.describe()
    assert before["class_counts"]["val"]["OutOfFocus"] == 0
    assert (before["sizes"], before["groups"]) == ({"train": 1986, "val": 478, "test": 813},
                                                   {"train": 39, "val": 9, "test": 19})
    assert [(m["class"], m["from"], m["to"], m["images"]) for m in split.moves] == [
        ("OutOfFocus", "train", "val", 20)]
    assert (after["sizes"], after["groups"]) == ({"train": 1966, "val": 498, "test": 813},
                                                 {"train": 38, "val": 10, "test": 19})
    assert np.array_equal(split.test, plain.test) and after["groups_overlap"] is False
    counts = split.describe(classes=encoders["phenotype"].classes)["class_counts"]
    assert len(counts["val"]) == 16 and min(min(side.values()) for side in counts.values()) > 0
    assert counts["val"]["OutOfFocus"] == 10
    row_level = make_split(frame, labels=y, method="random", seed=config.seed)  # stratified by row: no move needed
    assert row_level.moves == []
    for side in _sides(row_level):
        assert set(y[side]) == set(range(16))


def test_a_move_is_left_to_the_run_to_report_so_it_is_shown_once(caplog: pytest.LogCaptureFixture) -> None:
    frame, labels, groups = rare_plates((0, 1, 2, 3))
    with caplog.at_level(logging.DEBUG, logger="cellclass"):
        split = make_split(frame, labels=labels, groups=groups, group_column="plate", classes=RARE)
    assert split.moves  # a plate was moved, and the split carries its note for the run to log
    assert split.move_notes()[0].startswith("moved plate P00 ")
    assert "moved plate" not in caplog.text
