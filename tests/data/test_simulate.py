"""Tests of the BPS and HPA simulators: layout, dtype, determinism and learnable signal."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from cellclass.data.simulate import (
    BPS_CONDITIONS,
    BPS_FILENAME_REGEX,
    HPA_CHANNELS,
    HPA_CLASSES,
    HPA_RENDERED_CLASSES,
    expected_foci,
    simulate_bps,
    simulate_hpa,
)
from cellclass.errors import CellclassError, SimulationError

REAL_PLATES = {
    ("Fe", 0.0, 4): "P244", ("Fe", 0.0, 24): "P250", ("Fe", 0.0, 48): "P253",
    ("Fe", 0.3, 4): "P243", ("Fe", 0.3, 24): "P249",
    ("Fe", 0.82, 4): "P242", ("Fe", 0.82, 24): "P248", ("Fe", 0.82, 48): "P251",
    ("X-ray", 0.0, 4): "P278", ("X-ray", 0.0, 24): "P282", ("X-ray", 0.0, 48): "P286",
    ("X-ray", 0.1, 4): "P279", ("X-ray", 0.1, 24): "P283", ("X-ray", 0.1, 48): "P287",
    ("X-ray", 1.0, 4): "P280", ("X-ray", 1.0, 24): "P284", ("X-ray", 1.0, 48): "P288",
}
NUCLEAR = {0, 1, 2, 4, 5}
CYTOPLASMIC = {6, 7, 14, 21, 23, 25}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _condition(row: dict[str, str]) -> tuple[str, float, int]:
    return row["particle_type"], float(row["dose_Gy"]), int(row["hr_post_exposure"])


# --------------------------------------------------------------------------------------
# BPS
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bps_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate_bps(tmp_path_factory.mktemp("bps_small"), n_images=40, seed=0, image_size=48)


@pytest.fixture(scope="module")
def bps_signal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[tuple, list[Path]]]:
    """24 images per condition at 64x64, grouped by condition."""
    meta = simulate_bps(
        tmp_path_factory.mktemp("bps_signal"), n_images=17 * 24, seed=1, image_size=64
    )
    groups: dict[tuple, list[Path]] = {}
    for row in _read_csv(meta):
        groups.setdefault(_condition(row), []).append(meta.parent / row["filename"])
    return meta, groups


def test_bps_layout_and_names(bps_small: Path) -> None:
    assert bps_small.name == "meta.csv"
    header = bps_small.read_text().splitlines()[0]
    assert header == "filename,dose_Gy,particle_type,hr_post_exposure"
    rows = _read_csv(bps_small)
    assert len(rows) == 40
    pattern = re.compile(BPS_FILENAME_REGEX)
    for row in rows:
        assert pattern.match(row["filename"]), row["filename"]
        assert (bps_small.parent / row["filename"]).is_file()
    assert len({row["filename"] for row in rows}) == 40
    # Images lie directly in out_dir and nothing else is left behind (no temp files).
    assert sorted(p.name for p in bps_small.parent.iterdir()) == sorted(
        [row["filename"] for row in rows] + ["meta.csv"]
    )
    # The example name of the real benchmark matches the regex.
    assert pattern.match("P242_73665006707-A6_003_013_proj.tif")


def test_bps_each_condition_on_its_real_plate(bps_small: Path) -> None:
    rows = _read_csv(bps_small)
    plates: dict[tuple, set[str]] = {}
    for row in rows:
        plates.setdefault(_condition(row), set()).add(row["filename"][:4])
    assert plates == {cond: {plate} for cond, plate in REAL_PLATES.items()}
    assert {c.plate for c in BPS_CONDITIONS} == set(REAL_PLATES.values())
    # Balanced: 40 images over 17 conditions is 2 or 3 each.
    counts = [sum(_condition(r) == cond for r in rows) for cond in REAL_PLATES]
    assert max(counts) - min(counts) <= 1
    # Several wells per plate, and dose written as floats like the real file.
    assert len({r["filename"].split("-")[1][:2] for r in rows if r["filename"][:4] == "P242"}) > 1
    assert {r["dose_Gy"] for r in rows} == {"0.0", "0.3", "0.82", "0.1", "1.0"}
    assert {r["hr_post_exposure"] for r in rows} == {"4", "24", "48"}


def test_bps_images_are_uint16_2d_and_use_high_range(bps_small: Path) -> None:
    rows = _read_csv(bps_small)
    maxima = []
    for row in rows:
        image = tifffile.imread(bps_small.parent / row["filename"])
        assert image.dtype == np.uint16
        assert image.shape == (48, 48)
        maxima.append(int(image.max()))
    assert min(maxima) > 255
    assert max(maxima) > 5000


def test_bps_deterministic_by_seed(tmp_path: Path) -> None:
    a = simulate_bps(tmp_path / "a", n_images=20, seed=7, image_size=32)
    b = simulate_bps(tmp_path / "b", n_images=20, seed=7, image_size=32)
    c = simulate_bps(tmp_path / "c", n_images=20, seed=8, image_size=32)
    assert _digest(a.parent) == _digest(b.parent)
    digest_c = _digest(c.parent)
    assert digest_c.keys() == _digest(a.parent).keys()
    assert digest_c["meta.csv"] == _digest(a.parent)["meta.csv"]
    differing = [k for k in digest_c if k != "meta.csv" and digest_c[k] != _digest(a.parent)[k]]
    assert len(differing) == 20


def test_bps_output_does_not_depend_on_workers(tmp_path: Path) -> None:
    one = simulate_bps(tmp_path / "one", n_images=34, seed=3, image_size=32, workers=1)
    two = simulate_bps(tmp_path / "two", n_images=34, seed=3, image_size=32, workers=2)
    assert _digest(one.parent) == _digest(two.parent)


def test_bps_size_jitter_and_progress(tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    meta = simulate_bps(
        tmp_path, n_images=34, image_size=(40, 60), size_jitter=0.25,
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )
    shapes = {tifffile.imread(meta.parent / r["filename"]).shape for r in _read_csv(meta)}
    assert len(shapes) > 5
    assert all(30 <= h <= 50 and 45 <= w <= 75 for h, w in shapes)
    assert calls and calls[-1] == ("writing images", 34, 34)
    assert [done for _, done, _ in calls] == sorted(done for _, done, _ in calls)


def _bright_pixels(image: np.ndarray) -> int:
    """Pixels of foci: a top-hat above half the nucleus-over-background level."""
    smooth = ndi.gaussian_filter(image.astype(float), 1.0)
    background = np.median(np.concatenate([smooth[:3].ravel(), smooth[-3:].ravel()]))
    nucleus = np.median(smooth[smooth > np.percentile(smooth, 70)])
    tophat = smooth - ndi.grey_opening(smooth, size=(7, 7))
    return int((tophat > 0.5 * (nucleus - background)).sum())


def _foci_peaks(image: np.ndarray) -> tuple[np.ndarray, float]:
    """Local maxima of foci, and the nucleus area in pixels."""
    smooth = ndi.gaussian_filter(image.astype(float), 1.0)
    background = np.median(np.concatenate([smooth[:3].ravel(), smooth[-3:].ravel()]))
    nucleus = np.median(smooth[smooth > np.percentile(smooth, 70)])
    tophat = smooth - ndi.grey_opening(smooth, size=(7, 7))
    peaks = (smooth == ndi.maximum_filter(smooth, size=3)) & (
        tophat > 0.5 * (nucleus - background)
    )
    area = float((smooth > background + 0.3 * (nucleus - background)).sum())
    return np.argwhere(peaks).astype(float), area


def _clark_evans(image: np.ndarray) -> float:
    """Mean nearest-neighbour distance of foci over its value for random positions.

    About 1 for scattered foci, lower for foci lined up along tracks.
    """
    points, area = _foci_peaks(image)
    if len(points) < 4:
        return float("nan")
    dist = np.hypot(*(points[:, None] - points[None]).transpose(2, 0, 1))
    np.fill_diagonal(dist, np.inf)
    return float(dist.min(axis=1).mean() / (0.5 * np.sqrt(area / len(points))))


def test_bps_foci_rise_with_dose_and_fall_with_time(bps_signal) -> None:
    _, groups = bps_signal

    def mean_bright(cond: tuple) -> float:
        return float(np.mean([_bright_pixels(tifffile.imread(p)) for p in groups[cond]]))

    for particle, dose in (("X-ray", 1.0), ("Fe", 0.82)):
        assert mean_bright((particle, dose, 4)) > 3 * mean_bright((particle, 0.0, 4))
        assert mean_bright((particle, dose, 4)) > 1.3 * mean_bright((particle, dose, 48))
    assert mean_bright(("X-ray", 1.0, 24)) > mean_bright(("X-ray", 0.1, 24))
    # The model the images follow.
    assert expected_foci("X-ray", 1.0, 4) > expected_foci("X-ray", 1.0, 48) > expected_foci(
        "X-ray", 0.0, 48
    )


def test_bps_fe_foci_lie_along_tracks(bps_signal) -> None:
    _, groups = bps_signal
    fe = [_clark_evans(tifffile.imread(p)) for p in groups[("Fe", 0.82, 4)]]
    xray = [_clark_evans(tifffile.imread(p)) for p in groups[("X-ray", 1.0, 4)]]
    assert np.isfinite(fe).sum() >= 15 and np.isfinite(xray).sum() >= 15
    assert np.nanmean(fe) < np.nanmean(xray) - 0.1


def test_bps_plates_differ_in_intensity(bps_signal) -> None:
    """The plate confound: background level varies far more between plates than within."""
    _, groups = bps_signal
    backgrounds = [
        np.array([np.median(tifffile.imread(p)[:3]) for p in paths]) for paths in groups.values()
    ]
    between = np.std([b.mean() for b in backgrounds])
    within = np.mean([b.std() for b in backgrounds])
    assert between > 3 * within


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_images": 10}, "n_images must be an integer of at least 17"),
        ({"n_images": 20, "image_size": 8}, "at least 16 pixels"),
        ({"n_images": 20, "image_size": (32, 32, 1)}, "int or a \\(height, width\\) pair"),
        ({"n_images": 20, "size_jitter": 1.5}, "size_jitter must be in"),
        ({"n_images": 20, "workers": 0}, "workers must be a positive integer"),
        ({"n_images": 20, "seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_bps_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(SimulationError, match=match):
        simulate_bps(tmp_path, **kwargs)


def test_bps_refuses_to_overwrite_unless_told(tmp_path: Path) -> None:
    simulate_bps(tmp_path, n_images=17, image_size=24)
    with pytest.raises(CellclassError, match="already exists; pass overwrite=True"):
        simulate_bps(tmp_path, n_images=17, image_size=24)
    assert simulate_bps(tmp_path, n_images=17, image_size=24, overwrite=True).is_file()


# --------------------------------------------------------------------------------------
# HPA
# --------------------------------------------------------------------------------------


def _png(path: Path) -> np.ndarray:
    return imagecodecs.png_decode(path.read_bytes())


@pytest.fixture(scope="module")
def hpa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate_hpa(tmp_path_factory.mktemp("hpa"), n_images=80, seed=0, image_size=64)


def test_hpa_classes_constant() -> None:
    assert len(HPA_CLASSES) == 28
    assert HPA_CLASSES[0] == "Nucleoplasm"
    assert HPA_CLASSES[2] == "Nucleoli"
    assert HPA_CLASSES[21] == "Plasma membrane"
    assert HPA_CLASSES[23] == "Mitochondria"
    assert HPA_CLASSES[25] == "Cytosol"
    assert HPA_CLASSES[27] == "Rods & rings"
    assert {0, 2, 21, 23, 25} <= set(HPA_RENDERED_CLASSES)


def test_hpa_layout_and_labels(hpa: Path) -> None:
    assert hpa.name == "train.csv"
    assert hpa.read_text().splitlines()[0] == "Id,Target"
    rows = _read_csv(hpa)
    assert len(rows) == 80
    assert len({r["Id"] for r in rows}) == 80
    n_labels = []
    for row in rows:
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", row["Id"])
        labels = [int(t) for t in row["Target"].split(" ")]
        assert all(0 <= t <= 27 for t in labels)
        assert len(set(labels)) == len(labels)
        n_labels.append(len(labels))
        for channel in HPA_CHANNELS:
            image = _png(hpa.parent / "train" / f"{row['Id']}_{channel}.png")
            assert image.dtype == np.uint8
            assert image.shape == (64, 64)
    assert sum(n > 1 for n in n_labels) >= 10
    assert max(n_labels) <= 3
    assert len(list((hpa.parent / "train").iterdir())) == 4 * 80


def test_hpa_green_follows_localisation(hpa: Path) -> None:
    """Nuclear classes put more of the green signal inside the nuclei than cytoplasmic ones."""
    nuclear, cytoplasmic = [], []
    for row in _read_csv(hpa):
        labels = {int(t) for t in row["Target"].split()}
        blue = _png(hpa.parent / "train" / f"{row['Id']}_blue.png").astype(float)
        green = _png(hpa.parent / "train" / f"{row['Id']}_green.png").astype(float)
        green -= np.percentile(green, 5)
        inside = blue > 0.5 * blue.max()
        fraction = green[inside].clip(0).sum() / green.clip(0).sum()
        if labels <= NUCLEAR:
            nuclear.append(fraction)
        elif labels <= CYTOPLASMIC:
            cytoplasmic.append(fraction)
    assert len(nuclear) >= 5 and len(cytoplasmic) >= 5
    assert np.mean(nuclear) > np.mean(cytoplasmic) + 0.3


def test_hpa_deterministic_by_seed(tmp_path: Path) -> None:
    a = simulate_hpa(tmp_path / "a", n_images=6, seed=5, image_size=48)
    b = simulate_hpa(tmp_path / "b", n_images=6, seed=5, image_size=48)
    c = simulate_hpa(tmp_path / "c", n_images=6, seed=6, image_size=48)
    assert _digest(a.parent) == _digest(b.parent)
    assert a.read_text() != c.read_text()
    assert set(_digest(a.parent).values()).isdisjoint(_digest(c.parent).values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_images": 0}, "n_images must be a positive integer"),
        ({"image_size": 16}, "at least 32 pixels"),
        ({"workers": -1}, "workers must be a positive integer"),
        ({"seed": 1.5}, "seed must be a non-negative integer"),
    ],
)
def test_hpa_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(SimulationError, match=match):
        simulate_hpa(tmp_path, **kwargs)
