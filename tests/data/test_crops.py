"""Single-cell crops, the cell-level manifest and its QC, resumption, and montage tiles."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellclass.data.cache import CacheSettings, prepare_cache
from cellclass.data.crops import (
    CELL_COLUMNS,
    GRID_COLUMNS,
    QcThresholds,
    crop_cells,
    crop_settings,
    cut_montage,
    field_key,
    make_crops,
    make_grid_crops,
    mask_path_for,
    object_properties,
)
from cellclass.data.io import read_image, write_tiff
from cellclass.data.masks import segment_fields
from cellclass.data.presets import hpa
from cellclass.data.segment import SkimageBackend
from cellclass.data.simulate_fields import simulate_nuclei_field
from cellclass.data.simulate_hpa_fields import simulate_hpa_fields
from cellclass.data.spec import DatasetSpec, spec_from_manifest
from cellclass.data.splits import make_split
from cellclass.errors import CropError, ImageReadError, OutputPathError


def square_labels(shape: tuple[int, int], boxes: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    labels = np.zeros(shape, np.uint16)
    for value, (y0, x0, y1, x1) in boxes.items():
        labels[y0:y1, x0:x1] = value
    return labels


def ramp(shape: tuple[int, int], channels: int = 2, dtype: type = np.uint16) -> np.ndarray:
    """An image whose every pixel is distinct: where a crop came from can be checked."""
    n = channels * shape[0] * shape[1]
    return (np.arange(n) + 1).reshape(channels, *shape).astype(dtype)


# --------------------------------------------------------------------------------------
# one field
# --------------------------------------------------------------------------------------


def test_object_properties_by_hand() -> None:
    labels = square_labels((20, 30), {3: (2, 4, 6, 10), 7: (15, 25, 20, 30)})
    props = object_properties(labels)
    assert list(props) == [3, 7]
    assert props[3].area == 24 and props[3].bbox == (2, 4, 6, 10)
    assert (props[3].centroid_y, props[3].centroid_x) == (3.5, 6.5)
    assert not props[3].touches_border
    assert props[7].touches_border and props[7].bbox == (15, 25, 20, 30)


def test_crop_geometry_and_dtype() -> None:
    image = ramp((40, 50))
    labels = square_labels((40, 50), {1: (10, 20, 15, 25), 2: (30, 5, 33, 8)})
    out = list(crop_cells(image, labels, 9))
    assert [oid for oid, _, _ in out] == [1, 2]
    oid, crop, props = out[0]
    assert crop.shape == (2, 9, 9) and crop.dtype == np.uint16
    # the centroid pixel (12, 22) sits at (4, 4) of the crop
    assert (props.centroid_y, props.centroid_x) == (12.0, 22.0)
    np.testing.assert_array_equal(crop, image[:, 8:17, 18:27])
    assert crop[:, 4, 4].tolist() == image[:, 12, 22].tolist()
    # even sizes: the centroid pixel at size // 2
    _, even, _ = next(crop_cells(image, labels, 8))
    np.testing.assert_array_equal(even, image[:, 8:16, 18:26])
    # float images and (H, W) images keep their dtype; one channel comes out as (1, S, S)
    floats = image.astype(np.float32) / 7
    assert next(crop_cells(floats, labels, 9))[1].dtype == np.float32
    plane = next(crop_cells(image[0], labels, 9))[1]
    assert plane.shape == (1, 9, 9)
    # a crop is a copy: writing to it leaves the field alone
    crop[:] = 0
    assert image[:, 12, 22].min() > 0


def test_mask_neighbours_and_background() -> None:
    image = ramp((30, 30), channels=1)
    labels = square_labels((30, 30), {1: (10, 10, 16, 16), 2: (10, 16, 16, 22)})
    plain = next(crop_cells(image, labels, 12))[1][0]
    neighbours = next(crop_cells(image, labels, 12, mask_neighbours=True))[1][0]
    alone = next(crop_cells(image, labels, 12, mask_background=True))[1][0]
    window = labels[7:19, 7:19]
    assert (neighbours[window == 2] == 0).all() and (plain[window == 2] > 0).all()
    np.testing.assert_array_equal(neighbours[window != 2], plain[window != 2])  # background kept
    assert (alone[window != 1] == 0).all()
    np.testing.assert_array_equal(alone[window == 1], plain[window == 1])


def test_border_skip_pad_zero_and_reflect() -> None:
    image = ramp((20, 20), channels=1)
    labels = square_labels((20, 20), {1: (0, 0, 3, 3), 2: (8, 8, 12, 12)})
    assert [oid for oid, _, _ in crop_cells(image, labels, 8)] == [2]
    cuts = {oid: crop for oid, crop, _ in crop_cells(image, labels, 8, border="pad")}
    # object 1 has centroid (1, 1): its window starts at (-3, -3)
    zero = cuts[1][0]
    assert (zero[:3] == 0).all() and (zero[:, :3] == 0).all()
    np.testing.assert_array_equal(zero[3:, 3:], image[0, :5, :5])
    mirrored = next(crop_cells(image, labels, 8, border="pad", pad="reflect"))[1][0]
    expected = np.pad(image[0], 8, mode="reflect")[8 - 3:8 + 5, 8 - 3:8 + 5]
    np.testing.assert_array_equal(mirrored, expected)
    # a window larger than the field pads on every side
    big = next(crop_cells(image, labels, 64, border="pad", pad="reflect"))[1]
    assert big.shape == (1, 64, 64)


def test_area_filters() -> None:
    labels = square_labels((40, 40), {1: (5, 5, 7, 7), 2: (20, 20, 30, 30), 3: (10, 30, 15, 35)})
    image = ramp((40, 40), 1)
    assert [o for o, _, _ in crop_cells(image, labels, 6, border="pad", min_area=5)] == [2, 3]
    assert [o for o, _, _ in crop_cells(image, labels, 6, border="pad", max_area=25)] == [1, 3]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"size": 0}, "crop size must be an integer >= 1; got 0"),
    ({"border": "crop"}, "border 'crop' is invalid; valid: skip, pad"),
    ({"pad": "edge"}, "pad 'edge' is invalid; valid: zero, reflect"),
    ({"min_area": -1}, "min_area must be an integer >= 0"),
    ({"min_area": 10, "max_area": 5}, "max_area must be an integer >= 10"),
    ({"mask_neighbours": "yes"}, "mask_neighbours must be True or False"),
    ({"labels": np.zeros((9, 9), np.uint16)}, "labels are 9 x 9 pixels but the image is 10 x 10"),
    ({"labels": np.full((10, 10), -1)}, "negative values"),
    ({"labels": np.zeros((10, 10), np.float32)}, "valid: an \\(H, W\\) integer label image"),
    ({"image": np.zeros((1, 1, 10, 10))}, "image has shape \\(1, 1, 10, 10\\)"),
])
def test_crop_cells_errors(kwargs: dict, match: str) -> None:
    args = {"image": np.zeros((1, 10, 10), np.uint16), "labels": np.ones((10, 10), np.uint16), "size": 4, **kwargs}
    with pytest.raises(CropError, match=match):
        list(crop_cells(args.pop("image"), args.pop("labels"), args.pop("size"), **args))


@pytest.mark.parametrize(("image_id", "key"), [
    ("a01.tif", "a01"),
    ("images/a01.TIFF", "images/a01"),
    ("plate1/B03_s1.ome.tif", "plate1/B03_s1"),
    ("train/abc-123", "train/abc-123"),
    ("plate.zarr/A/1/0", "plate.zarr/A/1/0"),
    ("../up/x.png", "_/up/x"),
    ("/abs/x.npy", "abs/x"),
    ("run.2/a.b.c.tif", "run.2/a.b.c"),
])
def test_field_key_and_mask_path(image_id: str, key: str) -> None:
    assert field_key(image_id) == key
    assert mask_path_for(image_id).as_posix() == f"masks/{key}.tif"


def test_field_key_rejects_an_empty_id() -> None:
    with pytest.raises(CropError, match="image id '' names no file"):
        field_key("")


# --------------------------------------------------------------------------------------
# a dataset of fields
# --------------------------------------------------------------------------------------


def nuclei_dataset(root: Path, counts: list[int], shape: tuple[int, int] = (96, 96)) -> DatasetSpec:
    """Fields of simulated nuclei (12-bit in uint16) with their true masks where segment writes them."""
    rows = []
    for i, n in enumerate(counts):
        image, labels = simulate_nuclei_field(shape, n=n, seed=i, radius=(5.0, 8.0))
        name = f"images/plate{i // 3}/f{i:02d}.tif"
        write_tiff(root / name, image)
        write_tiff(root / "seg" / mask_path_for(name), labels)
        rows.append({"filename": name, "condition": "treated" if i % 2 else "control",
                     "plate": f"P{i // 3}", "well": f"A{i % 3 + 1:02d}", "site": str(i)})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return spec_from_manifest(root / "labels.csv", image_col="filename", tasks=["condition"], groups=["plate", "well"])


@pytest.fixture()
def dataset(tmp_path: Path) -> DatasetSpec:
    return nuclei_dataset(tmp_path / "data", [6, 8, 7, 9, 5, 8])


def test_manifest_inherits_every_column_and_crops_read_back(dataset: DatasetSpec, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = make_crops(dataset, dataset.base_dir / "seg", out, 16, border="pad")
    cells = pd.read_csv(result.cells, dtype=str, keep_default_na=False)
    manifest = pd.read_csv(dataset.manifest_path, dtype=str)
    assert cells.columns.tolist() == [*manifest.columns, *CELL_COLUMNS]
    assert result.n_cells == len(cells) and result.n_fields == 6 and result.n_processed == 6
    # every object of every field, with its field's columns
    for row, field in zip(manifest.to_dict("records"), range(6)):
        own = cells[cells.filename == row["filename"]]
        labels = read_image(dataset.base_dir / "seg" / mask_path_for(row["filename"]))[0]
        assert sorted(own.object_id.astype(int)) == sorted(set(np.unique(labels)) - {0})
        for column in manifest.columns:
            assert (own[column] == row[column]).all()
        assert (own.field_id == field_key(row["filename"])).all()
        assert (own.field_row == str(field + 1)).all()
    # the crops are those of crop_cells, in the field's dtype
    first = cells.iloc[0]
    image = read_image(dataset.base_dir / first.filename)
    labels = read_image(dataset.base_dir / "seg" / mask_path_for(first.filename))[0]
    expected = {oid: crop for oid, crop, _ in crop_cells(image, labels, 16, border="pad")}
    for row in cells[cells.filename == first.filename].itertuples():
        crop = read_image(out / row.crop)
        assert crop.dtype == np.uint16 and crop.shape == (1, 16, 16)
        np.testing.assert_array_equal(crop, expected[int(row.object_id)])
        assert row.crop == f"crops/{row.field_id}/{row.object_id}.tif"
    assert int(cells.area.astype(int).min()) >= 1 and set(cells.touches_border) <= {"0", "1"}


def test_cells_yaml_splits_by_field_and_plate(dataset: DatasetSpec, tmp_path: Path) -> None:
    result = make_crops(dataset, dataset.base_dir / "seg", tmp_path / "out", 16, border="pad")
    spec = DatasetSpec.from_yaml(result.spec)
    assert spec.image.column == "crop" and spec.groups == ["plate", "well", "field_id"]
    assert spec.task_names == ["condition"]
    frame = spec.load_manifest()
    assert spec.read_image(frame.iloc[0]).shape == (1, 16, 16)
    split = make_split(frame, groups=frame[spec.groups[0]].to_numpy(), method="group", val_fraction=0.0,
                       test_fraction=0.34, seed=0, group_column=spec.groups[0])
    train, test = frame.iloc[split.train], frame.iloc[split.test]
    assert len(test) and not set(train.field_id) & set(test.field_id)
    assert not set(train.plate) & set(test.plate)


def test_cells_go_into_the_prepared_cache(dataset: DatasetSpec, tmp_path: Path) -> None:
    result = make_crops(dataset, dataset.base_dir / "seg", tmp_path / "out", 16, border="pad")
    spec = DatasetSpec.from_yaml(result.spec)
    cache = prepare_cache(spec, CacheSettings(image_size=16), cache_dir=tmp_path / "cache", workers=1)
    images = cache.images
    assert images.shape == (result.n_cells, 1, 16, 16) and images.dtype == np.uint16
    cells = pd.read_csv(result.cells, dtype=str)
    for i in (0, len(cells) - 1):
        np.testing.assert_array_equal(images[i], read_image(tmp_path / "out" / cells.crop[i]))


def test_qc_flags_fields_with_too_few_or_too_many_objects(tmp_path: Path) -> None:
    spec = nuclei_dataset(tmp_path / "data", [8, 8, 9, 0, 1, 40, 8], shape=(128, 128))
    result = make_crops(spec, spec.base_dir / "seg", tmp_path / "out", 12, border="pad")
    qc = pd.read_csv(result.fields_qc)
    assert qc.columns.tolist() == ["field_id", "image_id", "field_row", "plate", "well", "n_objects", "n_crops", "qc"]
    flags = dict(zip(qc.n_objects, qc.qc))
    assert flags[0] == "too_few" and flags[1] == "too_few" and flags[8] == "ok"
    assert qc.qc[qc.n_objects == qc.n_objects.max()].tolist() == ["too_many"]
    assert result.n_flagged == 3
    cells = pd.read_csv(result.cells)
    assert set(cells.field_qc[cells.field_id == qc.field_id[5]]) == {"too_many"}
    # absolute bounds
    strict = make_crops(spec, spec.base_dir / "seg", tmp_path / "out", 12, border="pad",
                        qc=QcThresholds(min_objects=9, max_objects=20))
    assert strict.n_processed == 0  # QC does not re-cut anything
    flags = pd.read_csv(strict.fields_qc).qc.tolist()
    assert flags == ["too_few", "too_few", "ok", "too_few", "too_few", "too_many", "too_few"]


def test_qc_bounds_from_the_median() -> None:
    qc = QcThresholds()
    assert qc.bounds(np.array([10, 20, 30])) == (20.0, 5.0, 80.0)
    assert qc.flags(np.array([4, 5, 20, 80, 81])) == ["too_few", "ok", "ok", "ok", "too_many"]
    assert QcThresholds().flags(np.array([0, 0, 0])) == ["too_few"] * 3  # median 0: only min_objects


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"low_factor": -1}, "low_factor must be a number >= 0"),
    ({"low_factor": 2, "high_factor": 1}, "high_factor 1 is below low_factor 2"),
    ({"min_objects": -2}, "min_objects must be an integer >= 0"),
    ({"max_objects": 0}, "max_objects must be an integer >= 1"),
])
def test_qc_threshold_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(CropError, match=match):
        QcThresholds(**kwargs)


class Interrupt(Exception):
    pass


def test_resume_after_an_interruption_does_only_the_rest(dataset: DatasetSpec, tmp_path: Path) -> None:
    masks = dataset.base_dir / "seg"
    fresh = make_crops(dataset, masks, tmp_path / "fresh", 16, mask_neighbours=True)

    def stop_after_three(stage: str, done: int, total: int) -> None:
        if done == 3:
            raise Interrupt

    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        make_crops(dataset, masks, out, 16, mask_neighbours=True, progress=stop_after_three)
    assert not (out / "cells.csv").exists()
    done_before = {p: p.stat().st_mtime_ns for p in (out / "crops").rglob("*.tif")}
    assert done_before
    calls = []
    resumed = make_crops(dataset, masks, out, 16, mask_neighbours=True, progress=lambda *c: calls.append(c))
    assert resumed.n_processed == 3 and calls[0] == ("cutting fields", 3, 6) and calls[-1] == ("cutting fields", 6, 6)
    assert (out / "cells.csv").read_bytes() == fresh.cells.read_bytes()
    assert (out / "fields_qc.csv").read_bytes() == fresh.fields_qc.read_bytes()
    assert all(p.stat().st_mtime_ns == t for p, t in done_before.items())  # not cut again

    # a field whose mask changed, or whose crop is gone, is cut again; the others are not
    first_mask = masks / mask_path_for(dataset.load_manifest().filename[0])
    write_tiff(first_mask, read_image(first_mask)[0])
    os.utime(first_mask, ns=(1, 1))
    next((out / "crops" / "images" / "plate1").rglob("*.tif")).unlink()
    assert make_crops(dataset, masks, out, 16, mask_neighbours=True).n_processed == 2
    # other settings cut everything again, and leave no crop of the old ones behind
    wider = make_crops(dataset, masks, out, 20, border="pad")
    assert wider.n_processed == 6
    crops = sorted(p.relative_to(out).as_posix() for p in (out / "crops").rglob("*.tif"))
    assert crops == sorted(pd.read_csv(wider.cells).crop)


def test_labels_corrected_after_cutting_need_no_recut(dataset: DatasetSpec, tmp_path: Path) -> None:
    out = tmp_path / "out"
    make_crops(dataset, dataset.base_dir / "seg", out, 16)
    manifest = pd.read_csv(dataset.manifest_path, dtype=str)
    manifest.loc[0, "condition"] = "fixed"
    manifest.to_csv(dataset.manifest_path, index=False)
    again = make_crops(dataset, dataset.base_dir / "seg", out, 16)
    assert again.n_processed == 0
    cells = pd.read_csv(again.cells, dtype=str)
    assert set(cells.condition[cells.filename == manifest.filename[0]]) == {"fixed"}


def test_worker_processes_give_the_same_output(dataset: DatasetSpec, tmp_path: Path) -> None:
    one = make_crops(dataset, dataset.base_dir / "seg", tmp_path / "one", 16, border="pad", pad="reflect")
    two = make_crops(dataset, dataset.base_dir / "seg", tmp_path / "two", 16, border="pad", pad="reflect",
                     workers=2)
    assert one.cells.read_bytes() == two.cells.read_bytes()
    cells = pd.read_csv(one.cells)
    for crop in cells.crop[::7]:
        np.testing.assert_array_equal(read_image(tmp_path / "one" / crop), read_image(tmp_path / "two" / crop))


def test_a_backend_segments_each_field_and_writes_its_masks(dataset: DatasetSpec, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = make_crops(dataset, SkimageBackend(), out, 16, border="pad", write_masks=True, workers=2)
    qc = pd.read_csv(result.fields_qc)
    for image_id, n in zip(qc.image_id, qc.n_objects):
        mask = read_image(out / mask_path_for(image_id))[0]
        assert mask.dtype == np.uint16 and len(np.unique(mask)) - 1 == n
    assert result.n_cells == qc.n_crops.sum() > 0
    # the masks it wrote are a mask folder for the next run
    again = make_crops(dataset, out, tmp_path / "again", 16, border="pad")
    assert again.n_cells == result.n_cells


def test_crop_settings_are_read_back_from_the_cells_folder(dataset: DatasetSpec, tmp_path: Path) -> None:
    assert crop_settings(dataset) is None  # fields, not crops
    seg = tmp_path / "seg"
    segment_fields(dataset, SkimageBackend(channel=0), seg)
    result = make_crops(dataset, seg, tmp_path / "cells", 24, mask_background=True, border="pad", pad="reflect",
                        min_area=20)
    settings = crop_settings(DatasetSpec.from_yaml(result.spec))
    assert {k: v for k, v in settings.items() if k != "segmentation"} == {
        "size": 24, "mask_neighbours": False, "mask_background": True, "border": "pad", "pad": "reflect",
        "min_area": 20, "max_area": None}
    segmentation = settings["segmentation"]
    assert segmentation["backend"] == "skimage" and segmentation["nucleus_channel"] == 0
    assert segmentation["cell_channel"] is None and segmentation["params"]["threshold"] == "local"
    # With masks of unknown origin the crops are still known; with a backend, the backend is.
    plain = make_crops(dataset, dataset.base_dir / "seg", tmp_path / "plain", 16)
    assert crop_settings(DatasetSpec.from_yaml(plain.spec))["segmentation"] is None
    direct = make_crops(dataset, SkimageBackend(channel=0), tmp_path / "direct", 16, border="pad")
    assert crop_settings(DatasetSpec.from_yaml(direct.spec))["segmentation"]["backend"] == "skimage"


def test_hpa_fields_end_to_end_with_the_true_masks(tmp_path: Path) -> None:
    simulate_hpa_fields(tmp_path / "hpa", n_fields=3, size=192, seed=1)
    spec = hpa(tmp_path / "hpa")
    result = make_crops(spec, tmp_path / "hpa", tmp_path / "out", 48, border="pad")
    cells = pd.read_csv(result.cells, dtype=str)
    truth = pd.read_csv(tmp_path / "hpa" / "cells_truth.csv", dtype=str)
    merged = truth.merge(cells, on=["Id", "object_id"], how="left", suffixes=("_cell", "_field"))
    assert merged.crop.notna().all() and len(cells) == len(truth)  # every true cell, once
    for cell_labels, field_labels in zip(merged.Target_cell, merged.Target_field):
        assert set(cell_labels.split()) <= set(field_labels.split())
    assert read_image(tmp_path / "out" / cells.crop[0]).shape == (4, 48, 48)
    cell_spec = DatasetSpec.from_yaml(result.spec)
    assert cell_spec.image.channels == ["red", "green", "blue", "yellow"]
    assert cell_spec.task("localization").values == "indices"
    assert len(cell_spec.labels(cell_spec.load_manifest(), "localization")) == len(cells)


def test_make_crops_errors(dataset: DatasetSpec, tmp_path: Path) -> None:
    masks = dataset.base_dir / "seg"
    with pytest.raises(CropError, match="mask folder .*nowhere.* does not exist"):
        make_crops(dataset, tmp_path / "nowhere", tmp_path / "out", 16)
    with pytest.raises(CropError, match="masks must be a folder or a segmentation backend; got int"):
        make_crops(dataset, 3, tmp_path / "out", 16)
    with pytest.raises(CropError, match="write_masks=True writes the masks a backend makes"):
        make_crops(dataset, masks, tmp_path / "out", 16, write_masks=True)
    with pytest.raises(CropError, match="workers must be an integer >= 1; got 0"):
        make_crops(dataset, masks, tmp_path / "out", 16, workers=0)
    with pytest.raises(CropError, match="has no field to cut"):
        make_crops(dataset, masks, tmp_path / "out", 16, frame=dataset.load_manifest().iloc[:0])
    with pytest.raises(CropError, match="crop size must be an integer >= 1"):
        make_crops(dataset, masks, tmp_path / "out", 0)
    with pytest.raises(OutputPathError, match="is the dataset's own manifest"):
        spec = spec_from_manifest(dataset.manifest_path, image_col="filename", tasks=["condition"])
        (dataset.base_dir / "labels.csv").rename(dataset.base_dir / "cells.csv")
        spec.manifest = "cells.csv"
        make_crops(spec, masks, dataset.base_dir, 16)


def test_missing_mask_clashing_columns_and_keys(dataset: DatasetSpec, tmp_path: Path) -> None:
    masks = dataset.base_dir / "seg"
    frame = dataset.load_manifest()
    (masks / mask_path_for(frame.filename[2])).unlink()
    with pytest.raises(CropError, match=r"1 of 6 fields have no mask file, the first .*f02.tif.* \(row 3\)"):
        make_crops(dataset, masks, tmp_path / "out", 16)
    with pytest.raises(CropError, match="already has column\\(s\\) area, crop"):
        make_crops(dataset, masks, tmp_path / "out", 16, frame=frame.assign(area="1", crop="x"))
    twin = frame.iloc[[0, 0]].copy()
    twin.iloc[1, twin.columns.get_loc("filename")] = frame.filename[0].replace(".tif", ".png")
    with pytest.raises(CropError, match="have the same key 'images/plate0/f00'"):
        make_crops(dataset, masks, tmp_path / "out", 16, frame=twin)


def test_unfit_mask_files(dataset: DatasetSpec, tmp_path: Path) -> None:
    masks = dataset.base_dir / "seg"
    path = masks / mask_path_for(dataset.load_manifest().filename[0])
    write_tiff(path, np.zeros((80, 80), np.uint16))
    with pytest.raises(CropError, match="row 1: mask file .* is 80 x 80 pixels but its field is 96 x 96"):
        make_crops(dataset, masks, tmp_path / "out", 16)
    write_tiff(path, np.zeros((2, 96, 96), np.uint16))
    with pytest.raises(CropError, match="holds 2 channel\\(s\\) of uint16"):
        make_crops(dataset, masks, tmp_path / "out", 16)
    path.write_bytes(b"not a tiff")
    with pytest.raises(CropError, match="row 1: cannot read mask file"):
        make_crops(dataset, masks, tmp_path / "out", 16)


def test_an_unreadable_field_names_its_row(dataset: DatasetSpec, tmp_path: Path) -> None:
    (dataset.base_dir / dataset.load_manifest().filename[4]).write_bytes(b"broken")
    with pytest.raises(ImageReadError, match="row 5: .*run `cellclass validate`"):
        make_crops(dataset, dataset.base_dir / "seg", tmp_path / "out", 16)


# --------------------------------------------------------------------------------------
# montages
# --------------------------------------------------------------------------------------


def montage_of(tiles: dict[tuple[int, int], np.ndarray], grid: tuple[int, int], tile: int,
               fill: int = 0, channels: int = 2) -> np.ndarray:
    image = np.full((channels, grid[0] * tile, grid[1] * tile), fill, np.uint16)
    for (r, c), t in tiles.items():
        image[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = t
    return image


def test_cut_montage_returns_the_tiles_and_skips_padding() -> None:
    rng = np.random.default_rng(0)
    tiles = {(r, c): rng.integers(0, 4000, (2, 10, 10)).astype(np.uint16) for r in range(3) for c in range(4)
             if (r, c) not in ((2, 2), (2, 3))}
    image = montage_of(tiles, (3, 4), 10, fill=7)
    cut = list(cut_montage(image, 10))
    assert [(r, c) for _, r, c, _ in cut] == sorted(tiles)
    assert [i for i, _, _, _ in cut] == [r * 4 + c for r, c in sorted(tiles)]
    for _, r, c, t in cut:
        assert t.dtype == np.uint16
        np.testing.assert_array_equal(t, tiles[(r, c)])
    assert len(list(cut_montage(image, 10, skip_empty=False))) == 12
    by_column = list(cut_montage(image, (10, 10), order="column"))
    assert [i for i, _, _, _ in by_column] == sorted(c * 3 + r for r, c in tiles)
    # near-constant padding (noise of a few grey levels) needs a threshold
    noisy = image.astype(np.int32)
    noisy[:, 20:, 20:] += rng.integers(0, 3, (2, 10, 20))
    noisy = noisy.astype(np.uint16)
    assert len(list(cut_montage(noisy, 10))) == 12
    assert len(list(cut_montage(noisy, 10, empty_std_threshold=2.0))) == 10


def test_cut_montage_errors() -> None:
    image = np.zeros((1, 30, 40), np.uint16)
    with pytest.raises(CropError, match="montage of 30 x 40 pixels is not a grid of 12 x 12 tiles"):
        list(cut_montage(image, 12))
    with pytest.raises(CropError, match="order 'diagonal' is invalid; valid: row, column"):
        list(cut_montage(image, 10, order="diagonal"))
    with pytest.raises(CropError, match="empty_std_threshold must be a number >= 0; got -1"):
        list(cut_montage(image, 10, empty_std_threshold=-1))
    with pytest.raises(CropError, match="tile must be one side or \\(height, width\\)"):
        list(cut_montage(image, (10, 10, 10)))
    with pytest.raises(CropError, match="tile side must be an integer >= 1; got 0"):
        list(cut_montage(image, 0))


def test_make_grid_crops(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = tmp_path / "data"
    rows = []
    for m, n_tiles in enumerate((5, 3)):
        tiles = {(i // 3, i % 3): rng.integers(1, 999, (2, 8, 8)).astype(np.uint16) for i in range(n_tiles)}
        write_tiff(root / f"montage{m}.tif", montage_of(tiles, (2, 3), 8))
        rows.append({"file": f"montage{m}.tif", "phase": "G1" if m else "S", "experiment": "E1"})
    pd.DataFrame(rows).to_csv(root / "montages.csv", index=False)
    spec = spec_from_manifest(root / "montages.csv", image_col="file", tasks=["phase"], groups=["experiment"])
    result = make_grid_crops(spec, tmp_path / "out", 8)
    cells = pd.read_csv(result.cells, dtype=str)
    assert cells.columns.tolist() == ["file", "phase", "experiment", *GRID_COLUMNS]
    assert cells.groupby("file").size().tolist() == [5, 3]
    assert cells.object_id[cells.file == "montage0.tif"].tolist() == ["0", "1", "2", "3", "4"]
    assert pd.read_csv(result.fields_qc).n_objects.tolist() == [5, 3]
    tile = read_image(tmp_path / "out" / cells.crop[4])
    montage = read_image(root / "montage0.tif")
    np.testing.assert_array_equal(tile, montage[:, 8:16, 8:16])
    assert DatasetSpec.from_yaml(result.spec).groups == ["experiment", "field_id"]
    assert crop_settings(DatasetSpec.from_yaml(result.spec)) is None  # tiles are no crops around objects
    with pytest.raises(CropError, match="row 1 \\(montage0.tif\\): montage of 16 x 24 pixels is not a grid"):
        make_grid_crops(spec, tmp_path / "other", 7)


@pytest.mark.shared_data
def test_jurkat_tiles_come_back_from_a_rebuilt_montage(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "ifc_cellcycle_jurkat_mlcp"
    labels = pd.read_csv(folder / "labels.csv")
    # one small and one large montage (gaps where duplicates were dropped stay blank)
    chosen = labels[(labels.montage == "CP0001") & labels.phase.isin(["Anaphase", "Telophase"])
                    & (labels.experiment == "Experiment_1")]
    for (phase, montage), group in chosen.groupby(["phase", "montage"]):
        tiles = {(int(r.tile_row), int(r.tile_col)): read_image(folder / r.filename) for r in group.itertuples()}
        first = next(iter(tiles.values()))
        image = np.zeros((first.shape[0], 30 * 40, 30 * 40), first.dtype)  # 30 x 30 tiles of 40 px, blank padding
        for (r, c), t in tiles.items():
            image[:, r * 40:(r + 1) * 40, c * 40:(c + 1) * 40] = t
        cut = list(cut_montage(image, 40, order="column"))
        assert [(i, r, c) for i, r, c, _ in cut] == sorted(
            zip(group.tile_index, group.tile_row, group.tile_col))
        by_index = dict(zip(group.tile_index, group.filename))
        for index, _, _, tile in cut:
            np.testing.assert_array_equal(tile, read_image(folder / by_index[index]))
        assert len(cut) == len(group) and len(group) < 900
