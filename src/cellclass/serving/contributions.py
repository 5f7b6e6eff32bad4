"""Labelled images contributed through the API: validation, storage, review and export.

A contribution is an image, a label per task of the served model, and optional metadata.
Labels are checked against the tasks and classes the model was trained on; the image is
stored content-addressed (:mod:`cellclass.serving.files`) and indexed in the database
(:mod:`cellclass.serving.database`) with status ``pending``. Curators accept or reject it.
:meth:`ContributionStore.export` writes the accepted ones as a dataset that
``cellclass train`` reads: ``images/``, ``manifest.csv`` (the training spec's image column
and one column per task) and ``dataset.yaml``.

Nothing is half-written: the file is stored atomically before the row is inserted in a
transaction, and a file that no row refers to after a failed insert is removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cellclass.atomic import atomic_path, atomic_write_bytes
from cellclass.data.spec import DatasetSpec, ImageSpec, TaskSpec
from cellclass.errors import ExportError, NotFoundError, UploadError
from cellclass.serving.database import Database, Transaction
from cellclass.serving.files import FileStore, LocalFileStore
from cellclass.serving.keys import now
from cellclass.serving.uploads import Upload

log = logging.getLogger(__name__)

STATUSES = ("pending", "accepted", "rejected")

_COLUMNS = ("id, dataset_id, sha256, extension, filename, size_bytes, shape, dtype, labels, metadata, "
            "status, contributor, model, created_at, reviewed_at, reviewed_by, review_note")


def dataset_definition(spec: Mapping[str, Any] | None, encoders: Mapping[str, Any],
                       channels: Sequence[str]) -> dict[str, Any]:
    """What contributions to a model must look like: its tasks, classes and channels.

    Args:
        spec: The training dataset spec (``DatasetSpec.to_dict()``, kept in checkpoints).
        encoders: Task name to :class:`cellclass.data.labels.TaskEncoder`.
        channels: The model's channel names.
    """
    spec = spec or {}
    return {
        "name": str(spec.get("name") or "dataset"),
        "image_column": str((spec.get("image") or {}).get("column") or "image"),
        "channels": list(channels),
        "groups": list(spec.get("groups") or []),
        "tasks": [{"name": e.name, "type": e.type, "classes": list(e.classes)} for e in encoders.values()],
    }


def dataset_id(definition: Mapping[str, Any]) -> str:
    """A short stable identifier of a dataset definition."""
    canonical = json.dumps(definition, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def validate_labels(labels: Any, tasks: Sequence[Mapping[str, Any]]) -> dict[str, str | list[str]]:
    """Check a contribution's labels against the model's tasks; return them normalized.

    Single-label and binary tasks take one class name (numbers are read as text, so a
    dose of ``0.82`` is the class ``"0.82"``); multi-label tasks take a list of class
    names (possibly empty), kept in class order without repeats.

    Raises:
        UploadError: When ``labels`` is not a JSON object, names an unknown task, misses a
            task, or gives a label that is not a class; the message names the culprit and
            the valid values.
    """
    names = [t["name"] for t in tasks]
    example = json.dumps({t["name"]: (t["classes"][:1] if t["type"] == "multilabel" else t["classes"][0])
                          for t in tasks})
    if not isinstance(labels, dict) or not labels:
        raise UploadError(
            f"labels must be a non-empty JSON object of task to label(s), got {labels!r}; "
            f"valid: e.g. {example}"
        )
    unknown = [k for k in labels if k not in names]
    if unknown:
        raise UploadError(f"labels name unknown task(s) {unknown}; valid tasks: {', '.join(names)}")
    missing = [n for n in names if n not in labels]
    if missing:
        raise UploadError(
            f"labels lack task(s) {missing}; every task of the model needs a label, e.g. {example}"
        )
    out: dict[str, str | list[str]] = {}
    for task in tasks:
        name, classes, value = task["name"], list(task["classes"]), labels[task["name"]]
        if task["type"] == "multilabel":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list):
                raise UploadError(
                    f"task {name!r} is multi-label and takes a list of class names, got {value!r}; "
                    f"valid classes: {', '.join(classes)}"
                )
            items = [_label_text(v) for v in items]
            bad = [v for v in items if v not in classes]
            if bad:
                raise UploadError(f"task {name!r} got unknown label(s) {bad}; valid: {', '.join(classes)}")
            out[name] = [c for c in classes if c in set(items)]
        else:
            if isinstance(value, (list, dict)) or value is None:
                raise UploadError(
                    f"task {name!r} takes one class name, got {value!r}; valid: {', '.join(classes)}"
                )
            text = _label_text(value)
            if text not in classes:
                raise UploadError(f"task {name!r} got unknown label {text!r}; valid: {', '.join(classes)}")
            out[name] = text
    return out


def _label_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value).strip()


MAX_JSON_DEPTH = 16
"""Deepest nesting of arrays and objects accepted in a JSON form field."""


def parse_json_field(text: str | None, field: str, *, max_bytes: int, required: bool,
                     max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse a multipart form field holding JSON: standard JSON only, bounded in size and depth.

    NaN, Infinity and numbers that overflow to infinity (``1e999``) are refused rather than
    stored as the non-standard JSON Python would write for them; so are strings that are
    not valid Unicode (lone surrogates such as ``"\\ud800"``), which no response could encode.

    Raises:
        UploadError: When it is missing (and required), too long, nested deeper than
            ``max_depth``, not valid JSON, or holds a non-finite number or invalid string.
    """
    if text is None or text.strip() == "":
        if required:
            raise UploadError(f"the form field {field!r} is missing; valid: a JSON object, e.g. "
                              f'{{"particle_type": "Fe"}}')
        return None
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise UploadError(f"the form field {field!r} has {size:,} bytes; the limit is {max_bytes:,}")
    depth = json_depth(text)
    if depth > max_depth:
        raise UploadError(f"the form field {field!r} nests arrays and objects {depth} levels deep; the limit "
                          f"is {max_depth}")
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise UploadError(f"the form field {field!r} is not valid JSON ({exc.msg} at position {exc.pos}): "
                          f"{text[:80]!r}") from None
    except ValueError as exc:  # a refused constant, float or integer
        raise UploadError(f"the form field {field!r} {exc}; valid: standard JSON, whose numbers are finite "
                          f"(integers of at most {_MAX_INT_DIGITS} digits)") from None
    if not _valid_unicode(value):
        raise UploadError(f"the form field {field!r} holds a string that is not valid Unicode (a lone "
                          f"surrogate escape such as \\ud800); valid: UTF-8 text")
    return value


def json_depth(text: str) -> int:
    """Deepest nesting of arrays and objects in JSON text, counted without parsing it.

    Brackets inside strings do not count; text that is not JSON gets some number that
    the parser then refuses anyway.
    """
    depth = deepest = 0
    for _, opening in _brackets(text):
        depth += 1 if opening else -1
        deepest = max(deepest, depth)
    return deepest


def _brackets(text: str) -> Iterator[tuple[int, bool]]:
    """``(position, opening)`` of each array or object bracket of JSON text, outside strings."""
    in_string = escaped = False
    for i, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{]}":
            yield i, char in "[{"


_MAX_INT_DIGITS = 4300  # Python's own limit on converting digits to int


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"holds {name}, which is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"holds {text[:40]}, which overflows to infinity")
    return value


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > _MAX_INT_DIGITS:
        raise ValueError(f"holds an integer of {digits:,} digits")
    return int(text)


def _valid_unicode(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_valid_unicode(k) and _valid_unicode(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_valid_unicode(v) for v in value)
    return True


@dataclass(frozen=True)
class ExportResult:
    """What :meth:`ContributionStore.export` wrote."""

    out: Path
    manifest: Path
    spec: Path
    n_rows: int
    n_images: int
    dataset_id: str


class ContributionStore:
    """Contributions in a database, their files in a file store.

    Args:
        db: The database (its schema is made by :class:`Database`).
        files: The content-addressed file store.
    """

    def __init__(self, db: Database, files: FileStore) -> None:
        self.db = db
        self.files = files

    # -- datasets -----------------------------------------------------------------------
    def register_dataset(self, definition: Mapping[str, Any]) -> str:
        """Record a dataset definition (idempotent); return its id."""
        ident = dataset_id(definition)
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO datasets (dataset_id, definition, created_at) VALUES (?, ?, ?) "
                       "ON CONFLICT (dataset_id) DO NOTHING",
                       (ident, json.dumps(definition, sort_keys=True), now()))
        return ident

    def datasets(self) -> dict[str, dict[str, Any]]:
        """Every recorded dataset definition by id."""
        rows = self.db.query("SELECT dataset_id, definition FROM datasets ORDER BY created_at")
        return {r["dataset_id"]: json.loads(r["definition"]) for r in rows}

    # -- writes -------------------------------------------------------------------------
    def remove_leftovers(self) -> list[Path] | None:
        """Remove what a killed process left in a local file store: ``.tmp`` files, files no row points to.

        Called when the service starts (see :meth:`LocalFileStore.remove_unreferenced`);
        an S3 store has no partial objects and is left alone.

        Returns:
            The removed files, or None when the store was not looked at.
        """
        if not isinstance(self.files, LocalFileStore):
            return None

        def referenced() -> set[tuple[str, str]]:
            rows = self.db.query("SELECT DISTINCT sha256, extension FROM contributions")
            return {(r["sha256"], r["extension"]) for r in rows}

        return self.files.remove_unreferenced(referenced)

    def add(self, upload: Upload, labels: Mapping[str, Any], metadata: Mapping[str, Any] | None, *,
            contributor: str, dataset: str, model: Mapping[str, Any],
            also: Callable[[Transaction, dict[str, Any]], None] | None = None) -> tuple[dict[str, Any], bool]:
        """Store one validated contribution with status ``pending``.

        The same image with the same labels from the same contributor is stored once:
        the second call returns the first record and ``False``.

        Args:
            upload: The checked image.
            labels: Validated labels (:func:`validate_labels`).
            metadata: Optional JSON object.
            contributor: Key id of the contributor.
            dataset: Dataset id (:meth:`register_dataset`).
            model: Identity of the model the labels were checked against.
            also: More statements to run in the same transaction once the row is written
                (given the record): the labelling queue records its item with it. An error
                raised there undoes the contribution.

        Returns:
            ``(record, created)``.
        """
        labels_json = json.dumps(labels, sort_keys=True, separators=(",", ":"))
        created_file = self.files.put(upload.sha256, upload.extension, upload.data)
        record_id = uuid.uuid4().hex
        try:
            with self.db.transaction() as tx:
                tx.execute(
                    f"INSERT INTO contributions ({_COLUMNS}) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL) "
                    "ON CONFLICT (sha256, contributor, labels) DO NOTHING",
                    (record_id, dataset, upload.sha256, upload.extension, upload.filename, len(upload.data),
                     json.dumps(list(upload.image.shape)), str(upload.image.dtype), labels_json,
                     json.dumps(dict(metadata or {}), sort_keys=True), "pending", contributor,
                     json.dumps(dict(model), sort_keys=True), now()),
                )
                inserted = tx.rowcount == 1
                rows = tx.execute(f"SELECT {_COLUMNS} FROM contributions WHERE sha256 = ? AND contributor = ? "
                                  "AND labels = ?", (upload.sha256, contributor, labels_json))
                if also is not None:
                    also(tx, _record(rows[0]))
        except BaseException:
            if created_file:
                self._drop_orphan(upload.sha256, upload.extension)
            raise
        if inserted:
            log.info("contribution %s (%s) from %s", record_id, upload.sha256[:12], contributor)
        return _record(rows[0]), inserted

    def _drop_orphan(self, sha256: str, extension: str) -> None:
        try:
            if not self.db.query("SELECT id FROM contributions WHERE sha256 = ?", (sha256,)):
                self.files.delete(sha256, extension)
        except Exception as exc:  # noqa: BLE001 (the original error matters more; an orphan file is harmless)
            log.warning("could not remove unreferenced file %s%s: %s", sha256, extension, exc)

    def review(self, contribution_id: str, status: str, *, reviewer: str, note: str | None = None) -> dict[str, Any]:
        """Set a contribution's status to ``accepted`` or ``rejected`` (a decision may be changed).

        Raises:
            UploadError: When ``status`` is neither.
            NotFoundError: When no contribution has that id.
        """
        if status not in ("accepted", "rejected"):
            raise UploadError(f"review status {status!r} is invalid; valid: accepted, rejected")
        with self.db.transaction() as tx:
            tx.execute("UPDATE contributions SET status = ?, reviewed_at = ?, reviewed_by = ?, review_note = ? "
                       "WHERE id = ?", (status, now(), reviewer, note, contribution_id))
            if tx.rowcount != 1:
                raise NotFoundError(f"no contribution with id {contribution_id!r}")
            rows = tx.execute(f"SELECT {_COLUMNS} FROM contributions WHERE id = ?", (contribution_id,))
        log.info("contribution %s %s by %s", contribution_id, status, reviewer)
        return _record(rows[0])

    # -- reads --------------------------------------------------------------------------
    def get(self, contribution_id: str) -> dict[str, Any]:
        """One contribution.

        Raises:
            NotFoundError: When no contribution has that id.
        """
        rows = self.db.query(f"SELECT {_COLUMNS} FROM contributions WHERE id = ?", (contribution_id,))
        if not rows:
            raise NotFoundError(f"no contribution with id {contribution_id!r}")
        return _record(rows[0])

    def list(self, *, status: str | None = None, contributor: str | None = None, dataset: str | None = None,
             limit: int = 100, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Contributions, oldest first, with the total matching count.

        Raises:
            UploadError: When ``status`` is not one of :data:`STATUSES`.
        """
        if status is not None and status not in STATUSES:
            raise UploadError(f"status {status!r} is invalid; valid: {', '.join(STATUSES)}")
        where, params = [], []
        for column, value in (("status", status), ("contributor", contributor), ("dataset_id", dataset)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        total = int(self.db.query(f"SELECT COUNT(*) AS n FROM contributions{clause}", params)[0]["n"])
        rows = self.db.query(f"SELECT {_COLUMNS} FROM contributions{clause} ORDER BY created_at, id "
                             "LIMIT ? OFFSET ?", [*params, int(limit), int(offset)])
        return [_record(r) for r in rows], total

    def image(self, record: Mapping[str, Any]) -> bytes:
        """The stored bytes of a contribution's image."""
        return self.files.get(record["sha256"], record["extension"])

    # -- export -------------------------------------------------------------------------
    def export(self, out: str | Path, *, status: str = "accepted", dataset: str | None = None) -> ExportResult:
        """Write contributions as a dataset that ``cellclass train`` reads.

        Writes ``OUT/images/<sha256>.<ext>`` (one file per distinct image),
        ``OUT/manifest.csv`` (the training spec's image column, one column per task,
        multi-label values joined by ``;``, then the contribution's id, contributor,
        times and metadata) and ``OUT/dataset.yaml`` (a :class:`DatasetSpec` declaring the
        model's tasks and classes, so the encoders match). Groups of the training spec
        (plate, well) become columns and groups where every row's metadata gives them.

        Args:
            out: Output folder.
            status: Which contributions to export (default the accepted ones).
            dataset: Dataset id to export; needed only when contributions were made to
                models of different tasks or classes.

        Raises:
            ExportError: When there is nothing to export or several datasets are mixed.
        """
        out = Path(out)
        definitions = self.datasets()
        rows = self._rows_to_export(definitions, status, dataset)
        definition = definitions[rows[0]["dataset_id"]]
        # A class name holding ";" (e.g. "Rods; rings") needs another multi-label delimiter.
        delimiter = "|" if any(";" in c for t in definition["tasks"] for c in t["classes"]) else ";"
        n_images = self._write_images(out, rows)
        frame = manifest_frame(rows, definition, delimiter)
        groups = [g for g in definition["groups"] if frame[g].astype(str).str.strip().ne("").all()]
        frame = frame.drop(columns=[g for g in definition["groups"] if g not in groups])
        manifest = out / "manifest.csv"
        with atomic_path(manifest) as tmp:
            frame.to_csv(tmp, index=False)
        spec_path = contributions_spec(definition, groups, delimiter, out).to_yaml(out / "dataset.yaml")
        log.info("exported %d contribution(s), %d image(s) to %s", len(rows), n_images, out)
        return ExportResult(out, manifest, spec_path, len(rows), n_images, rows[0]["dataset_id"])

    def _rows_to_export(self, definitions: Mapping[str, Any], status: str, dataset: str | None) -> list[dict[str, Any]]:
        """Every contribution of ``status`` (in ``dataset``), oldest first, all of one dataset.

        Raises:
            ExportError: When ``dataset`` is unknown, nothing matches, or the matches belong
                to several datasets.
        """
        if dataset is not None and dataset not in definitions:
            raise ExportError(f"no dataset {dataset!r} in the contribution store; valid: "
                              f"{', '.join(definitions) or '(none)'}")
        rows: list[dict[str, Any]] = []
        while True:
            page, total = self.list(status=status, dataset=dataset, limit=1000, offset=len(rows))
            rows += page
            if not page or len(rows) >= total:
                break
        if not rows:
            raise ExportError(f"no contribution with status {status!r} to export"
                              + (f" in dataset {dataset!r}" if dataset else ""))
        used = sorted({r["dataset_id"] for r in rows})
        if len(used) > 1:
            described = "; ".join(f"{d} ({definitions[d]['name']}: tasks "
                                  f"{[t['name'] for t in definitions[d]['tasks']]})" for d in used)
            raise ExportError(f"the {status} contributions belong to {len(used)} datasets ({described}); "
                              f"pass --dataset ID to export one")
        return rows

    def _write_images(self, out: Path, rows: Sequence[Mapping[str, Any]]) -> int:
        """Copy each distinct image of ``rows`` to ``OUT/images/``; return how many."""
        written: set[str] = set()
        for r in rows:
            relative = export_image_path(r)
            if relative not in written:
                atomic_write_bytes(out / relative, self.image(r))
                written.add(relative)
        return len(written)


def export_image_path(record: Mapping[str, Any]) -> str:
    """Where an exported contribution's image goes, relative to the export folder."""
    return f"images/{record['sha256']}{record['extension']}"


def manifest_frame(rows: Sequence[Mapping[str, Any]], definition: Mapping[str, Any], delimiter: str) -> pd.DataFrame:
    """The exported manifest: image path, one column per task, provenance, groups and metadata per row.

    Args:
        rows: Contribution records.
        definition: Their dataset definition (tasks, image column, groups).
        delimiter: What joins the classes of a multi-label task.
    """
    table = []
    for r in rows:
        row: dict[str, Any] = {definition["image_column"]: export_image_path(r)}
        for task in definition["tasks"]:
            value = r["labels"][task["name"]]
            row[task["name"]] = delimiter.join(value) if isinstance(value, list) else value
        row.update({"contribution_id": r["id"], "contributor": r["contributor"], "source_filename": r["filename"],
                    "created_at": r["created_at"], "reviewed_by": r["reviewed_by"] or ""})
        for group in definition["groups"]:
            row[group] = str(r["metadata"].get(group, ""))
        row["metadata"] = json.dumps(r["metadata"], sort_keys=True)
        table.append(row)
    return pd.DataFrame(table)


def contributions_spec(definition: Mapping[str, Any], groups: Sequence[str], delimiter: str,
                       out: Path) -> DatasetSpec:
    """The :class:`DatasetSpec` of an export: the model's tasks and classes, so encoders match."""
    return DatasetSpec(
        name=f"{definition['name']}-contributions",
        manifest="manifest.csv",
        image=ImageSpec(column=definition["image_column"], channels=list(definition["channels"]) or None),
        tasks=[TaskSpec(t["name"], [t["name"]], type=t["type"], classes=list(t["classes"]),
                        delimiter=delimiter if t["type"] == "multilabel" else None)
               for t in definition["tasks"]],
        groups=list(groups),
        base_dir=out,
    )


def _record(row: Mapping[str, Any]) -> dict[str, Any]:
    record = dict(row)
    for key in ("labels", "shape", "model"):
        record[key] = json.loads(record[key])
    record["metadata"] = readable_metadata(record["metadata"])
    return record


def readable_metadata(text: str) -> dict[str, Any]:
    """A stored ``metadata`` column as a JSON object every response can carry.

    Rows written before the API bounded its JSON fields can hold what it now refuses, and
    what no response could encode: nesting deeper than :data:`MAX_JSON_DEPTH`, NaN or
    Infinity, lone surrogate escapes (``"\\ud800"``). Such metadata comes back readable
    rather than failing the listing: a value nested deeper than the limit as its stored
    JSON text (a string), a non-finite number as its name (``"NaN"``), a lone surrogate
    as U+FFFD. Metadata within the bounds comes back as it was stored.
    """
    if json_depth(text) > MAX_JSON_DEPTH:
        text = _deep_values_as_text(text, MAX_JSON_DEPTH)
    try:
        value = json.loads(text, parse_constant=str, parse_int=_int_or_text)
    except ValueError as exc:  # not JSON at all: no version of cellclass writes that
        log.warning("stored metadata is not JSON (%s); returned as text: %.80r", exc, text)
        return {"unparsed": text}
    value = _without_lone_surrogates(value)
    return value if isinstance(value, dict) else {"value": value}


def _deep_values_as_text(text: str, max_depth: int) -> str:
    """JSON text in which each array or object opening below ``max_depth`` is replaced by a string of its text."""
    pieces: list[str] = []
    copied, depth, start = 0, 0, -1
    for i, opening in _brackets(text):
        if opening:
            depth += 1
            if depth == max_depth + 1:
                start = i
        else:
            if depth == max_depth + 1 and start >= 0:
                pieces += [text[copied:start], json.dumps(text[start : i + 1])]
                copied, start = i + 1, -1
            depth -= 1
    return "".join(pieces) + text[copied:]


def _int_or_text(text: str) -> int | str:
    return int(text) if len(text.lstrip("-")) <= _MAX_INT_DIGITS else text


def _without_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value if _valid_unicode(value) else value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_lone_surrogates(v) for v in value]
    return value
