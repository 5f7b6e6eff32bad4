"""check_image: the one check of an image before a model sees it (CLI predict and the API)."""

from __future__ import annotations

import numpy as np
import pytest

from cellclass.errors import ImageReadError
from cellclass.inference.predictor import check_image


@pytest.mark.parametrize(("image", "match"), [
    (np.zeros((0, 8)), r"image 'x.npy' is empty \(shape \(1, 0, 8\)\); valid: an image with at least one pixel"),
    (np.zeros((3, 0, 4), dtype=np.uint16), r"is empty \(shape \(3, 0, 4\)\)"),
    (np.array([[1.0, np.nan], [np.inf, -np.inf]]), r"holds 1 NaN and 2 infinite pixel value\(s\) of 4; valid: finite"),
    (np.zeros((1, 2, 2, 2)), r"is an array of shape \(1, 2, 2, 2\) and dtype float64; valid: a numeric image"),
    (np.array([["a"]]), r"dtype <U1; valid: a numeric image"),
])
def test_unusable_images_are_refused_by_name(image: np.ndarray, match: str) -> None:
    with pytest.raises(ImageReadError, match=match):
        check_image(image, "image 'x.npy'")


def test_usable_images_come_back_as_chw() -> None:
    assert check_image(np.ones((5, 6), dtype=np.uint16), "x").shape == (1, 5, 6)
    image = np.ones((2, 5, 6), dtype=np.float32)
    assert check_image(image, "x") is image
