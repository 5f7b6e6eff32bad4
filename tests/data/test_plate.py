"""OME-Zarr plates: the manifest from the plate metadata, labels joined by well, the preset,
the ``layout: plate`` spec, the simulator and the prepared cache built from a plate."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellclass.data.cache import CacheSettings, find_cache, prepare_cache
from cellclass.data.omezarr import normalize_well, plate_fields
from cellclass.data.plate import PLATE_COLUMNS, plate_manifest
from cellclass.data.presets import load_spec, preset
from cellclass.data.spec import DatasetSpec
from cellclass.data.validate import validate
from cellclass.errors import MissingDependencyError, PlateSimulationError, SpecError

pytest.importorskip("ome_zarr")
from cellclass.data.simulate_plate import (  # noqa: E402
    PLATE_CHANNELS,
    TREATMENTS,
    simulate_plate,
)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2 x 3 plate, 2 fields per well, 24 px (read-only: copy it before changing it)."""
    out = tmp_path_factory.mktemp("plate")
    simulate_plate(out, rows=2, cols=3, fields=2, image_size=24, seed=0)
    return out


def test_plate_fields_list_every_field_from_the_metadata(sim: Path) -> None:
    name, fields = plate_fields(sim / "plate.zarr")
    assert name == "simulated plate"
    assert [f.path for f in fields[:3]] == ["A/1/0", "A/1/1", "A/2/0"]
    assert [(f.row, f.column, f.well, f.field) for f in fields[-1:]] == [("B", "3", "B03", "1")]
    assert len(plate_fields(sim / "plate.zarr", first_only=True)[1]) == 6


def test_listing_a_plate_reads_no_pixel(sim: Path, tmp_path: Path) -> None:
    """Every chunk of the copy is corrupt, yet its manifest is built (from the metadata alone)."""
    copy = tmp_path / "data"
    shutil.copytree(sim, copy)
    chunks = [p for p in (copy / "plate.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"]
    for chunk in chunks:
        chunk.write_bytes(b"corrupt")
    assert len(chunks) == 12 * 2 * 2  # fields x channels x levels, one chunk each
    assert len(preset("plate", copy).load_manifest()) == 12


@pytest.mark.parametrize(("text", "well"), [("A1", "A01"), ("a01", "A01"), ("A/1", "A01"), ("B-12", "B12"),
                                            ("C_3", "C03"), (" H 7 ", "H07"), ("AA2", "AA02")])
def test_well_names_are_normalized(text: str, well: str) -> None:
    assert normalize_well(text) == well


def test_a_bad_well_name_is_refused() -> None:
    with pytest.raises(SpecError, match=r"well '1A' is not a well name; valid: a row letter .* A1, A01, A/1"):
        normalize_well("1A")
    assert normalize_well("r1c1", strict=False) == "r1c1"


def test_the_preset_has_one_row_per_field_with_groups_and_labels(sim: Path) -> None:
    spec = preset("plate", sim)
    frame = spec.load_manifest()
    assert list(frame.columns) == ["_row", *PLATE_COLUMNS, "treatment"]
    assert len(frame) == 12 and spec.groups == ["well", "plate"] and spec.task_names == ["treatment"]
    assert frame.image.iloc[0] == "plate.zarr/A/1/0" and set(frame.plate) == {"plate"}
    # Both fields of a well carry the well's label; treatments follow the plate map by column.
    assert frame.groupby("well").treatment.nunique().eq(1).all()
    assert frame.set_index("image").treatment["plate.zarr/B/2/1"] == TREATMENTS[1]
    assert spec.image.channels == list(PLATE_CHANNELS)  # from the fields' omero metadata
    image = spec.read_image(frame.iloc[0].to_dict())
    assert image.shape == (2, 24, 24) and image.dtype == np.uint16


def test_the_preset_takes_the_plate_folder_itself_and_per_well(sim: Path) -> None:
    spec = preset("plate", sim / "plate.zarr", per="well")
    frame = spec.load_manifest()
    assert len(frame) == 6 and set(frame.field) == {"0"} and frame.image.iloc[0] == "A/1/0"
    assert spec.image_paths(frame.iloc[0])[0] == (sim / "plate.zarr" / "A" / "1" / "0").resolve()


def test_the_preset_through_load_spec_and_validate(sim: Path) -> None:
    spec = load_spec(sim, preset_name="plate")
    result = validate(spec)
    assert result.ok and result.n_rows == 12 and dict(result.dtypes) == {"uint16": 12}


def test_preset_errors_say_what_is_missing(sim: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"holds no OME-Zarr plate; valid: a plate folder"):
        preset("plate", tmp_path)
    shutil.copytree(sim / "plate.zarr", tmp_path / "p" / "plate.zarr")
    with pytest.raises(SpecError, match=r"preset 'plate' needs a labels CSV .*wells\.csv.* keyed by well"):
        preset("plate", tmp_path / "p")
    (tmp_path / "p" / "wells.csv").write_text("well,row\nA1,A\n")
    with pytest.raises(SpecError, match=r"has no label column \(columns: well, row\)"):
        preset("plate", tmp_path / "p")


def write_labels(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_labels_join_by_well_in_any_spelling_and_unlisted_wells_stay_empty(sim: Path, tmp_path: Path) -> None:
    labels = write_labels(tmp_path / "labels.csv", "well,moa,row\nA1,x,A\nA/2,y,A\nb03,z,B\n")
    frame = plate_manifest(sim, labels=labels)
    by_well = frame.groupby("well").moa.first().to_dict()
    assert by_well == {"A01": "x", "A02": "y", "A03": "", "B01": "", "B02": "", "B03": "z"}
    assert (frame.row == frame.well.str[0]).all()  # the CSV's row column gives way to the plate's


def test_labels_keyed_by_row_and_column(sim: Path, tmp_path: Path) -> None:
    labels = write_labels(tmp_path / "labels.csv", "row,column,moa\nA,1,x\nB,3,z\n")
    frame = plate_manifest(sim, labels=labels, per="well")
    assert frame.set_index("well").moa.to_dict() == {"A01": "x", "A02": "", "A03": "", "B01": "", "B02": "", "B03": "z"}


def test_labels_of_several_plates_by_plate_and_well(sim: Path, tmp_path: Path) -> None:
    for name in ("P1.zarr", "P2.ome.zarr"):
        shutil.copytree(sim / "plate.zarr", tmp_path / name)
    labels = write_labels(tmp_path / "labels.csv", "plate,well,moa\nP1,A1,x\nP2.ome.zarr,A1,y\n")
    frame = plate_manifest(tmp_path, labels=labels, per="well")
    assert sorted(set(frame.plate)) == ["P1", "P2"] and len(frame) == 12
    a1 = frame[frame.well == "A01"].set_index("plate")
    assert a1.moa.to_dict() == {"P1": "x", "P2": "y"}
    assert a1.image.to_dict() == {"P1": "P1.zarr/A/1/0", "P2": "P2.ome.zarr/A/1/0"}
    # Without a plate column, a CSV's rows apply to every plate (one plate map).
    shared = plate_manifest(tmp_path, labels=write_labels(tmp_path / "map.csv", "well,moa\nA1,x\n"), per="well")
    assert shared[shared.well == "A01"].moa.tolist() == ["x", "x"]


@pytest.mark.parametrize(("text", "message"), [
    ("moa\nx\n", r"has no well column 'well'; it has: moa; valid: a 'well' column"),
    ("well,moa\nA1,x\nA01,y\n", r"lists well\(s\) A01 more than once; valid: one row per well"),
    ("well,moa\nH9,x\n", r"names 1 well\(s\) no plate holds: H09; plates: plate"),
    ("well,moa\n9Z,x\n", r"line 2: well '9Z' is not a well name"),
])
def test_bad_labels_csvs_are_refused(sim: Path, tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        plate_manifest(sim, labels=write_labels(tmp_path / "labels.csv", text))


def test_other_plate_errors(sim: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"plate\.per 'site' is invalid; valid: field, well"):
        plate_manifest(sim, per="site")
    with pytest.raises(SpecError, match=r"labels CSV .*nope\.csv' does not exist"):
        plate_manifest(sim, labels=tmp_path / "nope.csv")
    with pytest.raises(SpecError, match=r"is an OME-Zarr group with \['well'\].*, not a plate"):
        plate_fields(sim / "plate.zarr" / "A" / "1")
    broken = tmp_path / "broken.zarr"
    shutil.copytree(sim / "plate.zarr", broken)
    shutil.rmtree(broken / "A" / "2")
    with pytest.raises(SpecError, match=r"well 'A/2' of plate .* is missing or lists no field"):
        plate_fields(broken)


def test_a_plate_spec_in_yaml_round_trips(sim: Path, tmp_path: Path) -> None:
    spec_path = tmp_path / "screen.yaml"
    spec_path.write_text(
        f"name: screen\nlayout: plate\nmanifest: {sim / 'wells.csv'}\n"
        f"image: {{column: image, root: {sim}}}\n"
        "tasks: [{name: treatment, columns: [treatment]}]\ngroups: [well, plate]\n"
        "plate: {plates: [plate.zarr], per: well}\n"
    )
    spec = DatasetSpec.from_yaml(spec_path)
    assert spec.plate.per == "well" and len(spec.load_manifest()) == 6
    again = DatasetSpec.from_yaml(spec.to_yaml(tmp_path / "saved" / "spec.yaml"))
    assert again.plate == spec.plate and again.load_manifest().equals(spec.load_manifest())
    spec_path.write_text(spec_path.read_text().replace("per: well", "per: well, fields: 2"))
    with pytest.raises(SpecError, match=r"plate has unknown key\(s\) \['fields'\]"):
        DatasetSpec.from_yaml(spec_path)


def test_the_cache_builds_from_a_plate_and_its_key_follows_the_chunks(sim: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(sim, data)
    spec = preset("plate", data)
    settings = CacheSettings(image_size=16, fit="resize")
    cache = prepare_cache(spec, settings, cache_dir=tmp_path / "cache", workers=1)
    frame = spec.load_manifest()
    assert cache.images.shape == (12, 2, 16, 16) and cache.images.dtype == np.uint16
    assert find_cache(spec, settings, cache_dir=tmp_path / "cache").key == cache.key
    # A level-1 chunk changes nothing a field's pixels come from: the cache still holds.
    level1 = next(p for p in (data / "plate.zarr" / "A" / "1" / "0" / "s1").rglob("*") if p.is_file() and p.name != "zarr.json")
    os.utime(level1, ns=(1, 1))
    assert find_cache(spec, settings, cache_dir=tmp_path / "cache").key == cache.key
    # A rewritten full-resolution chunk of one field makes it stale.
    chunk = next(p for p in (data / "plate.zarr" / "B" / "3" / "1" / "s0").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes())
    os.utime(chunk, ns=(10**18, 10**18))
    assert find_cache(spec, settings, cache_dir=tmp_path / "cache") is None
    content = CacheSettings(image_size=16, fit="resize", hash="content")
    built = prepare_cache(spec, content, cache_dir=tmp_path / "cache", workers=1)
    os.utime(chunk, ns=(10**17, 10**17))  # same bytes, another time: the content key holds
    assert find_cache(spec, content, cache_dir=tmp_path / "cache").key == built.key
    assert len(frame) == 12


def test_the_simulator_is_deterministic_and_its_treatments_show(tmp_path: Path) -> None:
    from cellclass.data.io import read_image

    a = simulate_plate(tmp_path / "a", rows=1, cols=3, fields=2, image_size=32, seed=3)
    simulate_plate(tmp_path / "b", rows=1, cols=3, fields=2, image_size=32, seed=3)
    assert pd.read_csv(a).to_dict("list") == {"well": ["A01", "A02", "A03"], "treatment": list(TREATMENTS)}
    first = read_image(tmp_path / "a" / "plate.zarr" / "A" / "2" / "1")
    np.testing.assert_array_equal(first, read_image(tmp_path / "b" / "plate.zarr" / "A" / "2" / "1"))
    marker = {t: np.mean([read_image(tmp_path / "a" / "plate.zarr" / "A" / str(c + 1) / str(f))[1].mean()
                          for f in range(2)]) for c, t in enumerate(TREATMENTS)}
    assert marker["drug_A"] > 2 * marker["DMSO"]  # the bright halo
    spots = {t: read_image(tmp_path / "a" / "plate.zarr" / "A" / str(c + 1) / "0")[1].max() for c, t in enumerate(TREATMENTS)}
    assert spots["drug_B"] > spots["DMSO"]  # the puncta


def test_a_simulated_z_stack_plate_in_ngff_0_4(tmp_path: Path) -> None:
    from cellclass.data.axes import AxesPolicy
    from cellclass.data.io import describe_image, read_image

    simulate_plate(tmp_path, rows=1, cols=1, fields=1, image_size=16, z_planes=3, ngff="0.4")
    field = tmp_path / "plate.zarr" / "A" / "1" / "0"
    assert (field / ".zattrs").is_file() and not (field / "zarr.json").exists()
    assert describe_image(field).axes == "CZYX"
    middle = read_image(field, axes=AxesPolicy(z="middle"))
    assert middle.shape == (2, 16, 16)
    # The focused (middle) plane is the sharpest: its DNA peak is the highest.
    assert middle[0].max() >= read_image(field, axes=AxesPolicy(z=0))[0].max()


def test_simulator_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PlateSimulationError, match=r"rows 27 is invalid; valid: an integer from 1 to 26"):
        simulate_plate(tmp_path, rows=27)
    with pytest.raises(PlateSimulationError, match=r"ngff '0.3' is invalid; valid: 0.4, 0.5"):
        simulate_plate(tmp_path, ngff="0.3")
    simulate_plate(tmp_path, rows=1, cols=1, fields=1, image_size=16)
    with pytest.raises(PlateSimulationError, match=r"already exists; pass overwrite=True"):
        simulate_plate(tmp_path, rows=1, cols=1, fields=1, image_size=16)
    simulate_plate(tmp_path, rows=1, cols=2, fields=1, image_size=16, overwrite=True)
    assert len(plate_fields(tmp_path / "plate.zarr")[1]) == 2 and not (tmp_path / ".plate.zarr.partial").exists()
    import sys

    monkeypatch.setitem(sys.modules, "ome_zarr", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'cellclass\[zarr\]'"):
        simulate_plate(tmp_path / "other")
