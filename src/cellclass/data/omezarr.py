"""OME-Zarr (NGFF) images and high-content-screening plates, read through ``ome-zarr``.

An OME-Zarr *image* is a folder (``cells.ome.zarr``, or one field of a plate,
``plate.zarr/A/1/0``) holding a multiscale pyramid: the ``multiscales`` metadata lists
its resolution levels and names its axes (``t``, ``c``, ``z``, ``y``, ``x``), the
``omero`` metadata names its channels (``channels[].label``). Only the level-0 (full
resolution) array of the image asked for is read, and of it only the chunks the
:class:`~cellclass.data.axes.AxesPolicy` needs (one plane for ``--z N``); other levels,
fields and wells are never opened. The axes follow the rules every reader here follows
(:mod:`cellclass.data.axes`): channels become ``C`` in the declared order, Z > 1 or
T > 1 needs a projection.

An OME-Zarr *plate* (``plate`` metadata) lists its wells (``A/1``, ...), each well its
fields (``0``, ``1``, ...); :func:`plate_fields` lists them from the metadata alone.

The metadata is parsed by the ``ome-zarr`` library (zarr v2 and v3 stores, NGFF 0.4 and
0.5), the chunks read through zarr. Both are the ``zarr`` extra:
``pip install 'cellclass[zarr]'``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellclass.data.axes import AxesPolicy, ImageAxes, check_axes, to_chw
from cellclass.errors import ImageReadError, MissingDependencyError, SpecError

__all__ = [
    "PlateField",
    "describe_zarr_image",
    "is_zarr_path",
    "normalize_well",
    "plate_fields",
    "read_zarr_image",
    "zarr_image_files",
    "zarr_kind",
]

log = logging.getLogger(__name__)

SOURCE = "OME-Zarr"
EXTRA_HINT = "pip install 'cellclass[zarr]'"

# Files that mark a folder as a zarr group or array (zarr v3; zarr v2).
_MARKERS = ("zarr.json", ".zattrs", ".zgroup", ".zarray")
_ZARR_SUFFIX = re.compile(r"\.zarr$", re.IGNORECASE)
# NGFF axis names and types to the letters of cellclass.data.axes.
_AXIS_LETTERS = {"t": "T", "c": "C", "z": "Z", "y": "Y", "x": "X"}
_TYPE_LETTERS = {"time": "T", "channel": "C"}
_WELL = re.compile(r"^\s*([A-Za-z]{1,2})\s*[-_/ ]?\s*0*(\d{1,3})\s*$")


# -- what a path is ------------------------------------------------------------------------
def is_zarr_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names an OME-Zarr location: a component ending in ``.zarr``
    (``cells.ome.zarr``, ``plate.zarr/A/1/0``) or a folder holding zarr metadata."""
    text = os.fspath(path)
    if any(_ZARR_SUFFIX.search(part) for part in Path(text).parts):
        return not os.path.isfile(text)
    return os.path.isdir(text) and any(os.path.isfile(os.path.join(text, m)) for m in _MARKERS)


def zarr_kind(path: str | os.PathLike[str]) -> str | None:
    """What the OME-Zarr group at ``path`` holds: ``image``, ``plate``, ``well``, or None
    where it is no OME-Zarr group (missing, a plain folder, a bare array).

    Raises:
        MissingDependencyError: When the ``zarr`` extra is not installed.
    """
    location = _location(os.fspath(path))
    if location is None:
        return None
    attrs = location.root_attrs
    for kind, key in (("image", "multiscales"), ("plate", "plate"), ("well", "well")):
        if key in attrs:
            return kind
    return None


# -- images --------------------------------------------------------------------------------
def read_zarr_image(path: str | os.PathLike[str], policy: AxesPolicy) -> tuple[np.ndarray, tuple[str, ...]]:
    """Read the full-resolution level of an OME-Zarr image as ``(C, H, W)``.

    Only the level-0 array is read, and only the planes ``policy`` keeps where it names a
    Z or T index (``--z 3``, ``--z middle``).

    Args:
        path: The image's folder (an image group, or a field of a plate).
        policy: How Z, T are reduced (see :mod:`cellclass.data.axes`).

    Returns:
        ``(image, channel_names)``: the image in the array's dtype (native byte order) and
        the ``omero`` channel labels (empty unless every channel has one).

    Raises:
        MissingDependencyError: When the ``zarr`` extra is not installed.
        StackError: When Z > 1 or T > 1 and ``policy`` does not say how to reduce it.
        ImageReadError: When the folder is missing, not an OME-Zarr image (a plate or a
            well is named as such), or its metadata or chunks cannot be read.
    """
    name = os.fspath(path)
    image = _open_image(name)
    array = image.data
    axes, shape = image.axes, tuple(int(n) for n in array.shape)
    check_axes(axes, shape, policy, name, SOURCE)  # refuse a stack before reading a chunk
    index: list[Any] = [slice(None)] * len(axes)
    for letter in "TZ":
        how, position = getattr(policy, letter.lower()), axes.find(letter)
        if position < 0 or shape[position] == 1:
            continue
        if isinstance(how, int):
            index[position] = slice(how, how + 1)
        elif how == "middle":
            index[position] = slice(shape[position] // 2, shape[position] // 2 + 1)
    try:
        values = np.asarray(array[tuple(index)])  # reads the chunks of these planes only
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ImageReadError(f"cannot read OME-Zarr image '{name}': {type(exc).__name__}: {exc}") from exc
    if values.dtype.kind not in "buif":
        raise ImageReadError(
            f"cannot read OME-Zarr image '{name}': unsupported dtype {values.dtype}; valid: boolean, "
            f"integer or floating point pixels"
        )
    if not values.dtype.isnative:
        values = values.astype(values.dtype.newbyteorder("="))
    # Planes already chosen while reading are size-1 axes now; reduce only what is left.
    rest = AxesPolicy(
        z=None if _chosen(index, axes, "Z") else policy.z,
        t=None if _chosen(index, axes, "T") else policy.t,
    )
    return to_chw(values, axes, rest, name, SOURCE), image.channel_names


def describe_zarr_image(path: str | os.PathLike[str]) -> ImageAxes:
    """What an OME-Zarr image declares: its axes, sizes, dtype, channel names and levels.

    Raises:
        MissingDependencyError: When the ``zarr`` extra is not installed.
        ImageReadError: When the folder is no OME-Zarr image.
    """
    name = os.fspath(path)
    image = _open_image(name)
    shape = tuple(int(n) for n in image.data.shape)
    return ImageAxes(name, SOURCE, image.axes, shape, str(image.data.dtype), declared=True,
                     channel_names=image.channel_names, series=((image.axes, shape),), levels=image.levels)


def zarr_image_files(path: str | os.PathLike[str]) -> list[str]:
    """The files an OME-Zarr image's pixels come from: its group's metadata and every file
    of its level-0 array (the array's metadata and chunks), sorted.

    A prepared cache fingerprints these (their sizes and times, or their bytes), so its key
    changes when the image's metadata or any full-resolution chunk changes, and not when
    another field, well or resolution level does.

    Raises:
        MissingDependencyError: When the ``zarr`` extra is not installed.
        ImageReadError: When the folder is no OME-Zarr image.
    """
    name = os.fspath(path)
    image = _open_image(name)
    files = [os.path.join(name, m) for m in _MARKERS if os.path.isfile(os.path.join(name, m))]
    level = os.path.join(name, image.level_path)
    for folder, _, names in os.walk(level):
        files += [os.path.join(folder, n) for n in names]
    return sorted(files)


# -- plates --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlateField:
    """One field of view of a plate, as the plate's and well's metadata list it.

    Attributes:
        row: Row name (``A``).
        column: Column name (``1``, as the plate names it).
        well: Normalized well name (``A01``, see :func:`normalize_well`).
        field: The field's path inside its well (``0``).
        path: The field's path inside the plate (``A/1/0``).
    """

    row: str
    column: str
    well: str
    field: str
    path: str


def plate_fields(path: str | os.PathLike[str], *, first_only: bool = False) -> tuple[str | None, list[PlateField]]:
    """List the fields of an OME-Zarr plate from its metadata (no pixel is read).

    Args:
        path: The plate's folder.
        first_only: Keep the first field of each well only (one row per well).

    Returns:
        ``(name, fields)``: the plate's declared name (None when it declares none) and its
        fields, well by well in the plate's order.

    Raises:
        MissingDependencyError: When the ``zarr`` extra is not installed.
        SpecError: When the folder is no OME-Zarr plate, or a well it lists is missing or
            declares no field.
    """
    name = os.fspath(path)
    location = _location(name)
    attrs = {} if location is None else location.root_attrs
    plate = attrs.get("plate")
    if not isinstance(plate, dict):
        found = "no OME-Zarr group" if location is None else f"an OME-Zarr group with {sorted(k for k in attrs if k != 'version') or 'no metadata'}"
        raise SpecError(
            f"'{name}' is {found}, not a plate; valid: a folder whose metadata holds 'plate' "
            f"(an OME-Zarr high-content-screening plate)"
        )
    rows = [str(r.get("name", "")) for r in plate.get("rows", [])]
    columns = [str(c.get("name", "")) for c in plate.get("columns", [])]
    fields: list[PlateField] = []
    for entry in plate.get("wells", []):
        well_path = str(entry.get("path", "")).strip("/")
        row, column = _well_position(entry, well_path, rows, columns)
        well = location.create(well_path)
        images = (well.root_attrs.get("well") or {}).get("images") if well.exists() else None
        if not images:
            raise SpecError(
                f"well '{well_path}' of plate '{name}' is missing or lists no field; valid: a well "
                f"group whose 'well' metadata lists its images"
            )
        for image in images[:1] if first_only else images:
            field = str(image.get("path", "")).strip("/")
            fields.append(PlateField(row, column, normalize_well(f"{row}{column}", strict=False),
                                     field, f"{well_path}/{field}"))
    declared = plate.get("name")
    return (str(declared) if declared else None), fields


def normalize_well(text: str, *, strict: bool = True) -> str:
    """A well name in one form, ``A01``: row letters upper-cased, column zero-padded to two
    digits. Accepts ``A1``, ``A01``, ``a01``, ``A/1``, ``A-1``, ``A_01``, ``A 1``.

    Args:
        text: The well name as written.
        strict: Raise on a name of another form; otherwise return it stripped.

    Raises:
        SpecError: When ``strict`` and ``text`` is not a well name.
    """
    match = _WELL.match(str(text))
    if match is None:
        if strict:
            raise SpecError(
                f"well {text!r} is not a well name; valid: a row letter and a column number such "
                f"as A1, A01, A/1 or B-12"
            )
        return str(text).strip()
    return f"{match.group(1).upper()}{int(match.group(2)):02d}"


# -- helpers -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Image:
    data: Any  # the level-0 zarr array, opened and not read
    axes: str
    channel_names: tuple[str, ...]
    levels: int
    level_path: str


def _modules() -> tuple[Any, Any, Any, Any]:
    try:
        import zarr
        from ome_zarr import axes as ome_axes
        from ome_zarr import format as ome_format
        from ome_zarr import io as ome_io
    except ImportError as exc:
        raise MissingDependencyError(
            f"reading OME-Zarr needs the zarr extra ({exc.name or 'ome_zarr'} is not installed); "
            f"install it with: {EXTRA_HINT}"
        ) from None
    return zarr, ome_io, ome_axes, ome_format


def _location(name: str) -> Any:
    _, ome_io, _, ome_format = _modules()
    if not os.path.isdir(name):
        return None
    # zarr v2 metadata means NGFF 0.4 or older: telling ome-zarr so spares it a warning per
    # open (it detects the version either way).
    v2 = not os.path.isfile(os.path.join(name, "zarr.json")) and os.path.isfile(os.path.join(name, ".zattrs"))
    try:
        return ome_io.parse_url(name, mode="r", fmt=ome_format.FormatV04() if v2 else ome_format.CurrentFormat())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageReadError(f"cannot read OME-Zarr metadata of '{name}': {type(exc).__name__}: {exc}") from exc


def _open_image(name: str) -> _Image:
    """The level-0 array of an image (opened, not read) and what its metadata declares.

    ome-zarr parses the metadata (zarr v2 or v3, the NGFF version, the axes); the array is
    opened with zarr by the path of the first ``multiscales`` dataset, so no other level
    (nor another field) is opened.
    """
    zarr, _, ome_axes, ome_format = _modules()
    if not os.path.exists(name):
        raise ImageReadError(f"cannot read image '{name}': folder does not exist")
    location = _location(name)
    if location is None:
        raise ImageReadError(
            f"cannot read image '{name}': not an OME-Zarr image (no zarr metadata); valid: a folder "
            f"holding 'multiscales' metadata, e.g. cells.ome.zarr or plate.zarr/A/1/0"
        )
    attrs = location.root_attrs
    if "multiscales" not in attrs:
        kind = "plate" if "plate" in attrs else "well" if "well" in attrs else "zarr group"
        raise ImageReadError(
            f"cannot read image '{name}': it is an OME-Zarr {kind}, not an image; valid: an image "
            f"(a field of a plate such as plate.zarr/A/1/0); read a whole plate with --preset plate"
        )
    try:
        multiscale = attrs["multiscales"][0]
        datasets = [str(d["path"]) for d in multiscale["datasets"]]
        version = str(multiscale.get("version") or attrs.get("version") or location.version)
        declared = multiscale.get("axes")
        axes_list = ome_axes.Axes(declared, fmt=ome_format.format_from_version(version)).to_list() if declared else []
        array = zarr.open_array(store=location.store, path=datasets[0], mode="r")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ImageReadError(f"cannot read OME-Zarr metadata of '{name}': {type(exc).__name__}: {exc}") from exc
    # NGFF 0.1 / 0.2 declare no axes: their arrays are (t, c, z, y, x) by convention.
    axes = "".join(_letter(a) for a in axes_list) if axes_list else "TCZYX"[-array.ndim:]
    channels = (attrs.get("omero") or {}).get("channels") or []
    labels = [c.get("label") if isinstance(c, dict) else None for c in channels]
    names = tuple(map(str, labels)) if labels and all(labels) and len(labels) == _channels(axes, array.shape) else ()
    return _Image(array, axes, names, len(datasets), datasets[0])


def _letter(axis: Any) -> str:
    if isinstance(axis, str):
        return _AXIS_LETTERS.get(axis.lower(), "Q")
    name = str(axis.get("name", "")).lower()
    return _AXIS_LETTERS.get(name) or _TYPE_LETTERS.get(str(axis.get("type", "")).lower(), "Q")


def _channels(axes: str, shape: tuple[int, ...]) -> int:
    position = axes.find("C")
    return int(shape[position]) if position >= 0 else 1


def _chosen(index: list[Any], axes: str, letter: str) -> bool:
    position = axes.find(letter)
    return position >= 0 and index[position] != slice(None)


def _well_position(entry: dict[str, Any], path: str, rows: list[str], columns: list[str]) -> tuple[str, str]:
    """Row and column names of a well: from its indices (NGFF 0.4+), else from its path."""
    row_index, column_index = entry.get("rowIndex"), entry.get("columnIndex")
    if isinstance(row_index, int) and isinstance(column_index, int) and row_index < len(rows) and column_index < len(columns):
        return rows[row_index], columns[column_index]
    parts = path.split("/")
    return (parts[0], parts[-1]) if len(parts) >= 2 else (path, "")
