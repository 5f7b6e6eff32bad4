"""Segmenting a dataset of fields: one label image per field, where the crops look for it.

:func:`segment_fields` runs a segmentation backend (:mod:`cellclass.data.segment`) on every
field of a dataset (any form :class:`~cellclass.data.spec.DatasetSpec` reads; Z, T and
channel choices apply) and writes::

    OUT/masks/<field key>.tif    uint16 labels, 0 background, objects 1..N: whole cells where
                                 a cell channel is given, else nuclei
    OUT/nuclei/<field key>.tif   with a cell channel only: the nuclei, each numbered as its cell
    OUT/masks.csv                one row per field: every column of its manifest row, then
                                 MASK_COLUMNS (and ``nuclei`` with a cell channel)
    OUT/segment.json             the settings and the object counts
    OUT/segment-parts/           per-field done-markers (what makes a rerun resume)

The field key and the mask path are those of :func:`cellclass.data.crops.field_key` and
:func:`~cellclass.data.crops.mask_path_for`: a field ``a01.tif`` directly under the image
root has its mask at ``masks/a01.tif``, one in a sub-folder ``plate1/a01.tif`` at
``masks/plate1/a01.tif``, so fields of one stem in different folders never collide.
:func:`cellclass.data.crops.make_crops` reads ``OUT`` as its mask folder.

Each worker process segments one field at a time and writes its mask before taking the
next, so memory does not grow with the number of fields. A field whose mask and
done-marker exist, made with the same settings from the same files (size and modification
time), is skipped on a rerun; ``masks.csv`` is assembled again at the end from the markers.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellclass.atomic import atomic_path, atomic_write_text
from cellclass.data.crops import (
    csv_text,
    describe_backend,
    field_key,
    file_stamps,
    jsonable,
    map_fields,
    mask_path_for,
)
from cellclass.data.io import write_tiff
from cellclass.data.segment import Backend, CellParams, segment_cells
from cellclass.data.spec import ROW_COLUMN, DatasetSpec
from cellclass.errors import ImageReadError, OutputPathError, SegmentationError
from cellclass.progress import ProgressFn

__all__ = [
    "IN_PROCESS_BACKENDS",
    "MASK_COLUMNS",
    "NUCLEAR_CHANNEL_NAMES",
    "SegmentResult",
    "field_source",
    "resolve_channel",
    "segment_fields",
]

log = logging.getLogger(__name__)

MASK_COLUMNS: tuple[str, ...] = ("field_id", "field_row", "mask", "n_objects")
"""Columns :func:`segment_fields` adds to each field's row in ``masks.csv``: the field key,
the field's manifest row number, the mask's path relative to ``OUT``, and its number of
objects. With a cell channel a ``nuclei`` column (the nucleus mask's path) follows ``mask``."""

NUCLEAR_CHANNEL_NAMES: tuple[str, ...] = ("dapi", "hoechst", "dna", "nuclei", "nucleus", "h2b", "blue")
"""Channel names taken for the nuclear stain when none is chosen (case-insensitive), in
this order of preference; ``blue`` is HPA's nuclear channel."""

IN_PROCESS_BACKENDS: tuple[str, ...] = ("cellpose", "stardist")
"""Backends that run in the calling process whatever ``workers`` says: they hold a loaded
model and use their own threads (or a GPU)."""

_MARKER_VERSION = 1


@dataclass(frozen=True)
class SegmentResult:
    """What :func:`segment_fields` wrote.

    Attributes:
        out: The output folder.
        manifest: ``masks.csv``.
        n_fields: Fields in the run.
        n_processed: Fields segmented by this call (the others were done by an earlier one).
        n_objects: Objects of each field, in manifest order.
        cells: Whether the masks are whole cells (a cell channel was given) or nuclei.
    """

    out: Path
    manifest: Path
    n_fields: int
    n_processed: int
    n_objects: tuple[int, ...]
    cells: bool

    @property
    def total(self) -> int:
        """Objects over every field."""
        return int(sum(self.n_objects))

    @property
    def n_empty(self) -> int:
        """Fields in which no object was found."""
        return sum(n == 0 for n in self.n_objects)

    def stats(self) -> dict[str, float]:
        """Objects per field: ``min``, ``median``, ``mean`` and ``max``."""
        counts = np.asarray(self.n_objects, dtype=np.float64)
        return {"min": float(counts.min()), "median": float(np.median(counts)), "mean": float(counts.mean()),
                "max": float(counts.max())}


def resolve_channel(spec: DatasetSpec, value: str | int | None, what: str = "nucleus channel") -> int:
    """The index of a channel given by index or by name.

    Args:
        spec: The dataset whose channel names are looked up.
        value: An index (``2``, ``"2"``), a channel name of ``spec`` (``"blue"``), or None
            for the nuclear channel found by :data:`NUCLEAR_CHANNEL_NAMES` (else 0).
        what: How the channel is called in a message.

    Raises:
        SegmentationError: On a negative index or a name that is not one of the spec's.
    """
    names = spec.image.channel_names or []
    if value is None:
        lowered = [n.lower() for n in names]
        for candidate in NUCLEAR_CHANNEL_NAMES:
            if candidate in lowered:
                return lowered.index(candidate)
        return 0
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if index < 0:
            raise SegmentationError(f"{what} {value!r} is negative; valid: an index from 0"
                                    + (f", or one of {', '.join(names)}" if names else ""))
        if names and index >= len(names):
            raise SegmentationError(f"{what} {index} is out of range for dataset {spec.name!r}, whose images have "
                                    f"{len(names)} channel(s); valid: 0 to {len(names) - 1}, or one of "
                                    f"{', '.join(names)}")
        return index
    if text in names:
        return names.index(text)
    lowered = [n.lower() for n in names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    valid = f"an index from 0, or one of {', '.join(names)}" if names else \
        "an index from 0 (the dataset names no channels)"
    raise SegmentationError(f"{what} {value!r} is not a channel of dataset {spec.name!r}; valid: {valid}")


def field_source(spec: DatasetSpec, record: dict[str, Any]) -> Path:
    """The path a backend is told a field came from (what a mask pattern is formatted with).

    The field's image file; for a channel set (one file per channel), the files' common
    prefix under the image root: ``train/abc`` for ``train/abc_red.png``, ``train/abc_blue.png``
    ..., so ``{stem}`` is ``abc``.
    """
    if spec.image.column is not None:
        return spec.image_paths(record)[0]
    return spec.image_root / spec.image_id(record)


def segment_fields(
    spec: DatasetSpec,
    backend: Backend,
    out: str | os.PathLike[str],
    *,
    cell_channel: int | None = None,
    cell_params: CellParams | None = None,
    frame: pd.DataFrame | None = None,
    workers: int = 1,
    progress: ProgressFn | None = None,
) -> SegmentResult:
    """Segment every field of a dataset and write one label image per field.

    See the module docstring for the files written. The backend labels the nuclei (or, for
    the ``masks`` backend, reads the labels the user has); with ``cell_channel`` whole cells
    are then grown from them on that channel (:func:`~cellclass.data.segment.segment_cells`)
    and ``masks/`` holds the cells, ``nuclei/`` the nuclei.

    Args:
        spec: The dataset of fields.
        backend: The segmentation backend (its channel is set when it is built).
        out: Output folder; created if missing.
        cell_channel: Index of a cytoplasm or membrane channel to grow whole cells on.
        cell_params: Settings of the cell growth (default :class:`CellParams`).
        frame: The rows to segment (default: ``spec.load_manifest()``).
        workers: Processes segmenting fields in parallel (1: this process). Backends of
            :data:`IN_PROCESS_BACKENDS` always run in this process.
        progress: Called as ``progress("segmenting", fields_done, fields_total)``.

    Returns:
        What was written (:class:`SegmentResult`).

    Raises:
        SegmentationError: On ``workers`` below 1, no rows, two fields of one key, a
            manifest column named like an added one, or a field the backend cannot segment
            (the message names its row).
        ImageReadError: When a field cannot be read; the message names its row.
        OutputPathError: When a mask or ``masks.csv`` would replace one of the inputs.
    """
    _check_arguments(workers, cell_channel)
    job = _Job(backend=backend, cell_channel=cell_channel,
               cell_params=(cell_params or CellParams()) if cell_channel is not None else None)
    frame = spec.load_manifest() if frame is None else frame
    if not len(frame):
        raise SegmentationError(f"dataset {spec.name!r} has no field to segment; check its manifest and row filters")
    out = Path(out).resolve()
    added = job.columns
    inherited = [str(c) for c in frame.columns if c != ROW_COLUMN]
    _check_columns(spec, added, inherited)
    todo = _fields(spec, frame)
    _check_outputs(spec, job, out, todo)
    signature = jsonable(job.signature())
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    pending = _not_done(out, todo, signature, spec, job)
    done, total = len(todo) - len(pending), len(todo)
    if done and pending:
        log.info("%d of %d fields already segmented in %s; segmenting the other %d", done, total, out, len(pending))
    elif done:
        log.info("all %d fields already segmented in %s", total, out)
    if progress is not None:
        progress("segmenting", done, total)
    if getattr(backend, "name", None) in IN_PROCESS_BACKENDS and workers > 1:
        log.info("the %s backend runs in this process; workers=%d does not apply to it", backend.name, workers)
        workers = 1
    for item, n_objects in _segment_all(spec, job, out, signature, pending, workers):
        item.n_objects = n_objects
        done += 1
        if progress is not None:
            progress("segmenting", done, total)

    manifest = _assemble(out / "masks.csv", frame, inherited, todo, job)
    result = SegmentResult(out=out, manifest=manifest, n_fields=total, n_processed=len(pending),
                           n_objects=tuple(item.n_objects for item in todo), cells=cell_channel is not None)
    _write_summary(out / "segment.json", spec, signature, result, time.perf_counter() - started)
    log.info("%d objects in %d fields written to %s", result.total, total, out / "masks")
    return result


def _check_arguments(workers: Any, cell_channel: Any) -> None:
    """Refuse a worker count or a cell channel that is not a valid integer."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SegmentationError(f"workers must be an integer >= 1; got {workers!r}")
    if cell_channel is not None and (isinstance(cell_channel, bool) or not isinstance(cell_channel, int)
                                     or cell_channel < 0):
        raise SegmentationError(f"cell_channel must be a channel index >= 0 or None; got {cell_channel!r}")


def _check_columns(spec: DatasetSpec, added: Any, inherited: list[str]) -> None:
    """Refuse a manifest that already has a column masks.csv adds."""
    clash = [c for c in added if c in inherited]
    if clash:
        raise SegmentationError(f"the manifest of {spec.name!r} already has column(s) {', '.join(clash)}, which "
                                f"masks.csv adds; valid: a manifest without them (rename them)")


def _not_done(out: Path, todo: list[Any], signature: Any, spec: DatasetSpec, job: Any) -> list[Any]:
    """The fields without a current done marker; the others take their object count from it."""
    pending = []
    for item in todo:
        marker = _read_done(out, item, signature, spec, job)
        if marker is None:
            pending.append(item)
        else:
            item.n_objects = int(marker["n_objects"])
    return pending


def _write_summary(path: Path, spec: DatasetSpec, signature: Any, result: SegmentResult, seconds: float) -> None:
    """``segment.json``: the settings, the field counts and the objects per field."""
    summary = {
        "dataset": spec.name, "settings": signature, "n_fields": result.n_fields, "n_processed": result.n_processed,
        "objects": {"total": result.total, **result.stats(), "empty_fields": result.n_empty},
        "seconds": round(seconds, 3),
    }
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")


# -- the work ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """What one field becomes: the backend's labels, then cells grown from them if asked."""

    backend: Any
    cell_channel: int | None = None
    cell_params: CellParams | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        if self.cell_channel is None:
            return MASK_COLUMNS
        at = MASK_COLUMNS.index("mask") + 1
        return (*MASK_COLUMNS[:at], "nuclei", *MASK_COLUMNS[at:])

    def signature(self) -> dict[str, Any]:
        return {"backend": describe_backend(self.backend), "cell_channel": self.cell_channel,
                "cell_params": None if self.cell_params is None else asdict(self.cell_params)}

    def outputs(self, image_id: str) -> list[str]:
        """The files a field's segmentation writes, relative to the output folder."""
        mask = mask_path_for(image_id)
        files = [mask.as_posix()]
        if self.cell_channel is not None:
            files.append(("nuclei" / mask.relative_to("masks")).as_posix())
        return files

    def mask_source(self, spec: DatasetSpec, record: dict[str, Any]) -> Path | None:
        """The mask file the ``masks`` backend reads for a field (None for other backends)."""
        mask_path = getattr(self.backend, "mask_path", None)
        return None if mask_path is None else Path(mask_path(field_source(spec, record)))

    def run(self, spec: DatasetSpec, record: dict[str, Any], image: np.ndarray) -> list[np.ndarray]:
        """The field's label images, as :meth:`outputs` names them."""
        labels = self.backend.segment(image, source=field_source(spec, record))
        if self.cell_channel is None:
            return [labels]
        return [segment_cells(labels, image, self.cell_channel, self.cell_params), labels]


@dataclass
class _Field:
    position: int
    record: dict[str, Any]
    image_id: str
    key: str
    n_objects: int = -1


def _fields(spec: DatasetSpec, frame: pd.DataFrame) -> list[_Field]:
    items, seen = [], {}
    for position, record in enumerate(frame.to_dict("records")):
        image_id = spec.image_id(record)
        key = field_key(image_id)
        if key in seen:
            raise SegmentationError(
                f"fields {seen[key]!r} and {image_id!r} have the same key {key!r} (image id less its "
                f"extension), so their masks would collide; valid: one image per field key"
            )
        seen[key] = image_id
        items.append(_Field(position, record, image_id, key))
    return items


def _check_outputs(spec: DatasetSpec, job: _Job, out: Path, items: list[_Field]) -> None:
    """Refuse outputs that would replace an input (the manifest, an image or a mask read) or
    masks that another tool wrote (a simulator's true masks, masks from CellProfiler)."""
    if spec.manifest_path is not None and (out / "masks.csv") == spec.manifest_path:
        raise OutputPathError(f"{str(out / 'masks.csv')!r} is the dataset's own manifest; valid: another "
                              f"output folder")
    for item in items:
        written = {(out / relative).resolve() for relative in job.outputs(item.image_id)}
        source = job.mask_source(spec, item.record)
        read = [*spec.image_paths(item.record), *([] if source is None else [source])]
        for path in read:
            if path.resolve() in written:
                raise OutputPathError(
                    f"segmenting field {item.image_id!r} into {str(out)!r} would replace its input "
                    f"{str(path.resolve())!r}; valid: an output folder whose masks/ is not where the fields or their masks are read from"
                )
    masks = out / "masks"
    if masks.is_dir() and not (out / "segment-parts").is_dir() and any(masks.iterdir()):
        raise OutputPathError(
            f"{str(masks)!r} holds files that no segmentation run wrote (there is no segment-parts/ beside it), "
            f"which would be replaced; valid: a new or empty output folder, or one a segmentation run wrote"
        )


def _marker_path(out: Path, key: str) -> Path:
    base = out / "segment-parts" / key
    return base.with_name(base.name + ".json")


def _sources(spec: DatasetSpec, job: _Job, item: _Field) -> list[list[Any]]:
    """Size and modification time of the field's files (and of a mask read): a change redoes it."""
    paths = [*spec.image_paths(item.record)]
    source = job.mask_source(spec, item.record)
    if source is not None:
        paths.append(source)
    return file_stamps(paths)


def _read_done(out: Path, item: _Field, signature: dict[str, Any], spec: DatasetSpec,
               job: _Job) -> dict[str, Any] | None:
    """The field's done-marker where it is complete and current, else None."""
    try:
        marker = json.loads(_marker_path(out, item.key).read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(marker, dict) or marker.get("version") != _MARKER_VERSION
            or marker.get("settings") != signature or marker.get("sources") != _sources(spec, job, item)
            or not all((out / relative).is_file() for relative in job.outputs(item.image_id))):
        return None
    return marker


_STATE: dict[str, Any] = {}


def _init_worker(spec: DatasetSpec, job: _Job, out: Path, signature: dict[str, Any]) -> None:
    _STATE.update(spec=spec, job=job, out=out, signature=signature)


def _segment_one(position: int, record: dict[str, Any], image_id: str, key: str) -> tuple[int, int]:
    """Segment one field: its label image(s), then its done-marker (in this order)."""
    spec, job, out, signature = _STATE["spec"], _STATE["job"], _STATE["out"], _STATE["signature"]
    item = _Field(position, record, image_id, key)
    sources = _sources(spec, job, item)
    row = record.get(ROW_COLUMN, position + 1)
    try:
        image = spec.read_image(record)
    except ImageReadError as exc:
        raise ImageReadError(f"row {row}: {exc} (run `cellclass validate`)") from None
    try:
        labels = job.run(spec, record, image)
    except SegmentationError as exc:
        raise SegmentationError(f"row {row} (field {image_id!r}): {exc}") from None
    for relative, array in zip(job.outputs(image_id), labels, strict=True):
        write_tiff(out / relative, np.asarray(array, dtype=np.uint16))
    n_objects = int(np.count_nonzero(np.bincount(labels[0].ravel())[1:]))
    marker = {"version": _MARKER_VERSION, "settings": signature, "sources": sources, "n_objects": n_objects}
    atomic_write_text(_marker_path(out, key), json.dumps(marker) + "\n")
    return position, n_objects


def _segment_all(spec: DatasetSpec, job: _Job, out: Path, signature: dict[str, Any], pending: list[_Field],
                 workers: int) -> Iterator[tuple[_Field, int]]:
    """Segment the pending fields, in this process or in a pool with a bounded queue."""
    return map_fields(pending, workers, _init_worker, (spec, job, out, signature), _segment_one, _STATE.clear)


def _assemble(path: Path, frame: pd.DataFrame, inherited: list[str], items: list[_Field], job: _Job) -> Path:
    """Write ``masks.csv``: each field's row, then where its masks are and their object count."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow([*inherited, *job.columns])
        for item in items:
            values = [csv_text(item.record.get(c)) for c in inherited]
            row_number = item.record.get(ROW_COLUMN, item.position + 1)
            writer.writerow([*values, item.key, row_number, *job.outputs(item.image_id), item.n_objects])
    return path
