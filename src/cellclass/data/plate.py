"""The manifest of an OME-Zarr plate dataset: one row per field (or per well), labels by well.

A dataset of ``layout: plate`` (preset ``plate``) lists its rows from the plates'
metadata (:func:`cellclass.data.omezarr.plate_fields`), so there is no manifest to write:

============ ==============================================================================
``plate``    the plate's name: its folder's name less ``.zarr`` / ``.ome.zarr``
``well``     the well, normalized to ``A01`` (the default group: wells never straddle a split)
``row``      the row name (``A``)
``column``   the column name as the plate names it (``1``)
``field``    the field's path in its well (``0``)
``image``    the field's path under the image root (``plate.zarr/A/1/0``)
============ ==============================================================================

Labels come from a CSV keyed by well (``well`` column, any of ``A1``, ``A01``, ``A/1``;
or ``row`` and ``column`` columns), and by plate too where it has a ``plate`` column
(else its rows apply to every plate: one plate map for the whole screen). Its other
columns are joined onto every field of the well. Wells of a plate the CSV does not list
get empty labels (``validate`` reports them, ``drop_unlabeled`` drops them); a CSV well
that no plate holds is an error.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pandas as pd

from cellclass.data.omezarr import normalize_well, plate_fields, zarr_kind
from cellclass.errors import SpecError

__all__ = ["PER_VALUES", "PLATE_COLUMNS", "find_plates", "plate_manifest", "plate_name"]

log = logging.getLogger(__name__)

PLATE_COLUMNS = ("plate", "well", "row", "column", "field", "image")
"""Columns every plate manifest has, in order."""

PER_VALUES = ("field", "well")
"""One row per field of view, or per well (its first field)."""

_SUFFIX = re.compile(r"(\.ome)?\.zarr$", re.IGNORECASE)


def plate_name(path: str | os.PathLike[str]) -> str:
    """A plate's name: its folder's name less ``.zarr`` / ``.ome.zarr``."""
    return _SUFFIX.sub("", Path(path).resolve().name)


def find_plates(root: str | os.PathLike[str]) -> list[Path]:
    """The plates of a dataset folder: ``root`` itself if it is a plate, else every folder
    directly in it that is one, sorted by name.

    Raises:
        SpecError: When there is none.
        MissingDependencyError: When the ``zarr`` extra is not installed.
    """
    root = Path(root)
    if not root.is_dir():
        raise SpecError(f"plate folder {str(root)!r} does not exist")
    if zarr_kind(root) == "plate":
        return [root]
    plates = [p for p in sorted(root.iterdir()) if p.is_dir() and zarr_kind(p) == "plate"]
    if not plates:
        raise SpecError(
            f"{str(root)!r} holds no OME-Zarr plate; valid: a plate folder (plate.zarr, whose metadata "
            f"holds 'plate') or a folder holding plate folders"
        )
    return plates


def plate_manifest(
    root: str | os.PathLike[str],
    *,
    plates: list[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    per: str = "field",
    well_column: str = "well",
    plate_column: str = "plate",
) -> pd.DataFrame:
    """Build the manifest of a plate dataset (see the module docstring), as text.

    Args:
        root: The image root: a plate, or the folder holding the plates.
        plates: Plate folders relative to ``root`` (None: :func:`find_plates`).
        labels: CSV of labels keyed by well (and plate); None gives no label column.
        per: ``field`` (one row per field) or ``well`` (the first field of each well).
        well_column: The CSV's well column.
        plate_column: The CSV's plate column, used where it has one.

    Raises:
        SpecError: When a plate is missing or holds no well, ``per`` is invalid, or the
            labels CSV is unreadable, lacks the well column, names a well twice or a well
            no plate holds.
        MissingDependencyError: When the ``zarr`` extra is not installed.
    """
    if per not in PER_VALUES:
        raise SpecError(f"plate.per {per!r} is invalid; valid: {', '.join(PER_VALUES)}")
    root = Path(root)
    folders = [root / p for p in plates] if plates else find_plates(root)
    rows = []
    for folder in folders:
        if not folder.is_dir():
            raise SpecError(f"plate {str(folder)!r} does not exist")
        _, fields = plate_fields(folder, first_only=per == "well")
        name = plate_name(folder)
        prefix = Path(os.path.relpath(folder.resolve(), root.resolve())).as_posix()
        for f in fields:
            image = f.path if prefix == "." else f"{prefix}/{f.path}"
            rows.append({"plate": name, "well": f.well, "row": f.row, "column": f.column,
                         "field": f.field, "image": image})
    frame = pd.DataFrame(rows, columns=list(PLATE_COLUMNS), dtype=str)
    if labels is None:
        return frame
    return _join_labels(frame, Path(labels), well_column, plate_column)


def _join_labels(frame: pd.DataFrame, path: Path, well_column: str, plate_column: str) -> pd.DataFrame:
    if not path.is_file():
        raise SpecError(f"labels CSV {str(path)!r} does not exist")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise SpecError(f"cannot parse labels CSV {str(path)!r}: {exc}") from None
    table.columns = [str(c).strip() for c in table.columns]
    if well_column in table.columns:
        wells = table[well_column]
    elif {"row", "column"} <= set(table.columns):
        wells = table["row"].str.strip() + table["column"].str.strip()
    else:
        raise SpecError(
            f"labels CSV {str(path)!r} has no well column {well_column!r}; it has: "
            f"{', '.join(table.columns)}; valid: a {well_column!r} column (A1, A01, A/1) or 'row' and "
            f"'column' columns"
        )
    keys = pd.DataFrame({"well": [_csv_well(w, path, i) for i, w in enumerate(wells, start=2)]})
    by_plate = plate_column in table.columns
    if by_plate:
        keys["plate"] = table[plate_column].map(lambda p: plate_name(str(p).strip()))
    on = ["plate", "well"] if by_plate else ["well"]
    repeated = keys[keys.duplicated(on, keep=False)]
    if len(repeated):
        shown = ", ".join(sorted({"/".join(r) for r in repeated[on].itertuples(index=False)})[:5])
        raise SpecError(f"labels CSV {str(path)!r} lists well(s) {shown} more than once; valid: one row per well")
    known = set(frame[on].itertuples(index=False, name=None))
    unknown = [k for k in keys[on].itertuples(index=False, name=None) if k not in known]
    if unknown:
        shown = ", ".join("/".join(k) for k in unknown[:5])
        raise SpecError(
            f"labels CSV {str(path)!r} names {len(unknown)} well(s) no plate holds: {shown}; "
            f"plates: {', '.join(sorted(frame['plate'].unique()))}"
        )
    ignored = [c for c in table.columns if c in PLATE_COLUMNS and c not in (well_column, plate_column)]
    if ignored:
        log.info("labels CSV %s: column(s) %s come from the plate metadata instead", path, ignored)
    extra = table.drop(columns=[c for c in (well_column, plate_column, *ignored) if c in table.columns])
    merged = frame.merge(pd.concat([keys, extra], axis=1), on=on, how="left", sort=False)
    return merged.fillna("")


def _csv_well(value: str, path: Path, line: int) -> str:
    try:
        return normalize_well(value)
    except SpecError as exc:
        raise SpecError(f"labels CSV {str(path)!r} line {line}: {exc}") from None
