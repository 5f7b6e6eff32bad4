"""Images for a person to look at: raw channels, in their own units, small enough to send.

The web page renders channels as colours and sets each channel's contrast itself, so the
service sends the channel data, not a picture: an NPY file of ``(C, H, W)``, 8- and
16-bit images in their own dtype (never through 8 bits), other numbers as float32. An
image larger than asked is reduced by averaging blocks of pixels.
"""

from __future__ import annotations

import io
import math

import numpy as np

DISPLAY_DTYPES = ("uint8", "uint16", "float32")
"""The dtypes a display array has (the ones a browser's typed arrays read directly)."""


def display_array(image: np.ndarray, max_side: int) -> tuple[np.ndarray, int]:
    """``image`` as a display array of at most ``max_side`` pixels a side, and the reduction factor.

    Args:
        image: ``(C, H, W)`` or ``(H, W)`` in its own dtype.
        max_side: Largest height or width of the result; a larger image is reduced by the
            smallest integer factor that fits, each pixel the mean of a block.

    Returns:
        ``(array, factor)``: ``(C, H', W')`` little-endian uint8, uint16 or float32, and
        the factor (1 when the image was not reduced).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    factor = max(1, math.ceil(max(image.shape[1:]) / max_side))
    if factor > 1:
        c, h, w = image.shape
        h2, w2 = math.ceil(h / factor), math.ceil(w / factor)
        padded = np.pad(image.astype(np.float64), ((0, 0), (0, h2 * factor - h), (0, w2 * factor - w)),
                        mode="edge")
        reduced = padded.reshape(c, h2, factor, w2, factor).mean(axis=(2, 4))
        image = np.rint(reduced).astype(image.dtype) if image.dtype.kind in "biu" else reduced
    return _display_dtype(image), factor


def _display_dtype(image: np.ndarray) -> np.ndarray:
    """8- and 16-bit unsigned images as they are; other integers in 16 bits where they fit; the rest float32."""
    if image.dtype == np.bool_:
        return image.astype("|u1")
    if image.dtype.kind == "u" and image.dtype.itemsize <= 2:
        return image.astype(image.dtype.newbyteorder("<"), copy=False)
    if image.dtype.kind in "iu" and image.size and image.min() >= 0 and image.max() <= 65535:
        return image.astype("<u2")
    return image.astype("<f4")


def npy_bytes(array: np.ndarray) -> bytes:
    """The NPY file of ``array`` (format 1.0, C order)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buffer.getvalue()


def display_npy(image: np.ndarray, max_side: int) -> tuple[bytes, dict[str, str]]:
    """The display NPY of ``image`` (see :func:`display_array`) and headers describing it.

    The headers say the original shape (``X-Cellclass-Shape: C,H,W``) and dtype
    (``X-Cellclass-Dtype``), and the reduction factor (``X-Cellclass-Reduced``).
    """
    image = np.asarray(image)
    shape = image.shape if image.ndim == 3 else (1, *image.shape)
    array, factor = display_array(image, max_side)
    headers = {"X-Cellclass-Shape": ",".join(map(str, shape)), "X-Cellclass-Dtype": str(image.dtype),
               "X-Cellclass-Reduced": str(factor)}
    return npy_bytes(array), headers
