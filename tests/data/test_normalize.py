"""Normalization works on raw 16-bit values, round-trips through JSON, and falls back per group."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellclass.data.normalize import NormalizedView, Normalizer


def ramp(c: int = 2, size: int = 16, top: int = 60000, dtype=np.uint16) -> np.ndarray:
    """Channels of evenly spaced values from 0 to ``top`` (channel ``k`` scaled by ``k + 1``)."""
    base = np.linspace(0, top, size * size).reshape(size, size)
    return np.stack([base * (k + 1) / c for k in range(c)]).astype(dtype)


def test_uint16_values_beyond_255_map_correctly() -> None:
    image = np.zeros((1, 10, 10), dtype=np.uint16)
    image[0, :5] = 20000
    image[0, 5:] = 60000
    norm = Normalizer(low=0.0, high=100.0).fit([image])
    assert norm.low_values_.tolist() == [20000.0] and norm.high_values_.tolist() == [60000.0]
    probe = np.array([[[20000, 40000, 60000, 50000]]], dtype=np.uint16)
    out = norm.transform(probe)
    assert out.dtype == np.float32 and out.shape == (1, 1, 4)
    np.testing.assert_allclose(out[0, 0], [0.0, 0.5, 1.0, 0.75], atol=1e-6)


def test_default_percentiles_and_clip_range() -> None:
    image = ramp(c=1, size=100, top=9999)
    norm = Normalizer().fit([image], max_pixels_per_image=image[0].size)
    expected_low, expected_high = np.percentile(image.astype(np.float64), [1.0, 99.8])
    np.testing.assert_allclose(norm.low_values_, [expected_low], rtol=1e-6)
    np.testing.assert_allclose(norm.high_values_, [expected_high], rtol=1e-6)
    hot = np.array([[[0, 100, 65535]]], dtype=np.uint16)
    out = norm.transform(hot)
    np.testing.assert_allclose(
        out[0, 0, :2], (np.array([0, 100]) - expected_low) / (expected_high - expected_low),
        atol=1e-6,
    )
    assert out[0, 0, 2] == 1.5  # a hot pixel is capped at clip_range[1]
    assert Normalizer(clip=False).fit([image]).transform(hot).max() > 6


def test_statistics_are_per_channel() -> None:
    image = ramp(c=3)
    out = Normalizer(low=0, high=100).fit([image]).transform(image)
    np.testing.assert_allclose(out.min(axis=(1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(out.max(axis=(1, 2)), 1.0, atol=1e-6)


def test_round_trip_through_json_gives_equal_outputs() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 50000, (3, 32, 32)).astype(np.uint16) for _ in range(6)]
    groups = ["A", "A", "B", "B", "C", "C"]
    for mode in ("percentile", "group", "image", "none"):
        norm = Normalizer(mode=mode, clip_range=(0.0, 1.0)).fit(images, groups=groups)
        again = Normalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
        assert again == norm
        for group in ("A", "Z", None):
            np.testing.assert_array_equal(
                again.transform(images[0], group), norm.transform(images[0], group)
            )


def test_group_mode_uses_group_stats_and_global_for_unseen_groups() -> None:
    dim = np.full((1, 8, 8), 1000, dtype=np.uint16)
    dim[0, :4] = 0
    bright = dim * 10
    norm = Normalizer(mode="group", low=0, high=100).fit([dim, bright], groups=["p1", "p2"])
    assert set(norm.group_values_) == {"p1", "p2"}
    np.testing.assert_allclose(norm.transform(dim, "p1"), norm.transform(bright, "p2"))
    assert norm.transform(dim, "p1").max() == 1.0
    global_out = norm.transform(bright, "p9")
    np.testing.assert_allclose(global_out, norm.transform(bright, None))
    np.testing.assert_allclose(global_out.max(), 1.0)  # global high is the bright plate's 10000
    np.testing.assert_allclose(norm.transform(dim, "p9").max(), 0.1, rtol=1e-6)


def test_image_mode_needs_no_fit_and_uses_each_image() -> None:
    norm = Normalizer(mode="image", low=0, high=100)
    a, b = ramp(top=1000, dtype=np.float64), ramp(top=50000, dtype=np.float64)
    np.testing.assert_allclose(norm.transform(a), norm.transform(b), atol=1e-5)
    assert norm.transform(b).max() == 1.0


def test_transform_batch_matches_single_images() -> None:
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 4000, (4, 2, 8, 8)).astype(np.uint16)
    for mode, groups in (("percentile", None), ("group", ["a", "b", "a", "new"]), ("image", None)):
        norm = Normalizer(mode=mode).fit(list(batch[:3]), groups=["a", "b", "a"])
        out = norm.transform_batch(batch, groups)
        assert out.dtype == np.float32 and out.shape == batch.shape
        for i in range(4):
            group = None if groups is None else groups[i]
            np.testing.assert_allclose(out[i], norm.transform(batch[i], group), rtol=1e-6)


def test_sample_stays_bounded_and_images_stay_unchanged() -> None:
    rng = np.random.default_rng(2)
    images = [rng.normal(1000, 100, (2, 64, 64)) for _ in range(20)]
    copies = [im.copy() for im in images]
    norm = Normalizer(low=50, high=50.5).fit(iter(images), max_pixels_per_image=512, max_pixels=3000)
    np.testing.assert_allclose(norm.low_values_, 1000, atol=15)
    assert all(np.array_equal(a, b) for a, b in zip(images, copies, strict=True))


def test_errors() -> None:
    image = ramp(c=2)
    with pytest.raises(ValueError, match="mode 'plate' is invalid; valid: percentile, image, group, none"):
        Normalizer(mode="plate")
    with pytest.raises(ValueError, match="0 <= low < high <= 100; got low=99, high=1"):
        Normalizer(low=99, high=1)
    with pytest.raises(ValueError, match=r"not fitted: call fit\(\)"):
        Normalizer().transform(image)
    norm = Normalizer().fit([image])
    with pytest.raises(ValueError, match=r"image has 3 channel\(s\) but the normalizer was fitted on 2"):
        norm.transform(ramp(c=3))
    with pytest.raises(ValueError, match=r"must have shape \(C, H, W\); got shape \(16, 16\)"):
        norm.transform(image[0])
    with pytest.raises(ValueError, match="training image 1 has 3 channels; the images before it have 2"):
        Normalizer().fit([image, ramp(c=3)])
    with pytest.raises(ValueError, match="got no image"):
        Normalizer().fit([])
    with pytest.raises(ValueError, match="needs the group of every training image"):
        Normalizer(mode="group").fit([image])
    with pytest.raises(ValueError, match="got 1 groups for 2 images"):
        Normalizer(mode="group").fit([image, image], groups=["a"])
    with pytest.raises(ValueError, match=r"unknown normalizer key\(s\) \['scale'\]"):
        Normalizer.from_dict({"mode": "none", "scale": 2})


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
    some = view.rows(idx)  # rows of the view, as an array of their own
    assert len(some) == 4
    np.testing.assert_allclose(some[1:3], whole[[2, 2]])
    np.testing.assert_allclose(some[np.array([3, 0])], whole[[9, 7]])


def test_materialized_view_is_the_normalized_array() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 60000, size=(11, 2, 4, 4)).astype(np.uint16)
    view = NormalizedView(images, Normalizer().fit(images))
    whole = view.materialize(chunk=4)  # chunks that do not divide the rows
    assert whole.dtype == np.float32 and whole.shape == images.shape and view.nbytes == whole.nbytes
    np.testing.assert_array_equal(whole, view[np.arange(11)])
