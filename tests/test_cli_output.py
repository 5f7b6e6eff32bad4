"""What the commands print: machine formats (--format json|csv) and tables a pipe can grep."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_cli_errors import TINY_CONFIG, call

from cellclass.data.io import write_tiff
from cellclass.data.presets import bps
from cellclass.training.loop import train


@pytest.fixture
def long_named_set(tmp_path: Path) -> tuple[Path, str]:
    """A dataset whose one bad row names a file far longer than any terminal line."""
    folder = tmp_path / "data"
    deep = Path(*[f"plate_{i:02d}_" + "x" * 40 for i in range(5)])
    (folder / deep).mkdir(parents=True)
    good = [f"{deep.as_posix()}/cell_{i}.tif" for i in range(4)]
    for name in good:
        write_tiff(folder / name, np.ones((1, 8, 8), dtype=np.uint16))
    missing = f"{deep.as_posix()}/the_one_missing_cell_with_a_long_name.tif"
    pd.DataFrame({"filename": [*good, missing], "label": ["a", "b", "a", "b", "a"]}).to_csv(
        folder / "labels.csv", index=False)
    return folder / "labels.csv", missing


def test_a_piped_table_keeps_each_file_name_on_one_line(long_named_set: tuple[Path, str],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    manifest, missing = long_named_set
    assert len(missing) > 250
    rc, out, _ = call(["validate", manifest, "--image-col", "filename", "--task", "label"], capsys)
    assert rc == 1
    (line,) = [line for line in out.splitlines() if missing in line]  # what `grep NAME` finds
    assert "missing file" in line and "error" in line


def test_validate_json_and_csv(long_named_set: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    manifest, missing = long_named_set
    rc, out, err = call(["validate", manifest, "--image-col", "filename", "--task", "label", "--format", "json"],
                        capsys)
    assert rc == 1
    data = json.loads(out)
    assert data["ok"] is False and data["n_rows"] == 5 and data["bad_rows"] == [5]
    assert data["problems"] == [{"row": 5, "file": missing, "field": "image", "reason": f"missing file {missing}",
                                 "severity": "error"}]
    rc, out, err = call(["validate", manifest, "--image-col", "filename", "--task", "label", "--format", "csv",
                         "--report", manifest.parent / "p.csv"], capsys)
    assert rc == 1
    frame = pd.read_csv(io.StringIO(out))
    assert frame.to_dict("records") == [{"row": 5, "file": missing, "field": "image", "severity": "error",
                                         "reason": f"missing file {missing}"}]
    assert "problems written to" in err and "problems written to" not in out


def test_validate_with_warnings_only_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_tiff(tmp_path / "outside.tif", np.ones((1, 4, 4), dtype=np.uint8))
    write_tiff(data / "a.tif", np.ones((1, 4, 4), dtype=np.uint8))
    pd.DataFrame({"f": ["a.tif", "../outside.tif"], "y": ["a", "b"]}).to_csv(data / "m.csv", index=False)
    rc, out, _ = call(["validate", data / "m.csv", "--image-col", "f", "--task", "y"], capsys)
    assert rc == 0
    assert "no error found; 1 warning(s)" in out and "leaves the data folder" in out


def test_inspect_json_and_csv(bps_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = call(["inspect", bps_dir, "--preset", "bps", "--max-images", "20", "--format", "json"], capsys)
    assert rc == 0
    data = json.loads(out)
    assert data["images_checked"] == 20 and data["channel_stats"][0]["dtype"] == "uint16"
    assert data["left_out"][0]["count"] == data["n_rows"] - 20
    rc, out, _ = call(["inspect", bps_dir, "--preset", "bps", "--max-images", "20", "--format", "csv"], capsys)
    assert rc == 0
    blocks = {block.split("\n", 1)[0]: block.split("\n", 1)[1] for block in out.strip().split("\n\n")}
    assert set(blocks) == {"# class_counts", "# channel_stats", "# left_out", "# confounds"}
    counts = pd.read_csv(io.StringIO(blocks["# class_counts"]))
    assert counts.loc[counts.task == "particle_type", "count"].sum() == data["n_rows"]
    stats = pd.read_csv(io.StringIO(blocks["# channel_stats"]))
    assert stats[["dtype", "channels", "images"]].values.tolist() == [["uint16", 1, 20]]


@pytest.mark.slow
def test_compare_json_and_csv(bps_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train(bps(bps_dir), TINY_CONFIG, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    rc, out, _ = call(["compare", tmp_path / "a", tmp_path / "b", "--n-boot", "100", "--format", "json"], capsys)
    assert rc == 0
    pair = json.loads(out)["tasks"]["particle_type"]["pairs"][0]
    assert pair["delta"] == 0.0
    rc, out, _ = call(["compare", tmp_path / "a", tmp_path / "b", "--n-boot", "100", "--format", "csv"], capsys)
    metrics = pd.read_csv(io.StringIO(out.split("\n\n")[0].split("\n", 1)[1]))
    assert metrics["run"].tolist() == ["a", "b"] and (metrics["task"] == "particle_type").all()


def test_progress_notes_after_a_command_go_to_the_stderr_of_the_moment(capsys: pytest.CaptureFixture[str]) -> None:
    """A program (or test) that runs a command through a runner whose stream is closed
    afterwards still gets cellclass's later log lines on its own stderr, not a logging error."""
    import logging

    from typer.testing import CliRunner

    from cellclass.cli import app

    assert CliRunner().invoke(app, ["--version"]).exit_code == 0
    logging.getLogger("cellclass.training").info("a note after the command")
    err = capsys.readouterr().err
    assert "a note after the command" in err and "Logging error" not in err
