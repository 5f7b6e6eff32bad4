"""Fitting images to the model size without touching intensities; per-batch normalization."""

from __future__ import annotations

import numpy as np
import pytest

from cellclass.data.loading import NormalizedView, fit_image, select_channels
from cellclass.data.normalize import Normalizer
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


def test_normalized_view_matches_whole_array_normalization() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 60000, size=(10, 2, 4, 4)).astype(np.float32)
    norm = Normalizer().fit(images)
    view = NormalizedView(images, norm)
    whole = norm.transform_batch(images)
    idx = np.array([7, 2, 2, 9])
    np.testing.assert_allclose(view[idx], whole[idx])
    assert view.shape == images.shape and len(view) == 10
    np.testing.assert_allclose(view[np.array([-1, 0])], whole[[9, 0]])
    np.testing.assert_allclose(view[3:6], whole[3:6])
    np.testing.assert_allclose(view[4], whole[4:5])
    with pytest.raises(IndexError, match="out of range for 10 images"):
        view[np.array([3, 10])]


def test_materialized_view_is_the_normalized_array() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 60000, size=(11, 2, 4, 4)).astype(np.uint16)
    view = NormalizedView(images, Normalizer().fit(images))
    whole = view.materialize(chunk=4)  # chunks that do not divide the rows
    assert whole.dtype == np.float32 and whole.shape == images.shape and view.nbytes == whole.nbytes
    np.testing.assert_array_equal(whole, view[np.arange(11)])
