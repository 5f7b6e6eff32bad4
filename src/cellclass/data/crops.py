"""From fields to single cells: fixed-size crops around each object, and tiles of montages.

:func:`crop_cells` cuts one field ``(C, H, W)`` and its label image ``(H, W)`` into
``(C, size, size)`` crops, one per object, in the field's own dtype. The crop window is
centred on the object's centroid: the centroid pixel sits at ``(size // 2, size // 2)``.

- **Neighbours.** ``mask_neighbours`` sets the pixels of every *other* object in the window
  to 0 (the object and the background stay); ``mask_background`` keeps only the object's
  own pixels (neighbours and background become 0).
- **Border.** A window that runs past the field's edge is either skipped
  (``border="skip"``) or filled (``border="pad"``): with zeros (``pad="zero"``, labels 0
  there) or with the field mirrored at its edge (``pad="reflect"``, labels mirrored too,
  so masking treats a mirrored neighbour as a neighbour).
- **Size.** Objects outside ``[min_area, max_area]`` pixels are skipped. An object larger
  than the window is cut by it, still centred.

:func:`make_crops` does this over a whole dataset of fields (any form
:class:`~cellclass.data.spec.DatasetSpec` reads; Z, T and channel choices apply) and writes::

    OUT/crops/<field key>/<object id>.tif   one crop per object, the field's dtype kept
    OUT/cells.csv     one row per crop: every column of its field's row, then CELL_COLUMNS
    OUT/cells.yaml    a DatasetSpec of the crops (image column ``crop``, the field's tasks,
                      groups: the field's groups, then ``field_id``)
    OUT/fields_qc.csv one row per field: object counts and a QC flag
    OUT/crops.json    the settings, the counts and the QC bounds used
    OUT/parts/        per-field parts and done-markers (what makes a rerun resume)

The field key (:func:`field_key`) is the field's image id with its extension dropped, so a
field ``images/a01.tif`` has its mask at ``masks/images/a01.tif`` (:func:`mask_path_for`,
where ``cellclass segment`` writes it) and its crops under ``crops/images/a01/``. Fields in
different folders never collide.

Fields are processed one at a time per worker process (a field's crops are written as they
are cut and never held together), so memory does not grow with the number of fields. A
field whose part, done-marker and crops exist, made with the same settings from the same
image and mask files (size and modification time), is skipped on a rerun; ``cells.csv``
is assembled from the parts at the end, atomically, taking the field's columns from the
current manifest (a corrected label needs no re-cropping).

:func:`cut_montage` and :func:`make_grid_crops` do the same for imaging flow cytometry
montages: a grid of fixed-size tiles, one cell each, with constant padding tiles skipped.

Crops go into the prepared cache like any other dataset: ``prepare_cache`` on
``cells.yaml``.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from cellclass.atomic import atomic_path, atomic_write_text
from cellclass.data.io import read_image, write_tiff
from cellclass.data.segment import Backend
from cellclass.data.spec import ROW_COLUMN, DatasetSpec, ImageSpec
from cellclass.data.vendor import VENDOR_EXTENSIONS
from cellclass.errors import CropError, ImageReadError, OutputPathError
from cellclass.progress import ProgressFn

__all__ = [
    "BORDER_MODES",
    "CELL_COLUMNS",
    "CROP_SETTING_NAMES",
    "GRID_COLUMNS",
    "MONTAGE_ORDERS",
    "PAD_MODES",
    "QC_FLAGS",
    "CellProps",
    "CropResult",
    "QcThresholds",
    "crop_cells",
    "crop_settings",
    "cut_montage",
    "field_key",
    "make_crops",
    "make_grid_crops",
    "mask_path_for",
    "object_properties",
]

log = logging.getLogger(__name__)

BORDER_MODES: tuple[str, ...] = ("skip", "pad")
"""What :func:`crop_cells` does with a window that runs past the field's edge."""

PAD_MODES: tuple[str, ...] = ("zero", "reflect")
"""How ``border="pad"`` fills the part of a window outside the field."""

MONTAGE_ORDERS: tuple[str, ...] = ("row", "column")
"""Tile numbering of a montage: along rows first, or down columns first."""

QC_FLAGS: tuple[str, ...] = ("ok", "too_few", "too_many")
"""Values of the ``qc`` column of ``fields_qc.csv`` (and ``field_qc`` of ``cells.csv``)."""

CELL_COLUMNS: tuple[str, ...] = (
    "object_id", "centroid_y", "centroid_x", "area", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1",
    "touches_border", "field_id", "field_row", "crop", "field_qc",
)
"""Columns :func:`make_crops` adds after the field's own: the object's label value in the
mask, centroid (pixels), area (pixels), bounding box (``y0, x0`` inclusive, ``y1, x1``
exclusive), whether it touches the field's edge (0/1), the field key (a group), the field's
manifest row number, the crop's path relative to ``OUT``, and the field's QC flag."""

GRID_COLUMNS: tuple[str, ...] = ("object_id", "tile_row", "tile_col", "field_id", "field_row", "crop", "field_qc")
"""Columns :func:`make_grid_crops` adds: the tile's index in the montage, its row and
column in the grid, then as :data:`CELL_COLUMNS`."""

_IMAGE_SUFFIXES: tuple[str, ...] = tuple(sorted(
    {".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".png", ".npy", ".jpeg", ".jpg", ".zarr",
     *VENDOR_EXTENSIONS},
    key=len, reverse=True,
))
_MARKER_VERSION = 1


# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------


def field_key(image_id: str) -> str:
    """The key of a field: its image id with the image extension dropped, as a POSIX path.

    ``images/a01.tif`` gives ``images/a01``; ``train/abc`` (a channel set) stays; an OME-Zarr
    field ``plate.zarr/A/1/0`` stays. ``..`` parts become ``_`` and a leading ``/`` is dropped,
    so every path built on a key stays inside its output folder.

    Raises:
        CropError: If the id is empty.
    """
    parts = [("_" if p == ".." else p) for p in str(image_id).replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        raise CropError(f"image id {image_id!r} names no file; valid: a path such as images/a01.tif")
    last = parts[-1]
    for suffix in _IMAGE_SUFFIXES:
        if last.lower().endswith(suffix) and len(last) > len(suffix):
            parts[-1] = last[: -len(suffix)]
            break
    return "/".join(parts)


def mask_path_for(image_id: str) -> PurePosixPath:
    """Where the label image of a field lives, relative to a segmentation output folder.

    ``masks/<field key>.tif`` (see :func:`field_key`): ``images/a01.tif`` has its mask at
    ``masks/images/a01.tif``, and a field directly under the image root at
    ``masks/<image stem>.tif``. ``cellclass segment`` writes masks there and
    :func:`make_crops` reads them from there.

    Raises:
        CropError: If the id is empty.
    """
    return PurePosixPath("masks") / f"{field_key(image_id)}.tif"


# --------------------------------------------------------------------------------------
# One field
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellProps:
    """Where one object sits in its field.

    Attributes:
        centroid_y: Mean row of its pixels.
        centroid_x: Mean column of its pixels.
        area: Number of its pixels.
        bbox: ``(y0, x0, y1, x1)``, start inclusive, end exclusive.
        touches_border: Whether any of its pixels lies on the field's edge.
    """

    centroid_y: float
    centroid_x: float
    area: int
    bbox: tuple[int, int, int, int]
    touches_border: bool


def object_properties(labels: np.ndarray) -> dict[int, CellProps]:
    """Centroid, area, bounding box and border contact of every object of a label image.

    Args:
        labels: ``(H, W)`` integer labels, 0 background; values need not be consecutive.

    Returns:
        The objects by label value, in increasing order.

    Raises:
        CropError: If ``labels`` is not a 2-D image of non-negative integers.
    """
    labels = _check_labels(labels)
    height, width = labels.shape
    flat = labels.ravel()
    area = np.bincount(flat)
    rows = np.repeat(np.arange(height, dtype=np.float64), width)
    cols = np.tile(np.arange(width, dtype=np.float64), height)
    sum_y = np.bincount(flat, weights=rows, minlength=len(area))
    sum_x = np.bincount(flat, weights=cols, minlength=len(area))
    out: dict[int, CellProps] = {}
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        y0, y1, x0, x1 = box[0].start, box[0].stop, box[1].start, box[1].stop
        n = int(area[index])
        out[index] = CellProps(
            centroid_y=float(sum_y[index] / n), centroid_x=float(sum_x[index] / n), area=n,
            bbox=(y0, x0, y1, x1), touches_border=y0 == 0 or x0 == 0 or y1 == height or x1 == width,
        )
    return out


def crop_cells(
    image: np.ndarray,
    labels: np.ndarray,
    size: int,
    *,
    mask_neighbours: bool = False,
    mask_background: bool = False,
    border: str = "skip",
    pad: str = "zero",
    min_area: int = 1,
    max_area: int | None = None,
) -> Iterator[tuple[int, np.ndarray, CellProps]]:
    """Cut a fixed-size crop centred on each object of a field.

    Args:
        image: The field, ``(C, H, W)`` (or ``(H, W)``, one channel), any numeric dtype.
        labels: Its ``(H, W)`` integer label image, 0 background.
        size: Side of the square crops, in pixels.
        mask_neighbours: Set other objects' pixels in the crop to 0.
        mask_background: Keep only the object's own pixels (implies ``mask_neighbours``).
        border: ``skip`` objects whose window runs past the field's edge, or ``pad`` it.
        pad: With ``border="pad"``: ``zero`` or ``reflect`` (the field mirrored at its edge).
        min_area: Objects with fewer pixels are skipped.
        max_area: Objects with more pixels are skipped (None: no limit).

    Yields:
        ``(object_id, crop, props)`` in increasing order of label value: the label value,
        a ``(C, size, size)`` array in the image's dtype, and its :class:`CellProps`.

    Raises:
        CropError: On a setting out of range, an image that is not ``(C, H, W)`` numeric,
            or labels that are not non-negative integers of the image's height and width.
    """
    settings = _CellSettings(size=size, mask_neighbours=mask_neighbours, mask_background=mask_background,
                             border=border, pad=pad, min_area=min_area, max_area=max_area)
    yield from _crop_field(settings, image, labels)


def _crop_field(
    settings: _CellSettings, image: np.ndarray, labels: np.ndarray
) -> Iterator[tuple[int, np.ndarray, CellProps]]:
    image = _check_image(image)
    labels = _check_labels(labels, image.shape[1:])
    size, half = settings.size, settings.size // 2
    height, width = labels.shape
    padded: tuple[np.ndarray, np.ndarray] | None = None
    for object_id, props in object_properties(labels).items():
        if props.area < settings.min_area or (settings.max_area is not None and props.area > settings.max_area):
            continue
        y0 = math.floor(props.centroid_y + 0.5) - half
        x0 = math.floor(props.centroid_x + 0.5) - half
        if 0 <= y0 and 0 <= x0 and y0 + size <= height and x0 + size <= width:
            crop = image[:, y0:y0 + size, x0:x0 + size].copy()
            window = labels[y0:y0 + size, x0:x0 + size]
        elif settings.border == "skip":
            continue
        else:
            if padded is None:
                # Padded once per field, by a whole crop side: every window of a centroid
                # inside the field then lies inside the padded arrays.
                mode = "constant" if settings.pad == "zero" else "reflect"
                padded = (np.pad(image, ((0, 0), (size, size), (size, size)), mode=mode),
                          np.pad(labels, ((size, size), (size, size)), mode=mode))
            crop = padded[0][:, y0 + size:y0 + 2 * size, x0 + size:x0 + 2 * size].copy()
            window = padded[1][y0 + size:y0 + 2 * size, x0 + size:x0 + 2 * size]
        if settings.mask_background:
            crop[:, window != object_id] = 0
        elif settings.mask_neighbours:
            crop[:, (window != object_id) & (window != 0)] = 0
        yield object_id, crop, props


def cut_montage(
    image: np.ndarray,
    tile: int | tuple[int, int],
    *,
    skip_empty: bool = True,
    empty_std_threshold: float = 0.0,
    order: str = "row",
) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """Cut a montage (a grid of equal tiles, one cell each) into its tiles.

    Imaging flow cytometry software exports cells as montages; the last row is filled with
    padding tiles of one constant value. A tile is empty when the standard deviation of
    every channel is at most ``empty_std_threshold`` (0: exactly constant).

    Args:
        image: The montage, ``(C, H, W)`` or ``(H, W)``; ``H`` and ``W`` multiples of the tile.
        tile: Tile side, or ``(height, width)``.
        skip_empty: Leave out empty tiles.
        empty_std_threshold: Largest per-channel standard deviation of an empty tile.
        order: Tile numbering: ``row`` (left to right, then the next row) or ``column``
            (top to bottom, then the next column).

    Yields:
        ``(index, row, col, tile)``: the tile's number in ``order`` (empty tiles counted),
        its grid position, and a ``(C, tile_h, tile_w)`` copy in the montage's dtype.

    Raises:
        CropError: On a tile size or threshold out of range, an unknown order, or a
            montage whose sides are not multiples of the tile.
    """
    settings = _GridSettings(tile=tile, skip_empty=skip_empty, empty_std_threshold=empty_std_threshold,
                             order=order)
    yield from _cut_montage(settings, image)


def _cut_montage(settings: _GridSettings, image: np.ndarray) -> Iterator[tuple[int, int, int, np.ndarray]]:
    image = _check_image(image)
    tile_h, tile_w = settings.tile
    _, height, width = image.shape
    if height % tile_h or width % tile_w:
        raise CropError(
            f"montage of {height} x {width} pixels is not a grid of {tile_h} x {tile_w} tiles; valid: sides "
            f"that are multiples of the tile (check the tile size)"
        )
    n_rows, n_cols = height // tile_h, width // tile_w
    positions = ((r, c) for r in range(n_rows) for c in range(n_cols)) if settings.order == "row" else \
        ((r, c) for c in range(n_cols) for r in range(n_rows))
    for index, (r, c) in enumerate(positions):
        cut = image[:, r * tile_h:(r + 1) * tile_h, c * tile_w:(c + 1) * tile_w]
        if settings.skip_empty and _is_empty(cut, settings.empty_std_threshold):
            continue
        yield index, r, c, cut.copy()


def _is_empty(tile: np.ndarray, threshold: float) -> bool:
    flat = tile.reshape(tile.shape[0], -1)
    if threshold == 0:
        return bool((flat == flat[:, :1]).all())
    return bool((flat.astype(np.float64).std(axis=1) <= threshold).all())


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CellSettings:
    size: int
    mask_neighbours: bool = False
    mask_background: bool = False
    border: str = "skip"
    pad: str = "zero"
    min_area: int = 1
    max_area: int | None = None

    def __post_init__(self) -> None:
        _check_int("crop size", self.size, 1)
        _check_choice("border", self.border, BORDER_MODES)
        _check_choice("pad", self.pad, PAD_MODES)
        _check_int("min_area", self.min_area, 0)
        if self.max_area is not None:
            _check_int("max_area", self.max_area, max(self.min_area, 1))
        for name in ("mask_neighbours", "mask_background"):
            if not isinstance(getattr(self, name), bool):
                raise CropError(f"{name} must be True or False; got {getattr(self, name)!r}")


@dataclass(frozen=True)
class _GridSettings:
    tile: int | tuple[int, int]
    skip_empty: bool = True
    empty_std_threshold: float = 0.0
    order: str = "row"

    def __post_init__(self) -> None:
        tile = (self.tile, self.tile) if isinstance(self.tile, (int, np.integer)) else tuple(self.tile)
        if len(tile) != 2:
            raise CropError(f"tile must be one side or (height, width); got {self.tile!r}")
        for side in tile:
            _check_int("tile side", side, 1)
        object.__setattr__(self, "tile", (int(tile[0]), int(tile[1])))
        _check_choice("order", self.order, MONTAGE_ORDERS)
        value = self.empty_std_threshold
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise CropError(f"empty_std_threshold must be a number >= 0; got {value!r}")


@dataclass(frozen=True)
class QcThresholds:
    """When a field has too few or too many objects (``fields_qc.csv``).

    A field is ``too_few`` below ``max(min_objects, low_factor x median)`` and ``too_many``
    above ``high_factor x median`` or above ``max_objects``, the median taken over every
    field of the run. With a median of 0 only the absolute bounds apply.

    Attributes:
        low_factor: Share of the median count below which a field has too few objects.
        high_factor: Multiple of the median count above which it has too many.
        min_objects: Fewest objects a field may have (1: an empty field is always flagged).
        max_objects: Most objects a field may have (None: no absolute limit).
    """

    low_factor: float = 0.25
    high_factor: float = 4.0
    min_objects: int = 1
    max_objects: int | None = None

    def __post_init__(self) -> None:
        for name in ("low_factor", "high_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise CropError(f"QC {name} must be a number >= 0; got {value!r}")
        if self.high_factor < self.low_factor:
            raise CropError(
                f"QC high_factor {self.high_factor!r} is below low_factor {self.low_factor!r}; valid: "
                f"high_factor >= low_factor"
            )
        _check_int("QC min_objects", self.min_objects, 0)
        if self.max_objects is not None:
            _check_int("QC max_objects", self.max_objects, max(self.min_objects, 1))

    def bounds(self, counts: np.ndarray) -> tuple[float, float, float]:
        """``(median, low, high)``: a field is flagged below ``low`` or above ``high``."""
        median = float(np.median(counts)) if len(counts) else 0.0
        low = max(float(self.min_objects), self.low_factor * median if median > 0 else 0.0)
        high = self.high_factor * median if median > 0 else math.inf
        if self.max_objects is not None:
            high = min(high, float(self.max_objects))
        return median, low, high

    def flags(self, counts: np.ndarray) -> list[str]:
        """The QC flag of each count (see :data:`QC_FLAGS`)."""
        _, low, high = self.bounds(counts)
        return ["too_few" if n < low else "too_many" if n > high else "ok" for n in counts]


@dataclass(frozen=True)
class CropResult:
    """What :func:`make_crops` or :func:`make_grid_crops` wrote.

    Attributes:
        out: The output folder.
        cells: ``cells.csv``.
        spec: ``cells.yaml``.
        fields_qc: ``fields_qc.csv``.
        n_fields: Fields in the run.
        n_cells: Rows of ``cells.csv``.
        n_processed: Fields cut by this call (the others were done by an earlier one).
        n_flagged: Fields whose QC flag is not ``ok``.
    """

    out: Path
    cells: Path
    spec: Path
    fields_qc: Path
    n_fields: int
    n_cells: int
    n_processed: int
    n_flagged: int


CROP_SETTING_NAMES: tuple[str, ...] = ("size", "mask_neighbours", "mask_background", "border", "pad", "min_area",
                                        "max_area")
"""The settings of :func:`crop_cells` that :func:`crop_settings` reads back."""


def crop_settings(spec: DatasetSpec) -> dict[str, Any] | None:
    """How the crops of a dataset written by :func:`make_crops` were cut, from its ``crops.json``.

    What a model trained on the crops records, so that a new field is cut the same way: the
    :data:`CROP_SETTING_NAMES`, and under ``segmentation`` how the masks were made where
    ``segment.json`` (of ``cellclass segment``) or the crops' own backend tells it:
    ``backend``, ``nucleus_channel``, ``params``, ``cell_channel`` and ``cell_params``.

    Returns:
        The settings, or ``None`` for a dataset that is not a folder of crops around objects
        (no ``crops.json`` beside its manifest, or tiles of montages).
    """
    manifest = spec.manifest_path
    path = None if manifest is None else manifest.parent / "crops.json"
    if path is None or not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text()).get("settings") or {}
    except (OSError, ValueError, AttributeError):
        log.warning("%s cannot be read; the crop settings are not recorded", path)
        return None
    if settings.get("kind") != "cells":
        return None
    out: dict[str, Any] = {name: settings.get(name) for name in CROP_SETTING_NAMES}
    segmentation = None
    if settings.get("backend") is not None:
        segmentation = {"backend": settings["backend"]}
    elif settings.get("masks_dir") and (Path(settings["masks_dir"]) / "segment.json").is_file():
        try:
            segmentation = json.loads((Path(settings["masks_dir"]) / "segment.json").read_text()).get("settings")
        except (OSError, ValueError, AttributeError):
            segmentation = None
    out["segmentation"] = _segmentation_settings(segmentation)
    return out


def _segmentation_settings(recorded: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The backend, nucleus channel and parameters of recorded segmentation settings."""
    if not isinstance(recorded, Mapping) or not isinstance(recorded.get("backend"), Mapping):
        return None
    backend = recorded["backend"]
    return {"backend": backend.get("name"), "nucleus_channel": backend.get("channel"),
            "params": backend.get("params"), "cell_channel": recorded.get("cell_channel"),
            "cell_params": recorded.get("cell_params")}


# --------------------------------------------------------------------------------------
# Cutters: what one field becomes (run in the worker processes)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CellCutter:
    """Crops around the objects of a mask read from ``masks_dir``, or made by ``backend``."""

    settings: _CellSettings
    masks_dir: Path | None = None
    backend: Any = None
    write_masks: bool = False

    kind = "cells"
    columns = CELL_COLUMNS[:CELL_COLUMNS.index("field_id")]

    def mask_file(self, image_id: str) -> Path | None:
        return None if self.masks_dir is None else self.masks_dir / mask_path_for(image_id)

    def signature(self) -> dict[str, Any]:
        source = ({"masks_dir": str(self.masks_dir)} if self.masks_dir is not None
                  else {"backend": describe_backend(self.backend)})
        return {"kind": self.kind, **asdict(self.settings), **source}

    def cut(self, spec: DatasetSpec, record: Mapping[str, Any], image: np.ndarray,
            out: Path) -> tuple[int | None, Iterator[tuple[int, np.ndarray, list[Any]]]]:
        """The number of objects in the field's labels (skipped ones included) and its crops."""
        image_id = spec.image_id(record)
        if self.masks_dir is not None:
            labels = _read_mask(self.mask_file(image_id), image, record)
        else:
            labels = self.backend.segment(image, source=spec.image_paths(record)[0])
            if self.write_masks:
                write_tiff(out / mask_path_for(image_id), labels.astype(np.uint16, copy=False))
        n_objects = int(np.count_nonzero(np.bincount(_check_labels(labels).ravel())[1:]))

        def crops() -> Iterator[tuple[int, np.ndarray, list[Any]]]:
            for object_id, crop, p in _crop_field(self.settings, image, labels):
                values = [object_id, round(p.centroid_y, 2), round(p.centroid_x, 2), p.area, *p.bbox,
                          int(p.touches_border)]
                yield object_id, crop, values

        return n_objects, crops()


@dataclass(frozen=True)
class _TileCutter:
    settings: _GridSettings

    kind = "grid"
    columns = GRID_COLUMNS[:GRID_COLUMNS.index("field_id")]

    def mask_file(self, image_id: str) -> Path | None:
        return None

    def signature(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self.settings)}

    def cut(self, spec: DatasetSpec, record: Mapping[str, Any], image: np.ndarray,
            out: Path) -> tuple[int | None, Iterator[tuple[int, np.ndarray, list[Any]]]]:
        """No count ahead (QC counts the non-empty tiles), and the tiles."""
        _, height, width = _check_image(image).shape
        tile_h, tile_w = self.settings.tile
        if height % tile_h or width % tile_w:
            raise CropError(
                f"row {record.get(ROW_COLUMN, '?')} ({spec.image_id(record)}): montage of {height} x {width} "
                f"pixels is not a grid of {tile_h} x {tile_w} tiles; valid: sides that are multiples of the "
                f"tile (check the tile size)"
            )
        tiles = ((index, tile, [index, r, c]) for index, r, c, tile in _cut_montage(self.settings, image))
        return None, tiles


# --------------------------------------------------------------------------------------
# A dataset of fields
# --------------------------------------------------------------------------------------


def make_crops(
    spec: DatasetSpec,
    masks: str | os.PathLike[str] | Backend,
    out: str | os.PathLike[str],
    size: int = 64,
    *,
    frame: pd.DataFrame | None = None,
    mask_neighbours: bool = False,
    mask_background: bool = False,
    border: str = "skip",
    pad: str = "zero",
    min_area: int = 1,
    max_area: int | None = None,
    qc: QcThresholds | None = None,
    write_masks: bool = False,
    workers: int = 1,
    progress: ProgressFn | None = None,
) -> CropResult:
    """Cut every field of a dataset into single-cell crops and write their dataset.

    See the module docstring for the files written. Each row of ``cells.csv`` holds every
    column of its field's manifest row (labels, plate, well ...) followed by
    :data:`CELL_COLUMNS`; ``cells.yaml`` declares the field's tasks and groups (the field's
    groups first, then ``field_id``), so a split keeps all cells of a field, and of a plate
    where the field's spec groups by plate, on one side.

    Args:
        spec: The dataset of fields.
        masks: A folder holding ``masks/<field key>.tif`` label images (the output folder
            of ``cellclass segment``; object ids are the label values of the files), or a
            segmentation backend (:mod:`cellclass.data.segment`) run on each field in the
            worker.
        out: Output folder; created if missing.
        size: Side of the square crops.
        frame: The rows to cut (default: ``spec.load_manifest()``).
        mask_neighbours: See :func:`crop_cells`.
        mask_background: See :func:`crop_cells`.
        border: See :func:`crop_cells`.
        pad: See :func:`crop_cells`.
        min_area: See :func:`crop_cells`.
        max_area: See :func:`crop_cells`.
        qc: Bounds of the per-field QC flags (default :class:`QcThresholds`).
        write_masks: With a backend, also write each field's labels to
            ``OUT/masks/<field key>.tif``.
        workers: Processes cutting fields in parallel (1: this process).
        progress: Called as ``progress("cutting fields", fields_done, fields_total)``.

    Returns:
        What was written (:class:`CropResult`).

    Raises:
        CropError: On a setting out of range, no rows, two fields of one key, a manifest
            column named like an added one, a missing or unfit mask file, or
            ``write_masks`` with a mask folder.
        ImageReadError: When a field cannot be read; the message names its row.
        OutputPathError: When ``cells.csv`` would replace the dataset's own manifest.
    """
    settings = _CellSettings(size=size, mask_neighbours=mask_neighbours, mask_background=mask_background,
                             border=border, pad=pad, min_area=min_area, max_area=max_area)
    if isinstance(masks, Backend):
        cutter = _CellCutter(settings, backend=masks, write_masks=write_masks)
    elif isinstance(masks, (str, os.PathLike)):
        folder = Path(masks).resolve()
        if not folder.is_dir():
            raise CropError(f"mask folder {str(folder)!r} does not exist; valid: the output folder of "
                            f"`cellclass segment` (holding masks/), or a segmentation backend")
        if write_masks:
            raise CropError(f"write_masks=True writes the masks a backend makes, but the masks come from the folder "
                            f"{str(folder)!r}; valid: write_masks=False with a mask folder")
        cutter = _CellCutter(settings, masks_dir=folder)
    else:
        raise CropError(f"masks must be a folder or a segmentation backend; got {type(masks).__name__}")
    return _run(spec, cutter, Path(out), frame, qc or QcThresholds(), workers, progress, CELL_COLUMNS, "cutting fields")


def make_grid_crops(
    spec: DatasetSpec,
    out: str | os.PathLike[str],
    tile: int | tuple[int, int],
    *,
    frame: pd.DataFrame | None = None,
    skip_empty: bool = True,
    empty_std_threshold: float = 0.0,
    order: str = "row",
    qc: QcThresholds | None = None,
    workers: int = 1,
    progress: ProgressFn | None = None,
) -> CropResult:
    """Cut every montage of a dataset into its tiles and write their dataset.

    The files are those of :func:`make_crops`; ``cells.csv`` adds :data:`GRID_COLUMNS`,
    ``object_id`` being the tile's index in ``order``, and QC counts non-empty tiles.

    Args:
        spec: The dataset of montages.
        out: Output folder.
        tile: Tile side, or ``(height, width)``.
        frame: The rows to cut (default: ``spec.load_manifest()``).
        skip_empty: See :func:`cut_montage`.
        empty_std_threshold: See :func:`cut_montage`.
        order: See :func:`cut_montage`.
        qc: Bounds of the per-montage QC flags.
        workers: Processes cutting montages in parallel.
        progress: Called as ``progress("cutting montages", montages_done, montages_total)``.

    Raises:
        CropError: As :func:`make_crops`, and for a montage that is not a grid of tiles.
        ImageReadError: When a montage cannot be read.
        OutputPathError: When ``cells.csv`` would replace the dataset's own manifest.
    """
    cutter = _TileCutter(_GridSettings(tile=tile, skip_empty=skip_empty, empty_std_threshold=empty_std_threshold,
                                       order=order))
    return _run(spec, cutter, Path(out), frame, qc or QcThresholds(), workers, progress, GRID_COLUMNS, "cutting montages")


@dataclass
class _Field:
    position: int
    record: dict[str, Any]
    image_id: str
    key: str
    n_objects: int = -1
    n_crops: int = -1


def _run(spec: DatasetSpec, cutter: Any, out: Path, frame: pd.DataFrame | None, qc: QcThresholds,
         workers: int, progress: ProgressFn | None, added: tuple[str, ...], stage: str) -> CropResult:
    _check_int("workers", workers, 1)
    frame = spec.load_manifest() if frame is None else frame
    if not len(frame):
        raise CropError(f"dataset {spec.name!r} has no field to cut; check its manifest and row filters")
    out = out.resolve()
    if spec.manifest_path is not None and (out / "cells.csv") == spec.manifest_path:
        raise OutputPathError(f"{str(out / 'cells.csv')!r} is the dataset's own manifest; valid: another "
                              f"output folder")
    inherited = [str(c) for c in frame.columns if c != ROW_COLUMN]
    clash = [c for c in added if c in inherited]
    if clash:
        raise CropError(f"the manifest of {spec.name!r} already has column(s) {', '.join(clash)}, which the "
                        f"cell manifest adds; valid: a manifest without them (rename them)")
    todo = _fields(spec, frame)
    _check_masks(cutter, todo)
    signature = jsonable(cutter.signature())
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    pending = []
    for item in todo:
        marker = _read_done(out, item, signature, spec, cutter)
        if marker is None:
            pending.append(item)
        else:
            item.n_objects, item.n_crops = marker["n_objects"], marker["n_crops"]
    done, total = len(todo) - len(pending), len(todo)
    if done:
        log.info("%d of %d fields already cut in %s; cutting the other %d", done, total, out, len(pending))
    if progress is not None:
        progress(stage, done, total)
    for item, counts in _cut_all(spec, cutter, out, signature, pending, workers):
        item.n_objects, item.n_crops = counts
        done += 1
        if progress is not None:
            progress(stage, done, total)

    counts = np.array([item.n_objects for item in todo])
    flags = qc.flags(counts)
    median, low, high = qc.bounds(counts)
    cells = out / "cells.csv"
    n_cells = _assemble(out, cells, frame, inherited, todo, flags, added)
    fields_qc = _write_qc(out / "fields_qc.csv", spec, todo, flags)
    spec_path = _write_spec(spec, out)
    n_flagged = sum(f != "ok" for f in flags)
    summary = {
        "dataset": spec.name, "settings": signature, "n_fields": total, "n_cells": n_cells,
        "n_processed": len(pending),
        "qc": {**asdict(qc), "median": median, "low": low, "high": None if math.isinf(high) else high,
               **{flag: sum(f == flag for f in flags) for flag in QC_FLAGS}},
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_text(out / "crops.json", json.dumps(summary, indent=2) + "\n")
    log.info("%d crops from %d fields in %s (%d flagged by QC)", n_cells, total, out, n_flagged)
    return CropResult(out=out, cells=cells, spec=spec_path, fields_qc=fields_qc, n_fields=total, n_cells=n_cells,
                      n_processed=len(pending), n_flagged=n_flagged)


def _fields(spec: DatasetSpec, frame: pd.DataFrame) -> list[_Field]:
    items, seen = [], {}
    for position, record in enumerate(frame.to_dict("records")):
        image_id = spec.image_id(record)
        key = field_key(image_id)
        if key in seen:
            raise CropError(
                f"fields {seen[key]!r} and {image_id!r} have the same key {key!r} (image id less its "
                f"extension), so their crops would collide; valid: one image per field key"
            )
        seen[key] = image_id
        items.append(_Field(position, record, image_id, key))
    return items


def _check_masks(cutter: Any, items: list[_Field]) -> None:
    missing = [(item, path) for item in items if (path := cutter.mask_file(item.image_id)) is not None
               and not path.is_file()]
    if missing:
        item, path = missing[0]
        raise CropError(
            f"{len(missing)} of {len(items)} fields have no mask file, the first {str(path)!r} for field "
            f"{item.image_id!r} (row {item.record.get(ROW_COLUMN, '?')}); valid: the output folder of "
            f"`cellclass segment`, holding masks/<field key>.tif for every field"
        )


# -- per-field work and resumption ------------------------------------------------------


def _part_paths(out: Path, key: str) -> tuple[Path, Path]:
    base = out / "parts" / key
    return base.with_name(base.name + ".csv"), base.with_name(base.name + ".done.json")


def _sources(spec: DatasetSpec, cutter: Any, item: _Field) -> list[list[Any]]:
    """Size and modification time of the field's files (and its mask): a change redoes it."""
    paths = [*spec.image_paths(item.record)]
    mask = cutter.mask_file(item.image_id)
    if mask is not None:
        paths.append(mask)
    return file_stamps(paths)


def file_stamps(paths: list[Any]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of each file (``None`` for one that cannot be read): what a
    done-marker records so that a changed input redoes its field."""
    stamps = []
    for path in paths:
        try:
            stat = os.stat(path)
            stamps.append([str(path), stat.st_size, stat.st_mtime_ns])
        except OSError:
            stamps.append([str(path), None, None])
    return stamps


def _read_done(out: Path, item: _Field, signature: dict[str, Any], spec: DatasetSpec,
               cutter: Any) -> dict[str, Any] | None:
    """The field's done-marker where it is complete and current, else None."""
    part, done = _part_paths(out, item.key)
    try:
        marker = json.loads(done.read_text())
    except (OSError, ValueError):
        return None
    if (marker.get("version") != _MARKER_VERSION or marker.get("settings") != signature
            or marker.get("sources") != _sources(spec, cutter, item) or not part.is_file()):
        return None
    with open(part, newline="") as handle:
        rows = list(csv.reader(handle))
    if len(rows) != marker.get("n_crops") or not all((out / row[-1]).is_file() for row in rows):
        return None
    return marker


_STATE: dict[str, Any] = {}


def _init_worker(spec: DatasetSpec, cutter: Any, out: Path, signature: dict[str, Any]) -> None:
    _STATE.update(spec=spec, cutter=cutter, out=out, signature=signature)


def _cut_one(position: int, record: dict[str, Any], image_id: str, key: str) -> tuple[int, tuple[int, int]]:
    """Cut one field: its crops, then its part, then its done-marker (in this order)."""
    spec, cutter, out, signature = _STATE["spec"], _STATE["cutter"], _STATE["out"], _STATE["signature"]
    item = _Field(position, record, image_id, key)
    sources = _sources(spec, cutter, item)
    try:
        image = spec.read_image(record)
    except ImageReadError as exc:
        raise ImageReadError(f"row {record.get(ROW_COLUMN, '?')}: {exc} (run `cellclass validate`)") from None
    crop_dir = out / "crops" / key
    if crop_dir.is_dir():  # a half-cut field of an interrupted run, or of other settings
        for stale in crop_dir.glob("*.tif"):
            stale.unlink()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    n_objects, crops = cutter.cut(spec, record, image, out)
    n_crops = 0
    for object_id, crop, values in crops:
        relative = f"crops/{key}/{object_id}.tif"
        write_tiff(out / relative, crop)
        writer.writerow([*values, relative])
        n_crops += 1
    part, done = _part_paths(out, key)
    atomic_write_text(part, buffer.getvalue())
    n_objects = n_crops if n_objects is None else n_objects
    marker = {"version": _MARKER_VERSION, "settings": signature, "sources": sources,
              "n_objects": n_objects, "n_crops": n_crops}
    atomic_write_text(done, json.dumps(marker) + "\n")
    return position, (n_objects, n_crops)


def _cut_all(spec: DatasetSpec, cutter: Any, out: Path, signature: dict[str, Any], pending: list[_Field],
             workers: int) -> Iterator[tuple[_Field, tuple[int, int]]]:
    """Cut the pending fields, in this process or in a pool with a bounded queue."""
    return map_fields(pending, workers, _init_worker, (spec, cutter, out, signature), _cut_one, _STATE.clear)


def map_fields(pending: list[Any], workers: int, initializer: Callable[..., None], initargs: tuple[Any, ...],
               work: Callable[[int, dict[str, Any], str, str], tuple[int, Any]],
               clear: Callable[[], None]) -> Iterator[tuple[Any, Any]]:
    """Run ``work(position, record, image_id, key)`` on every pending field; yield ``(field, result)``.

    With one worker (or one field) the work runs in this process after ``initializer(*initargs)``
    (and ``clear()`` after); otherwise in a process pool whose workers each run the
    initializer once, with at most two fields per worker in flight, so the queue never holds
    a whole plate. Results come in the order fields finish. Used by :func:`make_crops` and by
    :func:`cellclass.data.masks.segment_fields`.
    """
    if not pending:
        return
    if workers == 1 or len(pending) == 1:
        initializer(*initargs)
        try:
            for item in pending:
                yield item, work(item.position, item.record, item.image_id, item.key)[1]
        finally:
            clear()
        return
    by_position = {item.position: item for item in pending}
    queue = iter(pending)
    with ProcessPoolExecutor(max_workers=min(workers, len(pending)), initializer=initializer,
                             initargs=initargs) as pool:
        running: set[Future] = set()

        def submit() -> None:
            for item in queue:
                running.add(pool.submit(work, item.position, item.record, item.image_id, item.key))
                if len(running) >= 2 * workers:
                    return

        submit()
        try:
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    running.discard(future)
                    position, result = future.result()
                    yield by_position[position], result
                submit()
        except BaseException:
            for future in running:
                future.cancel()
            raise


# -- outputs ------------------------------------------------------------------------------


def _assemble(out: Path, cells: Path, frame: pd.DataFrame, inherited: list[str], items: list[_Field],
              flags: list[str], added: tuple[str, ...]) -> int:
    """Write ``cells.csv`` from the per-field parts, streaming, in manifest order."""
    n = 0
    with atomic_path(cells) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow([*inherited, *added])
            for item, flag in zip(items, flags):
                values = [csv_text(item.record.get(c)) for c in inherited]
                row_number = item.record.get(ROW_COLUMN, item.position + 1)
                part, _ = _part_paths(out, item.key)
                with open(part, newline="") as source:
                    for row in csv.reader(source):
                        writer.writerow([*values, *row[:-1], item.key, row_number, row[-1], flag])
                        n += 1
    return n


def _write_qc(path: Path, spec: DatasetSpec, items: list[_Field], flags: list[str]) -> Path:
    groups = [g for g in spec.groups if g not in ("field_id", "image_id", "field_row")]
    table = pd.DataFrame({
        "field_id": [item.key for item in items],
        "image_id": [item.image_id for item in items],
        "field_row": [item.record.get(ROW_COLUMN, item.position + 1) for item in items],
        **{g: [csv_text(item.record.get(g)) for item in items] for g in groups},
        "n_objects": [item.n_objects for item in items],
        "n_crops": [item.n_crops for item in items],
        "qc": flags,
    })
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


def _write_spec(spec: DatasetSpec, out: Path) -> Path:
    """``cells.yaml``: the crops as a dataset, with the field's tasks and groups."""
    cells = DatasetSpec(
        name=f"{spec.name}-cells",
        manifest="cells.csv",
        image=ImageSpec(column="crop", channels=spec.image.channel_names),
        tasks=copy.deepcopy(spec.tasks),
        groups=list(dict.fromkeys([*spec.groups, "field_id"])),
        split_column=spec.split_column,
        drop_unlabeled=spec.drop_unlabeled,
        controls=copy.deepcopy(spec.controls),
        base_dir=out,
    )
    return cells.to_yaml(out / "cells.yaml")


# -- checks -------------------------------------------------------------------------------


def _read_mask(path: Path, image: np.ndarray, record: Mapping[str, Any]) -> np.ndarray:
    row = record.get(ROW_COLUMN, "?")
    try:
        mask = read_image(path)
    except ImageReadError as exc:
        raise CropError(f"row {row}: cannot read mask file {str(path)!r}: {exc}") from None
    if mask.shape[0] != 1 or not np.issubdtype(mask.dtype, np.integer):
        raise CropError(f"row {row}: mask file {str(path)!r} holds {mask.shape[0]} channel(s) of {mask.dtype}; "
                        f"valid: one channel of integer labels (0 background)")
    if mask.shape[1:] != np.shape(image)[-2:]:
        raise CropError(
            f"row {row}: mask file {str(path)!r} is {mask.shape[1]} x {mask.shape[2]} pixels but its field is "
            f"{np.shape(image)[-2]} x {np.shape(image)[-1]}; valid: a mask of the field's size"
        )
    if mask.min(initial=0) < 0:
        raise CropError(f"row {row}: mask file {str(path)!r} holds negative labels; valid: 0 and above")
    return mask[0]


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise CropError(f"image has shape {image.shape}; valid: (C, H, W) or (H, W)")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise CropError(f"image dtype {image.dtype} is not numeric; valid: integer or float")
    return image


def _check_labels(labels: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise CropError(f"labels have shape {labels.shape} and dtype {labels.dtype}; valid: an (H, W) integer "
                        f"label image")
    if shape is not None and labels.shape != tuple(shape):
        raise CropError(f"labels are {labels.shape[0]} x {labels.shape[1]} pixels but the image is "
                        f"{shape[0]} x {shape[1]}; valid: labels of the image's height and width")
    if labels.size and labels.min() < 0:
        raise CropError(f"labels hold negative values (down to {labels.min()}); valid: 0 and above")
    return labels


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise CropError(f"{name} must be an integer >= {low}; got {value!r}")


def _check_choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise CropError(f"{name} {value!r} is invalid; valid: {', '.join(valid)}")


def describe_backend(backend: Any) -> dict[str, Any]:
    """A backend's name and public settings, as recorded in the done-markers."""
    values: dict[str, Any] = {}
    for name, value in vars(backend).items():
        if name.startswith("_"):
            continue
        values[name] = value.to_dict() if hasattr(value, "to_dict") else asdict(value) if is_dataclass(value) \
            else value
    return {"name": getattr(backend, "name", type(backend).__name__), **values}


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))


def csv_text(value: Any) -> str:
    """A manifest value as a CSV cell (missing values empty)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)
