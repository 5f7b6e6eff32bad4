"""Lossless image readers and writers.

Every reader returns one representation: an ``ndarray`` of shape ``(C, H, W)`` in the
file's own dtype (uint8, uint16, int16, uint32, float32, float64, ...), in native byte
order, with values exactly as stored. Nothing is rescaled, clipped or converted through
8 bit.

Supported files (see :data:`IMAGE_EXTENSIONS`):

- **TIFF** (``.tif``, ``.tiff``): a file that declares its axes (an ImageJ hyperstack
  with slices or frames, an OME-TIFF, tifffile metadata naming its axes) is read through
  ``tifffile``'s series: only its ``C`` axis (and the samples of an RGB page) becomes
  channels, in the declared order; Z, T and several series (positions) are handled as an
  :class:`~cellclass.data.axes.AxesPolicy` says, and refused without one
  (:class:`~cellclass.errors.StackError`); a pyramid is read at full resolution. Other
  files are decoded by libtiff through ``imagecodecs.tiff_decode`` (faster than tifffile
  on small images), falling back to ``tifffile`` where libtiff cannot decode the
  file or would drop pages: a single 2-D page gives ``C = 1``, the pages of a multi-page
  file that declares no axes are its channels, the samples of an RGB page (interleaved
  or planar) are its channels. The file's structure is checked before decoding, so a
  truncated file raises instead of returning partial data.
- **PNG** (``.png``): 8 and 16 bit, gray, gray + alpha, RGB, RGBA, decoded by
  ``imagecodecs.png_decode`` (16-bit stays 16-bit); samples become channels.
- **NPY** (``.npy``): loaded with ``allow_pickle=False``.
- **JPEG** (``.jpg``, ``.jpeg``): decoded by ``imagecodecs.jpeg_decode`` (lossy by
  nature; read as stored).
- **OME-Zarr** (a folder: ``cells.ome.zarr``, a plate's field ``plate.zarr/A/1/0``): the
  full-resolution level, axes and channel names from the NGFF metadata, through
  ``ome-zarr`` (the ``zarr`` extra; see :mod:`cellclass.data.omezarr`).
- **Vendor formats** (``.czi``, ``.nd2``, ``.lif``): through ``bioio`` plugins (the
  ``vendor`` extra; see :mod:`cellclass.data.vendor`).

Where a 3-D array's layout is not recorded in the file (NPY arrays, TIFF pages written as a
stack of gray pages), one rule decides: **a trailing axis of size <= 4 with a larger
leading axis means (H, W, C)**, e.g. ``(120, 120, 3)`` -> ``(3, 120, 120)``; anything else
is ``(C, H, W)``, e.g. ``(3, 40, 40)`` or ``(4, 4, 4)``. Leading axes of size 1 beyond
the third are dropped; any other array of more than 3 dimensions is refused.

Writers (:func:`write_tiff`, :func:`write_png`) go through :mod:`cellclass.atomic`: a
temporary file in the target folder moved into place, so a reader never sees a partial
file.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import string
import struct
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import imagecodecs
import numpy as np
import tifffile

from cellclass.atomic import atomic_path, atomic_write_bytes
from cellclass.data import omezarr, vendor
from cellclass.data.axes import (
    AxesPolicy,
    ImageAxes,
    check_axes,
    choose_series,
    select_channels_by_name,
    to_chw,
)
from cellclass.errors import ImageReadError, ImageWriteError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImagePath",
    "describe_image",
    "expand_pattern",
    "image_exists",
    "image_files",
    "read_channel_set",
    "read_image",
    "read_image_bytes",
    "write_png",
    "write_tiff",
]

logger = logging.getLogger(__name__)

ImagePath = str | os.PathLike[str]
"""A file system path to an image, as ``str`` or :class:`os.PathLike`."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".tif", ".tiff", ".png", ".npy", ".jpg", ".jpeg")
"""File extensions :func:`read_image` accepts (compared case-insensitively)."""

_VALID_EXTENSIONS = (", ".join(IMAGE_EXTENSIONS) + "; an OME-Zarr image folder (.zarr); "
                     + ", ".join(vendor.VENDOR_EXTENSIONS) + " with the vendor extra")

# Errors the third-party decoders raise for files they cannot decode. imagecodecs raises
# RuntimeError subclasses (TiffError, PngError, ...); tifffile and numpy raise ValueError
# (TiffFileError is one), KeyError for unknown codecs, and struct/EOF errors on short data.
_DECODE_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    ValueError,
    KeyError,
    IndexError,
    NotImplementedError,
    EOFError,
    struct.error,
    OSError,
)


# --------------------------------------------------------------------------------------
# Public readers
# --------------------------------------------------------------------------------------


_NO_POLICY = AxesPolicy()


def read_image(path: ImagePath, *, axes: AxesPolicy | None = None) -> np.ndarray:
    """Read one image file as a ``(C, H, W)`` array in the file's own dtype.

    Args:
        path: Image file; its extension (case-insensitive) picks the decoder and must be
            one of :data:`IMAGE_EXTENSIONS` or a vendor format (``.czi``, ``.nd2``,
            ``.lif``); or an OME-Zarr image folder (``cells.ome.zarr``,
            ``plate.zarr/A/1/0``).
        axes: What to do with a Z stack, a time series or several series, and which
            channels to keep by name (see :mod:`cellclass.data.axes`). None: such files
            are refused and every channel is kept.

    Returns:
        ndarray of shape ``(C, H, W)``, the file's dtype in native byte order, values
        exactly as stored (see the module docstring for how channels and layouts are
        interpreted; a projection's dtype is listed in :mod:`cellclass.data.axes`). Files
        storing channels last (RGB PNG, interleaved TIFF, HWC NPY) give a channels-first
        *view* rather than a copy, to keep decoding fast: call
        :func:`numpy.ascontiguousarray` where C-contiguous memory is needed.

    Raises:
        StackError: If the file declares Z > 1, T > 1 or several series and ``axes``
            does not say how to read them; the message names the file, its axes and
            sizes, and the options.
        ImageReadError: If the extension is not supported, the file is missing, empty,
            truncated or undecodable, or its array cannot be read as ``(C, H, W)``. The
            message names the path and the reason.
        MissingDependencyError: For an OME-Zarr folder without the ``zarr`` extra, or a
            vendor file without the ``vendor`` extra; the message names the extra.
    """
    name = os.fspath(path)
    other = _other_reader(name)
    if other is not None:
        policy = _NO_POLICY if axes is None else axes
        array, channel_names = other(name, policy)
        return select_channels_by_name(array, channel_names, policy, name)
    decode = _decoder(name)
    return _decoded(decode, _read_bytes(name), name, axes)


def read_image_bytes(data: bytes, name: str, *, axes: AxesPolicy | None = None) -> np.ndarray:
    """Decode an image held in memory (an upload) as :func:`read_image` decodes a file.

    Args:
        data: The file's bytes.
        name: The file's name; only its extension (which picks the decoder) and the
            error messages use it, nothing is opened.
        axes: As for :func:`read_image`.

    Returns:
        ndarray of shape ``(C, H, W)`` in the file's own dtype, as :func:`read_image`.

    Raises:
        StackError: As for :func:`read_image`.
        ImageReadError: If the extension is not supported, or the bytes are empty,
            truncated or undecodable.
    """
    if _other_reader(name) is not None:
        raise ImageReadError(
            f"cannot decode image '{name}' from memory: OME-Zarr folders and vendor formats are "
            f"read from disk; valid: {', '.join(IMAGE_EXTENSIONS)}"
        )
    decode = _decoder(name)
    if not data:
        raise ImageReadError(f"cannot decode image '{name}': file is empty (0 bytes)")
    return _decoded(decode, bytes(data), name, axes)


def describe_image(path: ImagePath) -> ImageAxes:
    """What an image file declares about its dimensions, without building ``(C, H, W)``.

    Reads the file's metadata (ImageJ description, OME-XML, tifffile metadata, the page
    directories) and, for formats whose header is all there is (PNG, JPEG, NPY), decodes
    it. ``inspect`` shows the result's :meth:`~cellclass.data.axes.ImageAxes.note`.

    Raises:
        ImageReadError: If the file cannot be read or its metadata cannot be parsed.
    """
    name = os.fspath(path)
    other = _other_reader(name)
    if other is omezarr.read_zarr_image:
        return omezarr.describe_zarr_image(name)
    if other is vendor.read_with_bioio:
        return vendor.describe_with_bioio(name)
    decode = _decoder(name)
    data = _read_bytes(name)
    if decode is _decode_tiff:
        return _describe_tiff(data, name)
    array, _ = decode(data, name, _NO_POLICY)
    source = os.path.splitext(name)[1].lstrip(".").upper().replace("JPG", "JPEG")
    return ImageAxes(name, source, "CYX", tuple(array.shape), str(array.dtype), declared=False)


def image_exists(path: ImagePath) -> bool:
    """Whether ``path`` is there to read: a file, or an OME-Zarr image folder."""
    name = os.fspath(path)
    if os.path.isfile(name):
        return True
    return _other_reader(name) is omezarr.read_zarr_image and os.path.isdir(name)


def image_files(path: ImagePath) -> list[str]:
    """The files an image's pixels come from: the file itself, or for an OME-Zarr image its
    metadata and full-resolution chunks (see :func:`cellclass.data.omezarr.zarr_image_files`).

    Raises:
        MissingDependencyError: For an OME-Zarr image without the ``zarr`` extra.
        ImageReadError: For an OME-Zarr folder that holds no image.
    """
    name = os.fspath(path)
    if _other_reader(name) is omezarr.read_zarr_image and os.path.isdir(name):
        return omezarr.zarr_image_files(name)
    return [name]


def read_channel_set(paths: Sequence[ImagePath], *, axes: AxesPolicy | None = None) -> np.ndarray:
    """Read one single-channel file per channel and stack them as ``(C, H, W)``.

    For datasets that store each channel in its own file, e.g. HPA
    (``{id}_red.png``, ``_green``, ``_blue``, ``_yellow``) or RxRx1 (``..._w1.png`` to
    ``..._w6.png``). Channels come out in the order of ``paths``.

    Args:
        paths: One image file per channel, each readable by :func:`read_image` and
            holding exactly one channel.
        axes: How each file's Z, T and series are read (its channel selection is not
            applied: a channel set selects files, see ``image.channels_select``).

    Returns:
        C-contiguous ndarray of shape ``(len(paths), H, W)`` in the files' common dtype.

    Raises:
        ImageReadError: If ``paths`` is empty, a file cannot be read, a file holds more
            than one channel, or the files differ in shape or dtype (the message names the
            odd file and both shapes).
        TypeError: If ``paths`` is a single path rather than a sequence of paths.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(
            f"read_channel_set expects a sequence of paths, one per channel; got a single "
            f"path {os.fspath(paths)!r}; use read_image for one file"
        )
    if len(paths) == 0:
        raise ImageReadError(
            "cannot read channel set: got 0 paths; valid: one single-channel file per channel"
        )
    first_name = os.fspath(paths[0])
    policy = AxesPolicy(z=axes.z, t=axes.t, series=axes.series) if axes is not None else None
    first = _read_single_channel(paths[0], policy)
    out = np.empty((len(paths), *first.shape), dtype=first.dtype)
    out[0] = first
    for index in range(1, len(paths)):
        plane = _read_single_channel(paths[index], policy)
        if plane.shape != first.shape or plane.dtype != first.dtype:
            raise ImageReadError(
                f"channel set mismatch: '{os.fspath(paths[index])}' has shape "
                f"{plane.shape} {plane.dtype} but '{first_name}' has shape {first.shape} "
                f"{first.dtype}; valid: all channel files of one shape and dtype"
            )
        out[index] = plane
    return out


def expand_pattern(
    pattern: str, fields: Mapping[str, object], channels: Sequence[str]
) -> list[str]:
    """Format a file name pattern once per channel.

    ``"{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png"`` with fields
    ``{"experiment": "HEPG2-01", "plate": 1, "well": "B02", "site": 1}`` and channels
    ``["1", ..., "6"]`` gives the six RxRx1 file names of one site. ``{channel}`` takes
    each value of ``channels`` in turn and wins over a field of that name; every other
    placeholder takes its value from ``fields`` (a dict or a pandas row) and may use
    format specs, e.g. ``{plate:02d}``.

    Args:
        pattern: :meth:`str.format` pattern.
        fields: Values for the pattern's placeholders other than ``channel``.
        channels: Channel values, one path per value, in order.

    Returns:
        One formatted path per channel, in the order of ``channels``.

    Raises:
        ImageReadError: If the pattern is malformed, names a field missing from
            ``fields`` (the message names the field and the available ones), or yields the
            same path for several channels because it lacks ``{channel}``.
    """
    try:
        placeholders = {
            field.split(".", 1)[0].split("[", 1)[0]
            for _, field, _, _ in string.Formatter().parse(pattern)
            if field is not None
        }
    except ValueError as exc:
        raise ImageReadError(
            f"invalid file name pattern {pattern!r}: {exc}; valid: a str.format pattern "
            f"such as '{{Id}}_{{channel}}.png'"
        ) from exc
    if "" in placeholders or any(field.isdigit() for field in placeholders):
        raise ImageReadError(
            f"invalid file name pattern {pattern!r}: positional placeholders ('{{}}', "
            f"'{{0}}') are not allowed; valid: named placeholders such as '{{channel}}'"
        )
    if "channel" not in placeholders and len(channels) > 1:
        raise ImageReadError(
            f"file name pattern {pattern!r} has no '{{channel}}' placeholder but "
            f"{len(channels)} channels were given; valid: a pattern containing "
            f"'{{channel}}', e.g. '{{Id}}_{{channel}}.png'"
        )
    missing = sorted(field for field in placeholders - {"channel"} if field not in fields)
    if missing:
        available = ", ".join(sorted(map(str, fields.keys()))) or "(none)"
        raise ImageReadError(
            f"file name pattern {pattern!r} needs field(s) {', '.join(missing)} missing "
            f"from the row; available fields: {available}"
        )
    values = _ChannelFields(fields)
    paths = []
    for channel in channels:
        values.channel = channel
        try:
            paths.append(pattern.format_map(values))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise ImageReadError(
                f"cannot format file name pattern {pattern!r} for channel {channel!r}: "
                f"{type(exc).__name__}: {exc}; valid: placeholders whose format specs fit "
                f"the field values"
            ) from exc
    return paths


# --------------------------------------------------------------------------------------
# Public writers
# --------------------------------------------------------------------------------------


def write_tiff(path: ImagePath, array: np.ndarray, *, compression: str | None = None) -> None:
    """Write a ``(C, H, W)`` array as a TIFF that :func:`read_image` reads back exactly.

    One channel is written as a single 2-D page, several as one gray page per channel.
    The parent folder is created if needed; the write is atomic.

    Args:
        path: Destination file.
        array: Image of shape ``(C, H, W)`` (or ``(H, W)`` for one channel), any numeric
            dtype tifffile supports.
        compression: Optional lossless TIFF compression, e.g. ``"zlib"``; None stores raw
            strips (fastest to decode).

    Raises:
        ImageWriteError: If ``array`` is not 2-D or 3-D numeric.
    """
    chw = _chw_for_writing(array, "write_tiff", path)
    page = chw[0] if chw.shape[0] == 1 else chw
    with atomic_path(path) as temporary:
        tifffile.imwrite(temporary, page, photometric="minisblack", compression=compression)


def write_png(path: ImagePath, array: np.ndarray) -> None:
    """Write a 1-channel (gray) or 3-channel (RGB) uint8/uint16 array as PNG, losslessly.

    The parent folder is created if needed; the write is atomic.

    Args:
        path: Destination file.
        array: Image of shape ``(C, H, W)`` with ``C`` 1 or 3 (or ``(H, W)``), dtype
            uint8 or uint16.

    Raises:
        ImageWriteError: If the shape or dtype cannot be stored in a PNG as described.
    """
    chw = _chw_for_writing(array, "write_png", path)
    if chw.dtype not in (np.uint8, np.uint16):
        raise ImageWriteError(
            f"write_png cannot store dtype {chw.dtype} for '{os.fspath(path)}'; "
            f"valid: uint8, uint16"
        )
    if chw.shape[0] not in (1, 3):
        raise ImageWriteError(
            f"write_png cannot store {chw.shape[0]} channels (shape {chw.shape}) for "
            f"'{os.fspath(path)}'; valid: 1 (gray) or 3 (RGB) channels"
        )
    hwc = chw[0] if chw.shape[0] == 1 else np.moveaxis(chw, 0, -1)
    encoded = imagecodecs.png_encode(np.ascontiguousarray(hwc, dtype=hwc.dtype.newbyteorder("=")))
    atomic_write_bytes(path, encoded)


# --------------------------------------------------------------------------------------
# Helpers shared by the readers
# --------------------------------------------------------------------------------------

class _ChannelFields:
    """Row fields with ``channel`` set per path, for :meth:`str.format_map`, without
    copying the row."""

    def __init__(self, fields: Mapping[str, object]) -> None:
        self._fields = fields
        self.channel: object = None

    def __getitem__(self, key: str) -> object:
        if key == "channel":
            return self.channel
        return self._fields[key]


def _other_reader(name: str) -> Callable[[str, AxesPolicy], tuple[np.ndarray, tuple[str, ...]]] | None:
    """The reader of a format that is not decoded from bytes (OME-Zarr, bioio), if ``name`` is one."""
    ext = os.path.splitext(name)[1].lower()
    if ext in _DECODERS:  # the fast path: no file system call
        return None
    if ext in vendor.VENDOR_EXTENSIONS:
        return vendor.read_with_bioio
    return omezarr.read_zarr_image if omezarr.is_zarr_path(name) else None


def _decoder(name: str) -> Callable[[bytes, str, AxesPolicy], tuple[np.ndarray, tuple[str, ...]]]:
    ext = os.path.splitext(name)[1].lower()
    decode = _DECODERS.get(ext)
    if decode is None:
        raise ImageReadError(
            f"unsupported image extension {ext or '(none)'!r} for '{name}'; "
            f"valid: {_VALID_EXTENSIONS}"
        )
    return decode


def _decoded(
    decode: Callable[[bytes, str, AxesPolicy], tuple[np.ndarray, tuple[str, ...]]],
    data: bytes,
    name: str,
    axes: AxesPolicy | None,
) -> np.ndarray:
    policy = _NO_POLICY if axes is None else axes
    array, channel_names = decode(data, name, policy)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return select_channels_by_name(array, channel_names, policy, name)


def _read_bytes(name: str) -> bytes:
    try:
        with open(name, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ImageReadError(f"cannot read image '{name}': file does not exist") from None
    except IsADirectoryError:
        raise ImageReadError(
            f"cannot read image '{name}': it is a directory; valid: an image file"
        ) from None
    except OSError as exc:
        raise ImageReadError(f"cannot read image '{name}': {exc.strerror or exc}") from exc
    if not data:
        raise ImageReadError(f"cannot decode image '{name}': file is empty (0 bytes)")
    return data


def _read_single_channel(path: ImagePath, axes: AxesPolicy | None) -> np.ndarray:
    image = read_image(path, axes=axes)
    if image.shape[0] != 1:
        raise ImageReadError(
            f"channel file '{os.fspath(path)}' holds {image.shape[0]} channels (shape "
            f"{image.shape}); valid: one single-channel file per channel"
        )
    return image[0]


def _to_chw(array: np.ndarray, name: str, *, samples_last: bool | None = None) -> np.ndarray:
    """Return ``array`` as ``(C, H, W)``, a view where the channels were last.

    Args:
        array: Decoded array.
        name: File name, for error messages.
        samples_last: True if the file records a trailing samples axis (PNG, interleaved
            TIFF), False if it records channels first; None applies the layout rule of
            the module docstring.
    """
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        return array[np.newaxis]
    if array.ndim != 3:
        raise ImageReadError(
            f"cannot interpret image '{name}': array of shape {array.shape} "
            f"({array.ndim}-D); valid: 2-D (H, W) or 3-D (C, H, W) / (H, W, C) with C <= 4"
        )
    if samples_last is None:
        samples_last = array.shape[-1] <= 4 and array.shape[0] > array.shape[-1]
    return np.moveaxis(array, -1, 0) if samples_last else array


def _check_dtype(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype.kind not in "buif":
        raise ImageReadError(
            f"cannot decode image '{name}': unsupported dtype {array.dtype}; valid: "
            f"boolean, integer or floating point pixels"
        )
    return array


# --------------------------------------------------------------------------------------
# PNG, JPEG, NPY
# --------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"


def _decode_png(data: bytes, name: str, axes: AxesPolicy) -> tuple[np.ndarray, tuple[str, ...]]:
    if not data.startswith(_PNG_SIGNATURE):
        raise ImageReadError(
            f"cannot decode image '{name}': not a PNG file (starts with {data[:8]!r})"
        )
    try:
        array = imagecodecs.png_decode(data)
    except _DECODE_ERRORS as exc:
        raise ImageReadError(
            f"cannot decode image '{name}': {_reason(exc)} ({len(data)} bytes; the file "
            f"may be truncated or corrupt)"
        ) from exc
    return _to_chw(array, name, samples_last=True), ()


def _decode_jpeg(data: bytes, name: str, axes: AxesPolicy) -> tuple[np.ndarray, tuple[str, ...]]:
    try:
        array = imagecodecs.jpeg_decode(data)
    except _DECODE_ERRORS as exc:
        raise ImageReadError(
            f"cannot decode image '{name}': {_reason(exc)} ({len(data)} bytes; the file "
            f"may be truncated or corrupt)"
        ) from exc
    return _to_chw(array, name, samples_last=True), ()


def _decode_npy(data: bytes, name: str, axes: AxesPolicy) -> tuple[np.ndarray, tuple[str, ...]]:
    if not data.startswith(_NPY_MAGIC):
        raise ImageReadError(
            f"cannot decode image '{name}': not an NPY file (starts with {data[:6]!r})"
        )
    handle = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(handle)
        header_readers = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        if version in header_readers:
            shape, _, dtype = header_readers[version](handle)
            if not dtype.hasobject:
                needed = handle.tell() + math.prod(shape) * dtype.itemsize
                if needed > len(data):
                    raise _truncated(name, len(data), needed)
            handle.seek(0)
        array = np.lib.format.read_array(handle, allow_pickle=False)
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"cannot decode image '{name}': {_reason(exc)}") from exc
    return _to_chw(_check_dtype(array, name), name), ()


# --------------------------------------------------------------------------------------
# TIFF
# --------------------------------------------------------------------------------------


class _TiffLayout(NamedTuple):
    """What the first page directories say about a TIFF file."""

    pages: int
    samples: int
    planar: int
    axes_source: str
    """Who declares axes beyond channels (``ImageJ``, ``OME``, ``tifffile``); empty when
    nobody does and the pages are the channels."""


# Bytes per value for the TIFF field types whose values we read or skip.
_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8,
                    11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}  # fmt: skip
_TIFF_INT_CODES = {1: "B", 3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q"}
_STRIP_OFFSETS, _STRIP_BYTE_COUNTS = 273, 279
_TILE_OFFSETS, _TILE_BYTE_COUNTS = 324, 325
_SAMPLES_PER_PIXEL, _PLANAR_CONFIG, _IMAGE_DESCRIPTION = 277, 284, 270
_TAGS_READ = frozenset(
    {_STRIP_OFFSETS, _STRIP_BYTE_COUNTS, _TILE_OFFSETS, _TILE_BYTE_COUNTS,
     _SAMPLES_PER_PIXEL, _PLANAR_CONFIG, _IMAGE_DESCRIPTION}
)  # fmt: skip
_IMAGEJ_IMAGES = re.compile(rb"\bimages=(\d+)")
_IMAGEJ_STACK = re.compile(rb"\b(?:slices|frames)=(\d+)")
_MAX_PAGES = 1_000_000


def _truncated(name: str, size: int, needed: int) -> ImageReadError:
    return ImageReadError(
        f"cannot decode image '{name}': file is truncated ({size} of at least {needed} bytes)"
    )


def _scan_tiff(data: bytes, name: str) -> _TiffLayout:
    """Walk the page directories and check every strip and tile lies inside the file.

    libtiff and tifffile both stop quietly at a page directory past the end of the file,
    returning fewer pages than were written, so truncation must be detected here.
    """
    size = len(data)
    form = _tiff_format(data, name)
    (offset,) = struct.unpack_from(form.offset_fmt, data, form.first_at)
    if offset == 0:
        raise ImageReadError(f"cannot decode image '{name}': TIFF file holds no pages")
    pages, samples, planar, imagej_images, needed, source = 0, 1, 1, 0, 0, ""
    seen: set[int] = set()
    while offset:
        if offset in seen:
            raise ImageReadError(
                f"cannot decode image '{name}': corrupt TIFF, page directory chain loops "
                f"back to offset {offset}"
            )
        if pages >= _MAX_PAGES:
            raise ImageReadError(
                f"cannot decode image '{name}': more than {_MAX_PAGES} pages; valid: one "
                f"page per channel"
            )
        seen.add(offset)
        tags, offset = _page_tags(data, form, offset, name)
        needed = max(needed, _pixels_end(tags, pages, name))
        if pages == 0:
            samples = _single_int(tags.get(_SAMPLES_PER_PIXEL, 1), "SamplesPerPixel", name)
            planar = _single_int(tags.get(_PLANAR_CONFIG, 1), "PlanarConfiguration", name)
            description = tags.get(_IMAGE_DESCRIPTION, b"")
            if isinstance(description, bytes):
                source, imagej_images = _axes_source(description)
        pages += 1
        if offset >= size:
            raise _truncated(name, size, max(needed, offset + form.count_size))
    if needed > size:
        raise _truncated(name, size, needed)
    # An ImageJ hyperstack may hold all its images behind a single page directory.
    if not source and imagej_images > pages:
        source = "ImageJ"
    return _TiffLayout(pages, samples, planar, source)


class _TiffFormat(NamedTuple):
    """Byte order and field layout of a classic TIFF (version 42) or a BigTIFF (43)."""

    order: str
    count_fmt: str
    entry_fmt: str
    offset_fmt: str
    count_size: int
    entry_size: int
    offset_size: int
    first_at: int
    """Where the offset of the first page directory is."""


def _tiff_format(data: bytes, name: str) -> _TiffFormat:
    """The layout the file's header declares.

    Raises:
        ImageReadError: When the header is truncated or not a TIFF header.
    """
    size = len(data)
    if size < 8:
        raise _truncated(name, size, 8) if data[:2] in (b"II", b"MM") else _not_tiff(data, name)
    if data[:2] == b"II":
        order = "<"
    elif data[:2] == b"MM":
        order = ">"
    else:
        raise _not_tiff(data, name)
    (version,) = struct.unpack_from(order + "H", data, 2)
    if version == 42:
        return _TiffFormat(order, order + "H", order + "HHI", order + "I", 2, 12, 4, 4)
    if version == 43:
        if size < 16:
            raise _truncated(name, size, 16)
        return _TiffFormat(order, order + "Q", order + "HHQ", order + "Q", 8, 20, 8, 8)
    raise _not_tiff(data, name)


def _page_tags(data: bytes, form: _TiffFormat, offset: int,
               name: str) -> tuple[dict[int, int | np.ndarray | bytes], int]:
    """The tags of :data:`_TAGS_READ` in the page directory at ``offset``, and the offset of
    the next directory (0 after the last).

    Raises:
        ImageReadError: When the directory runs past the end of the file.
    """
    size = len(data)
    if offset + form.count_size > size:
        raise _truncated(name, size, offset + form.count_size)
    (entries,) = struct.unpack_from(form.count_fmt, data, offset)
    end = offset + form.count_size + entries * form.entry_size + form.offset_size
    if end > size:
        raise _truncated(name, size, end)
    value_at = 4 + form.offset_size  # offset of the value field inside an entry
    tags: dict[int, int | np.ndarray | bytes] = {}
    position = offset + form.count_size
    for _ in range(entries):
        tag, kind, count = struct.unpack_from(form.entry_fmt, data, position)
        if tag in _TAGS_READ:
            tags[tag] = _tag_value(data, form.order, kind, count, position + value_at, form.offset_size, name)
        position += form.entry_size
    (following,) = struct.unpack_from(form.offset_fmt, data, end - form.offset_size)
    return tags, following


def _pixels_end(tags: dict[int, int | np.ndarray | bytes], page: int, name: str) -> int:
    """The end of the page's last strip or tile (0 when it declares none)."""
    end = 0
    for offsets_tag, counts_tag in ((_STRIP_OFFSETS, _STRIP_BYTE_COUNTS), (_TILE_OFFSETS, _TILE_BYTE_COUNTS)):
        if offsets_tag in tags or counts_tag in tags:
            end = max(end, _data_end(tags.get(offsets_tag), tags.get(counts_tag), page, name))
    return end


def _axes_source(description: bytes) -> tuple[str, int]:
    """Who declares axes beyond channels, from the first page's description, and the
    number of images an ImageJ description declares (0 otherwise).

    ImageJ files with channels only read the same as pages (the fast path); those with
    slices or frames need the declared axes, as do OME-TIFF and tifffile metadata that
    name the axes.
    """
    if description.startswith(b"ImageJ="):
        match = _IMAGEJ_IMAGES.search(description)
        stack = any(int(n) > 1 for n in _IMAGEJ_STACK.findall(description))
        return ("ImageJ" if stack else ""), (int(match.group(1)) if match else 0)
    head = description[:64].lstrip()
    if head.startswith(b"<") and b"<OME" in description:
        return "OME", 0
    if head.startswith(b"{") and b'"axes"' in description:
        return "tifffile", 0
    return "", 0


def _data_end(
    starts: int | np.ndarray | bytes | None,
    lengths: int | np.ndarray | bytes | None,
    page: int,
    name: str,
) -> int:
    """Return the end of a page's last strip or tile, checking offsets match counts."""
    if isinstance(starts, int) and isinstance(lengths, int):
        return starts + lengths
    if not isinstance(starts, (int, np.ndarray)) or not isinstance(lengths, (int, np.ndarray)):
        raise ImageReadError(
            f"cannot decode image '{name}': corrupt TIFF, page {page} lacks integer strip "
            f"(or tile) offsets and byte counts"
        )
    starts_array = np.atleast_1d(np.asarray(starts, dtype=np.uint64))
    lengths_array = np.atleast_1d(np.asarray(lengths, dtype=np.uint64))
    if starts_array.shape != lengths_array.shape or starts_array.size == 0:
        raise ImageReadError(
            f"cannot decode image '{name}': corrupt TIFF, page {page} has "
            f"{starts_array.size} strip offsets but {lengths_array.size} byte counts"
        )
    return int((starts_array + lengths_array).max())


def _single_int(value: int | np.ndarray | bytes, tag: str, name: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, np.ndarray) and value.size >= 1:
        return int(value[0])
    raise ImageReadError(
        f"cannot decode image '{name}': corrupt TIFF, tag {tag} holds {value!r}; "
        f"valid: an integer"
    )


def _tag_value(
    data: bytes, order: str, kind: int, count: int, at: int, offset_size: int, name: str
) -> int | np.ndarray | bytes:
    """Return an integer tag's value (int or array) or an ASCII tag's bytes."""
    item = _TIFF_TYPE_SIZES.get(kind)
    if item is None:
        raise ImageReadError(
            f"cannot decode image '{name}': corrupt TIFF, unknown field type {kind}"
        )
    total = item * count
    if total > offset_size:
        (at,) = struct.unpack_from(order + ("I" if offset_size == 4 else "Q"), data, at)
        if at + total > len(data):
            raise _truncated(name, len(data), at + total)
    if kind == 2:
        return bytes(data[at : at + total])
    code = _TIFF_INT_CODES.get(kind)
    if code is None:
        raise ImageReadError(
            f"cannot decode image '{name}': corrupt TIFF, unexpected field type {kind} "
            f"for a strip, tile or layout tag"
        )
    if count == 1:
        return struct.unpack_from(order + code, data, at)[0]
    return np.frombuffer(data, dtype=order + code, count=count, offset=at)


def _not_tiff(data: bytes, name: str) -> ImageReadError:
    return ImageReadError(
        f"cannot decode image '{name}': not a TIFF file (starts with {data[:4]!r}; valid: "
        f"b'II*\\x00', b'MM\\x00*' or BigTIFF)"
    )


def _decode_tiff(data: bytes, name: str, axes: AxesPolicy) -> tuple[np.ndarray, tuple[str, ...]]:
    layout = _scan_tiff(data, name)
    array: np.ndarray | None = None
    if layout.axes_source:
        decoded = _decode_tiff_series(data, name, axes)
        if decoded is not None:
            return decoded
    else:
        try:
            array = imagecodecs.tiff_decode(data, index=None if layout.pages > 1 else 0)
        except _DECODE_ERRORS as exc:
            logger.debug("libtiff cannot decode %s (%s); trying tifffile", name, exc)
        else:
            # libtiff returns only the pages matching the first page's shape and dtype.
            if layout.pages > 1 and (array.ndim < 3 or array.shape[0] != layout.pages):
                logger.debug(
                    "libtiff returned %s for %d pages of %s; trying tifffile",
                    array.shape, layout.pages, name,
                )  # fmt: skip
                array = None
    if array is None:
        array = _decode_tiff_with_tifffile(data, name)
    # Samples of one page are interleaved (planar 1, trailing axis) or planar (leading);
    # gray pages stacked as channels follow the module's layout rule.
    samples_last = (layout.planar == 1) if layout.samples > 1 else None
    return _to_chw(_check_dtype(array, name), name, samples_last=samples_last), ()


def _decode_tiff_with_tifffile(data: bytes, name: str) -> np.ndarray:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            series = tiff.series
            if len(series) > 1:
                shapes = ", ".join(f"{s.shape} {s.dtype}" for s in series)
                raise ImageReadError(
                    f"cannot decode image '{name}': TIFF holds {len(series)} images of "
                    f"different shape or dtype ({shapes}); valid: pages of one shape and "
                    f"dtype, one per channel"
                )
            return tiff.asarray()
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"cannot decode image '{name}': {_reason(exc)}") from exc


class _TiffSeries(NamedTuple):
    """The series a TIFF file declares, as tifffile reads its metadata."""

    source: str
    """``ImageJ``, ``OME`` or ``tifffile``; empty when tifffile found no axes after all."""
    shapes: list[tuple[str, tuple[int, ...]]]
    names: list[tuple[str, ...]]
    levels: int


def _decode_tiff_series(
    data: bytes, name: str, axes: AxesPolicy
) -> tuple[np.ndarray, tuple[str, ...]] | None:
    """Read a TIFF through the series its metadata declares; None if it declares none."""
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            found = _tiff_series(tiff)
            if not found.source:
                return None
            index = choose_series(found.shapes, axes, name, found.source)
            series_axes, shape = found.shapes[index]
            check_axes(series_axes, shape, axes, name, found.source)  # refuse before decoding
            array = tiff.series[index].asarray()  # level 0 of a pyramid: full resolution
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"cannot decode image '{name}': {_reason(exc)}") from exc
    chw = to_chw(_check_dtype(array, name), series_axes, axes, name, found.source)
    return chw, found.names[index]


def _tiff_series(tiff: tifffile.TiffFile) -> _TiffSeries:
    series = tiff.series
    kind = series[0].kind if series else ""
    if kind == "imagej":
        source = "ImageJ"
    elif kind == "ome":
        source = "OME"
    elif kind == "shaped" and tiff.shaped_metadata and "axes" in tiff.shaped_metadata[0]:
        source = "tifffile"
    else:
        source = ""
    shapes = [(s.axes, tuple(int(n) for n in s.shape)) for s in series]
    names: list[tuple[str, ...]] = [() for _ in series]
    if source == "OME":
        declared = _ome_channel_names(tiff.ome_metadata or "")
        if len(declared) == len(series):
            names = [
                found if len(found) == _channels_of(axes, shape) else ()
                for found, (axes, shape) in zip(declared, shapes, strict=True)
            ]
    return _TiffSeries(source, shapes, names, len(series[0].levels) if series else 1)


def _channels_of(axes: str, shape: tuple[int, ...]) -> int:
    sizes = dict(zip(axes, shape, strict=True))
    return sizes.get("C", 1) * sizes.get("S", 1)


def _ome_channel_names(xml: str) -> list[tuple[str, ...]]:
    """The channel names of every OME image, in order (empty where a channel has no name).

    A channel of several samples (RGB) gives one name per sample, ``name:0``, ``name:1``...
    """
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return []
    out = []
    for image in root:
        if not image.tag.endswith("}Image") and image.tag != "Image":
            continue
        names: list[str] = []
        for pixels in image:
            if not pixels.tag.endswith("Pixels"):
                continue
            for channel in pixels:
                if not channel.tag.endswith("Channel"):
                    continue
                name = channel.get("Name") or ""
                samples = int(channel.get("SamplesPerPixel") or 1)
                names += [name] if samples == 1 else [f"{name}:{k}" for k in range(samples)]
        out.append(tuple(names) if names and all(n and not n.startswith(":") for n in names) else ())
    return out


def _describe_tiff(data: bytes, name: str) -> ImageAxes:
    layout = _scan_tiff(data, name)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            found = _tiff_series(tiff)  # ImageJ channels alone are declared axes too
            page = tiff.pages.first
            page_axes, page_shape, dtype = page.axes, tuple(page.shape), str(page.dtype)
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"cannot decode image '{name}': {_reason(exc)}") from exc
    if found.source:
        axes, shape = found.shapes[0]
        return ImageAxes(name, found.source, axes, shape, dtype, declared=True,
                         channel_names=found.names[0], series=tuple(found.shapes), levels=found.levels)
    if layout.pages > 1:
        page_axes, page_shape = "I" + page_axes, (layout.pages, *page_shape)
    return ImageAxes(name, "TIFF", page_axes, page_shape, dtype, declared=False)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else type(exc).__name__


_DECODERS: dict[str, Callable[[bytes, str, AxesPolicy], tuple[np.ndarray, tuple[str, ...]]]] = {
    ".tif": _decode_tiff,
    ".tiff": _decode_tiff,
    ".png": _decode_png,
    ".npy": _decode_npy,
    ".jpg": _decode_jpeg,
    ".jpeg": _decode_jpeg,
}


# --------------------------------------------------------------------------------------
# Helpers shared by the writers
# --------------------------------------------------------------------------------------


def _chw_for_writing(array: np.ndarray, writer: str, path: ImagePath) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind not in "buif":
        raise ImageWriteError(
            f"{writer} cannot store dtype {array.dtype} for '{os.fspath(path)}'; valid: "
            f"boolean, integer or floating point arrays"
        )
    if array.ndim == 2:
        return array[np.newaxis]
    if array.ndim != 3:
        raise ImageWriteError(
            f"{writer} needs an array of shape (C, H, W) or (H, W) for "
            f"'{os.fspath(path)}'; got shape {array.shape}"
        )
    return array
