"""Dataset validation: read every row and every image, report every problem at once.

Validation never modifies or deletes a source file. It names each problem by its
manifest row (1-based data row; the CSV line is one more, for the header), the file and
the reason, so a researcher can fix a dataset in one pass instead of one error per run.
"""

from __future__ import annotations

import difflib
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellclass.data.io import image_exists
from cellclass.data.spec import ROW_COLUMN, DatasetSpec, TaskSpec
from cellclass.errors import ImageReadError, LabelError

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]

_TYPO_MAX_COUNT = 2
_TYPO_MIN_RATIO = 4


@dataclass(frozen=True)
class Problem:
    """One problem found in a dataset.

    Attributes:
        row: 1-based manifest data row, or ``None`` for dataset-wide problems.
        file: Image file concerned, relative to the image root, if any.
        field: What is wrong: ``image``, ``label:<task>``, ``group:<column>``, ``row``.
        reason: Human-readable reason, naming the value received and what is valid.
    """

    row: int | None
    file: str | None
    field: str
    reason: str


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
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not self.problems

    @property
    def bad_rows(self) -> set[int]:
        """Row numbers with at least one problem."""
        return {p.row for p in self.problems if p.row is not None}

    def to_frame(self) -> pd.DataFrame:
        """Problems as a table with columns row, file, field, reason."""
        return pd.DataFrame([asdict(p) for p in self.problems], columns=["row", "file", "field", "reason"])


def validate(
    spec: DatasetSpec,
    *,
    check_images: bool = True,
    workers: int = 4,
    progress: ProgressFn | None = None,
) -> ValidationReport:
    """Check every row of ``spec``'s manifest and, unless told not to, every image.

    Checks: empty or duplicated image paths; group values that cannot be derived; for
    each task, empty labels, labels outside the declared classes, malformed values and
    probable typos (a label seen at most twice that closely resembles a frequent one);
    missing, truncated or undecodable images; channel counts that differ from the
    declared channels (or from the most common count); NaN or Inf pixels.

    Args:
        spec: Dataset to validate.
        check_images: Decode every image (otherwise only metadata is checked).
        workers: Decoding threads (decoders release the GIL).
        progress: Called as ``progress(done, total)`` while images are decoded.
    """
    full = spec.load_manifest(apply_drop=False)
    frame = full
    n_dropped = 0
    if spec.drop_unlabeled:
        frame = full[spec.labeled_mask(full)].reset_index(drop=True)
        n_dropped = len(full) - len(frame)
    report = ValidationReport(n_rows=len(frame), n_dropped=n_dropped, images_checked=check_images)
    problems: list[Problem] = []
    ids = [spec.image_id(r) for r in frame.to_dict("records")]
    problems += _check_paths(frame, ids)
    problems += _check_groups(spec, frame, ids)
    for task in spec.tasks:
        problems += _check_task(spec, task, frame, ids)
    if check_images:
        image_problems, infos = _check_images(spec, frame, ids, workers, progress)
        problems += image_problems
        problems += _check_shapes(spec, frame, ids, infos, report)
    report.problems = sorted(problems, key=lambda p: (p.row is not None, p.row or 0, p.field))
    return report


def _check_paths(frame: pd.DataFrame, ids: list[str]) -> list[Problem]:
    problems = []
    first_seen: dict[str, int] = {}
    for row, image_id in zip(frame[ROW_COLUMN], ids, strict=True):
        if not image_id.strip():
            problems.append(Problem(int(row), None, "image", "empty image path"))
            continue
        if image_id in first_seen:
            problems.append(
                Problem(int(row), image_id, "row", f"duplicate of row {first_seen[image_id]} (same image)")
            )
        else:
            first_seen[image_id] = int(row)
    return problems


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

    def check(i: int) -> tuple[int, Problem | None, ImageInfo | None]:
        record = records[i]
        row = int(record[ROW_COLUMN])
        if not ids[i].strip():
            return i, None, None
        paths = spec.image_paths(record)
        missing = [p for p in paths if not image_exists(p)]
        if missing:
            names = ", ".join(_rel(p, root) for p in missing)
            return i, Problem(row, ids[i], "image", f"missing file {names}"), None
        try:
            array = spec.read_image(record)
        except ImageReadError as exc:
            return i, Problem(row, ids[i], "image", str(exc)), None
        if np.issubdtype(array.dtype, np.floating):
            bad = ~np.isfinite(array)
            if bad.any():
                n_nan = int(np.isnan(array).sum())
                n_inf = int(bad.sum()) - n_nan
                return i, Problem(
                    row, ids[i], "image", f"{n_nan} NaN and {n_inf} Inf pixel(s); pixels must be finite"
                ), ImageInfo(array.shape, str(array.dtype))
        return i, None, ImageInfo(array.shape, str(array.dtype))

    problems: list[Problem] = []
    infos: dict[int, ImageInfo] = {}
    total = len(records)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, (i, problem, info) in enumerate(pool.map(check, range(total)), start=1):
            if problem is not None:
                problems.append(problem)
            if info is not None:
                infos[i] = info
            if progress is not None:
                progress(done, total)
    return problems, infos


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
    for i, info in infos.items():
        row = int(frame[ROW_COLUMN].iloc[i])
        if info.shape[0] != expected:
            problems.append(Problem(
                row, ids[i], "image",
                f"has {info.shape[0]} channel(s) (shape {info.shape}); expected {expected} ({source})",
            ))
        elif info.dtype != main_dtype:
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
    from cellclass.atomic import atomic_path

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
    import os

    return Path(os.path.relpath(path, start)).as_posix()


def problems_summary(report: ValidationReport) -> dict[str, Any]:
    """Counts of problems by field, for a one-line summary."""
    return dict(Counter(p.field for p in report.problems))
