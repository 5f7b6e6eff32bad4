"""Dataset validation: read every row and every image, report every problem at once.

Validation never modifies or deletes a source file. It names each problem by its
manifest row (1-based data row; the CSV line is one more, for the header), the file and
the reason, so a researcher can fix a dataset in one pass instead of one error per run.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellclass.atomic import atomic_path
from cellclass.data.io import image_exists
from cellclass.data.spec import ROW_COLUMN, DatasetSpec, TaskSpec
from cellclass.errors import ImageReadError, LabelError
from cellclass.progress import ProgressFn

log = logging.getLogger(__name__)


PROBLEM_COLUMNS = ["row", "file", "field", "severity", "reason"]
"""Columns of :meth:`ValidationReport.to_frame` (and of ``validate --report``)."""

_TYPO_MAX_COUNT = 2
_TYPO_MIN_RATIO = 4


@dataclass(frozen=True)
class Problem:
    """One problem found in a dataset.

    Attributes:
        row: 1-based manifest data row, or ``None`` for dataset-wide problems.
        file: Image file concerned, relative to the image root, if any.
        field: What is wrong: ``image``, ``path``, ``label:<task>``, ``group:<column>``,
            ``row``, ``manifest``.
        reason: Human-readable reason, naming the value received and what is valid.
        severity: ``error`` (the row cannot be used as it is) or ``warning`` (it can,
            but the dataset is fragile: a path that leaves the data folder).
    """

    row: int | None
    file: str | None
    field: str
    reason: str
    severity: str = "error"


@dataclass
class ImageInfo:
    """What was learned from one decoded image."""

    shape: tuple[int, ...]
    dtype: str


@dataclass
class ValidationReport:
    """Result of :func:`validate`.

    Attributes:
        n_rows: Rows in the manifest (after ``drop_unlabeled``).
        n_dropped: Rows dropped as unlabeled.
        problems: Every problem, in row order.
        images_checked: Whether images were decoded.
        shapes: Count of each image shape seen.
        dtypes: Count of each image dtype seen.
        expected_channels: Channel count images must have.
    """

    n_rows: int
    n_dropped: int = 0
    problems: list[Problem] = field(default_factory=list)
    images_checked: bool = True
    shapes: Counter = field(default_factory=Counter)
    dtypes: Counter = field(default_factory=Counter)
    expected_channels: int | None = None

    @property
    def errors(self) -> list[Problem]:
        """Problems of severity ``error``."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        """Problems of severity ``warning``."""
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """Whether no error was found (warnings allowed)."""
        return not self.errors

    @property
    def bad_rows(self) -> set[int]:
        """Row numbers with at least one error."""
        return {p.row for p in self.errors if p.row is not None}

    def to_frame(self) -> pd.DataFrame:
        """Problems as a table with columns row, file, field, severity, reason."""
        frame = pd.DataFrame([asdict(p) for p in self.problems], columns=PROBLEM_COLUMNS)
        frame["row"] = frame["row"].astype("Int64")  # integers, empty for dataset-wide problems
        return frame

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary and every problem."""
        return {
            "n_rows": self.n_rows,
            "n_dropped": self.n_dropped,
            "ok": self.ok,
            "n_errors": len(self.errors),
            "n_warnings": len(self.warnings),
            "bad_rows": sorted(self.bad_rows),
            "images_checked": self.images_checked,
            "shapes": {"x".join(map(str, shape)): n for shape, n in self.shapes.most_common()},
            "dtypes": dict(self.dtypes.most_common()),
            "expected_channels": self.expected_channels,
            "problems": [asdict(p) for p in self.problems],
        }


def validate(
    spec: DatasetSpec,
    *,
    check_images: bool = True,
    workers: int = 4,
    progress: ProgressFn | None = None,
) -> ValidationReport:
    """Check every row of ``spec``'s manifest and, unless told not to, every image.

    Every problem of a row is reported, not only the first. Checks: a manifest with no
    row; empty image paths; rows repeating another row, or naming its image with other
    labels; paths that leave the data folder (``..``, absolute, a symbolic link out:
    warnings); group values that cannot be derived; for each task, empty labels, labels
    outside the declared classes, malformed values and probable typos (a label seen at
    most twice that closely resembles a frequent one); missing files, folders and broken
    symbolic links where images should be; truncated or undecodable images; channel
    counts that differ from the declared channels (or from the most common count); dtypes
    that differ from the most common one (mixed bit depths); NaN or Inf pixels.

    Args:
        spec: Dataset to validate.
        check_images: Decode every image (otherwise only metadata is checked).
        workers: Decoding threads (decoders release the GIL).
        progress: Called as ``progress("validating", done, total)`` while images are decoded.
    """
    full = spec.load_manifest(apply_drop=False)
    frame = full
    n_dropped = 0
    if spec.drop_unlabeled:
        frame = full[spec.labeled_mask(full)].reset_index(drop=True)
        n_dropped = len(full) - len(frame)
    report = ValidationReport(n_rows=len(frame), n_dropped=n_dropped, images_checked=check_images)
    problems: list[Problem] = []
    if frame.empty:
        problems.append(Problem(None, None, "manifest", _no_rows_reason(spec, len(full), n_dropped)))
    ids = [spec.image_id(r) for r in frame.to_dict("records")]
    problems += _check_paths(spec, frame, ids)
    problems += _check_locations(spec, frame, ids)
    problems += _check_groups(spec, frame, ids)
    for task in spec.tasks:
        problems += _check_task(spec, task, frame, ids)
    if check_images:
        image_problems, infos = _check_images(spec, frame, ids, workers, progress)
        problems += image_problems
        problems += _check_shapes(spec, frame, ids, infos, report)
    report.problems = sorted(problems, key=lambda p: (p.row is not None, p.row or 0, p.severity != "error", p.field))
    return report


def _no_rows_reason(spec: DatasetSpec, n_loaded: int, n_dropped: int) -> str:
    source = str(spec.manifest_path or spec.image_root)
    if n_dropped:
        return f"no row is left: all {n_dropped} rows of {source!r} are unlabeled (--drop-unlabeled)"
    if spec.where:
        return (f"no row is left: no row of {source!r} satisfies {' and '.join(spec.where)!r}; "
                "valid: filters that keep at least one row")
    return f"the manifest {source!r} has no row (a header only); valid: one row per image"


def _check_paths(spec: DatasetSpec, frame: pd.DataFrame, ids: list[str]) -> list[Problem]:
    """Empty image paths, and rows that repeat an earlier row's image."""
    problems = []
    first_seen: dict[str, int] = {}
    label_columns = list(dict.fromkeys(c for t in spec.tasks for c in t.columns))
    labels = frame[label_columns].astype(str).agg("\x1f".join, axis=1).tolist() if len(frame) else []
    source_columns = [c for c in frame.columns if c != ROW_COLUMN and c not in spec.derive]
    whole = frame[source_columns].astype(str).agg("\x1f".join, axis=1).tolist() if len(frame) else []
    for i, (row, image_id) in enumerate(zip(frame[ROW_COLUMN], ids, strict=True)):
        if not image_id.strip():
            problems.append(Problem(int(row), None, "image", "empty image path"))
            continue
        if image_id not in first_seen:
            first_seen[image_id] = i
            continue
        j = first_seen[image_id]
        first = int(frame[ROW_COLUMN].iloc[j])
        if whole[i] == whole[j]:
            reason = f"duplicate of row {first} (the same row again)"
        elif labels[i] == labels[j]:
            reason = f"duplicate of row {first} (same image and labels; other columns differ)"
        else:
            theirs = ", ".join(f"{c}={frame[c].iloc[j]!r}" for c in label_columns)
            ours = ", ".join(f"{c}={frame[c].iloc[i]!r}" for c in label_columns)
            reason = f"same image as row {first} with other labels: {ours} here, {theirs} there"
        problems.append(Problem(int(row), image_id, "row", reason))
    return problems


def _check_locations(spec: DatasetSpec, frame: pd.DataFrame, ids: list[str]) -> list[Problem]:
    """Warnings for image paths that leave the data folder: a copy of the folder would lose them."""
    root = spec.image_root
    problems = []
    for record, image_id in zip(frame.to_dict("records"), ids, strict=True):
        if not image_id.strip():
            continue
        try:
            paths = spec.image_paths(record)
        except ImageReadError:
            continue  # a pattern that cannot be formatted is the image check's problem
        for path in paths:
            reason = _outside_reason(path, root)
            if reason:
                problems.append(Problem(int(record[ROW_COLUMN]), image_id, "path", reason, "warning"))
    return problems


def _outside_reason(path: Path, root: Path) -> str:
    """Why the image file ``path`` (the image root joined with the manifest's text) lies
    outside ``root``; ``""`` when it does not."""
    hint = (f"the dataset depends on a file outside its folder {str(root)!r}; valid: a path inside "
            "it (copy the file in, or point the image root higher)")
    lexical = Path(os.path.normpath(path))
    if not path.is_relative_to(root):  # the manifest held an absolute path elsewhere
        return f"absolute path {str(path)!r} outside the data folder; {hint}"
    if not lexical.is_relative_to(root):
        return f"path {path.relative_to(root).as_posix()!r} leaves the data folder through '..' (to {str(lexical)!r}); {hint}"
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(root):
        return f"path {path.relative_to(root).as_posix()!r} is a symbolic link to {str(target)!r}; {hint}"
    return ""


def _check_groups(spec: DatasetSpec, frame: pd.DataFrame, ids: list[str]) -> list[Problem]:
    problems = []
    for group in spec.groups:
        empty = frame[group].astype(str).str.strip().eq("").to_numpy()
        rule = spec.derive.get(group)
        for i in np.flatnonzero(empty):
            reason = (
                f"cannot derive {group!r} from {rule.source}={frame[rule.source].iloc[i]!r} "
                f"with regex {rule.regex!r}"
                if rule
                else f"empty {group!r}"
            )
            problems.append(Problem(int(frame[ROW_COLUMN].iloc[i]), ids[i], f"group:{group}", reason))
    return problems


def _check_task(spec: DatasetSpec, task: TaskSpec, frame: pd.DataFrame, ids: list[str]) -> list[Problem]:
    problems = []
    parsed: list[tuple[int, str, list[str]]] = []
    for record, image_id in zip(frame.to_dict("records"), ids, strict=True):
        row = int(record[ROW_COLUMN])
        try:
            value = task.parse(record)
        except LabelError as exc:
            problems.append(Problem(row, image_id, f"label:{task.name}", str(exc)))
            continue
        if value is None or (task.type == "multilabel" and not value and not task.indicator_columns):
            cols = ", ".join(task.columns)
            problems.append(Problem(row, image_id, f"label:{task.name}", f"empty label in column(s) {cols}"))
            continue
        parsed.append((row, image_id, value if isinstance(value, list) else [value]))
    counts = Counter(item for _, _, items in parsed for item in items)
    if task.classes:
        valid = set(task.classes)
        for row, image_id, items in parsed:
            for item in items:
                if item not in valid:
                    hint = _closest(item, task.classes)
                    problems.append(Problem(
                        row, image_id, f"label:{task.name}",
                        f"unknown label {item!r}{hint}; valid: {', '.join(task.classes)}",
                    ))
    else:
        suspects = _probable_typos(counts)
        for row, image_id, items in parsed:
            for item in items:
                if item in suspects:
                    problems.append(Problem(
                        row, image_id, f"label:{task.name}",
                        f"unknown label {item!r} (seen {counts[item]}x; probable typo of "
                        f"{suspects[item]!r}, seen {counts[suspects[item]]}x); declare the task's "
                        "classes if it is real",
                    ))
    return problems


def _closest(item: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(item, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _probable_typos(counts: Counter) -> dict[str, str]:
    """Rare labels that closely resemble a frequent one, mapped to that one."""
    frequent = [c for c, n in counts.items() if n > _TYPO_MAX_COUNT]
    out = {}
    for label, n in counts.items():
        if n > _TYPO_MAX_COUNT:
            continue
        for match in difflib.get_close_matches(label, frequent, n=3, cutoff=0.75):
            if counts[match] >= _TYPO_MIN_RATIO * n and not _numeric(label):
                out[label] = match
                break
    return out


def _numeric(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _check_images(
    spec: DatasetSpec,
    frame: pd.DataFrame,
    ids: list[str],
    workers: int,
    progress: ProgressFn | None,
) -> tuple[list[Problem], dict[int, ImageInfo]]:
    records = frame.to_dict("records")
    root = spec.image_root

    def check(i: int) -> tuple[int, list[Problem], ImageInfo | None]:
        record = records[i]
        row = int(record[ROW_COLUMN])
        if not ids[i].strip():
            return i, [], None
        try:
            paths = spec.image_paths(record)
        except ImageReadError as exc:
            return i, [Problem(row, ids[i], "image", str(exc))], None
        file_problems = [Problem(row, ids[i], "image", reason) for reason in _file_reasons(paths, root)]
        if file_problems:
            return i, file_problems, None
        try:
            array = spec.read_image(record)
        except ImageReadError as exc:
            return i, [Problem(row, ids[i], "image", str(exc))], None
        info = ImageInfo(array.shape, str(array.dtype))
        if np.issubdtype(array.dtype, np.floating):
            bad = ~np.isfinite(array)
            if bad.any():
                n_nan = int(np.isnan(array).sum())
                n_inf = int(bad.sum()) - n_nan
                return i, [Problem(
                    row, ids[i], "image", f"{n_nan} NaN and {n_inf} Inf pixel(s); pixels must be finite"
                )], info
        return i, [], info

    problems: list[Problem] = []
    infos: dict[int, ImageInfo] = {}
    total = len(records)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, (i, found, info) in enumerate(pool.map(check, range(total)), start=1):
            problems += found
            if info is not None:
                infos[i] = info
            if progress is not None:
                progress("validating", done, total)
    return problems, infos


def _file_reasons(paths: list[Path], root: Path) -> list[str]:
    """What is wrong with a row's image file(s) before decoding: missing files, folders, broken links."""
    missing, folders, broken = [], [], []
    for path in paths:
        if image_exists(path):  # a file, or an OME-Zarr image folder
            continue
        if path.is_dir():
            folders.append(_rel(path, root))
        elif path.is_symlink():
            broken.append(f"{_rel(path, root)} -> {os.readlink(path)}")
        else:
            missing.append(_rel(path, root))
    reasons = []
    if missing:
        reasons.append(f"missing file {', '.join(missing)}")
    if folders:
        reasons.append(f"{', '.join(folders)} is a folder, not an image file; valid: a path to an image file")
    if broken:
        reasons.append(f"broken symbolic link {', '.join(broken)} (the target does not exist)")
    return reasons


def _check_shapes(
    spec: DatasetSpec,
    frame: pd.DataFrame,
    ids: list[str],
    infos: dict[int, ImageInfo],
    report: ValidationReport,
) -> list[Problem]:
    report.shapes = Counter(info.shape for info in infos.values())
    report.dtypes = Counter(info.dtype for info in infos.values())
    if not infos:
        return []
    declared = len(spec.image.channel_names) if spec.image.channel_names else None
    channel_counts = Counter(info.shape[0] for info in infos.values())
    expected = declared or channel_counts.most_common(1)[0][0]
    report.expected_channels = expected
    source = "declared channels" if declared else "most images"
    main_dtype = report.dtypes.most_common(1)[0][0]
    problems = []
    if len(report.dtypes) > 1:
        mix = ", ".join(f"{dtype} ({n} images)" for dtype, n in report.dtypes.most_common())
        problems.append(Problem(
            None, None, "image",
            f"images have mixed dtypes: {mix}; valid: one dtype (normalization statistics pooled over "
            "different bit depths fit none of them: convert the odd images, or split the dataset)",
        ))
    for i, info in infos.items():
        row = int(frame[ROW_COLUMN].iloc[i])
        if info.shape[0] != expected:
            problems.append(Problem(
                row, ids[i], "image",
                f"has {info.shape[0]} channel(s) (shape {info.shape}); expected {expected} ({source})",
            ))
        if info.dtype != main_dtype:
            problems.append(Problem(
                row, ids[i], "image", f"dtype {info.dtype} differs from the dataset's {main_dtype}"
            ))
    return problems


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def write_clean_manifest(spec: DatasetSpec, report: ValidationReport, out: str | Path) -> Path:
    """Write the manifest's good rows (original columns, original text) atomically.

    Image paths are rewritten relative to the new manifest's folder when it differs from
    the original's, so the clean manifest works where it is written. Source files are
    not touched.
    """
    out = Path(out).resolve()
    frame = spec.load_manifest(apply_drop=True)
    keep = ~frame[ROW_COLUMN].isin(report.bad_rows)
    derived = list(spec.derive)
    clean = frame.loc[keep].drop(columns=[ROW_COLUMN, *[c for c in derived if c in frame]])
    if spec.image.column and spec.image_root != out.parent:
        clean[spec.image.column] = [
            _relpath(spec.image_root / p, out.parent) for p in clean[spec.image.column]
        ]
    with atomic_path(out) as tmp:
        clean.to_csv(tmp, index=False)
    log.info("wrote %d of %d rows to %s", int(keep.sum()), len(frame), out)
    return out


def _relpath(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def problems_summary(report: ValidationReport) -> dict[str, Any]:
    """Counts of problems by field, for a one-line summary."""
    return dict(Counter(p.field for p in report.problems))
