"""validate: every problem found in one pass, named by row, file and reason; sources untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellclass.data.io import write_tiff
from cellclass.data.presets import bps
from cellclass.data.spec import spec_from_manifest
from cellclass.data.validate import validate, write_clean_manifest


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_clean_simulated_set_has_no_problem(bps_dir: Path) -> None:
    report = validate(bps(bps_dir))
    assert report.ok, report.problems
    assert report.dtypes == {"uint16": report.n_rows}


def test_all_four_faults_reported_with_rows_and_sources_untouched(corrupt_bps: tuple[Path, dict[str, int]]) -> None:
    data, rows = corrupt_bps
    before = _digest(data)
    report = validate(bps(data))
    by_row = {p.row: p for p in report.problems}
    assert set(by_row) == set(rows.values())
    assert "truncated" in by_row[rows["truncated"]].reason
    assert by_row[rows["missing"]].reason.startswith("missing file")
    assert "unknown label 'Xray' (did you mean 'X-ray'?)" in by_row[rows["typo"]].reason
    assert by_row[rows["typo"]].field == "label:particle_type"
    assert "has 3 channel(s)" in by_row[rows["channels"]].reason
    assert all(p.file for p in report.problems)
    assert _digest(data) == before


def test_write_clean_keeps_good_rows_and_works_elsewhere(corrupt_bps: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    data, rows = corrupt_bps
    report = validate(bps(data))
    out = tmp_path / "clean" / "meta.csv"
    write_clean_manifest(bps(data), report, out)
    clean = pd.read_csv(out, dtype=str)
    assert len(clean) == report.n_rows - 4
    assert list(clean.columns) == ["filename", "dose_Gy", "particle_type", "hr_post_exposure"]
    spec = spec_from_manifest(out, image_col="filename", tasks=["particle_type"])
    assert validate(spec).ok
    assert report.bad_rows == set(rows.values())
    original = pd.read_csv(data / "meta.csv", dtype=str)
    bad_files = {original.filename[r - 1] for r in rows.values()}
    assert not {Path(f).name for f in clean.filename} & bad_files


def test_duplicates_empty_labels_typos_and_nan_pixels(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        write_tiff(tmp_path / f"{name}.tif", np.ones((1, 4, 4), dtype=np.float32))
    nan = np.ones((1, 4, 4), dtype=np.float32)
    nan[0, 0, 0] = np.nan
    nan[0, 1, 1] = np.inf
    write_tiff(tmp_path / "nan.tif", nan)
    labels = ["mitotic"] * 5 + ["interphase"] * 5
    files = ["a.tif", "b.tif", "c.tif", "a.tif", "nan.tif", "b.tif", "c.tif", "a.tif", "b.tif", "c.tif"]
    frame = pd.DataFrame({"f": files, "y": labels})
    frame.loc[6, "y"] = ""
    frame.loc[8, "y"] = "mitotc"
    frame.to_csv(tmp_path / "m.csv", index=False)
    report = validate(spec_from_manifest(tmp_path / "m.csv", image_col="f", tasks=["y"]))
    reasons = {(p.row, p.field): p.reason for p in report.problems}
    assert reasons[(4, "row")] == "duplicate of row 1 (the same row again)"
    assert reasons[(7, "label:y")] == "empty label in column(s) y"
    assert "probable typo of 'mitotic'" in reasons[(9, "label:y")]
    assert reasons[(5, "image")] == "1 NaN and 1 Inf pixel(s); pixels must be finite"


def test_metadata_only_mode_skips_images(tmp_path: Path) -> None:
    pd.DataFrame({"f": ["gone.tif"], "y": ["a"]}).to_csv(tmp_path / "m.csv", index=False)
    spec = spec_from_manifest(tmp_path / "m.csv", image_col="f", tasks=["y"])
    assert validate(spec, check_images=False).ok
    assert not validate(spec).ok


@pytest.mark.shared_data
def test_drop_unlabeled_on_autofoci(shared_data: Path) -> None:
    manifest = shared_data / "autofoci_dsb_foci_singlecell" / "labels.csv"
    spec = spec_from_manifest(manifest, image_col="filename", tasks=["has_focus:binary", "n_foci"],
                              drop_unlabeled=True)
    report = validate(spec)
    assert report.n_rows == 344 and report.n_dropped == 460
    assert report.ok, report.problems[:5]
