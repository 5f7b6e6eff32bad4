"""Dataset specifications: where a dataset's manifest and images are, and what they mean.

A :class:`DatasetSpec` names the manifest (a CSV with one row per image, or a folder of
class folders), how each row's image file(s) are found, which label *tasks* it carries
and which *group* columns (plate, well, experiment) tie rows together. It is written as
YAML, with every path relative to the YAML file, or built by a preset
(:mod:`cellclass.data.presets`) or from command-line options (:func:`spec_from_manifest`).

Manifests are read as text (``dtype=str``) so labels stay exactly as written: a dose of
``0.82`` is the class ``"0.82"``, never the float ``0.8199999``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from cellclass.atomic import atomic_write_text
from cellclass.data.axes import AxesPolicy
from cellclass.data.io import (
    IMAGE_EXTENSIONS,
    expand_pattern,
    read_channel_set,
    read_image,
)
from cellclass.data.plate import plate_manifest
from cellclass.errors import ImageReadError, LabelError, SpecError
from cellclass.textfiles import UTF8_HINT, load_yaml, utf8_position

TASK_TYPES = ("single", "multilabel", "binary")
ROW_COLUMN = "_row"
"""Column added to every loaded manifest: the 1-based data row number in the source file."""

_POSITIVE = {"1", "1.0", "true", "yes", "y", "pos", "positive", "t"}
_NEGATIVE = {"0", "0.0", "false", "no", "n", "neg", "negative", "f"}


@dataclass
class TaskSpec:
    """One label task.

    Attributes:
        name: Task name used everywhere downstream (metrics, heads, checkpoints).
        columns: Source column(s). A ``single`` task with several columns joins their
            values with ``"+"`` (BPS particle and dose: ``"Fe+0.82"``). A ``multilabel``
            task has one column holding delimited labels, or one 0/1 column per class.
        type: ``single`` (one class per row), ``multilabel`` (any number of classes) or
            ``binary`` (two classes, values such as 0/1, true/false, yes/no).
        delimiter: Separator of a delimited multi-label column (HPA: ``" "``).
        classes: Declared class names, in order. Values outside them are errors. When
            omitted, classes are the sorted distinct values of the whole manifest.
        values: ``names`` (labels are class names) or ``indices`` (labels are 0-based
            indices into ``classes``, as HPA's ``Target``).
    """

    name: str
    columns: list[str]
    type: str = "single"
    delimiter: str | None = None
    classes: list[str] | None = None
    values: str = "names"

    def __post_init__(self) -> None:
        if isinstance(self.columns, str):
            self.columns = [self.columns]
        if self.type not in TASK_TYPES:
            raise SpecError(
                f"task {self.name!r} has an invalid type {self.type!r}; valid: {', '.join(TASK_TYPES)}"
            )
        if not self.columns:
            raise SpecError(f"task {self.name!r} names no column")
        if self.values not in ("names", "indices"):
            raise SpecError(
                f"task {self.name!r} has invalid values {self.values!r}; valid: names, indices"
            )
        if self.values == "indices" and not self.classes:
            raise SpecError(f"task {self.name!r} uses values: indices but declares no classes")
        if self.type == "binary" and self.classes is None:
            self.classes = ["0", "1"]
        if self.type == "multilabel" and len(self.columns) == 1 and self.delimiter is None:
            self.delimiter = " "

    @property
    def indicator_columns(self) -> bool:
        """Whether this multi-label task stores one 0/1 column per class."""
        return self.type == "multilabel" and len(self.columns) > 1

    def parse(self, row: Mapping[str, Any]) -> str | list[str] | None:
        """Return this task's label(s) of one manifest row.

        Returns:
            A class name for single and binary tasks, a list of class names for
            multi-label tasks, or ``None`` when the label is empty.

        Raises:
            LabelError: When a value cannot be interpreted (an index out of range, a binary
                value that is neither positive nor negative, a non-0/1 indicator).
        """
        if self.indicator_columns:
            out = []
            for col in self.columns:
                value = str(row[col]).strip().lower()
                if value in _POSITIVE:
                    out.append(col)
                elif value not in _NEGATIVE:
                    raise LabelError(
                        f"column {col!r} of task {self.name!r} holds {row[col]!r}; valid: 0 or 1"
                    )
            return out
        values = [str(row[col]).strip() for col in self.columns]
        if any(v == "" or v.lower() == "nan" for v in values):
            return None
        if self.type == "multilabel":
            items = [v for v in re.split(self._split_pattern, values[0]) if v != ""]
            return [self._name(v) for v in items]
        if self.type == "binary":
            value = values[0].lower()
            if value in _POSITIVE:
                return self.classes[1]
            if value in _NEGATIVE:
                return self.classes[0]
            if values[0] in self.classes:
                return values[0]
            raise LabelError(
                f"task {self.name!r} (binary) got {values[0]!r}; valid: 0/1, true/false, "
                f"yes/no or {', '.join(self.classes)}"
            )
        return self._name("+".join(values))

    @property
    def _split_pattern(self) -> str:
        return r"\s+" if self.delimiter in (" ", None) else re.escape(self.delimiter)

    def _name(self, value: str) -> str:
        if self.values == "names":
            return value
        try:
            index = int(value)
        except ValueError:
            raise LabelError(
                f"task {self.name!r} expects class indices, got {value!r}; "
                f"valid: integers 0..{len(self.classes) - 1}"
            ) from None
        if not 0 <= index < len(self.classes):
            raise LabelError(
                f"task {self.name!r} got class index {index}; valid: 0..{len(self.classes) - 1}"
            )
        return self.classes[index]


@dataclass
class ImageSpec:
    """How a manifest row points to its image file(s), and how they are read.

    Exactly one of ``column`` (a column holding a path per row) and ``pattern`` (a
    template such as ``"train/{Id}_{channel}.png"``, formatted with the row's fields and
    once per channel key) must be given. Paths are relative to ``root``, itself relative
    to the spec's folder.

    Attributes:
        column: Manifest column holding each row's image path.
        pattern: Template of one file per channel (multi-file channel sets).
        root: Folder the paths are relative to.
        channels: Channel names, in order. With ``pattern``, also the values substituted
            for ``{channel}`` unless ``channel_keys`` is given.
        channel_keys: Values substituted for ``{channel}`` (RxRx1: ``1`` .. ``6``).
        channels_select: Channels to keep, by name, in this order: with ``pattern``,
            names of ``channels`` (only their files are read); with ``column``, the
            files' declared channel names (OME), else ``channels``.
        z: What to do with a Z stack: ``max``, ``mean``, ``sum``, ``min``, ``middle`` or a
            0-based slice index (see :mod:`cellclass.data.axes`); None refuses Z stacks.
        t: The same for a time series.
        series: Which series (OME image, position) of files holding several.
        series_column: Manifest column holding each row's series index instead (one row
            per position of a multi-position file).
    """

    column: str | None = None
    pattern: str | None = None
    root: str = "."
    channels: list[str] | None = None
    channel_keys: list[str] | None = None
    channels_select: list[str] | None = None
    z: str | int | None = None
    t: str | int | None = None
    series: int | None = None
    series_column: str | None = None

    def __post_init__(self) -> None:
        if (self.column is None) == (self.pattern is None):
            raise SpecError(
                "image spec needs exactly one of 'column' (a path per row) and 'pattern' "
                f"(one file per channel); got column={self.column!r}, pattern={self.pattern!r}"
            )
        if self.pattern is not None:
            if "{channel}" not in self.pattern:
                raise SpecError(f"image pattern {self.pattern!r} has no '{{channel}}' field")
            if not self.channels:
                raise SpecError(f"image pattern {self.pattern!r} needs a list of channels")
        if self.channel_keys is not None and len(self.channel_keys) != len(self.channels or []):
            raise SpecError(
                f"image spec has {len(self.channel_keys)} channel_keys for "
                f"{len(self.channels or [])} channels; give one key per channel"
            )
        if isinstance(self.channels_select, str):
            self.channels_select = [self.channels_select]
        policy = AxesPolicy(z=self.z, t=self.t, series=self.series, select=self.channels_select)
        self.z, self.t, self.series = policy.z, policy.t, policy.series
        if self.channels_select is not None:
            self.channels_select = list(policy.select or ())
            unknown = [n for n in self.channels_select if n not in (self.channels or [])]
            if self.pattern is not None and unknown:
                raise SpecError(
                    f"image.channels_select names {', '.join(unknown)}, not among the channels; "
                    f"valid: {', '.join(self.channels or [])}"
                )
        if self.series is not None and self.series_column is not None:
            raise SpecError(
                f"image spec gives both series={self.series} and series_column="
                f"{self.series_column!r}; give one"
            )

    @property
    def pattern_fields(self) -> list[str]:
        """Manifest fields a pattern needs (all but ``channel``)."""
        if self.pattern is None:
            return []
        return [f for f in re.findall(r"{(\w+)", self.pattern) if f != "channel"]

    @property
    def channel_names(self) -> list[str] | None:
        """Names of the channels an image is read with (after ``channels_select``)."""
        return list(self.channels_select) if self.channels_select else self.channels

    def axes_policy(self, row: Mapping[str, Any] | None = None) -> AxesPolicy:
        """How one row's file(s) are read: Z, T, series and channel selection.

        Raises:
            SpecError: When z, t or series hold an invalid value.
            ImageReadError: When the row's ``series_column`` value is not an index.
        """
        series = self.series
        if self.series_column is not None and row is not None:
            value = str(row[self.series_column]).strip()
            if not value.isdigit():
                raise ImageReadError(
                    f"column {self.series_column!r} holds {value!r}; valid: a 0-based series "
                    f"index (0, 1, ...)"
                )
            series = int(value)
        select = self.channels_select if self.pattern is None else None
        # Built once per setting, not once per image read: building it would dominate a fast read.
        key = (self.z, self.t, series, tuple(select or ()), tuple(self.channels or ()))
        cached = self.__dict__.get("_policy")
        if cached is None or cached[0] != key:
            cached = (key, AxesPolicy(z=self.z, t=self.t, series=series, select=select, names=self.channels))
            self.__dict__["_policy"] = cached
        return cached[1]

    def with_defaults(self, policy: AxesPolicy) -> ImageSpec:
        """A copy that takes z, t, series and channels_select from ``policy`` where this
        spec leaves them unset (a model's recorded choice applied to another dataset)."""
        unset = {"z": policy.z, "t": policy.t, "channels_select": policy.select}
        if self.series_column is None:
            unset["series"] = policy.series
        changes = {k: (list(v) if k == "channels_select" else v) for k, v in unset.items()
                   if v is not None and getattr(self, k) is None}
        return dataclasses.replace(self, **changes) if changes else self


@dataclass
class DerivedColumn:
    """A column computed from another with a regular expression's first group.

    BPS file names carry their plate and well: ``P242_73665006707-A6_003_013_proj.tif``.
    """

    source: str
    regex: str

    def __post_init__(self) -> None:
        try:
            compiled = re.compile(self.regex)
        except re.error as exc:
            raise SpecError(f"derived column regex {self.regex!r} is invalid: {exc}") from None
        if compiled.groups < 1:
            raise SpecError(f"derived column regex {self.regex!r} needs a capture group")


@dataclass
class PlateSpec:
    """How a ``layout: plate`` dataset lists its rows (see :mod:`cellclass.data.plate`).

    Attributes:
        plates: OME-Zarr plate folders relative to ``image.root``; None: ``image.root``
            itself if it is a plate, else every plate folder in it.
        per: ``field`` (one row per field of view) or ``well`` (one per well, its first
            field).
        well_column: The labels CSV's well column (``A1``, ``A01``, ``A/1``).
        plate_column: The labels CSV's plate column, where it has one; without it its
            rows apply to every plate.
    """

    plates: list[str] | None = None
    per: str = "field"
    well_column: str = "well"
    plate_column: str = "plate"

    def __post_init__(self) -> None:
        if isinstance(self.plates, str):
            self.plates = [self.plates]
        if self.per not in ("field", "well"):
            raise SpecError(f"plate.per {self.per!r} is invalid; valid: field, well")


@dataclass
class ControlSpec:
    """Rows that form a negative control, such as BPS's sham-irradiated (0 Gy) cells."""

    column: str
    equals: str
    description: str = "control"

    def mask(self, frame: pd.DataFrame) -> np.ndarray:
        """Boolean mask of the control rows; numeric columns compare as numbers."""
        values = frame[self.column].astype(str).str.strip()
        target = pd.to_numeric(pd.Series([self.equals]), errors="coerce").iloc[0]
        numeric = pd.to_numeric(values, errors="coerce")
        if not np.isnan(target) and numeric.notna().any():
            return (numeric == target).to_numpy()
        return (values == str(self.equals)).to_numpy()


_OPERATORS = ("==", "!=", "<=", ">=", "<", ">")


def parse_where(expression: str) -> tuple[str, str, str]:
    """Split a row filter such as ``dose_Gy > 0`` into ``(column, operator, value)``.

    Raises:
        SpecError: When no operator is found.
    """
    match = re.match(r"^\s*([^<>=!]+?)\s*(==|!=|<=|>=|<|>)\s*(.*?)\s*$", expression)
    if not match or not match.group(3):
        raise SpecError(
            f"row filter {expression!r} is invalid; valid: 'COLUMN OP VALUE' with OP one of "
            f"{', '.join(_OPERATORS)}, e.g. 'dose_Gy > 0'"
        )
    return match.group(1), match.group(2), match.group(3).strip("'\"")


def where_mask(frame: pd.DataFrame, expression: str) -> np.ndarray:
    """Rows of ``frame`` that satisfy one filter; numbers compare as numbers."""
    column, op, value = parse_where(expression)
    if column not in frame.columns:
        raise SpecError(f"row filter {expression!r} names no column {column!r}; columns: {', '.join(frame.columns)}")
    text = frame[column].astype(str).str.strip()
    numeric = pd.to_numeric(text, errors="coerce")
    target = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
    if not np.isnan(target) and numeric.notna().all():
        left, right = numeric, target
    elif op in ("==", "!="):
        left, right = text, value
    else:
        raise SpecError(f"row filter {expression!r} compares column {column!r}, which is not numeric, with {op}")
    result = {"==": left == right, "!=": left != right, "<": left < right, "<=": left <= right,
              ">": left > right, ">=": left >= right}[op]
    return np.asarray(result, dtype=bool)


@dataclass
class DatasetSpec:
    """Everything cellclass needs to know about a dataset.

    Attributes:
        name: Dataset name shown in reports.
        manifest: Manifest CSV path relative to ``base_dir``; ``None`` with
            ``layout="folder"``.
        image: How rows point to images.
        tasks: Label tasks, in order.
        groups: Group columns (after derivation) that splits keep on one side.
        layout: ``csv`` (a manifest file), ``folder`` (one sub-folder per class under
            ``image.root``; the manifest is built by listing them) or ``plate`` (OME-Zarr
            plates under ``image.root``, one row per field; ``manifest``, if given, is a CSV
            of labels keyed by well; see :mod:`cellclass.data.plate`).
        derive: Columns computed from others by regex (plate, well from file names).
        split_column: Column holding a predefined split (``train``/``val``/``test``).
        drop_unlabeled: Drop rows whose labels are all empty instead of reporting them.
        controls: Negative-control rows checked by ``inspect``.
        where: Row filters (``"dose_Gy > 0"``), all of which a row must satisfy; the
            ``_row`` numbers still refer to the manifest.
        preset: Name of the preset that built this spec, if any.
        plate: How a ``plate`` layout lists its rows (:class:`PlateSpec`).
        base_dir: Folder relative paths start from (the YAML file's folder). Not saved.
    """

    name: str
    image: ImageSpec
    tasks: list[TaskSpec]
    manifest: str | None = None
    groups: list[str] = field(default_factory=list)
    layout: str = "csv"
    derive: dict[str, DerivedColumn] = field(default_factory=dict)
    split_column: str | None = None
    drop_unlabeled: bool = False
    controls: list[ControlSpec] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    preset: str | None = None
    plate: PlateSpec | None = None
    base_dir: Path = field(default_factory=Path.cwd)

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir)
        if self.layout not in ("csv", "folder", "plate"):
            raise SpecError(f"layout {self.layout!r} is invalid; valid: csv, folder, plate")
        if isinstance(self.plate, Mapping):
            self.plate = PlateSpec(**_checked("plate", self.plate, PlateSpec))
        if self.layout == "csv" and not self.manifest:
            raise SpecError("a csv-layout spec needs 'manifest' (path of the CSV)")
        if not self.tasks:
            raise SpecError(f"dataset {self.name!r} declares no label task")
        for expression in self.where:
            parse_where(expression)
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SpecError(f"dataset {self.name!r} declares task(s) {dupes} more than once")

    # -- paths ------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path | None:
        """Absolute path of the manifest file, if the layout has one."""
        return None if self.manifest is None else (self.base_dir / self.manifest).resolve()

    @property
    def image_root(self) -> Path:
        """Absolute folder image paths are relative to."""
        return (self.base_dir / self.image.root).resolve()

    @property
    def task_names(self) -> list[str]:
        """Names of the declared tasks, in order."""
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskSpec:
        """Return the task called ``name``.

        Raises:
            SpecError: When no such task exists; the message lists the valid ones.
        """
        for t in self.tasks:
            if t.name == name:
                return t
        raise SpecError(
            f"dataset {self.name!r} has no task {name!r}; valid: {', '.join(self.task_names)}"
        )

    def select_tasks(self, names: Sequence[str] | None) -> DatasetSpec:
        """Return a copy restricted to the named tasks (all when ``names`` is empty)."""
        if not names:
            return self
        return dataclasses.replace(self, tasks=[self.task(n) for n in names])

    # -- manifest ---------------------------------------------------------------------
    def required_columns(self, *, labels: bool = True) -> list[str]:
        """Source columns the manifest must have (the label columns only when ``labels``)."""
        cols: list[str] = []
        if self.image.column:
            cols.append(self.image.column)
        cols += self.image.pattern_fields
        if self.image.series_column:
            cols.append(self.image.series_column)
        for t in self.tasks if labels else ():
            cols += t.columns
        cols += [d.source for d in self.derive.values()]
        cols += [g for g in self.groups if g not in self.derive]
        if self.split_column:
            cols.append(self.split_column)
        return list(dict.fromkeys(c for c in cols if c not in self.derive))

    def load_manifest(self, *, apply_drop: bool = True, labels: bool = True) -> pd.DataFrame:
        """Read the manifest as text, add derived columns and the ``_row`` number.

        Args:
            apply_drop: Drop unlabeled rows when the spec says so.
            labels: Require the label columns. ``False`` reads a pool of images still to be
                labelled: a label column it lacks is added empty, and no row is dropped as
                unlabeled.

        Raises:
            SpecError: When the manifest is missing, empty (no header), not UTF-8, not
                valid CSV, or lacks a required column.
        """
        if self.layout == "folder":
            frame = self._scan_folder()
        elif self.layout == "plate":
            frame = self._scan_plates()
        else:
            path = self.manifest_path
            if not path.is_file():
                raise SpecError(f"manifest {str(path)!r} of dataset {self.name!r} does not exist")
            frame = read_manifest_csv(path)
        missing = [c for c in self.required_columns(labels=labels) if c not in frame.columns]
        if missing:
            raise SpecError(
                f"manifest {str(self.manifest_path or self.image_root)!r} lacks column(s) "
                f"{missing}; it has: {', '.join(map(str, frame.columns))}"
            )
        for column in [c for t in self.tasks for c in t.columns if c not in frame.columns]:
            frame[column] = ""  # only without labels: required columns were checked above
        frame.insert(0, ROW_COLUMN, np.arange(1, len(frame) + 1))
        for name, rule in self.derive.items():
            extracted = frame[rule.source].astype(str).str.extract(rule.regex, expand=False)
            if isinstance(extracted, pd.DataFrame):
                extracted = extracted.iloc[:, 0]
            frame[name] = extracted.fillna("").astype(str)
        for expression in self.where:
            frame = frame[where_mask(frame, expression)].reset_index(drop=True)
        if apply_drop and labels and self.drop_unlabeled:
            frame = frame[self.labeled_mask(frame)].reset_index(drop=True)
        return frame

    def labeled_mask(self, frame: pd.DataFrame) -> np.ndarray:
        """Rows where at least one task column is non-empty."""
        mask = np.zeros(len(frame), dtype=bool)
        for t in self.tasks:
            for col in t.columns:
                mask |= frame[col].astype(str).str.strip().ne("").to_numpy()
        return mask

    def _scan_plates(self) -> pd.DataFrame:
        plate = self.plate or PlateSpec()
        return plate_manifest(self.image_root, plates=plate.plates, labels=self.manifest_path, per=plate.per,
                              well_column=plate.well_column, plate_column=plate.plate_column)

    def _scan_folder(self) -> pd.DataFrame:
        root = self.image_root
        if not root.is_dir():
            raise SpecError(f"image folder {str(root)!r} of dataset {self.name!r} does not exist")
        column = self.image.column or "filename"
        label_col = self.tasks[0].columns[0]
        rows = []
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(class_dir.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    rows.append({column: f.relative_to(root).as_posix(), label_col: class_dir.name})
        if not rows:
            raise SpecError(
                f"folder {str(root)!r} holds no class sub-folder with images "
                f"(extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
        return pd.DataFrame(rows, dtype=str)

    # -- rows -------------------------------------------------------------------------
    def image_paths(self, row: Mapping[str, Any]) -> list[Path]:
        """Absolute path(s) of one row's image: one file, or one per channel."""
        root = self.image_root
        if self.image.column is not None:
            return [root / str(row[self.image.column])]
        keys = self.image.channel_keys or self.image.channels
        if self.image.channels_select:
            keys = [keys[self.image.channels.index(n)] for n in self.image.channels_select]
        return [root / p for p in expand_pattern(self.image.pattern, row, keys)]

    def image_id(self, row: Mapping[str, Any]) -> str:
        """A stable identifier of one row's image, relative to the image root."""
        if self.image.column is not None:
            return str(row[self.image.column])
        # The part of the pattern before the channel, less a trailing "_" or "_w":
        # "train/{Id}_{channel}.png" -> "train/abc"; "{well}_s{site}_w{channel}.png" -> "B03_s1".
        prefix = self.image.pattern.split("{channel}")[0]
        prefix = re.sub(r"[_\-.][A-Za-z]?$", "", prefix)
        return prefix.format(**{k: row[k] for k in self.image.pattern_fields})

    def read_image(self, row: Mapping[str, Any]) -> np.ndarray:
        """Read one row's image as ``(C, H, W)`` in the file's dtype.

        Z, T, series and channels are read as the image section says
        (:meth:`ImageSpec.axes_policy`).

        Raises:
            StackError: When a file holds a Z stack, a time series or several series and
                the spec does not say how to read it.
            ImageReadError: When a file cannot be read.
        """
        paths = self.image_paths(row)
        policy = self.image.axes_policy(row)
        if self.image.pattern is not None:
            return read_channel_set(paths, axes=policy)
        return read_image(paths[0], axes=policy)

    def labels(self, frame: pd.DataFrame, task: str) -> list[str | list[str] | None]:
        """Parse one task's labels for every row of ``frame``.

        Raises:
            LabelError: When a value cannot be parsed; the message names the row.
        """
        spec = self.task(task)
        out = []
        for record in frame.to_dict("records"):
            try:
                out.append(spec.parse(record))
            except LabelError as exc:
                raise LabelError(f"row {record.get(ROW_COLUMN, '?')}: {exc}") from None
        return out

    # -- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dict of this spec, ready for YAML (``base_dir`` left out)."""
        data = dataclasses.asdict(self)
        data.pop("base_dir")
        data["derive"] = {k: dataclasses.asdict(v) for k, v in self.derive.items()}
        return _drop_empty(data)

    def to_yaml(self, path: str | Path) -> Path:
        """Write this spec as YAML with paths relative to the YAML's folder."""
        path = Path(path).resolve()
        data = self.to_dict()
        rel = Path(_relpath(self.base_dir, path.parent))
        if data.get("manifest"):
            data["manifest"] = (rel / data["manifest"]).as_posix()
        data["image"]["root"] = (rel / self.image.root).as_posix()
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | Path) -> DatasetSpec:
        """Build a spec from a plain dict (as read from YAML).

        Raises:
            SpecError: When a key is unknown or a value invalid.
        """
        data = dict(data)
        _check_keys("dataset spec", data, {f.name for f in dataclasses.fields(cls)} - {"base_dir"})
        try:
            image = ImageSpec(**_checked("image", data.pop("image"), ImageSpec))
            tasks = [
                TaskSpec(**_checked(f"task {i}", t, TaskSpec))
                for i, t in enumerate(data.pop("tasks") or [])
            ]
            derive = {
                k: DerivedColumn(**_checked(f"derive.{k}", v, DerivedColumn))
                for k, v in (data.pop("derive", None) or {}).items()
            }
            controls = [
                ControlSpec(**_checked("control", c, ControlSpec))
                for c in data.pop("controls", None) or []
            ]
        except KeyError as exc:
            raise SpecError(f"dataset spec lacks required key {exc}") from None
        if "name" not in data:
            raise SpecError("dataset spec lacks required key 'name'")
        return cls(
            image=image, tasks=tasks, derive=derive, controls=controls, base_dir=Path(base_dir), **data
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> DatasetSpec:
        """Read a spec from YAML; relative paths start at the YAML file's folder."""
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"dataset spec {str(path)!r} does not exist")
        data = load_yaml(path, "dataset spec", SpecError)
        if not isinstance(data, dict):
            raise SpecError(f"dataset spec {str(path)!r} must hold a mapping, got {type(data).__name__}")
        return cls.from_dict(data, base_dir=path.resolve().parent)


def read_manifest_csv(path: Path) -> pd.DataFrame:
    """Read a manifest (a CSV; tab-separated for ``.tsv`` and ``.tab``) as text columns.

    Raises:
        SpecError: When the file is empty (no header), not UTF-8 (the message names the
            data row and line of the first bad byte) or not valid CSV.
    """
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    data = path.read_bytes()
    valid = "valid: a CSV with a header row of column names and one row per image"
    if not data.strip():
        raise SpecError(f"manifest {str(path)!r} is empty ({len(data)} bytes); {valid}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, column = utf8_position(data, exc.start)
        row = _data_row_at(data[: exc.start], sep)
        where = f"data row {row} (line {line}, column {column})" if row else f"the header (line {line}, column {column})"
        raise SpecError(f"manifest {str(path)!r} is not UTF-8 text: {where} holds the byte "
                        f"0x{data[exc.start]:02x}; {UTF8_HINT}") from None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            # index_col=False: a row with more fields than the header must not turn the
            # first column into an index and shift every value one column to the left.
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, sep=sep, index_col=False)
    except pd.errors.EmptyDataError:
        raise SpecError(f"manifest {str(path)!r} holds no header row; {valid}") from None
    except pd.errors.ParserError as exc:
        reason = str(exc).strip().splitlines()[-1].removeprefix("Error tokenizing data. C error: ")
        raise SpecError(f"manifest {str(path)!r} is not valid CSV: {reason}; valid: the same number of "
                        f"fields in every row (quote a field that holds {sep!r})") from None
    if any(issubclass(w.category, pd.errors.ParserWarning) for w in caught):
        _check_extra_fields(path, text, sep)
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _check_extra_fields(path: Path, text: str, sep: str) -> None:
    """Refuse a row with more non-empty fields than the header (empty trailing ones are ignored)."""
    reader = csv.reader(io.StringIO(text), delimiter=sep)
    header = next(reader)
    row = 0
    for record in reader:
        if not record:
            continue
        row += 1
        if len(record) > len(header) and any(v.strip() for v in record[len(header):]):
            raise SpecError(
                f"manifest {str(path)!r}: data row {row} (line {reader.line_num}) has {len(record)} fields, the "
                f"header {len(header)}; valid: one field per header column (quote a field that holds {sep!r})"
            )


def _data_row_at(before: bytes, sep: str) -> int:
    """Data row (1-based; 0 for the header) of the line that follows the complete lines of ``before``."""
    complete = before[: before.rfind(b"\n") + 1].decode("utf-8-sig")
    return sum(1 for record in csv.reader(io.StringIO(complete), delimiter=sep) if record)


def parse_task_option(option: str) -> tuple[str, str, str]:
    """Parse a ``--task`` option: ``COLUMN``, ``COLUMN:TYPE`` or ``NAME=COLUMN[:TYPE]``.

    Returns:
        ``(name, column, type)``.
    """
    name, _, rest = option.rpartition("=")
    column, _, ttype = rest.partition(":")
    ttype = ttype or "single"
    if ttype not in TASK_TYPES:
        raise SpecError(f"--task {option!r} has an invalid type {ttype!r}; valid: {', '.join(TASK_TYPES)}")
    if not column:
        raise SpecError(f"--task {option!r} names no column")
    return (name or column), column, ttype


def spec_from_manifest(
    manifest: str | Path,
    *,
    image_col: str,
    tasks: Iterable[str],
    groups: Iterable[str] = (),
    delimiter: str | None = None,
    split_column: str | None = None,
    drop_unlabeled: bool = False,
    name: str | None = None,
) -> DatasetSpec:
    """Build a spec from command-line style options.

    Image paths are relative to the manifest's folder.

    Args:
        manifest: CSV path.
        image_col: Column of image paths.
        tasks: ``--task`` options (see :func:`parse_task_option`).
        groups: Group columns.
        delimiter: Separator of delimited multi-label columns.
        split_column: Column holding a predefined split.
        drop_unlabeled: Drop rows with no label at all.
        name: Dataset name (default: the manifest folder's name).
    """
    manifest = Path(manifest).resolve()
    task_specs = []
    for option in tasks:
        tname, column, ttype = parse_task_option(option)
        task_specs.append(
            TaskSpec(name=tname, columns=[column], type=ttype,
                     delimiter=delimiter if ttype == "multilabel" else None)
        )
    if not task_specs:
        raise SpecError(f"manifest {str(manifest)!r} given without --task; name at least one label column")
    return DatasetSpec(
        name=name or manifest.parent.name,
        manifest=manifest.name,
        image=ImageSpec(column=image_col),
        tasks=task_specs,
        groups=list(groups),
        split_column=split_column,
        drop_unlabeled=drop_unlabeled,
        base_dir=manifest.parent,
    )


def _checked(where: str, value: Any, cls: type) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{where} must be a mapping, got {value!r}")
    _check_keys(where, value, {f.name for f in dataclasses.fields(cls)})
    return dict(value)


def _check_keys(where: str, data: Mapping[str, Any], valid: set[str]) -> None:
    unknown = sorted(set(data) - valid)
    if unknown:
        raise SpecError(f"{where} has unknown key(s) {unknown}; valid: {', '.join(sorted(valid))}")


def _drop_empty(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _drop_empty(v) for k, v in data.items() if v not in (None, [], {})}
    if isinstance(data, list):
        return [_drop_empty(v) for v in data]
    return data


def _relpath(target: Path, start: Path) -> str:
    return os.path.relpath(Path(target).resolve(), start.resolve())
