"""Segmenting a dataset of fields into mask files: layout, cells from nuclei, masks the user
has, resumption, parallel workers, and the outputs it refuses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellclass.data.crops import make_crops, mask_path_for
from cellclass.data.io import read_image, write_tiff
from cellclass.data.masks import (
    MASK_COLUMNS,
    field_source,
    resolve_channel,
    segment_fields,
)
from cellclass.data.presets import hpa
from cellclass.data.segment import (
    MaskFileBackend,
    NucleusParams,
    SegmentationError,
    SkimageBackend,
    segment_nuclei,
)
from cellclass.data.simulate_fields import simulate_nuclei_field
from cellclass.data.simulate_hpa_fields import simulate_hpa_fields
from cellclass.data.spec import DatasetSpec, spec_from_manifest
from cellclass.errors import ImageReadError, OutputPathError
from cellclass.evaluation.segmentation_metrics import match_objects


@pytest.fixture(scope="module")
def hpa_fields(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four simulated HPA fields of 192 x 192 with their true cells and nuclei (read-only)."""
    out = tmp_path_factory.mktemp("hpa_fields")
    simulate_hpa_fields(out, n_fields=4, size=192, seed=3)
    return out


def nuclei_dataset(root: Path, names: list[str]) -> DatasetSpec:
    """Fields of simulated nuclei (uint16), one per name, with a manifest of plates."""
    rows = []
    for i, name in enumerate(names):
        image, _ = simulate_nuclei_field((96, 96), n=5 + i, seed=i, radius=(5.0, 8.0))
        write_tiff(root / name, image)
        rows.append({"filename": name, "condition": "a" if i % 2 else "b", "plate": f"P{i // 2}"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return spec_from_manifest(root / "labels.csv", image_col="filename", tasks=["condition"], groups=["plate"])


def test_one_mask_per_field_where_crops_reads_it(tmp_path: Path) -> None:
    # Two fields of one stem in different folders: their masks mirror the folders.
    names = ["images/p1/f00.tif", "images/p2/f00.tif", "images/p2/f01.tif"]
    spec = nuclei_dataset(tmp_path / "data", names)
    out = tmp_path / "seg"
    result = segment_fields(spec, SkimageBackend(), out)
    assert result.n_fields == 3 and result.n_processed == 3 and not result.cells
    manifest = pd.read_csv(result.manifest, dtype=str)
    assert manifest.columns.tolist() == ["filename", "condition", "plate", *MASK_COLUMNS]
    assert manifest["mask"].tolist() == [str(mask_path_for(n)) for n in names]
    assert manifest["mask"].tolist()[:2] == ["masks/images/p1/f00.tif", "masks/images/p2/f00.tif"]
    for name, row in zip(names, manifest.itertuples(), strict=True):
        mask = read_image(out / row.mask)
        assert mask.dtype == np.uint16 and mask.shape == (1, 96, 96)
        np.testing.assert_array_equal(mask[0], segment_nuclei(read_image(tmp_path / "data" / name)))
        ids = np.unique(mask)
        assert ids.tolist() == list(range(len(ids)))  # 0 background, objects 1..N
        assert int(row.n_objects) == len(ids) - 1
    assert list(result.n_objects) == manifest.n_objects.astype(int).tolist()
    summary = json.loads((out / "segment.json").read_text())
    assert summary["objects"]["total"] == result.total and summary["settings"]["backend"]["name"] == "skimage"
    # crops reads the folder as it is
    cells = make_crops(spec, out, tmp_path / "cells", 16, border="pad")
    assert cells.n_cells == result.total


def test_cells_grown_from_nuclei_match_the_true_cells(hpa_fields: Path, tmp_path: Path) -> None:
    spec = hpa(hpa_fields)
    nucleus, cell = resolve_channel(spec, None), resolve_channel(spec, "red", "--cell-channel")
    assert (nucleus, cell) == (2, 0)
    result = segment_fields(spec, SkimageBackend(channel=nucleus), tmp_path / "seg", cell_channel=cell)
    assert result.cells
    manifest = pd.read_csv(result.manifest, dtype=str)
    assert manifest.columns.tolist() == ["Id", "Target", "field_id", "field_row", "mask", "nuclei", "n_objects"]
    for row in manifest.itertuples():
        cells = read_image(tmp_path / "seg" / row.mask)[0]
        nuclei = read_image(tmp_path / "seg" / row.nuclei)[0]
        inside = nuclei > 0
        assert (cells[inside] == nuclei[inside]).all()  # each cell keeps its nucleus's number
        truth = read_image(hpa_fields / "masks" / f"{row.Id}.tif")[0]
        assert match_objects(truth, cells)["by_threshold"]["0.5"]["f1"] >= 0.9


def test_masks_the_user_has_are_checked_and_copied(hpa_fields: Path, tmp_path: Path) -> None:
    spec = hpa(hpa_fields)
    record = spec.load_manifest().to_dict("records")[0]
    assert field_source(spec, record) == hpa_fields / "train" / record["Id"]  # a channel set: its prefix
    result = segment_fields(spec, MaskFileBackend("../masks/{stem}.tif"), tmp_path / "seg")
    for row in pd.read_csv(result.manifest, dtype=str).itertuples():
        np.testing.assert_array_equal(read_image(tmp_path / "seg" / row.mask),
                                      read_image(hpa_fields / "masks" / f"{row.Id}.tif"))
    with pytest.raises(SegmentationError, match=r"row 1 \(field '.+'\): mask file .+ does not exist"):
        segment_fields(spec, MaskFileBackend("../nope/{stem}.tif"), tmp_path / "other")


def test_a_rerun_does_only_what_changed(tmp_path: Path) -> None:
    spec = nuclei_dataset(tmp_path / "data", ["f00.tif", "f01.tif", "f02.tif"])
    out = tmp_path / "seg"
    first = segment_fields(spec, SkimageBackend(), out)
    again = segment_fields(spec, SkimageBackend(), out)
    assert again.n_processed == 0 and again.n_objects == first.n_objects
    # an interrupted run: one mask lost; one field's image replaced
    (out / "masks" / "f01.tif").unlink()
    image = tmp_path / "data" / "f02.tif"
    write_tiff(image, np.zeros((1, 96, 96), np.uint16))
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    resumed = segment_fields(spec, SkimageBackend(), out)
    assert resumed.n_processed == 2
    assert resumed.n_objects[:2] == first.n_objects[:2] and resumed.n_objects[2] == 0 and resumed.n_empty == 1
    # other settings: every field again
    other = segment_fields(spec, SkimageBackend(NucleusParams(min_area=60)), out)
    assert other.n_processed == 3


def test_worker_processes_give_the_same_masks(tmp_path: Path) -> None:
    spec = nuclei_dataset(tmp_path / "data", [f"f{i:02d}.tif" for i in range(4)])
    one = segment_fields(spec, SkimageBackend(), tmp_path / "one")
    two = segment_fields(spec, SkimageBackend(), tmp_path / "two", workers=2)
    assert one.n_objects == two.n_objects
    for i in range(4):
        np.testing.assert_array_equal(read_image(tmp_path / "one" / "masks" / f"f{i:02d}.tif"),
                                      read_image(tmp_path / "two" / "masks" / f"f{i:02d}.tif"))


def test_outputs_never_replace_inputs_or_masks_made_elsewhere(hpa_fields: Path, tmp_path: Path) -> None:
    spec = hpa(hpa_fields)
    before = {p: p.read_bytes() for p in (hpa_fields / "masks").iterdir()}
    with pytest.raises(OutputPathError, match="would replace its input"):
        segment_fields(spec, MaskFileBackend("../masks/{stem}.tif"), hpa_fields)
    with pytest.raises(OutputPathError, match="holds files that no segmentation run wrote"):
        segment_fields(spec, SkimageBackend(channel=2), hpa_fields)
    assert {p: p.read_bytes() for p in (hpa_fields / "masks").iterdir()} == before
    nuclei_dataset(tmp_path / "data", ["f00.tif"])
    (tmp_path / "data" / "labels.csv").rename(tmp_path / "data" / "masks.csv")
    moved = spec_from_manifest(tmp_path / "data" / "masks.csv", image_col="filename", tasks=["condition"])
    with pytest.raises(OutputPathError, match="is the dataset's own manifest"):
        segment_fields(moved, SkimageBackend(), tmp_path / "data")


def test_errors_name_the_value_and_what_is_valid(tmp_path: Path) -> None:
    spec = nuclei_dataset(tmp_path / "data", ["f00.tif", "f01.tif"])
    with pytest.raises(SegmentationError, match="workers must be an integer >= 1; got 0"):
        segment_fields(spec, SkimageBackend(), tmp_path / "a", workers=0)
    with pytest.raises(SegmentationError, match="cell_channel must be a channel index >= 0 or None; got -1"):
        segment_fields(spec, SkimageBackend(), tmp_path / "a", cell_channel=-1)
    with pytest.raises(SegmentationError, match=r"row 1 \(field 'f00.tif'\): channel 3 is out of range"):
        segment_fields(spec, SkimageBackend(channel=3), tmp_path / "a")
    with pytest.raises(SegmentationError, match="has no field to segment"):
        segment_fields(spec, SkimageBackend(), tmp_path / "a", frame=spec.load_manifest().iloc[:0])
    (tmp_path / "data" / "f01.tif").write_bytes(b"not a tiff")
    with pytest.raises(ImageReadError, match=r"row 2: .*f01.tif"):
        segment_fields(spec, SkimageBackend(), tmp_path / "b")
    clash = pd.read_csv(spec.manifest_path).assign(n_objects=1)
    clash.to_csv(spec.manifest_path, index=False)
    with pytest.raises(SegmentationError, match="already has column\\(s\\) n_objects"):
        segment_fields(spec, SkimageBackend(), tmp_path / "c")


def test_two_fields_of_one_key_are_refused(tmp_path: Path) -> None:
    spec = nuclei_dataset(tmp_path / "data", ["a/f.tif", "a/f.png"])
    with pytest.raises(SegmentationError, match="have the same key 'a/f'"):
        segment_fields(spec, SkimageBackend(), tmp_path / "seg")


def test_channels_by_index_or_name(hpa_fields: Path, tmp_path: Path) -> None:
    spec = hpa(hpa_fields)
    assert resolve_channel(spec, "yellow") == 3 and resolve_channel(spec, "Blue") == 2 and resolve_channel(spec, 1) == 1
    with pytest.raises(SegmentationError, match="'dapi' is not a channel of dataset 'hpa'; valid: an index from 0, "
                                                "or one of red, green, blue, yellow"):
        resolve_channel(spec, "dapi")
    with pytest.raises(SegmentationError, match="4 is out of range for dataset 'hpa'.+valid: 0 to 3"):
        resolve_channel(spec, "4")
    unnamed = nuclei_dataset(tmp_path / "data", ["f00.tif"])
    assert resolve_channel(unnamed, None) == 0 and resolve_channel(unnamed, "2") == 2
    with pytest.raises(SegmentationError, match="valid: an index from 0 \\(the dataset names no channels\\)"):
        resolve_channel(unnamed, "dna")
    with pytest.raises(SegmentationError, match="'-1' is negative"):
        resolve_channel(unnamed, "-1")
