"""The HPA field simulator: per-cell labels, true masks, the HPA layout, and segmentation on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellclass.data.io import read_image
from cellclass.data.presets import HPA_CLASSES, hpa
from cellclass.data.segment import CellParams, SkimageBackend, segment_cells
from cellclass.data.simulate import HPA_RENDERED_CLASSES
from cellclass.data.simulate_hpa_fields import simulate_hpa_fields
from cellclass.errors import SimulationError
from cellclass.evaluation.segmentation_metrics import score_fields


@pytest.fixture(scope="module")
def fields(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hpa_fields")
    simulate_hpa_fields(out, n_fields=6, size=256, seed=0)
    return out


def _sets(text: str) -> set[int]:
    return {int(v) for v in str(text).split()}


def test_field_labels_are_the_union_of_their_cells_labels(fields: Path) -> None:
    manifest = pd.read_csv(fields / "train.csv", dtype=str)
    truth = pd.read_csv(fields / "cells_truth.csv", dtype={"Id": str, "Target": str})
    assert sorted(truth.Id.unique()) == sorted(manifest.Id)
    proper_subsets = 0
    for field_id, target in zip(manifest.Id, manifest.Target):
        cells = truth[truth.Id == field_id]
        field_set = _sets(target)
        assert field_set <= set(HPA_RENDERED_CLASSES) and 1 <= len(field_set) <= 3
        cell_sets = [_sets(t) for t in cells.Target]
        assert all(s and s <= field_set for s in cell_sets)
        assert set().union(*cell_sets) == field_set
        assert cells.object_id.tolist() == list(range(1, len(cells) + 1))
        proper_subsets += sum(s < field_set for s in cell_sets)
    # the weak-label setting: in fields of several labels, some cells show only part of them
    assert any(len(_sets(t)) > 1 for t in manifest.Target)
    assert proper_subsets > 0


def test_masks_match_the_truth_and_nuclei_lie_in_their_cells(fields: Path) -> None:
    truth = pd.read_csv(fields / "cells_truth.csv", dtype={"Id": str})
    for field_id, cells in truth.groupby("Id"):
        cell_mask = read_image(fields / "masks" / f"{field_id}.tif")
        nuclei = read_image(fields / "nuclei" / f"{field_id}.tif")
        assert cell_mask.dtype == np.uint16 and cell_mask.shape == (1, 256, 256)
        ids = set(np.unique(cell_mask)) - {0}
        assert ids == set(cells.object_id)
        assert set(np.unique(nuclei)) - {0} == ids  # every cell has its nucleus
        inside = nuclei[0] > 0
        assert (cell_mask[0][inside] == nuclei[0][inside]).all()
        assert 4 <= len(ids) <= 16  # 256 px fields: a 3x3 or 4x4 grid of cells, most slots taken


def test_hpa_preset_reads_the_fields(fields: Path) -> None:
    spec = hpa(fields)
    frame = spec.load_manifest()
    image = spec.read_image(frame.iloc[0])
    assert image.shape == (4, 256, 256) and image.dtype == np.uint8
    labels = spec.labels(frame, "localization")
    assert all(set(v) <= set(HPA_CLASSES) and v for v in labels)
    # nuclei (blue) are bright where the true nuclei are, dim elsewhere
    nuclei = read_image(fields / "nuclei" / f"{frame.Id[0]}.tif")[0] > 0
    assert image[2][nuclei].mean() > 4 * image[2][~nuclei].mean()


def test_deterministic_by_seed_whatever_the_workers(tmp_path: Path) -> None:
    simulate_hpa_fields(tmp_path / "a", n_fields=3, size=128, seed=5)
    simulate_hpa_fields(tmp_path / "b", n_fields=3, size=128, seed=5, workers=2)
    simulate_hpa_fields(tmp_path / "c", n_fields=3, size=128, seed=6)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 + 3 * 6
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a" / "train.csv").read_bytes() != (tmp_path / "c" / "train.csv").read_bytes()


def test_default_segmentation_against_the_true_masks(fields: Path, capsys: pytest.CaptureFixture) -> None:
    spec = hpa(fields)
    backend = SkimageBackend(channel=2)
    nuclei_pairs, cell_pairs = [], []
    for record in spec.load_manifest().to_dict("records"):
        image = spec.read_image(record)
        predicted = backend.segment(image)
        nuclei_pairs.append((read_image(fields / "nuclei" / f"{record['Id']}.tif")[0], predicted))
        cells = segment_cells(predicted, image, channel=0, params=CellParams(threshold="li"))
        cell_pairs.append((read_image(fields / "masks" / f"{record['Id']}.tif")[0], cells))
    nuclei_f1 = score_fields(nuclei_pairs)["f1"]
    cells_f1 = score_fields(cell_pairs)["f1"]
    with capsys.disabled():
        print(f"\nsimulated HPA fields, default backend: nuclei object F1 {nuclei_f1:.3f}, "
              f"cells (seeded, microtubule channel) {cells_f1:.3f} at IoU 0.5")
    assert nuclei_f1 >= 0.9
    assert cells_f1 >= 0.8


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_fields": 0}, "n_fields must be a positive integer, got 0"),
    ({"size": 64}, "size must be an integer of at least 128 pixels, got 64"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"workers": 0}, "workers must be a positive integer"),
])
def test_errors(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(SimulationError, match=match):
        simulate_hpa_fields(tmp_path, **{"n_fields": 1, "size": 128, **kwargs})


def test_refuses_to_write_over_a_dataset(tmp_path: Path) -> None:
    simulate_hpa_fields(tmp_path, n_fields=1, size=128)
    with pytest.raises(SimulationError, match="train.csv already exists"):
        simulate_hpa_fields(tmp_path, n_fields=1, size=128)
    simulate_hpa_fields(tmp_path, n_fields=2, size=128, overwrite=True)
    assert len(pd.read_csv(tmp_path / "train.csv")) == 2
