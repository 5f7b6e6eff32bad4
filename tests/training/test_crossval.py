"""Cross-validation: every row tested exactly once, groups kept whole, mean and spread, resume; the
held-out test and the ensemble of the fold models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellclass.data.prepared import prepare_data
from cellclass.data.presets import bps, hpa
from cellclass.data.spec import ROW_COLUMN
from cellclass.errors import TrainingError
from cellclass.evaluation.thresholds import tune_thresholds
from cellclass.inference.ensemble import read_ensemble_file
from cellclass.training.config import TrainConfig
from cellclass.training.crossval import cross_validate


@pytest.mark.slow
def test_group_kfold_covers_every_row_once_and_resumes(bps_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="logreg", tasks=["particle_type"], image_size=16, workers=2, tta=False)
    summary = cross_validate(bps(bps_dir), cfg, tmp_path / "cv", n_folds=3)
    tested: list[str] = []
    for k in range(3):
        split = json.loads((tmp_path / "cv" / f"fold_{k}" / "split.json").read_text())["ids"]
        plates = {side: {i.split("_")[0] for i in split[side]} for side in ("train", "val", "test")}
        assert not plates["test"] & (plates["train"] | plates["val"])
        tested += split["test"]
    assert sorted(tested) == sorted(pd.read_csv(bps_dir / "meta.csv")["filename"])
    acc = summary["tasks"]["particle_type"]["accuracy"]
    assert acc["folds"] == 3 and acc["min"] <= acc["mean"] <= acc["max"] and acc["std"] is not None
    assert (tmp_path / "cv" / "cv.json").is_file() and (tmp_path / "cv" / "cv.csv").is_file()
    assert "k-fold" in summary["split"]["method"] and summary["split"]["group"] == "plate"
    stamp = (tmp_path / "cv" / "fold_0" / "metrics.json").stat().st_mtime_ns
    again = cross_validate(bps(bps_dir), cfg, tmp_path / "cv", n_folds=3)
    assert (tmp_path / "cv" / "fold_0" / "metrics.json").stat().st_mtime_ns == stamp
    assert again["tasks"] == summary["tasks"]


@pytest.mark.slow
def test_an_ensemble_without_a_held_out_test_is_written_but_not_scored(bps_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="logreg", tasks=["particle_type"], image_size=16, workers=2, tta=False)
    summary = cross_validate(bps(bps_dir), cfg, tmp_path / "cv", n_folds=3, ensemble=True)
    block = summary["ensemble"]
    assert block["members"] == ["fold_0", "fold_1", "fold_2"] and block["test"] is None
    assert "no held-out test" in block["note"] and "--holdout" in block["note"]
    assert "holdout" not in summary and not (tmp_path / "cv" / "holdout.csv").exists()
    assert read_ensemble_file(tmp_path / "cv")["members"] == [tmp_path / "cv" / f"fold_{k}" for k in range(3)]
    assert json.loads((tmp_path / "cv" / "cv.json").read_text())["ensemble"] == block
    # a held-out test changes every fold's rows: the folds trained without one are not reused
    with pytest.raises(TrainingError, match=r"fold_0' was trained as fold 0 of another cross-validation .*; valid: "
                                            r"the settings it was made with, or a new --out"):
        cross_validate(bps(bps_dir), cfg, tmp_path / "cv", n_folds=3, holdout=True)


@pytest.mark.slow
def test_held_out_rows_are_the_train_test_side_and_multilabel_thresholds_come_from_the_folds(
        hpa_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="logreg", image_size=16, workers=2, tta=False)
    summary = cross_validate(hpa(hpa_dir), cfg, tmp_path / "cv", n_folds=3, holdout=True, ensemble=True)
    spec = hpa(hpa_dir)
    test = prepare_data(spec, cfg).split.test  # the test side `cellclass train` holds out with these settings
    held = pd.read_csv(tmp_path / "cv" / "ensemble_test" / "predictions.csv")
    assert sorted(held["row"]) == sorted(spec.load_manifest()[ROW_COLUMN].to_numpy()[test])
    assert summary["holdout"]["n_images"] == len(test)
    # the ensemble's thresholds: tuned on the fold models' predictions of their own folds, pooled
    oof = pd.concat([pd.read_csv(tmp_path / "cv" / f"fold_{k}" / "predictions.csv") for k in range(3)])
    assert not set(oof["row"]) & set(held["row"])
    classes = list(prepare_data(spec, cfg).encoders["localization"].classes)
    truth = np.array([[c in str(v).split(";") for c in classes] for v in oof["localization__true"].fillna("")])
    expected = tune_thresholds(truth.astype(np.uint8), oof[[f"localization__p__{c}" for c in classes]].to_numpy(),
                               classes=classes)
    saved = read_ensemble_file(tmp_path / "cv")
    np.testing.assert_allclose(saved["thresholds"]["localization"], expected, atol=1e-6)
    assert saved["thresholds_from"].startswith("tuned on the pooled out-of-fold predictions of the 3 fold models")
    models = summary["holdout"]["models"]
    assert set(models) == {"fold_0", "fold_1", "fold_2", "ensemble"}
    assert 0 <= models["ensemble"]["localization"]["macro_f1"] <= 1
