"""Label encoding per task, fitted once on the whole dataset and saved with every run.

An encoder is fitted on the full manifest (never on a split), so a class absent from a
test split keeps its index, and the same mapping travels inside every checkpoint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellclass.atomic import atomic_write_text
from cellclass.data.spec import ROW_COLUMN, DatasetSpec, TaskSpec
from cellclass.errors import LabelError, SpecError


def natural_key(value: str) -> tuple:
    """Sort key that orders numbers numerically: ``0.1 < 0.3 < 1.0 < 10``; ``w2 < w10``."""
    try:
        return (0, float(value), value)
    except ValueError:
        parts = re.split(r"(\d+)", value)
        return (1, tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts), value)


@dataclass
class TaskEncoder:
    """Maps one task's class names to indices (single, binary) or multi-hot rows (multilabel).

    Attributes:
        name: Task name.
        type: ``single``, ``binary`` or ``multilabel``.
        classes: Class names in index order.
    """

    name: str
    type: str
    classes: list[str]

    @property
    def n_outputs(self) -> int:
        """Number of network outputs for this task (one per class)."""
        return len(self.classes)

    def encode(self, labels: Sequence[str | list[str] | None]) -> np.ndarray:
        """Encode parsed labels.

        Returns:
            ``int64`` indices of shape ``(N,)`` for single and binary tasks (``-1`` for an
            empty label), or a ``uint8`` multi-hot array ``(N, K)`` for multi-label tasks.

        Raises:
            LabelError: When a label is not one of ``classes``.
        """
        index = {c: i for i, c in enumerate(self.classes)}
        if self.type == "multilabel":
            out = np.zeros((len(labels), len(self.classes)), dtype=np.uint8)
            for i, items in enumerate(labels):
                for item in items or []:
                    out[i, self._index(index, item)] = 1
            return out
        out = np.full(len(labels), -1, dtype=np.int64)
        for i, item in enumerate(labels):
            if item is not None:
                out[i] = self._index(index, item)
        return out

    def decode(self, encoded: np.ndarray) -> list[str | list[str]]:
        """Inverse of :meth:`encode` (indices or multi-hot rows to class names)."""
        if self.type == "multilabel":
            return [[self.classes[j] for j in np.flatnonzero(row)] for row in np.asarray(encoded)]
        return [self.classes[int(i)] for i in np.asarray(encoded)]

    def _index(self, index: Mapping[str, int], item: str) -> int:
        try:
            return index[item]
        except KeyError:
            raise LabelError(
                f"task {self.name!r} got unknown label {item!r}; valid: {', '.join(self.classes)}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON and checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskEncoder:
        """Rebuild an encoder saved with :meth:`to_dict`."""
        return cls(name=data["name"], type=data["type"], classes=list(data["classes"]))


def fit_encoder(task: TaskSpec, labels: Sequence[str | list[str] | None]) -> TaskEncoder:
    """Fit one task's encoder: its declared classes, else the sorted distinct labels."""
    if task.classes:
        return TaskEncoder(task.name, task.type, list(task.classes))
    seen: set[str] = set()
    for item in labels:
        if item is None:
            continue
        seen.update(item if isinstance(item, list) else [item])
    if not seen:
        raise LabelError(f"task {task.name!r} has no label at all; check its column(s) {task.columns}")
    return TaskEncoder(task.name, task.type, sorted(seen, key=natural_key))


def fit_encoders(spec: DatasetSpec, frame: pd.DataFrame | None = None) -> dict[str, TaskEncoder]:
    """Fit an encoder per task on the whole manifest (``frame`` defaults to all rows).

    Raises:
        SpecError: When there is no row (a header-only manifest, or filters that keep none).
        LabelError: When a task has no label at all.
    """
    frame = spec.load_manifest() if frame is None else frame
    if frame.empty:
        source = str(spec.manifest_path or spec.image_root)
        why = (f"no row of {source!r} satisfies {' and '.join(spec.where)!r}" if spec.where
               else f"{source!r} has no labeled row" if spec.drop_unlabeled
               else f"the manifest {source!r} has no row (a header only)")
        raise SpecError(f"dataset {spec.name!r} has nothing to train on: {why}; valid: at least one row per class")
    return {t.name: fit_encoder(t, spec.labels(frame, t.name)) for t in spec.tasks}


def encode_frame(
    spec: DatasetSpec, frame: pd.DataFrame, encoders: Mapping[str, TaskEncoder]
) -> dict[str, np.ndarray]:
    """Encode every task of ``frame``; errors name the offending row."""
    out = {}
    for name, encoder in encoders.items():
        labels = spec.labels(frame, name)
        try:
            out[name] = encoder.encode(labels)
        except LabelError:
            for row, item in zip(frame[ROW_COLUMN], labels, strict=True):
                try:
                    encoder.encode([item])
                except LabelError as exc:
                    raise LabelError(f"row {row}: {exc}") from None
            raise
    return out


def save_encoders(path: str | Path, encoders: Mapping[str, TaskEncoder]) -> Path:
    """Write encoders as JSON (atomically)."""
    payload = {name: enc.to_dict() for name, enc in encoders.items()}
    return atomic_write_text(path, json.dumps(payload, indent=2))


def load_encoders(path: str | Path) -> dict[str, TaskEncoder]:
    """Read encoders written by :func:`save_encoders`."""
    data = json.loads(Path(path).read_text())
    return {name: TaskEncoder.from_dict(d) for name, d in data.items()}
