"""Image dimensions: only the channel axis becomes channels; Z, T and series need a choice.

Every file here carries real ImageJ or OME metadata: tifffile writes it with
``imagej=True`` / ``ome=True`` as ImageJ and Bio-Formats do, and two files carry a
description written out by hand as ImageJ 1.54 and Bio-Formats write it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

from cellclass.data.axes import AxesPolicy, parse_reduction
from cellclass.data.cache import CacheSettings, prepare_cache
from cellclass.data.inspect import inspect_dataset
from cellclass.data.io import describe_image, read_channel_set, read_image, read_image_bytes, write_tiff
from cellclass.data.presets import load_spec
from cellclass.data.spec import DatasetSpec, ImageSpec, TaskSpec
from cellclass.data.validate import validate
from cellclass.errors import ImageReadError, SpecError, StackError

RNG = np.random.default_rng(11)


def _stack(*shape: int, dtype: type = np.uint16) -> np.ndarray:
    if np.dtype(dtype).kind == "f":
        return RNG.random(shape).astype(dtype) * 1000
    return RNG.integers(0, 4000, shape).astype(dtype)


def _single_directory(path: Path) -> None:
    """End the page chain after the first directory, as ImageJ writes stacks over 4 GB:
    one directory, the images contiguous after it, their number in the description."""
    data = bytearray(path.read_bytes())
    (first,) = struct.unpack_from("<I", data, 4)
    (entries,) = struct.unpack_from("<H", data, first)
    struct.pack_into("<I", data, first + 2 + 12 * entries, 0)
    path.write_bytes(bytes(data))


# ImageJ 1.54f's description of a 3-slice, 2-channel hyperstack, as ImageJ saves it.
IMAGEJ_154_DESCRIPTION = (
    "ImageJ=1.54f\nimages=6\nchannels=2\nslices=3\nhyperstack=true\nmode=composite\n"
    "unit=micron\nspacing=0.5\nloop=false\nmin=0.0\nmax=4000.0\n"
)

# Bio-Formats' OME-XML of a 3-slice, 2-channel image with channel-major planes (XYZCT:
# Z varies fastest), and channel names.
BIOFORMATS_OME_XML = """<?xml version="1.0" encoding="UTF-8"?>
<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"
     xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
     xsi:schemaLocation="http://www.openmicroscopy.org/Schemas/OME/2016-06 http://www.openmicroscopy.org/Schemas/OME/2016-06/ome.xsd"
     Creator="OME Bio-Formats 6.11.1">
  <Image ID="Image:0" Name="well_B03">
    <Pixels BigEndian="false" DimensionOrder="XYZCT" ID="Pixels:0" Interleaved="false"
            PhysicalSizeX="0.65" PhysicalSizeY="0.65" PhysicalSizeZ="2.0"
            SignificantBits="16" SizeC="2" SizeT="1" SizeX="20" SizeY="16" SizeZ="3" Type="uint16">
      <Channel ID="Channel:0:0" Name="Hoechst" SamplesPerPixel="1"><LightPath/></Channel>
      <Channel ID="Channel:0:1" Name="Phalloidin" SamplesPerPixel="1"><LightPath/></Channel>
      <TiffData FirstC="0" FirstT="0" FirstZ="0" IFD="0" PlaneCount="6"/>
    </Pixels>
  </Image>
</OME>"""


@pytest.fixture
def zcyx() -> np.ndarray:
    return _stack(17, 2, 24, 20)


# -- files that declare Z, T, series -----------------------------------------------------
def test_imagej_z_stack_is_refused_then_projected(tmp_path: Path) -> None:
    zyx = _stack(30, 24, 20)
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, zyx, imagej=True, metadata={"axes": "ZYX"})

    message = (r"z\.tif' holds a Z stack \(Z=30\): ImageJ axes ZYX \(Z=30, Y=24, X=20\)"
               r".*--z max\|mean\|sum\|min\|middle\|N")
    with pytest.raises(StackError, match=message):
        read_image(path)
    projected = read_image(path, axes=AxesPolicy(z="max"))
    assert projected.shape == (1, 24, 20) and projected.dtype == np.uint16
    np.testing.assert_array_equal(projected[0], zyx.max(axis=0))
    np.testing.assert_array_equal(read_image(path, axes=AxesPolicy(z="middle"))[0], zyx[15])
    np.testing.assert_array_equal(read_image(path, axes=AxesPolicy(z=4))[0], zyx[4])


def test_imagej_zc_hyperstack_gives_its_two_channels(tmp_path: Path, zcyx: np.ndarray) -> None:
    path = tmp_path / "zc.tif"
    tifffile.imwrite(path, zcyx, imagej=True, metadata={"axes": "ZCYX"})

    with pytest.raises(StackError, match=r"Z stack \(Z=17\): ImageJ axes ZCYX \(Z=17, C=2, Y=24, X=20\)"):
        read_image(path)
    projected = read_image(path, axes=AxesPolicy(z="max"))
    np.testing.assert_array_equal(projected, zcyx.max(axis=0))  # channel order c0, c1 as declared


def test_imagej_hyperstack_behind_one_page_directory(tmp_path: Path, zcyx: np.ndarray) -> None:
    path = tmp_path / "one_directory.tif"
    tifffile.imwrite(path, zcyx, imagej=True, metadata={"axes": "ZCYX"})
    _single_directory(path)
    with tifffile.TiffFile(path) as tiff:
        assert len(tiff.pages) == 1

    with pytest.raises(StackError, match="Z stack"):
        read_image(path)
    np.testing.assert_array_equal(read_image(path, axes=AxesPolicy(z="max")), zcyx.max(axis=0))


def test_description_as_imagej_154_writes_it(tmp_path: Path) -> None:
    zcyx = _stack(3, 2, 16, 12)
    path = tmp_path / "imagej154.tif"
    tifffile.imwrite(path, zcyx.reshape(6, 16, 12), description=IMAGEJ_154_DESCRIPTION, metadata=None,
                     photometric="minisblack")

    with pytest.raises(StackError, match="ImageJ axes ZCYX"):
        read_image(path)
    np.testing.assert_array_equal(read_image(path, axes=AxesPolicy(z=1)), zcyx[1])
    assert describe_image(path).sizes == {"Z": 3, "C": 2, "Y": 16, "X": 12}


def test_imagej_time_series_float32(tmp_path: Path) -> None:
    tyx = _stack(30, 16, 12, dtype=np.float32)
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, tyx, imagej=True, metadata={"axes": "TYX"})

    with pytest.raises(StackError, match=r"time series \(T=30\).*--t max\|mean"):
        read_image(path)
    first = read_image(path, axes=AxesPolicy(t=0))
    assert first.dtype == np.float32
    np.testing.assert_array_equal(first[0], tyx[0])
    np.testing.assert_allclose(read_image(path, axes=AxesPolicy(t="mean"))[0], tyx.mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(read_image(path, axes=AxesPolicy(t="max"))[0], tyx.max(axis=0))


def test_imagej_tzcyx_needs_both_and_reduces_t_first(tmp_path: Path) -> None:
    tzcyx = _stack(3, 4, 2, 16, 12)
    path = tmp_path / "tzc.tif"
    tifffile.imwrite(path, tzcyx, imagej=True, metadata={"axes": "TZCYX"})

    with pytest.raises(StackError, match=r"Z stack \(Z=4\) and a time series \(T=3\).*--z .* and --t "):
        read_image(path)
    with pytest.raises(StackError, match="time series"):
        read_image(path, axes=AxesPolicy(z="max"))
    np.testing.assert_array_equal(read_image(path, axes=AxesPolicy(z="max", t=1)), tzcyx[1].max(axis=0))
    np.testing.assert_allclose(read_image(path, axes=AxesPolicy(z="max", t="mean")),
                               tzcyx.mean(axis=0).max(axis=0), rtol=1e-6)


def test_ome_zcyx_channel_names_and_selection(tmp_path: Path, zcyx: np.ndarray) -> None:
    path = tmp_path / "zc.ome.tif"
    tifffile.imwrite(path, zcyx, ome=True, metadata={"axes": "ZCYX", "Channel": {"Name": ["DAPI", "GFP"]}})

    described = describe_image(path)
    assert (described.source, described.axes, described.channel_names) == ("OME", "ZCYX", ("DAPI", "GFP"))
    assert "channels DAPI, GFP" in described.note()
    with pytest.raises(StackError, match="OME axes ZCYX"):
        read_image(path)
    mean = read_image(path, axes=AxesPolicy(z="mean"))
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean, zcyx.mean(axis=0), rtol=1e-6)
    gfp = read_image(path, axes=AxesPolicy(z="max", select=("GFP",)))
    np.testing.assert_array_equal(gfp, zcyx[:, 1:].max(axis=0))
    with pytest.raises(ImageReadError, match=r"channel\(s\) RFP not in .*; valid: DAPI, GFP"):
        read_image(path, axes=AxesPolicy(z="max", select=("RFP",)))


def test_bioformats_ome_xml_with_channel_major_planes(tmp_path: Path) -> None:
    czyx = _stack(2, 3, 16, 20)  # XYZCT: Z fastest, so planes are c0z0, c0z1, c0z2, c1z0 ...
    path = tmp_path / "bioformats.ome.tif"
    tifffile.imwrite(path, czyx.reshape(6, 16, 20), description=BIOFORMATS_OME_XML, metadata=None,
                     photometric="minisblack")

    described = describe_image(path)
    assert described.channel_names == ("Hoechst", "Phalloidin")
    with pytest.raises(StackError, match="Z stack"):
        read_image(path)
    np.testing.assert_array_equal(read_image(path, axes=AxesPolicy(z="max")), czyx.max(axis=1))
    np.testing.assert_array_equal(read_image(path, axes=AxesPolicy(z="min", select=("Phalloidin", "Hoechst"))),
                                  czyx.min(axis=1)[::-1])


def test_ome_two_positions_need_a_series(tmp_path: Path) -> None:
    positions = _stack(2, 2, 16, 12)
    path = tmp_path / "two_positions.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as writer:
        for position in positions:
            writer.write(position, metadata={"axes": "CYX"})

    with pytest.raises(StackError, match=r"holds 2 series \(OME images.*--series N \(0\.\.1\)"):
        read_image(path)
    np.testing.assert_array_equal(read_image(path, axes=AxesPolicy(series=1)), positions[1])
    with pytest.raises(StackError, match=r"--series 2 is out of range .* valid: 0\.\.1"):
        read_image(path, axes=AxesPolicy(series=2))
    assert "2 series (positions)" in describe_image(path).note()


def test_ome_pyramid_reads_full_resolution(tmp_path: Path) -> None:
    zcyx = _stack(3, 2, 64, 48)
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as writer:
        writer.write(zcyx, subifds=2, metadata={"axes": "ZCYX"})
        writer.write(zcyx[..., ::2, ::2], subfiletype=1)
        writer.write(zcyx[..., ::4, ::4], subfiletype=1)

    with pytest.raises(StackError, match="Z stack"):
        read_image(path)
    np.testing.assert_array_equal(read_image(path, axes=AxesPolicy(z="max")), zcyx.max(axis=0))
    described = describe_image(path)
    assert described.levels == 3
    assert "a pyramid of 3 levels (the full resolution is read)" in described.note(AxesPolicy(z="max"))


def test_tifffile_axes_metadata_is_declared(tmp_path: Path) -> None:
    path = tmp_path / "shaped.tif"
    tifffile.imwrite(path, _stack(5, 8, 8), metadata={"axes": "ZYX"})
    with pytest.raises(StackError, match="tifffile axes ZYX"):
        read_image(path)


def test_size_one_z_and_t_need_no_choice(tmp_path: Path) -> None:
    czyx = _stack(1, 1, 2, 16, 12)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, czyx, imagej=True, metadata={"axes": "TZCYX"})
    np.testing.assert_array_equal(read_image(path), czyx[0, 0])


# -- files that declare no axes ------------------------------------------------------------
def test_pages_without_axes_stay_channels_and_inspect_says_so(tmp_path: Path) -> None:
    pages = _stack(31, 16, 12)
    path = tmp_path / "pages.tif"
    write_tiff(path, pages)  # tifffile's shape metadata, no axes
    np.testing.assert_array_equal(read_image(path), pages)
    described = describe_image(path)
    assert not described.declared
    assert described.note() == "31 pages read as channels: the file declares no axes"


def test_imagej_channels_only_is_read_as_before(tmp_path: Path) -> None:
    cyx = _stack(3, 16, 12)
    path = tmp_path / "channels.tif"
    tifffile.imwrite(path, cyx, imagej=True, metadata={"axes": "CYX"})
    np.testing.assert_array_equal(read_image(path), cyx)
    assert describe_image(path).note() == "ImageJ axes CYX (C=3, Y=16, X=12); read as 3 channel(s)"


# -- projections and options -----------------------------------------------------------------
def test_sum_widens_the_dtype_and_mean_is_float32(tmp_path: Path) -> None:
    full = np.full((40, 8, 8), 65535, dtype=np.uint16)
    path = tmp_path / "bright.tif"
    tifffile.imwrite(path, full, imagej=True, metadata={"axes": "ZYX"})
    total = read_image(path, axes=AxesPolicy(z="sum"))
    assert total.dtype == np.uint32 and int(total.max()) == 40 * 65535
    assert read_image(path, axes=AxesPolicy(z="mean")).dtype == np.float32
    assert read_image(path, axes=AxesPolicy(z="min")).dtype == np.uint16


def test_plane_index_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, _stack(5, 8, 8), imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(StackError, match=r"--z 5 is out of range for .*z\.tif': it has Z=5; valid: 0\.\.4"):
        read_image(path, axes=AxesPolicy(z=5))


@pytest.mark.parametrize("value", ["maximum", "-1", "1.5", True])
def test_invalid_reduction_is_a_spec_error(value: object) -> None:
    with pytest.raises(SpecError, match=r"--z .* is invalid; valid: max, mean, sum, min, middle or a 0-based"):
        parse_reduction("z", value)


def test_reduction_parsing() -> None:
    assert parse_reduction("z", " MAX ") == "max"
    assert parse_reduction("t", "3") == 3
    assert AxesPolicy(z="2", series="1").to_dict() == {"z": 2, "series": 1}
    with pytest.raises(SpecError, match="--series -1 is invalid"):
        AxesPolicy(series=-1)


def test_bytes_and_channel_sets_read_stacks_the_same(tmp_path: Path, zcyx: np.ndarray) -> None:
    path = tmp_path / "zc.tif"
    tifffile.imwrite(path, zcyx, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(StackError):
        read_image_bytes(path.read_bytes(), "upload.tif")
    np.testing.assert_array_equal(read_image_bytes(path.read_bytes(), "upload.tif", axes=AxesPolicy(z="max")),
                                  zcyx.max(axis=0))
    for c in range(2):
        tifffile.imwrite(tmp_path / f"w{c}.tif", zcyx[:, c], imagej=True, metadata={"axes": "ZYX"})
    paths = [tmp_path / "w0.tif", tmp_path / "w1.tif"]
    with pytest.raises(StackError):
        read_channel_set(paths)
    np.testing.assert_array_equal(read_channel_set(paths, axes=AxesPolicy(z="max")), zcyx.max(axis=0))


# -- datasets ----------------------------------------------------------------------------------
def _stack_dataset(folder: Path, n: int = 4) -> tuple[Path, list[np.ndarray]]:
    """A manifest of ImageJ Z x C hyperstacks, half of each class."""
    folder.mkdir(parents=True, exist_ok=True)
    stacks, rows = [], []
    for i in range(n):
        stack = _stack(5, 2, 16, 16)
        tifffile.imwrite(folder / f"cell{i}.tif", stack, imagej=True, metadata={"axes": "ZCYX"})
        stacks.append(stack)
        rows.append({"image": f"cell{i}.tif", "label": "ab"[i % 2]})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv", stacks


def test_validate_names_every_z_stack_and_passes_with_z(tmp_path: Path) -> None:
    manifest, _ = _stack_dataset(tmp_path / "stacks")
    spec = load_spec(manifest, image_col="image", tasks=["label"])
    result = validate(spec)
    assert not result.ok
    assert [p.row for p in result.problems] == [1, 2, 3, 4]
    assert all("Z stack (Z=5)" in p.reason and "--z max|mean" in p.reason for p in result.problems)
    assert validate(load_spec(manifest, image_col="image", tasks=["label"], z="max")).ok


def test_spec_image_section_round_trips_and_reads(tmp_path: Path) -> None:
    manifest, stacks = _stack_dataset(tmp_path / "stacks")
    spec = load_spec(manifest, image_col="image", tasks=["label"], z="middle")
    yaml_path = spec.to_yaml(tmp_path / "spec.yaml")
    assert yaml.safe_load(yaml_path.read_text())["image"]["z"] == "middle"
    again = DatasetSpec.from_yaml(yaml_path)
    row = again.load_manifest().to_dict("records")[1]
    np.testing.assert_array_equal(again.read_image(row), stacks[1][2])
    # the command line wins over the spec
    overridden = load_spec(yaml_path, z="0")
    np.testing.assert_array_equal(overridden.read_image(row), stacks[1][0])


def test_spec_selects_channels_by_the_files_names(tmp_path: Path, zcyx: np.ndarray) -> None:
    tifffile.imwrite(tmp_path / "a.ome.tif", zcyx, ome=True,
                     metadata={"axes": "ZCYX", "Channel": {"Name": ["DAPI", "GFP"]}})
    pd.DataFrame({"image": ["a.ome.tif"], "label": ["x"]}).to_csv(tmp_path / "m.csv", index=False)
    spec = DatasetSpec(name="sel", manifest="m.csv", base_dir=tmp_path, tasks=[TaskSpec("label", ["label"])],
                       image=ImageSpec(column="image", z="max", channels_select=["GFP"]))
    row = spec.load_manifest().to_dict("records")[0]
    np.testing.assert_array_equal(spec.read_image(row), zcyx[:, 1:].max(axis=0))
    assert spec.image.channel_names == ["GFP"]


def test_pattern_spec_rejects_an_unknown_channel_name() -> None:
    with pytest.raises(SpecError, match="channels_select names RFP, not among the channels; valid: red, green"):
        ImageSpec(pattern="{Id}_{channel}.png", channels=["red", "green"], channels_select=["RFP"])
    image = ImageSpec(pattern="{Id}_{channel}.png", channels=["red", "green"], channels_select=["green"])
    spec = DatasetSpec(name="p", manifest="m.csv", image=image, tasks=[TaskSpec("label", ["label"])])
    assert [p.name for p in spec.image_paths({"Id": "x"})] == ["x_green.png"]


def test_series_column_reads_one_position_per_row(tmp_path: Path) -> None:
    positions = _stack(2, 1, 16, 12)
    with tifffile.TiffWriter(tmp_path / "plate.ome.tif", ome=True) as writer:
        for position in positions:
            writer.write(position, metadata={"axes": "CYX"})
    pd.DataFrame({"image": ["plate.ome.tif"] * 2, "position": ["0", "1"], "label": ["a", "b"]}).to_csv(
        tmp_path / "m.csv", index=False)
    spec = DatasetSpec(name="pos", manifest="m.csv", base_dir=tmp_path, tasks=[TaskSpec("label", ["label"])],
                       image=ImageSpec(column="image", series_column="position"))
    rows = spec.load_manifest().to_dict("records")
    for row, expected in zip(rows, positions, strict=True):
        np.testing.assert_array_equal(spec.read_image(row), expected)
    with pytest.raises(SpecError, match="both series=0 and series_column='position'"):
        ImageSpec(column="image", series=0, series_column="position")


def test_cache_key_holds_the_projection(tmp_path: Path) -> None:
    manifest, stacks = _stack_dataset(tmp_path / "stacks")
    settings = CacheSettings(16)
    by_max = prepare_cache(load_spec(manifest, image_col="image", tasks=["label"], z="max"), settings,
                           cache_dir=tmp_path / "cache")
    by_middle = prepare_cache(load_spec(manifest, image_col="image", tasks=["label"], z="middle"), settings,
                              cache_dir=tmp_path / "cache")
    assert by_max.path != by_middle.path
    assert by_max.meta["axes"] == {"z": "max"}
    np.testing.assert_array_equal(by_max.images[0], stacks[0].max(axis=0))
    np.testing.assert_array_equal(by_middle.images[3], stacks[3][2])


def test_inspect_describes_axes_and_channel_names(tmp_path: Path, zcyx: np.ndarray) -> None:
    for i in range(2):
        tifffile.imwrite(tmp_path / f"c{i}.ome.tif", zcyx, ome=True,
                         metadata={"axes": "ZCYX", "Channel": {"Name": ["DAPI", "GFP"]}})
    write_tiff(tmp_path / "pages.tif", _stack(31, 24, 20))
    pd.DataFrame({"image": ["c0.ome.tif", "c1.ome.tif", "pages.tif"], "label": ["a", "b", "a"]}).to_csv(
        tmp_path / "m.csv", index=False)
    report = inspect_dataset(load_spec(tmp_path / "m.csv", image_col="image", tasks=["label"]))
    assert "31 pages read as channels: the file declares no axes (1 of 3 files described)" in report.axes
    assert ("OME axes ZCYX (Z=17, C=2, Y=24, X=20); channels DAPI, GFP; not read without "
            "--z max|mean|sum|min|middle|N (2 of 3 files described)") in report.axes
    projected = inspect_dataset(load_spec(tmp_path / "m.csv", image_col="image", tasks=["label"], z="max"))
    assert any("channels DAPI, GFP; read as 2 channel(s) with --z max" in note for note in projected.axes)
    assert report.to_dict()["axes"] == report.axes
