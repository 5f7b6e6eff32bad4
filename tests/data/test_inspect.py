"""inspect: class counts, co-occurrence, intensities, sample grids and the confound table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellclass.data.inspect import cramers_v, display_rgb, inspect_dataset, theils_u
from cellclass.data.presets import bps, hpa
from cellclass.data.spec import spec_from_manifest


def test_association_measures_on_known_tables() -> None:
    assert theils_u(np.array([[10, 0], [0, 10]])) == pytest.approx(1.0)
    assert theils_u(np.array([[5, 5], [5, 5]])) == pytest.approx(0.0)
    assert cramers_v(np.array([[50, 0], [0, 50]])) == pytest.approx(1.0, abs=0.03)
    assert cramers_v(np.array([[25, 25], [25, 25]])) == pytest.approx(0.0)


@pytest.mark.slow
def test_simulated_bps_full_inspection(bps_dir: Path, tmp_path: Path) -> None:
    report = inspect_dataset(bps(bps_dir), tmp_path / "out", max_images=50, samples_per_class=4)
    assert not report.metadata_only and report.images_checked == 50
    stats = report.channel_stats
    assert stats["dtype"].tolist() == ["uint16"] and stats["max"].iloc[0] > 255
    assert sum(report.class_counts["particle_type"].values()) == report.n_rows
    out = tmp_path / "out"
    for name in ("inspection.json", "class_counts.csv", "confounds.csv", "channel_stats.csv",
                 "samples/particle_type/Fe.png", "samples/particle_type/X-ray.png"):
        assert (out / name).is_file(), name
    assert (out / "samples/particle_type/Fe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "inspection.json").read_text())
    assert data["n_rows"] == report.n_rows


@pytest.mark.slow
@pytest.mark.shared_data
def test_real_bps_metadata_flags_the_plate_confound(shared_data: Path, tmp_path: Path) -> None:
    report = inspect_dataset(bps(shared_data / "bps_metadata"), tmp_path)
    assert report.metadata_only and report.images_found == 0
    by = {(c.task, c.group): c for c in report.confounds}
    for task in ("particle_type", "dose", "hours"):
        assert by[(task, "plate")].level == "determined"
        assert by[(task, "plate")].theils_u == pytest.approx(1.0)
    warnings = "\n".join(report.warnings)
    assert "particle_type is fully determined by plate" in warnings
    assert "dose is fully determined by plate" in warnings
    assert "hours is fully determined by plate" in warnings
    sham = [c for c in report.control_checks if c.task == "particle_type"]
    assert len(sham) == 1 and sham[0].disjoint and sham[0].group == "plate"
    assert sham[0].groups_by_label == {"Fe": ["P244", "P250", "P253"], "X-ray": ["P278", "P282", "P286"]}
    assert "2 sham groups" in sham[0].message and "differ only by plate" in sham[0].message
    assert not any((tmp_path / "samples").glob("*"))


@pytest.mark.shared_data
def test_mitocheck_sixteen_classes(shared_data: Path) -> None:
    manifest = shared_data / "mitocheck_h2b_phenotypes" / "labels.csv"
    spec = spec_from_manifest(manifest, image_col="filename", tasks=["phenotype"], groups=["plate"])
    report = inspect_dataset(spec, max_images=100)
    counts = report.class_counts["phenotype"]
    assert len(counts) == 16 and sum(counts.values()) == 3277
    assert counts["Polylobed"] == 473 and min(counts.values()) == 58
    assert report.channel_stats["dtype"].tolist() == ["uint8"]


def test_multilabel_cooccurrence_on_simulated_hpa(hpa_dir: Path) -> None:
    report = inspect_dataset(hpa(hpa_dir), max_images=10)
    table = report.cooccurrence["localization"]
    assert (np.diag(table.to_numpy()) == [report.class_counts["localization"][c] for c in table.index]).all()
    assert (table.to_numpy() == table.to_numpy().T).all()
    assert report.channel_stats["channel"].tolist() == ["red", "green", "blue", "yellow"]


def test_display_rgb_is_unit_range() -> None:
    image = np.random.default_rng(0).integers(0, 65535, size=(4, 8, 8)).astype(np.uint16)
    rgb = display_rgb(image)
    assert rgb.shape == (8, 8, 3) and 0 <= rgb.min() and rgb.max() <= 1


def test_no_confound_when_labels_are_spread_across_groups(tmp_path: Path) -> None:
    rows = [{"f": f"{i}.tif", "y": "ab"[i % 2], "plate": f"P{i // 4}"} for i in range(40)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    spec = spec_from_manifest(tmp_path / "m.csv", image_col="f", tasks=["y"], groups=["plate"])
    report = inspect_dataset(spec)
    assert report.confounds[0].level == "ok" and report.warnings == []


def test_intensities_per_dtype_and_channel_count_and_what_was_left_out(tmp_path: Path) -> None:
    from cellclass.data.io import write_tiff

    files, labels = [], []
    for i in range(6):
        write_tiff(tmp_path / f"u16_{i}.tif", np.full((1, 8, 8), 1000 + i, dtype=np.uint16))
        files.append(f"u16_{i}.tif")
    for i in range(3):
        write_tiff(tmp_path / f"u8_{i}.tif", np.full((1, 8, 8), 7, dtype=np.uint8))
        write_tiff(tmp_path / f"rgb_{i}.tif", np.full((3, 8, 8), 9, dtype=np.uint8))
        files += [f"u8_{i}.tif", f"rgb_{i}.tif"]
    (tmp_path / "broken.tif").write_bytes(b"II*\x00not a tiff")
    files += ["broken.tif", "gone.tif"]
    labels = ["a", "b"] * (len(files) // 2)
    pd.DataFrame({"f": files, "y": labels}).to_csv(tmp_path / "m.csv", index=False)
    report = inspect_dataset(spec_from_manifest(tmp_path / "m.csv", image_col="f", tasks=["y"]))
    stats = report.channel_stats
    groups = stats.groupby(["dtype", "channels"])["images"].first().to_dict()
    assert groups == {("uint16", 1): 6, ("uint8", 1): 3, ("uint8", 3): 3}
    assert stats.loc[(stats.dtype == "uint16"), "min"].item() == 1000
    assert stats.loc[(stats.dtype == "uint8") & (stats.channels == 1), "max"].item() == 7
    assert report.images_checked == 12 and report.n_rows == 14
    left = {x.reason.split(" (")[0]: x for x in report.left_out}
    assert left["no image file"].count == 1 and "row 14 (gone.tif)" in left["no image file"].examples
    assert left["unreadable"].count == 1 and left["unreadable"].examples[0].startswith("row 13 (broken.tif): ")
    assert report.to_dict()["left_out"][0]["count"] == 1


def test_sampling_is_reported_as_left_out(bps_dir: Path) -> None:
    report = inspect_dataset(bps(bps_dir), max_images=10)
    (left,) = report.left_out
    assert left.count == report.n_rows - 10 and "--max-images" in left.reason
