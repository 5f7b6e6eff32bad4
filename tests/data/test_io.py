"""Tests of cellclass.data.io: lossless readers, channel sets, patterns and writers."""

from __future__ import annotations

from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile

from cellclass.data.io import (
    IMAGE_EXTENSIONS,
    expand_pattern,
    read_channel_set,
    read_image,
    write_png,
    write_tiff,
)
from cellclass.errors import CellclassError, ImageReadError

# Pixel values at the limits of 12-, 14- and 16-bit cameras, plus a value above 32767
# that a signed or 8-bit detour would corrupt.
LIMIT_VALUES = np.array([0, 1, 255, 256, 4095, 16383, 32767, 32768, 40000, 65534, 65535])


def limit_image(shape: tuple[int, int] = (6, 11)) -> np.ndarray:
    """A uint16 image holding every limit value, on a random background."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 65536, size=shape, dtype=np.uint16)
    image.flat[: LIMIT_VALUES.size] = LIMIT_VALUES
    return image


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)


# --------------------------------------------------------------------------------------
# TIFF
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [12, 14, 16])
def test_tiff_uint16_keeps_camera_bit_depth_limits(tmp_path: Path, bits: int) -> None:
    image = limit_image()
    image = np.minimum(image, 2**bits - 1).astype(np.uint16)
    path = tmp_path / "limits.tif"
    tifffile.imwrite(path, image)

    result = read_image(path)

    assert_same(result, image[np.newaxis])
    assert result.max() == 2**bits - 1
    if bits == 16:
        assert 40000 in result


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.uint16, np.int16, np.uint32, np.float32, np.float64]
)
def test_tiff_single_page_keeps_dtype(tmp_path: Path, dtype: type) -> None:
    image = (np.arange(7 * 9).reshape(7, 9) * 3).astype(dtype)
    path = tmp_path / "page.tif"
    tifffile.imwrite(path, image)

    assert_same(read_image(path), image[np.newaxis])


def test_tiff_float32_keeps_nan_and_inf(tmp_path: Path) -> None:
    image = np.linspace(-1.5, 2.5, 30, dtype=np.float32).reshape(5, 6)
    image[0, 0], image[1, 2], image[4, 5] = np.nan, np.inf, -np.inf
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, image)

    result = read_image(path)

    assert result.dtype == np.float32
    np.testing.assert_array_equal(result[0], image)  # NaNs compare equal here
    assert np.isnan(result[0, 0, 0])


def test_tiff_multipage_pages_are_channels(tmp_path: Path) -> None:
    stack = np.stack([limit_image(), limit_image()[::-1], limit_image()[:, ::-1]])
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    with tifffile.TiffFile(path) as tiff:
        assert len(tiff.pages) == 3

    assert_same(read_image(path), stack)


def test_tiff_multipage_written_page_by_page(tmp_path: Path) -> None:
    stack = np.stack([limit_image(), limit_image()[::-1]])
    path = tmp_path / "appended.tif"
    with tifffile.TiffWriter(path) as writer:
        for page in stack:
            writer.write(page, photometric="minisblack", contiguous=False)

    assert_same(read_image(path), stack)


def test_tiff_chw_stays_chw(tmp_path: Path) -> None:
    chw = np.arange(3 * 40 * 40, dtype=np.uint16).reshape(3, 40, 40) * 17
    path = tmp_path / "chw.tif"
    tifffile.imwrite(path, chw, photometric="minisblack")

    assert_same(read_image(path), chw)


def test_tiff_planar_rgb_is_chw(tmp_path: Path) -> None:
    chw = np.arange(3 * 8 * 5, dtype=np.uint16).reshape(3, 8, 5) * 1000
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, chw, photometric="rgb", planarconfig="separate")

    assert_same(read_image(path), chw)


def test_tiff_interleaved_rgb_hwc_becomes_chw(tmp_path: Path) -> None:
    hwc = np.random.default_rng(1).integers(0, 256, size=(120, 120, 3), dtype=np.uint8)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, hwc, photometric="rgb")

    assert_same(read_image(path), np.moveaxis(hwc, -1, 0))


def test_tiff_hwc_stored_as_gray_pages_follows_layout_rule(tmp_path: Path) -> None:
    # Stored as 20 gray pages of (20, 4): only the layout rule can tell it is HWC.
    hwc = np.arange(20 * 20 * 4, dtype=np.uint16).reshape(20, 20, 4)
    path = tmp_path / "hwc_pages.tif"
    tifffile.imwrite(path, hwc, photometric="minisblack")

    assert_same(read_image(path), np.moveaxis(hwc, -1, 0))


def test_tiff_interleaved_rgb_with_tiny_width_uses_tags_not_shape(tmp_path: Path) -> None:
    # (2, 3, 3) would be read as CHW by the shape rule; the TIFF tags say samples last.
    hwc = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    path = tmp_path / "tiny_rgb.tif"
    tifffile.imwrite(path, hwc, photometric="rgb")

    assert_same(read_image(path), np.moveaxis(hwc, -1, 0))


@pytest.mark.parametrize("compression", ["zlib", "lzw"])
def test_tiff_compressed_is_lossless(tmp_path: Path, compression: str) -> None:
    image = limit_image((32, 20))
    path = tmp_path / "compressed.tif"
    tifffile.imwrite(path, image, compression=compression)

    assert_same(read_image(path), image[np.newaxis])


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("bigtiff", [False, True])
def test_tiff_byte_order_and_bigtiff(tmp_path: Path, byteorder: str, bigtiff: bool) -> None:
    image = limit_image()
    path = tmp_path / "order.tif"
    tifffile.imwrite(path, image, byteorder=byteorder, bigtiff=bigtiff)

    result = read_image(path)

    assert_same(result, image[np.newaxis])
    assert result.dtype.isnative


def test_tiff_imagej_hyperstack_channels(tmp_path: Path) -> None:
    chw = np.stack([limit_image(), limit_image()[::-1]])
    path = tmp_path / "imagej.tif"
    tifffile.imwrite(path, chw, imagej=True, metadata={"axes": "CYX"})

    assert_same(read_image(path), chw)


def test_tiff_uppercase_extension(tmp_path: Path) -> None:
    image = limit_image()
    path = tmp_path / "UPPER.TIF"
    tifffile.imwrite(path, image)

    assert_same(read_image(str(path)), image[np.newaxis])


# --------------------------------------------------------------------------------------
# PNG, NPY, JPEG
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [12, 14, 16])
def test_png_16bit_keeps_camera_bit_depth_limits(tmp_path: Path, bits: int) -> None:
    image = np.minimum(limit_image(), 2**bits - 1).astype(np.uint16)
    path = tmp_path / "limits.png"
    path.write_bytes(imagecodecs.png_encode(image))

    result = read_image(path)

    assert_same(result, image[np.newaxis])
    assert result.max() == 2**bits - 1
    if bits == 16:
        assert 40000 in result


@pytest.mark.parametrize(
    ("shape", "channels"),
    [((9, 7), 1), ((9, 7, 2), 2), ((9, 7, 3), 3), ((9, 7, 4), 4)],
    ids=["gray", "gray+alpha", "rgb", "rgba"],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_modes_become_channels_first(
    tmp_path: Path, shape: tuple[int, ...], channels: int, dtype: type
) -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True, dtype=dtype)
    path = tmp_path / "mode.png"
    path.write_bytes(imagecodecs.png_encode(image))

    result = read_image(path)

    expected = image[np.newaxis] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    assert result.shape == (channels, 9, 7)
    assert_same(result, expected)


def test_npy_2d_gets_channel_axis(tmp_path: Path) -> None:
    image = limit_image()
    path = tmp_path / "image.npy"
    np.save(path, image)

    assert_same(read_image(path), image[np.newaxis])


def test_npy_3d_chw_and_hwc(tmp_path: Path) -> None:
    chw = np.arange(3 * 10 * 12, dtype=np.float32).reshape(3, 10, 12)
    np.save(tmp_path / "chw.npy", chw)
    np.save(tmp_path / "hwc.npy", np.moveaxis(chw, 0, -1))

    assert_same(read_image(tmp_path / "chw.npy"), chw)
    assert_same(read_image(tmp_path / "hwc.npy"), chw)


def test_npy_big_endian_becomes_native(tmp_path: Path) -> None:
    image = limit_image().astype(">u2")
    np.save(tmp_path / "be.npy", image)

    result = read_image(tmp_path / "be.npy")

    assert result.dtype == np.uint16
    assert result.dtype.isnative
    np.testing.assert_array_equal(result[0], image)


def test_npy_leading_singleton_axes_are_dropped(tmp_path: Path) -> None:
    chw = np.arange(2 * 5 * 6, dtype=np.uint16).reshape(1, 2, 5, 6)
    np.save(tmp_path / "batch1.npy", chw)

    assert_same(read_image(tmp_path / "batch1.npy"), chw[0])


def test_jpeg_is_read_channels_first(tmp_path: Path) -> None:
    image = np.full((16, 16, 3), 128, dtype=np.uint8)
    path = tmp_path / "photo.jpg"
    path.write_bytes(imagecodecs.jpeg_encode(image, level=95))

    result = read_image(path)

    assert result.shape == (3, 16, 16)
    assert result.dtype == np.uint8
    assert np.abs(result.astype(int) - 128).max() <= 2  # lossy codec


def test_image_extensions_cover_every_reader() -> None:
    assert IMAGE_EXTENSIONS == (".tif", ".tiff", ".png", ".npy", ".jpg", ".jpeg")


# --------------------------------------------------------------------------------------
# read_image errors
# --------------------------------------------------------------------------------------


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.tif"
    with pytest.raises(ImageReadError, match=r"image '.*absent\.tif': file does not exist"):
        read_image(path)


def test_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    with pytest.raises(ImageReadError, match=r"folder\.png': it is a directory"):
        read_image(folder)


@pytest.mark.parametrize("suffix", [".tif", ".png", ".npy", ".jpg"])
def test_empty_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.\w+': file is empty \(0 bytes\)"):
        read_image(path)


@pytest.mark.parametrize("name", ["x.bmp", "x.gif", "noextension"])
def test_unsupported_extension_lists_valid_ones(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"BM" + bytes(100))
    with pytest.raises(
        ImageReadError,
        match=r"unsupported image extension .* for '.*'; valid: \.tif, \.tiff, \.png, \.npy",
    ):
        read_image(path)


@pytest.mark.parametrize(
    "writer",
    [
        pytest.param(lambda p, a: tifffile.imwrite(p, a), id="single-page"),
        pytest.param(
            lambda p, a: tifffile.imwrite(p, np.stack([a, a, a]), photometric="minisblack"),
            id="multipage",
        ),
        pytest.param(
            lambda p, a: tifffile.imwrite(
                p, np.stack([a, a, a]), photometric="minisblack", contiguous=False
            ),
            id="multipage-noncontiguous",
        ),
        pytest.param(lambda p, a: tifffile.imwrite(p, a, compression="zlib"), id="zlib"),
        pytest.param(
            lambda p, a: tifffile.imwrite(p, np.stack([a, a, a], axis=-1), photometric="rgb"),
            id="rgb",
        ),
    ],
)
def test_truncated_tiff_raises(tmp_path: Path, writer) -> None:  # noqa: ANN001
    image = np.random.default_rng(3).integers(0, 65536, size=(64, 80), dtype=np.uint16)
    path = tmp_path / "cut.tif"
    writer(path, image)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(ImageReadError, match=r"decode image '.*cut\.tif': file is truncated"):
        read_image(path)


def test_truncated_tiff_message_gives_sizes(tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, np.zeros((100, 200), dtype=np.uint16))
    data = path.read_bytes()
    path.write_bytes(data[:1024])

    with pytest.raises(ImageReadError, match=rf"truncated \(1024 of at least {len(data)} bytes\)"):
        read_image(path)


@pytest.mark.parametrize("cut", [3, 7, 12])
def test_tiff_cut_inside_header_or_directory(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "stub.tif"
    tifffile.imwrite(path, np.zeros((4, 4), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:cut])

    with pytest.raises(ImageReadError, match=r"stub\.tif': file is truncated"):
        read_image(path)


def test_truncated_png_raises(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    data = imagecodecs.png_encode(limit_image((40, 40)))
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(ImageReadError, match=r"cannot decode image '.*cut\.png': .*truncated"):
        read_image(path)


def test_truncated_npy_raises(tmp_path: Path) -> None:
    path = tmp_path / "cut.npy"
    np.save(path, limit_image((40, 40)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(ImageReadError, match=r"\.npy': file is truncated \(\d+ of at least 3328"):
        read_image(path)


@pytest.mark.parametrize(
    ("suffix", "reason"),
    [
        (".tif", "not a TIFF file"),
        (".tiff", "not a TIFF file"),
        (".png", "not a PNG file"),
        (".npy", "not an NPY file"),
        (".jpg", "cannot decode image"),
    ],
)
def test_garbage_bytes_raise(tmp_path: Path, suffix: str, reason: str) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not an image at all " * 20)
    with pytest.raises(ImageReadError, match=rf"garbage\{suffix}'.*{reason}|{reason}.*garbage"):
        read_image(path)


def test_tiff_with_valid_header_but_corrupt_directory(tmp_path: Path) -> None:
    path = tmp_path / "loop.tif"
    # Header pointing at a directory with no entries whose "next" offset points to itself.
    path.write_bytes(b"II*\x00" + (8).to_bytes(4, "little") + bytes(2) + (8).to_bytes(4, "little"))
    with pytest.raises(ImageReadError, match=r"loop\.tif'"):
        read_image(path)


def test_tiff_pages_of_different_shapes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as writer:
        writer.write(np.zeros((8, 8), np.uint16), photometric="minisblack")
        writer.write(np.zeros((4, 4), np.uint16), photometric="minisblack")
    with pytest.raises(ImageReadError, match=r"mixed\.tif': TIFF holds 2 images of different"):
        read_image(path)


def test_npy_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageReadError, match=r"objects\.npy': .*allow_pickle"):
        read_image(path)


def test_npy_complex_dtype_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "complex.npy"
    np.save(path, np.zeros((4, 4), dtype=np.complex64))
    with pytest.raises(ImageReadError, match=r"unsupported dtype complex64; valid: "):
        read_image(path)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5), (2, 2, 3, 4, 5)])
def test_npy_uninterpretable_dimensions(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = tmp_path / "odd.npy"
    np.save(path, np.zeros(shape, dtype=np.uint8))
    with pytest.raises(ImageReadError, match=r"interpret image '.*odd\.npy': array of shape"):
        read_image(path)


def test_image_read_error_is_a_cellclass_error(tmp_path: Path) -> None:
    with pytest.raises(CellclassError):
        read_image(tmp_path / "absent.png")


# --------------------------------------------------------------------------------------
# Channel sets and patterns
# --------------------------------------------------------------------------------------


def test_hpa_style_channel_set_of_four_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    colours = ["red", "green", "blue", "yellow"]
    planes = rng.integers(0, 256, size=(4, 16, 12), dtype=np.uint8)
    for colour, plane in zip(colours, planes, strict=True):
        write_png(tmp_path / f"abc_{colour}.png", plane)

    paths = expand_pattern("{Id}_{channel}.png", {"Id": "abc"}, colours)
    result = read_channel_set([tmp_path / p for p in paths])

    assert_same(result, planes)
    assert result.flags.c_contiguous


def test_rxrx1_style_channel_set_of_six_16bit_pngs(tmp_path: Path) -> None:
    planes = np.stack([np.roll(limit_image((10, 10)), k) for k in range(6)])
    row = {"experiment": "HEPG2-01", "plate": 1, "well": "B02", "site": 2}
    paths = expand_pattern(
        "{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png",
        row,
        [str(k) for k in range(1, 7)],
    )
    assert paths[0] == "HEPG2-01/Plate1/B02_s2_w1.png"
    assert paths[-1] == "HEPG2-01/Plate1/B02_s2_w6.png"
    for path, plane in zip(paths, planes, strict=True):
        write_png(tmp_path / path, plane)

    assert_same(read_channel_set([tmp_path / p for p in paths]), planes)


def test_channel_set_shape_mismatch_names_odd_file(tmp_path: Path) -> None:
    write_png(tmp_path / "a_red.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "a_green.png", np.zeros((8, 9), np.uint8))
    with pytest.raises(
        ImageReadError,
        match=r"'.*a_green\.png' has shape \(8, 9\) uint8 but '.*a_red\.png' has shape \(8, 8\)",
    ):
        read_channel_set([tmp_path / "a_red.png", tmp_path / "a_green.png"])


def test_channel_set_dtype_mismatch(tmp_path: Path) -> None:
    write_png(tmp_path / "a_w1.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "a_w2.png", np.zeros((8, 8), np.uint16))
    with pytest.raises(ImageReadError, match=r"a_w2\.png' has shape \(8, 8\) uint16 but"):
        read_channel_set([tmp_path / "a_w1.png", tmp_path / "a_w2.png"])


def test_channel_set_refuses_multichannel_file(tmp_path: Path) -> None:
    write_png(tmp_path / "rgb.png", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ImageReadError, match=r"rgb\.png' holds 3 channels .*; valid: one single"):
        read_channel_set([tmp_path / "rgb.png"])


def test_channel_set_missing_member(tmp_path: Path) -> None:
    write_png(tmp_path / "a_red.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ImageReadError, match=r"a_blue\.png': file does not exist"):
        read_channel_set([tmp_path / "a_red.png", tmp_path / "a_blue.png"])


def test_channel_set_empty() -> None:
    with pytest.raises(ImageReadError, match=r"got 0 paths; valid: one single-channel file"):
        read_channel_set([])


def test_channel_set_single_path_is_a_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"sequence of paths.*single path"):
        read_channel_set(str(tmp_path / "a.png"))


def test_expand_pattern_format_spec_and_channel_override() -> None:
    paths = expand_pattern("P{plate:02d}/{channel}.tif", {"plate": 3, "channel": "x"}, ["a", "b"])
    assert paths == ["P03/a.tif", "P03/b.tif"]


def test_expand_pattern_accepts_pandas_row() -> None:
    pd = pytest.importorskip("pandas")
    row = pd.Series({"Id": "00070df0", "label": "1 2"})
    assert expand_pattern("{Id}_{channel}.png", row, ["red", "green"]) == [
        "00070df0_red.png",
        "00070df0_green.png",
    ]


def test_expand_pattern_missing_field_names_available_fields() -> None:
    with pytest.raises(
        ImageReadError,
        match=r"needs field\(s\) plate missing from the row; available fields: site, well",
    ):
        expand_pattern("Plate{plate}/{well}_w{channel}.png", {"well": "B02", "site": 1}, ["1"])


def test_expand_pattern_without_channel_placeholder() -> None:
    with pytest.raises(ImageReadError, match=r"has no '\{channel\}' placeholder but 2 channels"):
        expand_pattern("{Id}.png", {"Id": "a"}, ["red", "green"])


@pytest.mark.parametrize("pattern", ["{Id_{channel}.png", "{}_{channel}.png", "{0}_{channel}.png"])
def test_expand_pattern_malformed(pattern: str) -> None:
    with pytest.raises(ImageReadError, match=r"invalid file name pattern"):
        expand_pattern(pattern, {"Id": "a"}, ["red"])


def test_expand_pattern_bad_format_spec() -> None:
    with pytest.raises(ImageReadError, match=r"cannot format file name pattern .* channel 'red'"):
        expand_pattern("{plate:02d}_{channel}.png", {"plate": "B"}, ["red"])


# --------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        limit_image()[np.newaxis],
        np.stack([limit_image(), limit_image()[::-1], limit_image()[:, ::-1]]),
        np.full((2, 5, 5), np.nan, dtype=np.float32),
    ],
    ids=["one-channel", "three-channels", "float-nan"],
)
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_write_tiff_round_trip(tmp_path: Path, image: np.ndarray, compression: str | None) -> None:
    path = tmp_path / "sub" / "out.tif"  # the folder is created
    write_tiff(path, image, compression=compression)

    result = read_image(path)

    assert result.dtype == image.dtype
    np.testing.assert_array_equal(result, image)
    assert [p.name for p in path.parent.iterdir()] == ["out.tif"]  # no temporary left


def test_write_tiff_one_channel_is_a_2d_page(tmp_path: Path) -> None:
    path = tmp_path / "one.tif"
    write_tiff(path, limit_image()[np.newaxis])
    with tifffile.TiffFile(path) as tiff:
        assert len(tiff.pages) == 1
        assert tiff.pages[0].shape == limit_image().shape


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_write_png_round_trip(tmp_path: Path, channels: int, dtype: type) -> None:
    rng = np.random.default_rng(5)
    image = rng.integers(0, np.iinfo(dtype).max, size=(channels, 7, 9), endpoint=True, dtype=dtype)
    path = tmp_path / "out.png"
    write_png(path, image)

    assert_same(read_image(path), image)


def test_write_png_keeps_16bit(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    write_png(path, limit_image())
    assert imagecodecs.png_decode(path.read_bytes()).dtype == np.uint16
    assert 40000 in read_image(path)


def test_writers_replace_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "again.png"
    write_png(path, np.zeros((4, 4), np.uint8))
    write_png(path, np.ones((4, 4), np.uint8))
    assert read_image(path).max() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["again.png"]


def test_write_png_refuses_bad_channel_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"store 4 channels .*; valid: 1 \(gray\) or 3 \(RGB\)"):
        write_png(tmp_path / "x.png", np.zeros((4, 5, 5), np.uint8))
    assert not any(tmp_path.iterdir())


def test_write_png_refuses_bad_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot store dtype float32 .*; valid: uint8, uint16"):
        write_png(tmp_path / "x.png", np.zeros((1, 5, 5), np.float32))


@pytest.mark.parametrize("writer", [write_png, write_tiff])
def test_writers_refuse_bad_shape(tmp_path: Path, writer) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=r"shape \(C, H, W\) or \(H, W\).*got shape \(5,\)"):
        writer(tmp_path / "x.img", np.zeros(5, np.uint8))


def test_failed_write_leaves_no_temporary(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_tiff(tmp_path / "x.tif", np.zeros((2, 4, 4), dtype=object))
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------
# Real shared data
# --------------------------------------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("pattern", "shape", "dtype"),
    [
        ("ifc_cellcycle_jurkat_mlcp/images/*.tif", (3, 40, 40), np.uint16),
        ("autofoci_dsb_foci_singlecell/images/*.tif", (3, 120, 120), np.uint8),
        ("mitocheck_h2b_phenotypes/images/*/*.png", (1, 64, 64), np.uint8),
    ],
)
def test_shared_data_reads_with_expected_shape(
    shared_data: Path, pattern: str, shape: tuple[int, ...], dtype: type
) -> None:
    files = sorted(shared_data.glob(pattern))
    if not files:
        pytest.skip(f"no files match {pattern} under {shared_data}")
    step = max(1, len(files) // 50)  # a spread-out sample keeps the test fast
    for path in files[::step]:
        image = read_image(path)
        assert image.shape == shape, path
        assert image.dtype == dtype, path
    # The reference decoder agrees on one file.
    reference = tifffile.imread(files[0]) if files[0].suffix == ".tif" else None
    if reference is not None:
        chw = reference if reference.shape == shape else np.moveaxis(reference, -1, 0)
        np.testing.assert_array_equal(read_image(files[0]), chw)
