"""The data layer's user-facing errors are CellclassErrors (one line in the CLI), still ValueErrors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellclass.data.augment import AugmentConfig
from cellclass.data.batches import BatchLoader
from cellclass.data.io import write_png, write_tiff
from cellclass.data.normalize import Normalizer
from cellclass.errors import CellclassError, ConfigError, ImageWriteError, NormalizationError


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda: AugmentConfig(intensity_scale=-1), ConfigError, "intensity_scale and intensity_shift must be >= 0"),
    (lambda: AugmentConfig(crop_scale=(0.9, 0.2)), ConfigError, r"crop_scale must be \(low, high\)"),
    (lambda: AugmentConfig.from_dict({"flips": True}), ConfigError, r"unknown augmentation option\(s\) \['flips'\]"),
    (lambda: Normalizer(low=99.9, high=1), ConfigError, "percentiles must satisfy 0 <= low < high <= 100"),
    (lambda: Normalizer(mode="zscore"), ConfigError, "normalization mode 'zscore' is invalid"),
    (lambda: Normalizer.from_dict({"scale": 1}), ConfigError, r"unknown normalizer key\(s\) \['scale'\]"),
    (lambda: Normalizer().fit([]), NormalizationError, "Normalizer.fit got no image"),
    (lambda: Normalizer().fit([np.ones((1, 4, 4)), np.ones((2, 4, 4))]), NormalizationError,
     "training image 1 has 2 channels; the images before it have 1"),
    (lambda: Normalizer().transform(np.ones((1, 4, 4))), NormalizationError, "is not fitted"),
    (lambda: BatchLoader(np.zeros((2, 1, 4, 4), np.float32), batch_size=1, workers=-1), ConfigError,
     "loader workers = -1 is invalid; valid: an integer >= 0"),
])
def test_settings_and_data_errors(make: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match) as info:
        make()
    assert isinstance(info.value, CellclassError) and isinstance(info.value, ValueError)


def test_writers_refuse_what_the_format_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ImageWriteError, match="write_png cannot store dtype float32"):
        write_png(tmp_path / "a.png", np.ones((1, 4, 4), dtype=np.float32))
    with pytest.raises(ImageWriteError, match=r"write_png cannot store 2 channels"):
        write_png(tmp_path / "a.png", np.ones((2, 4, 4), dtype=np.uint8))
    with pytest.raises(ImageWriteError, match=r"needs an array of shape \(C, H, W\) or \(H, W\)"):
        write_tiff(tmp_path / "a.tif", np.ones((1, 1, 4, 4), dtype=np.uint8))
    assert not list(tmp_path.iterdir())
