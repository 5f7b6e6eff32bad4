"""Cross-validation: every row tested exactly once, groups kept whole, mean and spread, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cellclass.data.presets import bps
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
