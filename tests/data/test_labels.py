"""Label encoders: fitted once on the whole manifest, natural class order, saved and reloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellclass.data.labels import (
    TaskEncoder,
    encode_frame,
    fit_encoder,
    fit_encoders,
    load_encoders,
    natural_key,
    save_encoders,
)
from cellclass.data.spec import TaskSpec, spec_from_manifest
from cellclass.errors import LabelError


def test_natural_order_sorts_doses_numerically() -> None:
    assert sorted(["1.0", "0.3", "0.82", "0.1", "0.0", "10"], key=natural_key) == [
        "0.0", "0.1", "0.3", "0.82", "1.0", "10"]
    assert sorted(["w10", "w2", "w1"], key=natural_key) == ["w1", "w2", "w10"]


def test_single_and_multilabel_encoding_round_trip() -> None:
    enc = fit_encoder(TaskSpec("p", ["p"]), ["b", "a", None, "b"])
    assert enc.classes == ["a", "b"]
    codes = enc.encode(["b", "a", None])
    assert codes.tolist() == [1, 0, -1]
    assert enc.decode(codes[:2]) == ["b", "a"]
    ml = fit_encoder(TaskSpec("m", ["m"], type="multilabel"), [["x", "y"], ["y"], []])
    hot = ml.encode([["x", "y"], ["y"], []])
    assert hot.dtype == np.uint8 and hot.tolist() == [[1, 1], [0, 1], [0, 0]]
    assert ml.decode(hot) == [["x", "y"], ["y"], []]


def test_declared_classes_win_and_unknown_label_is_named() -> None:
    enc = fit_encoder(TaskSpec("p", ["p"], classes=["Fe", "X-ray"]), ["X-ray"])
    assert enc.classes == ["Fe", "X-ray"]
    with pytest.raises(LabelError, match=r"unknown label 'Xray'; valid: Fe, X-ray"):
        enc.encode(["Xray"])


def test_empty_task_is_an_error() -> None:
    with pytest.raises(LabelError, match="has no label at all"):
        fit_encoder(TaskSpec("p", ["p"]), [None, None])


def test_encoders_fit_on_whole_manifest_and_survive_a_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    pd.DataFrame({"f": ["a", "b", "c"], "y": ["z", "x", "y"]}).to_csv(path, index=False)
    spec = spec_from_manifest(path, image_col="f", tasks=["y"])
    encoders = fit_encoders(spec)
    frame = spec.load_manifest()
    assert encode_frame(spec, frame.iloc[:1], encoders)["y"].tolist() == [2]
    save_encoders(tmp_path / "enc.json", encoders)
    back = load_encoders(tmp_path / "enc.json")
    assert back["y"] == TaskEncoder("y", "single", ["x", "y", "z"])


def test_encode_frame_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    pd.DataFrame({"f": ["a", "b"], "y": ["x", "q"]}).to_csv(path, index=False)
    spec = spec_from_manifest(path, image_col="f", tasks=["y"])
    encoders = {"y": TaskEncoder("y", "single", ["x"])}
    with pytest.raises(LabelError, match=r"row 2: task 'y' got unknown label 'q'"):
        encode_frame(spec, spec.load_manifest(), encoders)
