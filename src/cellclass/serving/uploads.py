"""Checking and decoding uploaded images before anything else sees them.

An upload is refused, with a message saying what was wrong and what is valid, when:

- its file name is path-like (``../x.tif``, ``a/b.png``, a leading dot, control
  characters) or has another extension than TIFF, PNG or NPY (HTTP 422 / 415);
- its bytes are not what the extension says (HTTP 415);
- it is larger than the byte limit, or its header declares more pixel values than the
  pixel limit (HTTP 413). The header is read *before* decoding, so a decompression bomb
  (a few kilobytes of PNG declaring 50000 x 50000 pixels) is refused without allocating
  its pixels;
- it cannot be decoded, holds no pixel values (a ``(0, 8)`` array), holds NaN or infinite
  values, or holds floating-point values beyond float32's range, which the model's float32
  input would turn into infinities (HTTP 422).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import struct
from dataclasses import dataclass

import numpy as np
import tifffile

from cellclass.data.axes import AxesPolicy
from cellclass.data.io import read_image_bytes
from cellclass.errors import ImageReadError, PayloadTooLargeError, UnsupportedMediaError, UploadError

ACCEPTED_EXTENSIONS: tuple[str, ...] = (".tif", ".tiff", ".png", ".npy")
"""Extensions an upload may have (case-insensitive)."""

_MAGIC = {
    ".tif": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
    ".tiff": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
    ".png": (b"\x89PNG\r\n\x1a\n",),
    ".npy": (b"\x93NUMPY",),
}
_KIND = {".tif": "TIFF", ".tiff": "TIFF", ".png": "PNG", ".npy": "NPY"}
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_MAX_TIFF_PAGES = 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Upload:
    """A checked, decoded upload.

    Attributes:
        filename: The file name as sent (checked to be a plain name).
        extension: Its lower-case extension, e.g. ``.tif``.
        data: The file's bytes, stored as they came.
        image: Decoded ``(C, H, W)`` array in the file's own dtype.
        sha256: Hex SHA-256 of ``data`` (the content address).
    """

    filename: str
    extension: str
    data: bytes
    image: np.ndarray
    sha256: str


def check_filename(name: str | None) -> tuple[str, str]:
    """Return ``(name, extension)`` of an acceptable upload file name.

    Raises:
        UploadError: When the name is missing, too long or path-like.
        UnsupportedMediaError: When its extension is not TIFF, PNG or NPY.
    """
    if not name:
        raise UploadError("the image part has no file name; valid: a plain name such as 'cell_001.tif'")
    if (len(name) > 255 or "/" in name or "\\" in name or name.startswith(".")
            or _CONTROL.search(name) or ":" in name):
        raise UploadError(
            f"image file name {name!r} is not a plain file name (path separators, '..', a "
            f"leading dot, ':' or control characters, or over 255 characters); valid: a "
            f"plain name such as 'cell_001.tif'"
        )
    extension = ("." + name.rsplit(".", 1)[1].lower()) if "." in name else ""
    if extension not in ACCEPTED_EXTENSIONS:
        raise UnsupportedMediaError(
            f"image file {name!r} has extension {extension or '(none)'!r}; valid: "
            f"{', '.join(ACCEPTED_EXTENSIONS)}"
        )
    return name, extension


def declared_values(data: bytes, extension: str, name: str) -> int:
    """Number of pixel values (height x width x channels, summed over pages) the header declares.

    Nothing is decompressed.

    Raises:
        UploadError: When the header cannot be read.
        PayloadTooLargeError: When a TIFF has more than 4096 pages.
    """
    if extension == ".png":
        if len(data) < 33 or data[12:16] != b"IHDR":
            raise UploadError(f"cannot read the PNG header of {name!r}: no IHDR chunk first")
        width, height = struct.unpack(">II", data[16:24])
        return width * height * _PNG_CHANNELS.get(data[25], 4)
    if extension == ".npy":
        handle = io.BytesIO(data)
        try:
            version = np.lib.format.read_magic(handle)
            readers = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}
            reader = readers.get(version)
            if reader is None:
                raise ValueError(f"NPY format version {version}; valid: 1.0, 2.0")
            shape = reader(handle)[0]
        except (ValueError, OSError, EOFError, SyntaxError) as exc:
            raise UploadError(f"cannot read the NPY header of {name!r}: {exc}") from None
        return math.prod(shape)
    total = 0
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            for index, page in enumerate(tif.pages):
                if index >= _MAX_TIFF_PAGES:
                    raise PayloadTooLargeError(
                        f"TIFF {name!r} has more than {_MAX_TIFF_PAGES} pages; valid: one page per channel"
                    )
                total += math.prod(page.shape)
    except PayloadTooLargeError:
        raise
    except Exception as exc:  # noqa: BLE001 (tifffile raises many types on a corrupt header)
        raise UploadError(f"cannot read the TIFF header of {name!r}: {exc}") from None
    return total


def decode_upload(data: bytes, filename: str | None, *, max_bytes: int, max_pixels: int,
                  axes: AxesPolicy | None = None) -> Upload:
    """Check one uploaded file and decode it as ``(C, H, W)``.

    Args:
        data: The uploaded bytes.
        filename: The file name sent with them.
        max_bytes: Largest accepted file.
        max_pixels: Largest accepted number of pixel values (H x W x C).
        axes: How a stack is read (the model's training data's Z/T projection, series
            and channels); None refuses stacks.

    Raises:
        UploadError: For a bad name, an unreadable or undecodable file, no pixel values,
            non-finite values or values beyond float32's range.
        UnsupportedMediaError: For a file that is not a TIFF, PNG or NPY image.
        PayloadTooLargeError: For a file over the byte or pixel limits.
    """
    name, extension = check_filename(filename)
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"image {name!r} has {len(data):,} bytes; the limit is {max_bytes:,} bytes"
        )
    if not data:
        raise UploadError(f"image {name!r} is empty (0 bytes)")
    if not data.startswith(_MAGIC[extension]):
        raise UnsupportedMediaError(
            f"file {name!r} is not a {_KIND[extension]} image (it starts with {data[:8]!r}); "
            f"valid: TIFF, PNG or NPY images whose extension matches their content"
        )
    values = declared_values(data, extension, name)
    if values > max_pixels:
        raise PayloadTooLargeError(
            f"image {name!r} declares {values:,} pixel values (height x width x channels); the "
            f"limit is {max_pixels:,}"
        )
    try:
        image = read_image_bytes(data, name, axes=axes)
    except ImageReadError as exc:
        raise UploadError(str(exc)) from None
    if image.size > max_pixels:  # a header that lied
        raise PayloadTooLargeError(
            f"image {name!r} has {image.size:,} pixel values; the limit is {max_pixels:,}"
        )
    check_values(image, name)
    return Upload(name, extension, bytes(data), image, hashlib.sha256(data).hexdigest())


def check_values(image: np.ndarray, name: str) -> None:
    """Refuse a decoded image the model cannot read: no pixels, NaN or infinity, values beyond float32.

    The model reads float32, so a float64 value over float32's largest (about 3.4e38)
    would silently become infinite; it is refused rather than clipped, since no scaling
    would keep what the value meant.

    Raises:
        UploadError: Naming the image, what it holds and what is valid.
    """
    if image.size == 0:
        raise UploadError(f"image {name!r} holds no pixel values (shape {tuple(image.shape)}); valid: an "
                          f"image of at least 1 x 1 pixels")
    if image.dtype.kind != "f":
        return
    if not np.isfinite(image).all():
        raise UploadError(f"image {name!r} holds NaN or infinite values; valid: finite pixel values")
    largest = max(abs(float(image.max())), abs(float(image.min())))
    if image.dtype.itemsize > 4 and largest > _FLOAT32_MAX:
        raise UploadError(f"image {name!r} holds {image.dtype} values up to {largest:.3g} in magnitude, beyond "
                          f"float32's range, which the model reads; valid: magnitudes up to {_FLOAT32_MAX:.3g} "
                          f"(rescale the image first)")
