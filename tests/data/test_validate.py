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


def test_progress_counts_the_decoded_images(bps_dir: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    report = validate(bps(bps_dir), workers=2, progress=lambda *call: calls.append(call))
    assert calls[-1] == ("validating", report.n_rows, report.n_rows)
    assert [done for _, done, _ in calls] == list(range(1, report.n_rows + 1))


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


def _manifest(folder: Path, files: list[str], labels: list[str] | None = None) -> Path:
    labels = labels or ["a", "b"] * (len(files) // 2) + ["a"] * (len(files) % 2)
    pd.DataFrame({"f": files, "y": labels}).to_csv(folder / "m.csv", index=False)
    return folder / "m.csv"


def test_a_row_gets_every_problem_channels_and_dtype_and_mixed_dtypes_are_flagged(tmp_path: Path) -> None:
    for name in ("a", "b", "c", "d"):
        write_tiff(tmp_path / f"{name}.tif", np.ones((1, 8, 8), dtype=np.uint16))
    write_tiff(tmp_path / "odd.tif", np.ones((3, 8, 8), dtype=np.uint8))
    report = validate(spec_from_manifest(_manifest(tmp_path, ["a.tif", "b.tif", "c.tif", "d.tif", "odd.tif"]),
                                         image_col="f", tasks=["y"]))
    odd = [p.reason for p in report.problems if p.row == 5]
    assert odd == ["has 3 channel(s) (shape (3, 8, 8)); expected 1 (most images)",
                   "dtype uint8 differs from the dataset's uint16"]
    (mixed,) = [p for p in report.problems if p.row is None]
    assert mixed.severity == "error"
    assert mixed.reason.startswith("images have mixed dtypes: uint16 (4 images), uint8 (1 images); valid: one dtype")
    assert report.bad_rows == {5}


def test_header_only_manifest_and_filters_that_keep_no_row_are_problems(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("f,y\n")
    report = validate(spec_from_manifest(tmp_path / "m.csv", image_col="f", tasks=["y"]))
    assert not report.ok and report.n_rows == 0
    assert [(p.field, p.reason) for p in report.problems] == [
        ("manifest", f"the manifest '{tmp_path / 'm.csv'}' has no row (a header only); valid: one row per image")]
    write_tiff(tmp_path / "a.tif", np.ones((1, 4, 4), dtype=np.uint8))
    spec = spec_from_manifest(_manifest(tmp_path, ["a.tif"]), image_col="f", tasks=["y"])
    spec.where = ["y == zzz"]
    (problem,) = validate(spec).problems
    assert problem.reason.startswith(f"no row is left: no row of '{tmp_path / 'm.csv'}' satisfies 'y == zzz'")


def test_repeated_rows_and_conflicting_labels_are_told_apart(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        write_tiff(tmp_path / f"{name}.tif", np.ones((1, 4, 4), dtype=np.uint8))
    manifest = _manifest(tmp_path, ["a.tif", "b.tif", "c.tif", "a.tif", "b.tif"], ["x", "y", "x", "x", "x"])
    reasons = {p.row: p.reason for p in validate(spec_from_manifest(manifest, image_col="f", tasks=["y"])).problems}
    assert reasons == {4: "duplicate of row 1 (the same row again)",
                       5: "same image as row 2 with other labels: y='x' here, y='y' there"}


def test_paths_out_of_the_data_folder_are_warnings(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    outside = tmp_path / "outside.tif"
    write_tiff(outside, np.ones((1, 4, 4), dtype=np.uint8))
    write_tiff(data / "in.tif", np.ones((1, 4, 4), dtype=np.uint8))
    (data / "link.tif").symlink_to(outside)
    (data / "inner.tif").symlink_to(data / "in.tif")  # a link inside the folder is fine
    manifest = _manifest(data, ["in.tif", "../outside.tif", str(outside), "link.tif", "inner.tif"])
    report = validate(spec_from_manifest(manifest, image_col="f", tasks=["y"]))
    assert report.ok and not report.errors
    warnings = {p.row: p.reason for p in report.warnings}
    assert set(warnings) == {2, 3, 4} and all(p.field == "path" for p in report.warnings)
    assert warnings[2].startswith(f"path '../outside.tif' leaves the data folder through '..' (to '{outside}')")
    assert warnings[3].startswith(f"absolute path '{outside}' outside the data folder")
    assert warnings[4].startswith(f"path 'link.tif' is a symbolic link to '{outside}'")
    assert all("valid: a path inside it" in w for w in warnings.values())


def test_folders_and_broken_links_are_named_as_what_they_are(tmp_path: Path) -> None:
    write_tiff(tmp_path / "a.tif", np.ones((1, 4, 4), dtype=np.uint8))
    (tmp_path / "folder.tif").mkdir()
    (tmp_path / "broken.tif").symlink_to(tmp_path / "gone.tif")
    manifest = _manifest(tmp_path, ["a.tif", "folder.tif", "broken.tif", "missing.tif"])
    reasons = {p.row: p.reason for p in validate(spec_from_manifest(manifest, image_col="f", tasks=["y"])).problems}
    assert reasons == {
        2: "folder.tif is a folder, not an image file; valid: a path to an image file",
        3: f"broken symbolic link broken.tif -> {tmp_path / 'gone.tif'} (the target does not exist)",
        4: "missing file missing.tif",
    }


def test_report_frame_and_dict_carry_severity_and_integer_rows(tmp_path: Path) -> None:
    write_tiff(tmp_path / "a.tif", np.ones((1, 4, 4), dtype=np.uint8))
    report = validate(spec_from_manifest(_manifest(tmp_path, ["a.tif", "gone.tif"]), image_col="f", tasks=["y"]))
    frame = report.to_frame()
    assert list(frame.columns) == ["row", "file", "field", "severity", "reason"]
    assert frame["row"].tolist() == [2] and str(frame["row"].dtype) == "Int64"
    data = report.to_dict()
    assert data["ok"] is False and data["bad_rows"] == [2] and data["shapes"] == {"1x4x4": 1}
    assert data["problems"][0]["severity"] == "error"
