"""OME-Zarr images read through ome-zarr: pixels and dtype as written, axes, channel names,
only the level-0 chunks of the field asked for; vendor formats' missing extra."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from cellclass.data.axes import AxesPolicy
from cellclass.data.io import describe_image, image_exists, image_files, read_image, read_image_bytes
from cellclass.data.omezarr import is_zarr_path, zarr_kind
from cellclass.errors import ImageReadError, MissingDependencyError, StackError

zarr = pytest.importorskip("zarr")
writer = pytest.importorskip("ome_zarr.writer")
ome_format = pytest.importorskip("ome_zarr.format")


def write_ome_zarr(path: Path, image: np.ndarray, axes: str, *, labels: list[str] | None = None,
                   ngff: str = "0.5", levels: int = 2) -> Path:
    """Write ``image`` with the ome-zarr library: one chunk per plane, ``levels`` pyramid levels."""
    fmt = ome_format.FormatV04() if ngff == "0.4" else ome_format.FormatV05()
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    chunks = tuple(1 if a not in "yx" else n for a, n in zip(axes, image.shape, strict=True))
    metadata = {}
    if labels is not None:
        metadata["omero"] = {"channels": [{"label": n, "color": "FFFFFF",
                                           "window": {"start": 0, "end": 1, "min": 0, "max": 1}} for n in labels]}
    writer.write_image(image, group, axes=axes, fmt=fmt, scale_factors=(2,) * (levels - 1) or None,
                       storage_options={"chunks": chunks}, **metadata)
    return path


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_image_reads_back_exactly_in_its_dtype(tmp_path: Path, ngff: str, dtype: type) -> None:
    rng = np.random.default_rng(0)
    image = (rng.random((3, 40, 36)) * 1000).astype(dtype)
    path = write_ome_zarr(tmp_path / "cells.ome.zarr", image, "cyx", labels=["DNA", "Actin", "Tubulin"], ngff=ngff)
    out = read_image(path)
    assert out.dtype == image.dtype and out.shape == (3, 40, 36)
    np.testing.assert_array_equal(out, image)
    axes = describe_image(path)
    assert (axes.source, axes.axes, axes.shape, axes.levels) == ("OME-Zarr", "CYX", (3, 40, 36), 2)
    assert axes.channel_names == ("DNA", "Actin", "Tubulin")


def test_a_single_channel_yx_image_is_one_channel(tmp_path: Path) -> None:
    image = np.arange(24 * 20, dtype=np.uint16).reshape(24, 20)
    out = read_image(write_ome_zarr(tmp_path / "gray.zarr", image, "yx"))
    assert out.shape == (1, 24, 20)
    np.testing.assert_array_equal(out[0], image)


def test_channels_are_selected_by_their_omero_labels(tmp_path: Path) -> None:
    image = np.stack([np.full((16, 16), v, np.uint16) for v in (10, 20, 30)])
    path = write_ome_zarr(tmp_path / "c.zarr", image, "cyx", labels=["DNA", "Actin", "Tubulin"])
    out = read_image(path, axes=AxesPolicy(select=["Tubulin", "DNA"]))
    assert out[:, 0, 0].tolist() == [30, 10]
    with pytest.raises(ImageReadError, match=r"channel\(s\) Mito not in .*; valid: DNA, Actin, Tubulin"):
        read_image(path, axes=AxesPolicy(select=["Mito"]))


def test_channels_without_labels_declare_no_names(tmp_path: Path) -> None:
    path = write_ome_zarr(tmp_path / "c.zarr", np.zeros((2, 16, 16), np.uint16), "cyx")
    assert describe_image(path).channel_names == ()
    with pytest.raises(ImageReadError, match="declares no channel names"):
        read_image(path, axes=AxesPolicy(select=["DNA"]))


def test_a_z_stack_needs_a_projection_and_an_index_reads_one_plane(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 4000, (2, 5, 16, 16)).astype(np.uint16)  # c, z, y, x
    path = write_ome_zarr(tmp_path / "z.zarr", stack, "czyx", labels=["a", "b"])
    with pytest.raises(StackError, match=r"holds a Z stack \(Z=5\): OME-Zarr axes CZYX .*--z max\|mean"):
        read_image(path)
    np.testing.assert_array_equal(read_image(path, axes=AxesPolicy(z="max")), stack.max(axis=1))
    assert read_image(path, axes=AxesPolicy(z="mean")).dtype == np.float32
    with pytest.raises(StackError, match=r"--z 7 is out of range .* valid: 0\.\.4"):
        read_image(path, axes=AxesPolicy(z=7))
    np.testing.assert_array_equal(read_image(path, axes=AxesPolicy(z="middle")), stack[:, 2])
    # Only the chunks of plane 3 are read: with every other plane's chunks corrupt, it still reads.
    for channel in (path / "s0" / "c").iterdir():
        for plane in channel.iterdir():
            if plane.name != "3":
                corrupt_chunks(plane)
    np.testing.assert_array_equal(read_image(path, axes=AxesPolicy(z=3)), stack[:, 3])
    with pytest.raises(ImageReadError, match="cannot read OME-Zarr image"):  # the other planes are
        read_image(path, axes=AxesPolicy(z="middle"))


def test_a_time_series_is_refused_without_t_and_read_with_it(tmp_path: Path) -> None:
    series = np.stack([np.full((1, 16, 16), t, np.uint16) for t in range(4)])  # t, c, y, x
    path = write_ome_zarr(tmp_path / "t.zarr", series, "tcyx")
    with pytest.raises(StackError, match=r"time series \(T=4\)"):
        read_image(path)
    assert read_image(path, axes=AxesPolicy(t=2))[0, 0, 0] == 2
    assert read_image(path, axes=AxesPolicy(t="max"))[0, 0, 0] == 3


def corrupt_chunks(folder: Path) -> int:
    """Overwrite every chunk file under ``folder`` with bytes no codec decodes; return how many.

    (A *missing* chunk would not do: zarr reads it as the fill value.)
    """
    chunks = [p for p in folder.rglob("*") if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs")]
    for chunk in chunks:
        chunk.write_bytes(b"corrupt")
    return len(chunks)


def test_only_level_0_of_the_field_asked_for_is_touched(tmp_path: Path) -> None:
    """Another field's arrays can be gone and the lower resolution's chunks corrupt: neither is read."""
    plate = tmp_path / "plate.zarr"
    fields = {}
    for f in ("0", "1"):
        fields[f] = np.random.default_rng(int(f)).integers(0, 60000, (2, 32, 32)).astype(np.uint16)
        write_ome_zarr(plate / "A" / "1" / f, fields[f], "cyx", labels=["DNA", "Marker"])
    shutil.rmtree(plate / "A" / "1" / "1")
    assert corrupt_chunks(plate / "A" / "1" / "0" / "s1") > 0  # level 1
    np.testing.assert_array_equal(read_image(plate / "A" / "1" / "0"), fields["0"])
    files = image_files(plate / "A" / "1" / "0")
    assert files and all("/s1/" not in f for f in files)
    assert any(f.endswith("s0/zarr.json") for f in files) and any("/s0/c/" in f for f in files)


def test_a_corrupt_chunk_is_an_image_read_error(tmp_path: Path) -> None:
    path = write_ome_zarr(tmp_path / "c.zarr", np.ones((1, 16, 16), np.uint16) * 7, "cyx", levels=1)
    chunk = next(p for p in (path / "s0" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"not a zstd or blosc frame")
    with pytest.raises(ImageReadError, match="cannot read OME-Zarr image"):
        read_image(path)


def test_paths_that_are_not_images_say_what_they_are(tmp_path: Path) -> None:
    from cellclass.data.simulate_plate import simulate_plate

    simulate_plate(tmp_path / "sim", rows=1, cols=1, fields=1, image_size=16)
    plate = tmp_path / "sim" / "plate.zarr"
    assert (zarr_kind(plate), zarr_kind(plate / "A" / "1"), zarr_kind(plate / "A" / "1" / "0")) == ("plate", "well", "image")
    with pytest.raises(ImageReadError, match=r"it is an OME-Zarr plate, not an image; valid: an image .*A/1/0"):
        read_image(plate)
    with pytest.raises(ImageReadError, match="it is an OME-Zarr well, not an image"):
        read_image(plate / "A" / "1")
    with pytest.raises(ImageReadError, match="folder does not exist"):
        read_image(plate / "B" / "1" / "0")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(ImageReadError, match=r"not an OME-Zarr image \(no zarr metadata\)"):
        read_image(tmp_path / "empty.zarr")
    with pytest.raises(ImageReadError, match="OME-Zarr folders and vendor formats are read from disk"):
        read_image_bytes(b"xx", "upload.zarr")
    assert image_exists(plate / "A" / "1" / "0") and not image_exists(plate / "B" / "1" / "0")


def test_zarr_paths_are_recognised_without_touching_other_files(tmp_path: Path) -> None:
    assert is_zarr_path("plate.zarr/A/1/0") and is_zarr_path("cells.OME.ZARR")
    assert not is_zarr_path(tmp_path / "cell.tif")
    tiff_in_zarr_folder = tmp_path / "x.zarr" / "cell.tif"
    tiff_in_zarr_folder.parent.mkdir()
    tiff_in_zarr_folder.write_bytes(b"II*\x00")
    assert not is_zarr_path(tiff_in_zarr_folder)


def test_reading_ome_zarr_without_the_extra_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_ome_zarr(tmp_path / "c.zarr", np.zeros((1, 16, 16), np.uint16), "cyx")
    monkeypatch.setitem(sys.modules, "ome_zarr", None)  # as if it were not installed
    with pytest.raises(MissingDependencyError, match=r"needs the zarr extra .*pip install 'cellclass\[zarr\]'"):
        read_image(path)


# -- vendor formats ------------------------------------------------------------------------
@pytest.mark.parametrize(("ext", "label"), [(".czi", "Zeiss CZI"), (".nd2", "Nikon ND2"), (".lif", "Leica LIF")])
def test_vendor_files_without_the_extra_name_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ext: str, label: str) -> None:
    path = tmp_path / f"scan{ext}"
    path.write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "bioio", None)  # as where the vendor extra is not installed
    with pytest.raises(MissingDependencyError,
                       match=rf"reading {label} file '.*scan\{ext}' needs the vendor extra \(bioio is not installed\); "
                             r"install it with: pip install 'cellclass\[vendor\]'"):
        read_image(path)
    with pytest.raises(MissingDependencyError, match=r"cellclass\[vendor\]"):
        describe_image(path)


def test_a_vendor_plugin_missing_beside_bioio_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bioio")
    path = tmp_path / "scan.nd2"
    path.write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "bioio_nd2", None)
    with pytest.raises(MissingDependencyError, match=r"\(bioio-nd2 is not installed\).*cellclass\[vendor\]"):
        read_image(path)


def test_bioio_reads_an_ome_tiff_into_the_same_axes_rules(tmp_path: Path) -> None:
    """A real round trip through bioio (where it and its OME-TIFF plugin are installed)."""
    pytest.importorskip("bioio")
    pytest.importorskip("bioio_ome_tiff")
    import tifffile

    from cellclass.data.vendor import read_with_bioio

    stack = np.random.default_rng(2).integers(0, 4000, (3, 2, 24, 20)).astype(np.uint16)  # z, c, y, x
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, stack, ome=True, metadata={"axes": "ZCYX", "Channel": {"Name": ["DNA", "Actin"]}})
    with pytest.raises(StackError, match=r"Z stack \(Z=3\)"):
        read_with_bioio(path, AxesPolicy(), plugin="bioio_ome_tiff")
    image, names = read_with_bioio(path, AxesPolicy(z="max"), plugin="bioio_ome_tiff")
    assert image.dtype == np.uint16 and names == ("DNA", "Actin")
    np.testing.assert_array_equal(image, stack.max(axis=0))
    garbage = tmp_path / "bad.ome.tif"
    garbage.write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match=r"cannot read image '.*bad\.ome\.tif' through bioio: UnsupportedFileFormatError"):
        read_with_bioio(garbage, AxesPolicy(), plugin="bioio_ome_tiff")
