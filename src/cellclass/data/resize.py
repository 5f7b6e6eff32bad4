"""Decode and bring images to one size, keeping their intensity units.

This is the deterministic part of preprocessing: channel selection and fitting to a
square size (pad, resize or crop). It returns ``float32`` arrays in the images' own units
(a uint16 pixel of 40000 stays 40000.0); normalization, which is fitted on the training
split only, happens later (:mod:`cellclass.data.normalize`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cellclass.data.spec import ROW_COLUMN, DatasetSpec
from cellclass.errors import ImageReadError, SpecError
from cellclass.progress import ProgressFn

log = logging.getLogger(__name__)

FIT_MODES = ("pad", "resize", "crop")
"""How an image becomes ``size x size``: ``pad`` pads to a square with the image's own
minimum then resizes (keeps the aspect ratio; the default), ``resize`` stretches,
``crop`` takes the central square (padding where smaller)."""


def fit_image(image: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """Bring one ``(C, H, W)`` image to ``(C, size, size)`` float32, intensities unchanged.

    Downscaling uses antialiased bilinear interpolation, so a small bright focus is
    averaged, not skipped.
    """
    if mode not in FIT_MODES:
        raise SpecError(f"image fit mode {mode!r} is invalid; valid: {', '.join(FIT_MODES)}")
    x = np.asarray(image, dtype=np.float32)
    _, h, w = x.shape
    if mode == "crop":
        x = _center(x, size)
        return np.ascontiguousarray(x)
    if mode == "pad" and h != w:
        side = max(h, w)
        fill = x.reshape(x.shape[0], -1).min(axis=1)[:, None, None]
        out = np.broadcast_to(fill, (x.shape[0], side, side)).copy()
        top, left = (side - h) // 2, (side - w) // 2
        out[:, top : top + h, left : left + w] = x
        x = out
    if x.shape[1:] == (size, size):
        return np.ascontiguousarray(x)
    t = torch.from_numpy(np.ascontiguousarray(x))[None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t[0].numpy()


def _center(x: np.ndarray, size: int) -> np.ndarray:
    c, h, w = x.shape
    out = np.broadcast_to(x.reshape(c, -1).min(axis=1)[:, None, None], (c, size, size)).copy()
    sh, sw = min(h, size), min(w, size)
    y0, x0 = (h - sh) // 2, (w - sw) // 2
    oy, ox = (size - sh) // 2, (size - sw) // 2
    out[:, oy : oy + sh, ox : ox + sw] = x[:, y0 : y0 + sh, x0 : x0 + sw]
    return out


def select_channels(image: np.ndarray, channels: Sequence[int] | None) -> np.ndarray:
    """Keep the given channel indices (all when ``None``)."""
    if channels is None:
        return image
    bad = [c for c in channels if not 0 <= c < image.shape[0]]
    if bad:
        raise SpecError(f"channel index(es) {bad} out of range for an image with {image.shape[0]} channels")
    return image[list(channels)]


def load_images(
    spec: DatasetSpec,
    frame: pd.DataFrame,
    *,
    size: int,
    mode: str = "pad",
    channels: Sequence[int] | None = None,
    workers: int = 4,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Decode every row's image and fit it to ``size``: a ``(N, C, size, size)`` float32 array.

    Raises:
        ImageReadError: When an image cannot be read; the message names the row. Run
            ``cellclass validate`` to list every bad row at once.
    """
    records = frame.to_dict("records")

    def one(record: dict[str, Any]) -> np.ndarray:
        try:
            image = spec.read_image(record)
        except ImageReadError as exc:
            raise ImageReadError(f"row {record.get(ROW_COLUMN, '?')}: {exc} (run `cellclass validate`)") from None
        return fit_image(select_channels(image, channels), size, mode)

    if not records:
        raise SpecError(f"dataset {spec.name!r} has no row to load")
    first = one(records[0])
    out = np.empty((len(records), *first.shape), dtype=np.float32)
    out[0] = first
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, array in enumerate(pool.map(one, records[1:]), start=1):
            if array.shape != first.shape:
                raise ImageReadError(
                    f"row {records[i].get(ROW_COLUMN)}: image has {array.shape[0]} channel(s), the first "
                    f"row has {first.shape[0]}; run `cellclass validate`"
                )
            out[i] = array
            if progress is not None:
                progress("loading images", i + 1, len(records))
    return out
