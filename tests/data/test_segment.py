"""Nucleus segmentation, its backends, the field simulator and the object-matching metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellclass.data.io import write_tiff
from cellclass.data.segment import (
    BACKENDS,
    Backend,
    CellParams,
    CellposeBackend,
    MaskFileBackend,
    NucleusParams,
    SkimageBackend,
    StarDistBackend,
    make_backend,
    otsu_baseline,
    relabel,
    segment_cells,
    segment_nuclei,
)
from cellclass.data.simulate_fields import simulate_nuclei_field
from cellclass.errors import EvaluationError, MissingDependencyError, ModelError, SegmentationError
from cellclass.evaluation.segmentation_metrics import (
    iou_matrix,
    match_objects,
    mean_over_fields,
    score_fields,
)

REPO = Path(__file__).resolve().parents[2]


def disk(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


@pytest.fixture(scope="module")
def crowded_fields() -> list[tuple[np.ndarray, np.ndarray]]:
    """Simulated fields with 60% of the nuclei in touching pairs."""
    return [simulate_nuclei_field((192, 192), n=20, seed=s, touching_fraction=0.6) for s in range(4)]


# --------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------


def test_perfect_match_scores_one_even_with_other_label_values() -> None:
    true = np.zeros((40, 40), np.uint16)
    true[disk(true.shape, 10, 10, 5)] = 1
    true[disk(true.shape, 28, 28, 6)] = 2
    pred = np.where(true == 1, 7, np.where(true == 2, 3, 0)).astype(np.int32)
    result = match_objects(true, pred, thresholds=(0.5, 0.9))
    assert result["n_true"] == result["n_pred"] == 2
    for key in ("0.5", "0.9"):
        scores = result["by_threshold"][key]
        assert (scores["tp"], scores["fp"], scores["fn"]) == (2, 0, 0)
        assert scores["f1"] == scores["average_precision"] == 1.0
        assert scores["mean_matched_iou"] == pytest.approx(1.0)


def test_a_merge_counts_one_true_positive_at_most() -> None:
    true = np.zeros((30, 40), np.uint16)
    true[5:25, 5:20] = 1
    true[5:25, 20:35] = 2
    merged = (true > 0).astype(np.uint16)  # IoU 0.5 with each: exactly at the threshold
    scores = match_objects(true, merged)["by_threshold"]["0.5"]
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 0, 1)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["average_precision"] == pytest.approx(0.5)
    # a merge of unequal halves matches the larger one only
    true[5:25, 5:26] = 1
    scores = match_objects(true, merged)["by_threshold"]["0.5"]
    assert (scores["tp"], scores["fn"]) == (1, 1)


def test_shifted_objects_below_iou_half_are_misses() -> None:
    true = np.zeros((40, 60), np.uint16)
    true[10:30, 10:30] = 1
    pred = np.zeros_like(true)
    pred[10:30, 20:40] = 1  # half overlap: IoU 200/600 = 1/3
    assert iou_matrix(true, pred)[0, 0] == pytest.approx(1 / 3)
    scores = match_objects(true, pred)["by_threshold"]["0.5"]
    assert (scores["tp"], scores["fp"], scores["fn"]) == (0, 1, 1)
    assert scores["f1"] == 0.0 and scores["mean_matched_iou"] is None
    # a small shift still matches at 0.5 but not at 0.9
    pred[:] = 0
    pred[10:30, 12:32] = 1  # IoU 360/440
    result = match_objects(true, pred, thresholds=(0.5, 0.9))
    assert result["by_threshold"]["0.5"]["tp"] == 1
    assert result["by_threshold"]["0.9"]["tp"] == 0


def test_empty_fields_and_mean_over_fields() -> None:
    empty = np.zeros((8, 8), np.uint16)
    one = empty.copy()
    one[2:5, 2:5] = 1
    assert match_objects(empty, empty)["by_threshold"]["0.5"]["f1"] == 1.0
    missed = match_objects(one, empty)["by_threshold"]["0.5"]
    assert (missed["precision"], missed["recall"], missed["f1"]) == (0.0, 0.0, 0.0)
    result = score_fields([(one, one), (one, empty)], thresholds=(0.5, 0.75))
    assert result["n_fields"] == 2
    assert result["f1"] == pytest.approx(0.5)
    assert result["pooled"]["0.5"]["f1"] == pytest.approx(2 / 3)
    assert result["mean_average_precision"] == pytest.approx(0.5)
    assert mean_over_fields(result["fields"], 0.75)["recall"] == pytest.approx(0.5)


def test_metric_errors() -> None:
    a = np.zeros((4, 4), np.uint16)
    with pytest.raises(EvaluationError, match=r"differ in shape: true \(4, 4\), pred \(4, 5\)"):
        iou_matrix(a, np.zeros((4, 5), np.uint16))
    with pytest.raises(EvaluationError, match="must be 2-D"):
        iou_matrix(a[None], a[None])
    with pytest.raises(EvaluationError, match="must hold integers; got dtype float32"):
        iou_matrix(a.astype(np.float32), a)
    with pytest.raises(EvaluationError, match="IoU threshold 1.5 is out of range"):
        match_objects(a, a, thresholds=(1.5,))
    with pytest.raises(EvaluationError, match="no fields to score"):
        score_fields([])
    fields = score_fields([(a, a)], thresholds=(0.5,))["fields"]
    with pytest.raises(EvaluationError, match="IoU threshold 0.7 was not scored; scored thresholds: 0.5"):
        mean_over_fields(fields, 0.7)
    with pytest.raises(EvaluationError, match="no fields to average"):
        mean_over_fields([])


# --------------------------------------------------------------------------------------
# simulator
# --------------------------------------------------------------------------------------


def test_simulated_field_is_12_bit_deterministic_and_has_touching_pairs() -> None:
    image, labels = simulate_nuclei_field((128, 160), n=16, seed=3, touching_fraction=0.5)
    assert image.shape == (1, 128, 160) and image.dtype == np.uint16
    assert labels.shape == (128, 160) and labels.dtype == np.uint16
    assert image.max() <= 4095 and image.min() > 0
    assert set(np.unique(labels)) == set(range(labels.max() + 1))
    assert labels.max() >= 12
    again = simulate_nuclei_field((128, 160), n=16, seed=3, touching_fraction=0.5)
    assert np.array_equal(image, again[0]) and np.array_equal(labels, again[1])
    # touching: some nuclei share an edge with another (4-neighbours of different labels)
    h = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    v = (labels[1:] != labels[:-1]) & (labels[1:] > 0) & (labels[:-1] > 0)
    assert h.sum() + v.sum() > 20
    # nuclei are brighter than the background
    assert image[0][labels > 0].mean() > 2 * image[0][labels == 0].mean()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shape": (8, 64)}, "at least 16 x 16"),
        ({"n": -1}, "number of nuclei must be >= 0; got -1"),
        ({"touching_fraction": 1.5}, r"touching_fraction must be in \[0, 1\]; got 1.5"),
        ({"radius": (5.0, 2.0)}, "radius range must satisfy 0 < low <= high"),
    ],
)
def test_simulator_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(SegmentationError, match=message):
        simulate_nuclei_field(**kwargs)


# --------------------------------------------------------------------------------------
# the default pipeline and the baseline
# --------------------------------------------------------------------------------------


def test_default_splits_touching_nuclei_where_the_baseline_merges(crowded_fields) -> None:
    default = score_fields([(t, segment_nuclei(i)) for i, t in crowded_fields], thresholds=(0.5,))
    baseline = score_fields([(t, otsu_baseline(i)) for i, t in crowded_fields], thresholds=(0.5,))
    assert default["f1"] >= 0.9
    assert baseline["f1"] < 0.85
    assert default["f1"] > baseline["f1"] + 0.1


def test_segment_nuclei_output_contract(crowded_fields) -> None:
    image, truth = crowded_fields[0]
    labels = segment_nuclei(image)
    assert labels.dtype == np.uint16 and labels.shape == image.shape[1:]
    assert set(np.unique(labels)) == set(range(labels.max() + 1))
    # the same pixels as (H, W), as float, or as channel 1 of a stack
    assert np.array_equal(labels, segment_nuclei(image[0]))
    assert np.array_equal(labels, segment_nuclei(image[0].astype(np.float64)))
    stack = np.concatenate([np.zeros_like(image), image])
    assert np.array_equal(labels, segment_nuclei(stack, channel=1))
    # 16-bit values beyond 12 bit: scaling the field by 16 changes nothing
    assert np.array_equal(labels, segment_nuclei(image * np.uint16(16)))
    # an empty field has no nuclei
    assert segment_nuclei(np.full((64, 64), 100, np.uint16)).max() == 0


@pytest.mark.parametrize("seeds", ["hmaxima", "peaks", "none"])
def test_seed_methods_and_filters(crowded_fields, seeds: str) -> None:
    image, truth = crowded_fields[1]
    labels = segment_nuclei(image, params=NucleusParams(seeds=seeds, min_area=60, remove_border=True))
    areas = np.bincount(labels.ravel())[1:]
    assert labels.max() > 5 and areas.min() >= 60
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    assert not edge.any()
    bounded = segment_nuclei(image, params=NucleusParams(seeds=seeds, max_area=300))
    assert np.bincount(bounded.ravel())[1:].max() <= 300


def test_other_thresholds_and_options_still_find_the_nuclei(crowded_fields) -> None:
    image, truth = crowded_fields[2]
    for params in (NucleusParams(threshold="li"), NucleusParams(threshold="local", threshold_scale=0.5, block_size=51),
                   NucleusParams(background_size=61, intensity_weight=0.5, compactness=0.01),
                   NucleusParams(min_distance=6.0, seeds="peaks")):
        f1 = score_fields([(truth, segment_nuclei(image, params=params))], thresholds=(0.5,))["f1"]
        assert f1 > 0.8, params


def test_segment_cells_grows_each_nucleus_into_its_cell() -> None:
    shape = (60, 100)
    nuclei = np.zeros(shape, np.uint16)
    nuclei[disk(shape, 30, 25, 6)] = 1
    nuclei[disk(shape, 30, 75, 6)] = 2
    cyto = np.full(shape, 100, np.uint16)
    cyto[disk(shape, 30, 25, 18)] = 900
    cyto[disk(shape, 30, 75, 18)] = 900
    cyto[disk(shape, 5, 50, 4)] = 900  # cytoplasm without a nucleus stays background
    cells = segment_cells(nuclei, cyto[None], params=CellParams(sigma=1.0))
    assert cells.dtype == np.uint16 and set(np.unique(cells)) == {0, 1, 2}
    assert np.all(cells[nuclei == 1] == 1) and np.all(cells[nuclei == 2] == 2)
    assert 0.85 < (cells == 1).sum() / disk(shape, 30, 25, 18).sum() < 1.15
    assert cells[5, 50] == 0
    near = segment_cells(nuclei, cyto, params=CellParams(sigma=1.0, max_distance=4.0))
    assert (near == 1).sum() < (cells == 1).sum() / 2


def test_pipeline_errors() -> None:
    with pytest.raises(SegmentationError, match=r"channel 2 is out of range for an image of 2 channel\(s\)"):
        segment_nuclei(np.zeros((2, 8, 8), np.uint16), channel=2)
    with pytest.raises(SegmentationError, match="channel 1 is out of range for a single-channel"):
        segment_nuclei(np.zeros((8, 8), np.uint16), channel=1)
    with pytest.raises(SegmentationError, match=r"image has shape \(8,\); valid: \(H, W\) or \(C, H, W\)"):
        segment_nuclei(np.zeros(8, np.uint16))
    with pytest.raises(SegmentationError, match="NaN or infinite"):
        segment_nuclei(np.full((8, 8), np.nan))
    with pytest.raises(SegmentationError, match=r"nucleus labels have shape \(8, 8\) but the cytoplasm channel has \(9, 9\)"):
        segment_cells(np.zeros((8, 8), np.uint16), np.zeros((9, 9), np.uint16))
    with pytest.raises(SegmentationError, match="nucleus labels must be integers"):
        segment_cells(np.zeros((8, 8)), np.zeros((8, 8), np.uint16))
    with pytest.raises(SegmentationError, match="70000 objects found; valid: at most 65535"):
        relabel(np.arange(1, 70001).reshape(700, 100))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": "triangle"}, "threshold 'triangle' is invalid; valid: otsu, li, local"),
        ({"seeds": "blobs"}, "seeds 'blobs' is invalid; valid: hmaxima, peaks, none"),
        ({"sigma": -1.0}, "sigma must be a number >= 0.0; got -1.0"),
        ({"threshold_scale": 0.0}, "threshold_scale must be a number > 0.0; got 0.0"),
        ({"intensity_weight": 2.0}, r"intensity_weight must be a number >= 0.0 and <= 1.0; got 2.0"),
        ({"block_size": 50}, "block_size must be an odd integer >= 3; got 50"),
        ({"min_area": 50, "max_area": 10}, "max_area must be a number >= 50; got 10"),
        ({"min_distance": 0.5}, "min_distance must be a number >= 1.0; got 0.5"),
        ({"background_size": 1}, "background_size must be a number >= 3; got 1"),
    ],
)
def test_nucleus_params_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(SegmentationError, match=message):
        NucleusParams(**kwargs)


def test_params_round_trip_and_unknown_keys() -> None:
    params = NucleusParams(sigma=2.0, seeds="peaks")
    assert NucleusParams.from_dict(params.to_dict()) == params
    with pytest.raises(SegmentationError, match="unknown NucleusParams setting.s. sigmaa; valid: sigma,"):
        NucleusParams.from_dict({"sigmaa": 1.0})
    with pytest.raises(SegmentationError, match="unknown CellParams setting.s. h; valid: sigma,"):
        CellParams.from_dict({"h": 1.0})
    with pytest.raises(SegmentationError, match="threshold 'local' is invalid; valid: otsu, li"):
        CellParams(threshold="local")


# --------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------


def test_skimage_backend_is_the_default_pipeline(crowded_fields) -> None:
    image, _ = crowded_fields[0]
    backend = make_backend("skimage")
    assert isinstance(backend, Backend) and isinstance(backend, SkimageBackend)
    assert np.array_equal(backend.segment(image), segment_nuclei(image))
    assert set(BACKENDS) == {"skimage", "cellpose", "stardist", "masks"}


def test_make_backend_errors() -> None:
    with pytest.raises(SegmentationError, match="backend 'unet' is unknown; valid: skimage, cellpose, stardist, masks"):
        make_backend("unet")
    with pytest.raises(SegmentationError, match=r"backend 'skimage' cannot take arguments \['weights'\]"):
        make_backend("skimage", weights="x.pt")


def test_cellpose_and_stardist_need_weights_on_disk(tmp_path: Path) -> None:
    missing = tmp_path / "nuclei_model"
    with pytest.raises(ModelError, match=r"Cellpose model file '.*nuclei_model' does not exist; .*never downloads"):
        CellposeBackend(missing)
    with pytest.raises(ModelError, match=r"StarDist model folder '.*nuclei_model' does not exist"):
        make_backend("stardist", weights=missing)
    missing.mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        StarDistBackend(missing)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(_installed("cellpose"), reason="cellpose is installed here")
def test_cellpose_missing_package_names_the_extra(tmp_path: Path) -> None:
    weights = tmp_path / "cyto3_nuclei"
    weights.write_bytes(b"weights")
    with pytest.raises(MissingDependencyError, match=r"pip install 'cellclass\[cellpose\]'"):
        CellposeBackend(weights)


@pytest.mark.skipif(_installed("stardist"), reason="stardist is installed here")
def test_stardist_missing_package_names_the_extra(tmp_path: Path) -> None:
    (tmp_path / "2D_versatile_fluo").mkdir()
    (tmp_path / "2D_versatile_fluo" / "config.json").write_text("{}")
    with pytest.raises(MissingDependencyError, match=r"pip install 'cellclass\[stardist\]'"):
        StarDistBackend(tmp_path / "2D_versatile_fluo")


def test_mask_file_backend_reads_user_masks(tmp_path: Path) -> None:
    image, truth = simulate_nuclei_field((64, 80), n=6, seed=1)
    field = tmp_path / "images" / "A01_s1.tif"
    write_tiff(field, image)
    write_tiff(tmp_path / "masks" / "A01_s1_mask.tif", (truth * 3).astype(np.uint16))
    backend = make_backend("masks", pattern="../masks/{stem}_mask.tif")
    assert backend.mask_path(field) == field.parent / "../masks/A01_s1_mask.tif"
    labels = backend.segment(image, source=field)
    assert labels.dtype == np.uint16 and np.array_equal(labels, truth)  # renumbered 1..N
    rooted = MaskFileBackend("masks/{stem}_mask.tif", root=tmp_path)
    assert np.array_equal(rooted.segment(image, source=field), truth)


def test_mask_file_backend_errors(tmp_path: Path) -> None:
    image = np.zeros((1, 16, 16), np.uint16)
    with pytest.raises(SegmentationError, match=r"mask pattern '\{well\}.tif' is invalid: .*valid placeholders: \{stem\}"):
        MaskFileBackend("{well}.tif")
    backend = MaskFileBackend("{stem}_mask.tif")
    with pytest.raises(SegmentationError, match="needs each field's file path"):
        backend.segment(image)
    with pytest.raises(SegmentationError, match=r"mask file '.*f_mask.tif' for field '.*f.tif' does not exist"):
        backend.segment(image, source=tmp_path / "f.tif")
    write_tiff(tmp_path / "f_mask.tif", np.zeros((8, 8), np.uint16))
    with pytest.raises(SegmentationError, match="is 8 x 8 pixels but its field is 16 x 16"):
        backend.segment(image, source=tmp_path / "f.tif")
    write_tiff(tmp_path / "f_mask.tif", np.zeros((2, 16, 16), np.uint16))
    with pytest.raises(SegmentationError, match=r"holds 2 channel\(s\) of uint16; valid: one channel of integer"):
        backend.segment(image, source=tmp_path / "f.tif")
    write_tiff(tmp_path / "f_mask.tif", np.zeros((16, 16), np.float32))
    with pytest.raises(SegmentationError, match="of float32; valid: one channel of integer"):
        backend.segment(image, source=tmp_path / "f.tif")
    (tmp_path / "f_mask.tif").write_bytes(b"not a tiff")
    with pytest.raises(SegmentationError, match="cannot read mask file"):
        backend.segment(image, source=tmp_path / "f.tif")


# --------------------------------------------------------------------------------------
# real fields: BBBC039, held-out wells
# --------------------------------------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.slow
def test_default_beats_087_on_held_out_bbbc039_fields(shared_data: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "segmentation_bbbc039.py"), "--data", str(shared_data)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])["figures"]
    held = figures["bbbc039_held_out"]
    assert held["default"]["n_fields"] == 25
    assert held["default"]["f1"] >= 0.87
    assert held["default"]["f1"] > held["otsu_baseline"]["f1"] + 0.05
