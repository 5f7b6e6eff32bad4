"""Every preset on a small dataset laid out as the real one is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellclass.data.io import write_png, write_tiff
from cellclass.data.labels import fit_encoders
from cellclass.data.presets import HPA_CLASSES, bps, csv, folder, hpa, preset, rxrx1
from cellclass.errors import SpecError


def test_bps_parses_plate_and_well_and_declares_tasks(tmp_path: Path) -> None:
    names = ["P242_73665006707-A6_003_013_proj.tif", "P278_73668090728-F5_007_032_proj.tif"]
    pd.DataFrame({"filename": names, "dose_Gy": ["0.82", "0.0"], "particle_type": ["Fe", "X-ray"],
                  "hr_post_exposure": ["4", "48"]}).to_csv(tmp_path / "meta.csv", index=False)
    for n in names:
        write_tiff(tmp_path / n, np.full((1, 8, 8), 40000, dtype=np.uint16))
    spec = bps(tmp_path)
    frame = spec.load_manifest()
    assert frame["plate"].tolist() == ["P242", "P278"]
    assert frame["well"].tolist() == ["P242_73665006707-A6", "P278_73668090728-F5"]
    assert spec.task_names == ["particle_type", "dose", "particle_dose", "hours"]
    assert spec.labels(frame, "particle_dose") == ["Fe+0.82", "X-ray+0.0"]
    assert spec.controls[0].mask(frame).tolist() == [False, True]
    image = spec.read_image(frame.iloc[0])
    assert image.dtype == np.uint16 and image.max() == 40000


def test_hpa_reads_four_channel_sets_and_index_targets(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    pd.DataFrame({"Id": ["abc", "def"], "Target": ["0 25", "2"]}).to_csv(tmp_path / "train.csv", index=False)
    for i, image_id in enumerate(["abc", "def"]):
        for c, ch in enumerate(["red", "green", "blue", "yellow"]):
            write_png(tmp_path / "train" / f"{image_id}_{ch}.png", np.full((1, 6, 6), 10 * c + i, dtype=np.uint8))
    spec = hpa(tmp_path)
    frame = spec.load_manifest()
    assert spec.labels(frame, "localization") == [["Nucleoplasm", "Cytosol"], ["Nucleoli"]]
    image = spec.read_image(frame.iloc[1])
    assert image.shape == (4, 6, 6) and image[:, 0, 0].tolist() == [1, 11, 21, 31]
    assert spec.image_id(frame.iloc[0]) == "abc"
    assert fit_encoders(spec, frame)["localization"].classes == HPA_CLASSES
    assert len(HPA_CLASSES) == 28


def test_rxrx1_six_channels_from_pattern(tmp_path: Path) -> None:
    meta = pd.DataFrame({"site_id": ["HEPG2-01_1_B03_1"], "well_id": ["HEPG2-01_1_B03"], "cell_type": ["HEPG2"],
                         "dataset": ["train"], "experiment": ["HEPG2-01"], "plate": ["1"], "well": ["B03"],
                         "site": ["1"], "well_type": ["treatment"], "sirna": ["sirna_513"]})
    meta.to_csv(tmp_path / "metadata.csv", index=False)
    folder_ = tmp_path / "images" / "HEPG2-01" / "Plate1"
    for w in range(1, 7):
        write_png(folder_ / f"B03_s1_w{w}.png", np.full((1, 5, 5), w, dtype=np.uint8))
    spec = rxrx1(tmp_path)
    frame = spec.load_manifest()
    image = spec.read_image(frame.iloc[0])
    assert image.shape == (6, 5, 5) and image[:, 0, 0].tolist() == [1, 2, 3, 4, 5, 6]
    assert spec.groups == ["experiment", "plate", "well"] and spec.split_column == "dataset"
    assert spec.image.channels[0] == "Hoechst"


def test_folder_preset_lists_class_folders(tmp_path: Path) -> None:
    for cls in ("G1", "S"):
        for i in range(2):
            write_tiff(tmp_path / cls / f"{i}.tif", np.zeros((3, 4, 4), dtype=np.uint16))
    (tmp_path / "notes.txt").write_text("ignored")
    spec = folder(tmp_path)
    frame = spec.load_manifest()
    assert spec.labels(frame, "label") == ["G1", "G1", "S", "S"]
    assert spec.read_image(frame.iloc[3]).shape == (3, 4, 4)


def test_folder_preset_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="holds no class sub-folder with images"):
        folder(tmp_path).load_manifest()
    with pytest.raises(SpecError, match="does not exist"):
        folder(tmp_path / "nope").load_manifest()


def test_csv_preset_generic_image_label(tmp_path: Path) -> None:
    pd.DataFrame({"Image": ["a.npy"], "Label": ["mitotic"]}).to_csv(tmp_path / "data.csv", index=False)
    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.float32).reshape(1, 3, 4))
    spec = preset("csv", tmp_path)
    frame = spec.load_manifest()
    assert spec.labels(frame, "label") == ["mitotic"]
    assert spec.read_image(frame.iloc[0]).dtype == np.float32
    (tmp_path / "other.csv").write_text("Image,Label\n")
    with pytest.raises(SpecError, match=r"needs one manifest .* found \['data.csv', 'other.csv'\]"):
        csv(tmp_path)


@pytest.mark.shared_data
def test_bps_preset_on_real_metadata(shared_data: Path) -> None:
    spec = bps(shared_data / "bps_metadata")
    frame = spec.load_manifest()
    assert len(frame) == 77177
    assert frame["plate"].nunique() == 17 and (frame["plate"] != "").all()
    assert (frame["well"] != "").all()
