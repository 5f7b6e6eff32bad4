"""Fields to single cells from the command line: simulate hpa-fields, segment, crops, then
validate and train on the cells with every field on one side of the split; and the
mistakes these commands answer with one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellclass.cli import main
from cellclass.data.crops import CELL_COLUMNS, GRID_COLUMNS
from cellclass.data.io import read_image, write_tiff
from cellclass.data.simulate_hpa_fields import simulate_hpa_fields


def call(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``cellclass ARGS`` in this process as the console script does: ``(rc, stdout, stderr)``."""
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_info:
        patch.setattr(sys, "argv", ["cellclass", *map(str, args)])
        main()
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1), out, err


def one_error_line(rc: int, out: str, err: str) -> str:
    """Exit 2, no traceback, and stderr ending with its one ``error:`` line; returns it."""
    assert rc == 2, out + err
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len([line for line in lines if line.startswith("error:")]) == 1 and lines[-1].startswith("error:"), err
    return lines[-1]


@pytest.fixture(scope="module")
def small_fields(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two simulated HPA fields of 128 x 128 with their true masks (read-only)."""
    out = tmp_path_factory.mktemp("small_fields")
    simulate_hpa_fields(out, n_fields=2, size=128, seed=1)
    return out


# -- the mistakes: one line, exit 2, nothing written ----------------------------------------
def test_a_missing_masks_folder_is_one_line(small_fields: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "seg"
    line = one_error_line(*call(["crops", small_fields, "--preset", "hpa", "--masks", missing,
                                 "--out", tmp_path / "cells"], capsys))
    assert line == (f"error: --masks '{missing}' does not exist; valid: the output folder of `cellclass segment`, "
                    "holding masks/<field key>.tif for every field")
    line = one_error_line(*call(["crops", small_fields, "--preset", "hpa", "--masks", small_fields / "train",
                                 "--out", tmp_path / "cells"], capsys))
    assert "holds no masks/ folder" in line
    line = one_error_line(*call(["crops", small_fields, "--preset", "hpa", "--out", tmp_path / "cells"], capsys))
    assert "no --masks given; valid: --masks SEG" in line
    assert not (tmp_path / "cells").exists()


def test_a_bad_backend_is_one_line(small_fields: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(*call(["segment", small_fields, "--preset", "hpa", "--backend", "otsu",
                                 "--out", tmp_path / "seg"], capsys))
    assert line == ("error: --backend 'otsu' is unknown; valid: skimage, cellpose, stardist (or --masks PATTERN "
                    "for masks you have)")
    line = one_error_line(*call(["segment", small_fields, "--preset", "hpa", "--backend", "skimage",
                                 "--masks", "../masks/{stem}.tif", "--out", tmp_path / "seg"], capsys))
    assert "--masks and --backend skimage both given" in line
    assert not (tmp_path / "seg").exists()


def test_missing_cellpose_weights_name_the_file(small_fields: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "nuclei_model"
    line = one_error_line(*call(["segment", small_fields, "--preset", "hpa", "--backend", "cellpose",
                                 "--weights", weights, "--out", tmp_path / "seg"], capsys))
    assert line == (f"error: Cellpose model file '{weights}' does not exist; valid: an existing file on disk "
                    "(cellclass never downloads weights)")
    line = one_error_line(*call(["segment", small_fields, "--preset", "hpa", "--backend", "cellpose",
                                 "--out", tmp_path / "seg"], capsys))
    assert "--backend cellpose needs --weights: a Cellpose model file on disk" in line
    line = one_error_line(*call(["segment", small_fields, "--preset", "hpa", "--backend", "stardist",
                                 "--weights", weights, "--out", tmp_path / "seg"], capsys))
    assert f"StarDist model folder '{weights}' does not exist" in line
    assert not (tmp_path / "seg").exists()


@pytest.mark.parametrize(("args", "fragment"), [
    (["--nucleus-channel", "dapi"], ("--nucleus-channel 'dapi' is not a channel of dataset 'hpa'; valid: an index "
                                     "from 0, or one of red, green, blue, yellow")),
    (["--cell-channel", "blue"], "--cell-channel 'blue' is the nucleus channel (2)"),
    (["--membrane"], "--membrane shapes the cells grown on --cell-channel, which was not given"),
    (["--weights", "w.pt"], "--weights is given but --backend skimage takes none"),
    (["--diameter", "20"], "--diameter applies to --backend cellpose, not skimage"),
    (["--masks", "../masks/{stem}.tif", "--nucleus-channel", "2"], "--masks reads the masks you have as they are"),
])
def test_segment_option_mistakes(args: list[str], fragment: str, small_fields: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(*call(["segment", small_fields, "--preset", "hpa", *args, "--out", tmp_path / "seg"],
                                capsys))
    assert fragment in line
    assert not (tmp_path / "seg").exists()


@pytest.mark.parametrize(("args", "fragment"), [
    (["--grid", "40", "--size", "32"], "--grid cuts montages into tiles and takes no --size"),
    (["--grid", "4x"], "--grid '4x' is invalid; valid: a tile side in pixels, or HEIGHTxWIDTH"),
    (["--masks", "SMALL", "--border", "wrap"], "border 'wrap' is invalid; valid: skip, pad"),
])
def test_crops_option_mistakes(args: list[str], fragment: str, small_fields: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(small_fields) if a == "SMALL" else a for a in args]
    line = one_error_line(*call(["crops", small_fields, "--preset", "hpa", *args, "--out", tmp_path / "cells"],
                                capsys))
    assert fragment in line


def test_segment_never_replaces_masks_it_did_not_write(small_fields: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {p: p.read_bytes() for p in (small_fields / "masks").iterdir()}
    line = one_error_line(*call(["segment", small_fields, "--preset", "hpa", "--out", small_fields], capsys))
    assert "holds files that no segmentation run wrote" in line
    line = one_error_line(*call(["segment", small_fields, "--preset", "hpa", "--masks", "../masks/{stem}.tif",
                                 "--out", small_fields], capsys))
    assert "would replace its input" in line
    assert {p: p.read_bytes() for p in (small_fields / "masks").iterdir()} == before


def test_segment_reads_masks_the_user_has(small_fields: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = call(["segment", small_fields, "--preset", "hpa", "--masks", "../masks/{stem}.tif",
                         "--out", tmp_path / "seg"], capsys)
    assert rc == 0, out + err
    assert "objects per field: masks of the pattern '../masks/{stem}.tif'" in out
    for mask in (small_fields / "masks").iterdir():
        np.testing.assert_array_equal(read_image(tmp_path / "seg" / "masks" / mask.name), read_image(mask))
    assert f"next: cellclass crops {small_fields} --preset hpa --masks {tmp_path / 'seg'} --out CELLS" in out


# -- the whole chain, as a user runs it --------------------------------------------------------
@pytest.mark.slow
def test_fields_to_cells_to_a_model_with_fields_kept_whole(cli, tmp_path: Path) -> None:
    data, seg, cells, run = (tmp_path / name for name in ("fields", "seg", "cells", "run"))
    made = cli("simulate", "hpa-fields", data, "--n-fields", "12", "--size", "256", "--seed", "2")
    assert made.returncode == 0, made.stdout + made.stderr
    assert "next: cellclass segment" in made.stdout

    segmented = cli("segment", data, "--preset", "hpa", "--cell-channel", "red", "--out", seg, "--workers", "2")
    assert segmented.returncode == 0, segmented.stdout + segmented.stderr
    fields = pd.read_csv(data / "train.csv", dtype=str)
    masks = pd.read_csv(seg / "masks.csv", dtype=str)
    assert masks.Id.tolist() == fields.Id.tolist() and masks.Target.tolist() == fields.Target.tolist()
    truth = pd.read_csv(data / "cells_truth.csv", dtype={"Id": str})
    assert masks.n_objects.astype(int).sum() == len(truth)  # the simulated cells are found, one per cell
    for row in masks.itertuples():
        mask = read_image(seg / row.mask)
        assert mask.dtype == np.uint16 and (seg / row.nuclei).is_file()
        assert row.mask == f"masks/{row.Id}.tif"
    table = " ".join(segmented.stdout.split())
    assert f"| 12 | 12 | 0 | {len(truth)} |" in table.replace("│", "|")
    assert f"next: cellclass crops {data} --preset hpa --masks {seg} --out CELLS" in segmented.stdout
    again = cli("segment", data, "--preset", "hpa", "--cell-channel", "red", "--out", seg)
    assert again.returncode == 0 and f"| 12 | 0 | 12 | {len(truth)} |" in " ".join(again.stdout.split()).replace(
        "│", "|")

    cut = cli("crops", data, "--preset", "hpa", "--masks", seg, "--out", cells, "--size", "48",
              "--mask-neighbours", "--border", "pad", "--workers", "2")
    assert cut.returncode == 0, cut.stdout + cut.stderr
    table = pd.read_csv(cells / "cells.csv", dtype=str, keep_default_na=False)
    assert table.columns.tolist() == ["Id", "Target", *CELL_COLUMNS]
    assert len(table) == len(truth)
    target_of = dict(zip(fields.Id, fields.Target, strict=True))
    assert (table.Target == table.Id.map(target_of)).all()  # every cell inherits its field's labels
    assert (table.field_id == table.Id).all()
    assert read_image(cells / table.crop[0]).shape == (4, 48, 48)
    assert f"next: cellclass train {cells / 'cells.yaml'} --model lenet5 --image-size 48 --out RUN" in cut.stdout
    assert "fields QC: ok 12, too_few 0, too_many 0" in cut.stdout

    valid = cli("validate", cells / "cells.yaml")
    assert valid.returncode == 0, valid.stdout + valid.stderr
    assert f"{len(truth)} rows" in valid.stdout

    trained = cli("train", cells / "cells.yaml", "--model", "lenet5", "--epochs", "2", "--image-size", "48",
                  "--tracker", "none", "--set", "tta=false", "--out", run)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "split group by field_id" in " ".join(trained.stdout.split())
    field_of = dict(zip(table.crop, table.field_id, strict=True))
    split = json.loads((run / "split.json").read_text())
    sides = {side: {field_of[i] for i in ids} for side, ids in split["ids"].items()}
    assert all(sides.values())
    assert not (sides["train"] & sides["val"] or sides["train"] & sides["test"] or sides["val"] & sides["test"])
    assert sum(len(ids) for ids in split["ids"].values()) == len(table)


@pytest.mark.slow
def test_grid_cuts_montages_into_tiles(cli, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for m, n_tiles in enumerate((5, 6)):
        montage = np.zeros((2, 16, 24), np.uint16)  # a 2 x 3 grid of 8 x 8 tiles; the rest padding
        for i in range(n_tiles):
            r, c = divmod(i, 3)
            montage[:, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = rng.integers(1, 4000, (2, 8, 8))
        write_tiff(tmp_path / "data" / f"m{m}.tif", montage)
        rows.append({"file": f"m{m}.tif", "phase": "G1" if m else "S"})
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "montages.csv", index=False)
    result = cli("crops", tmp_path / "data" / "montages.csv", "--image-col", "file", "--task", "phase",
                 "--grid", "8", "--out", tmp_path / "tiles")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "11 tiles of 8 x 8 from 2 montages" in result.stdout
    tiles = pd.read_csv(tmp_path / "tiles" / "cells.csv", dtype=str)
    assert tiles.columns.tolist() == ["file", "phase", *GRID_COLUMNS]
    assert tiles.groupby("file").size().tolist() == [5, 6]
    assert "--image-size 8" in result.stdout


@pytest.fixture(scope="module")
def cell_run(cli, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Simulated HPA fields segmented, cut into 32 x 32 cells and a LeNet-5 trained on them for 2 epochs."""
    root = tmp_path_factory.mktemp("cell_run")
    paths = {name: root / name for name in ("fields", "seg", "cells", "run")}
    steps = [
        ("simulate", "hpa-fields", paths["fields"], "--n-fields", "12", "--size", "224", "--seed", "5"),
        ("segment", paths["fields"], "--preset", "hpa", "--cell-channel", "red", "--out", paths["seg"]),
        ("crops", paths["fields"], "--preset", "hpa", "--masks", paths["seg"], "--out", paths["cells"], "--size", "32",
         "--mask-neighbours", "--border", "pad"),
        ("train", paths["cells"] / "cells.yaml", "--model", "lenet5", "--epochs", "2", "--image-size", "32",
         "--tracker", "none", "--set", "tta=false", "--out", paths["run"]),
    ]
    for args in steps:
        done = cli(*args)
        assert done.returncode == 0, done.stdout + done.stderr
    paths["train_stdout"] = done.stdout  # type: ignore[assignment]
    return paths


def _test_fields(run: Path, cells: Path) -> list[str]:
    """The fields of the cells on the run's test side."""
    table = pd.read_csv(cells / "cells.csv", dtype=str, keep_default_na=False)
    field_of = dict(zip(table.crop, table.field_id, strict=True))
    return sorted({field_of[i] for i in json.loads((run / "split.json").read_text())["ids"]["test"]})


@pytest.mark.slow
def test_a_cell_model_answers_per_cell_and_per_field(cli, cell_run: dict[str, Path]) -> None:
    from cellclass.inference.checkpoint import Checkpoint

    run, cells = cell_run["run"], cell_run["cells"]
    test_fields = _test_fields(run, cells)
    assert "field level: " in cell_run["train_stdout"] and "cell level" in cell_run["train_stdout"]
    checkpoint = Checkpoint.load(run)
    assert checkpoint.crops is not None
    assert {k: checkpoint.crops[k] for k in ("size", "mask_neighbours", "border", "pad")} == {
        "size": 32, "mask_neighbours": True, "border": "pad", "pad": "zero"}
    assert checkpoint.crops["segmentation"]["nucleus_channel"] == 2 and checkpoint.crops["segmentation"][
        "cell_channel"] == 0
    assert set(checkpoint.field_thresholds["localization"]) == {"mean", "max", "topk_mean:3"}

    evaluated = cli("evaluate", run)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    text = " ".join(evaluated.stdout.split())
    assert f"field level: {len(test_fields)} test fields by field_id" in text
    assert "field thresholds of localization: per class, tuned on the validation fields (mean of their cells)" in text
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    block = metrics["fields"]
    assert block["n_fields"] == len(test_fields) and block["column"] == "field_id"
    assert block["n_cells"] == metrics["evaluation"]["n_images"]
    assert 0.0 <= block["tasks"]["localization"]["macro_f1"] <= 1.0
    table = pd.read_csv(run / "evaluation" / "field_predictions.csv", dtype=str, keep_default_na=False)
    assert sorted(table.field_id) == test_fields  # one row per test field
    assert table.n_cells.astype(int).sum() == block["n_cells"]
    train_block = json.loads((run / "metrics.json").read_text())["fields"]
    assert train_block["tasks"]["localization"]["macro_f1"] == block["tasks"]["localization"]["macro_f1"]

    other = cli("evaluate", run, "--aggregate", "topk:2", "--out", run / "eval-top2")
    assert other.returncode == 0, other.stdout + other.stderr
    top2 = json.loads((run / "eval-top2" / "metrics.json").read_text())["fields"]["tasks"]["localization"]
    assert top2["aggregation"] == "topk_mean:2"
    assert top2["thresholds_from"] == "per class, tuned on the validation fields (topk_mean:2 of their cells)"

    every = cli("evaluate", run, "--data", cells / "cells.yaml", "--aggregate", "max", "--out", run / "eval-all")
    assert every.returncode == 0, every.stdout + every.stderr
    assert len(pd.read_csv(run / "eval-all" / "field_predictions.csv")) == 12

    wrong = cli("evaluate", run, "--aggregate", "majority")
    assert wrong.returncode == 2 and "error: aggregation 'majority' does not apply to task 'localization'" in \
        wrong.stderr


@pytest.mark.slow
def test_predict_answers_the_fields_of_a_cell_dataset(cli, cell_run: dict[str, Path], tmp_path: Path) -> None:
    run, cells = cell_run["run"], cell_run["cells"]
    out = tmp_path / "predictions.csv"
    done = cli("predict", run, "--data", cells / "cells.yaml", "--out", out)
    assert done.returncode == 0, done.stdout + done.stderr
    cell_table = pd.read_csv(cells / "cells.csv", dtype=str, keep_default_na=False)
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(rows) == len(cell_table) and (rows.field_id == cell_table.field_id).all()
    fields = pd.read_csv(tmp_path / "field_predictions.csv", dtype=str, keep_default_na=False)
    assert sorted(fields.field_id) == sorted(set(cell_table.field_id))  # one row per field
    assert fields.n_cells.astype(int).tolist() == cell_table.groupby("field_id", sort=False).size().tolist()
    assert "12 field answer(s) by field_id written to" in " ".join(done.stdout.split())

    crops = sorted((cells / "crops").rglob("*.tif"))
    by_folder = cli("predict", run, *crops, "--aggregate-by", "folder", "--aggregate", "max", "--out",
                    tmp_path / "files.csv")
    assert by_folder.returncode == 0, by_folder.stdout + by_folder.stderr
    folders = pd.read_csv(tmp_path / "field_files.csv")
    assert len(folders) == 12 and folders.n_cells.sum() == len(crops)
    assert "per class, tuned on the validation fields (max of their cells)" in " ".join(by_folder.stdout.split())
    for args, fragment in ((["--aggregate-by", "well", crops[0]], "--aggregate-by 'well' with image files"),
                           ([], "give image files or --data SPEC"),
                           (["--data", cells / "cells.yaml", "--aggregate-by", "plate"],
                            "--aggregate-by 'plate' is not a column of the dataset")):
        refused = cli("predict", run, *args, "--out", tmp_path / "x.csv")
        assert refused.returncode == 2 and fragment in refused.stderr, refused.stderr
