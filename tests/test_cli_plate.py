"""An OME-Zarr plate of simulated wells, trained and evaluated end to end from the command
line with the plate's wells as groups: no well on two sides of the split."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("ome_zarr")


@pytest.fixture(scope="module")
def plate_run(tmp_path_factory: pytest.TempPathFactory, cli) -> tuple[Path, Path]:
    run_cli = cli
    data = tmp_path_factory.mktemp("screen")
    made = run_cli("simulate", "plate", data, "--rows", "6", "--cols", "6", "--fields", "2", "--image-size", "32")
    assert made.returncode == 0, made.stdout + made.stderr
    assert "next: cellclass validate" in made.stdout
    run = tmp_path_factory.mktemp("runs") / "lenet"
    trained = run_cli("train", data, "--preset", "plate", "--model", "lenet5", "--epochs", "6",
                      "--image-size", "32", "--batch-size", "16", "--lr", "3e-3", "--out", run)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    return data, run


@pytest.mark.slow
def test_training_keeps_every_well_on_one_side(plate_run: tuple[Path, Path]) -> None:
    data, run = plate_run
    split = json.loads((run / "split.json").read_text())
    assert split["split"]["method"] == "group" and split["split"]["group"] == "well"
    manifest = pd.read_csv(data / "wells.csv")  # one row per well: 36 wells, 72 fields
    well_of = {}
    for row in manifest.itertuples():
        for field in ("0", "1"):
            well_of[f"plate.zarr/{row.well[0]}/{int(row.well[1:])}/{field}"] = row.well
    sides = {side: {well_of[i] for i in ids} for side, ids in split["ids"].items()}
    assert sum(len(ids) for ids in split["ids"].values()) == 72
    assert not (sides["train"] & sides["val"] or sides["train"] & sides["test"] or sides["val"] & sides["test"])
    assert len(sides["train"] | sides["val"] | sides["test"]) == 36
    # Both fields of a well travel together.
    for ids in split["ids"].values():
        assert sorted(well_of[i] for i in ids)[::2] == sorted(well_of[i] for i in ids)[1::2]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"]["group_column"] == "well" and metrics["split"]["groups_overlap"] is False
    assert metrics["split"]["overlapping_groups"] == 0
    test = metrics["tasks"]["treatment"]
    assert test["n"] == len(split["ids"]["test"]) and 0.0 <= test["macro_f1"] <= 1.0
    assert set(test["per_class"]) == {"DMSO", "drug_A", "drug_B"}


@pytest.mark.slow
def test_evaluate_on_the_run_and_on_another_plate(plate_run: tuple[Path, Path], tmp_path: Path, cli) -> None:
    run_cli = cli
    _, run = plate_run
    again = run_cli("evaluate", run, "--out", tmp_path / "eval")
    assert again.returncode == 0, again.stdout + again.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["tasks"]["treatment"]["n"] == len(json.loads((run / "split.json").read_text())["ids"]["test"])
    other = tmp_path / "other"
    assert run_cli("simulate", "plate", other, "--rows", "1", "--cols", "3", "--fields", "1",
                   "--image-size", "32", "--seed", "9").returncode == 0
    external = run_cli("evaluate", run, "--data", other, "--preset", "plate", "--out", tmp_path / "ext")
    assert external.returncode == 0, external.stdout + external.stderr
    predictions = pd.read_csv(tmp_path / "ext" / "predictions.csv")
    assert predictions.image.tolist() == ["plate.zarr/A/1/0", "plate.zarr/A/2/0", "plate.zarr/A/3/0"]


@pytest.mark.slow
def test_cli_plate_errors_are_one_line(cli, tmp_path: Path) -> None:
    missing = cli("validate", tmp_path, "--preset", "plate")
    assert missing.returncode == 2
    assert "holds no OME-Zarr plate" in missing.stderr and "Traceback" not in missing.stderr
    assert cli("simulate", "plate", tmp_path / "p", "--rows", "1", "--cols", "1", "--fields", "1",
               "--image-size", "16").returncode == 0
    again = cli("simulate", "plate", tmp_path / "p", "--rows", "1", "--cols", "1")
    assert again.returncode == 2 and "already exists; pass overwrite=True (--overwrite)" in again.stderr
    (tmp_path / "p" / "plate.zarr" / "A" / "1" / "0").rename(tmp_path / "p" / "gone")
    broken = cli("validate", tmp_path / "p", "--preset", "plate")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "missing file plate.zarr/A/1/0" in " ".join(broken.stdout.split())
