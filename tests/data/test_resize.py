"""Fitting images to the model size without touching intensities."""

from __future__ import annotations

import numpy as np
import pytest

from cellclass.data.resize import fit_image, select_channels
from cellclass.errors import SpecError


def test_fit_keeps_16_bit_intensities() -> None:
    image = np.full((1, 10, 10), 40000, dtype=np.uint16)
    out = fit_image(image, 10)
    assert out.dtype == np.float32 and float(out.max()) == 40000.0
    assert fit_image(image, 5).max() == pytest.approx(40000.0)


def test_pad_keeps_aspect_ratio_crop_takes_the_centre() -> None:
    image = np.zeros((1, 4, 8), dtype=np.uint16)
    image[:, :, 3:5] = 100
    padded = fit_image(image, 8, "pad")
    assert padded.shape == (1, 8, 8) and padded[0, 0, 0] == 0 and padded[0, 4, 4] == 100
    cropped = fit_image(np.arange(36, dtype=np.uint16).reshape(1, 6, 6), 2, "crop")
    assert cropped[0].tolist() == [[14, 15], [20, 21]]
    with pytest.raises(SpecError, match="fit mode 'zoom' is invalid; valid: pad, resize, crop"):
        fit_image(image, 8, "zoom")


def test_select_channels() -> None:
    image = np.arange(3 * 4).reshape(3, 2, 2)
    assert select_channels(image, [2, 0])[:, 0, 0].tolist() == [8, 0]
    with pytest.raises(SpecError, match=r"channel index\(es\) \[5\] out of range for an image with 3 channels"):
        select_channels(image, [5])
