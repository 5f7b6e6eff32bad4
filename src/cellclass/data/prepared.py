"""Prepared data: a dataset's labels, split and images, computed once for a run, and the
split file (``split.json``) a run folder keeps of it.

Training, cross-validation (which shares one preparation across its folds), sweeps and
the re-evaluation of a finished run all start from a :class:`PreparedData`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from cellclass.atomic import atomic_write_text
from cellclass.data.cache import images_for_training
from cellclass.data.labels import TaskEncoder, encode_frame, fit_encoders
from cellclass.data.spec import DatasetSpec
from cellclass.data.splits import Split, choose_split_method, make_split
from cellclass.errors import SpecError
from cellclass.progress import ProgressFn

SIDES = ("train", "val", "test")


class PrepareSettings(Protocol):
    """The settings :func:`prepare_data` reads (a ``TrainConfig`` has every one)."""

    image_size: int
    fit: str
    channels: list[int]
    workers: int
    cache: bool
    cache_dir: str | None
    split: str | None
    split_by: str | None
    val_fraction: float
    test_fraction: float
    seed: int


@dataclass
class PreparedData:
    """Everything a run needs from a dataset, computed once.

    Attributes:
        spec: The dataset (its tasks already selected).
        frame: The manifest, one row per image.
        encoders: Task name to encoder.
        targets: Task name to encoded labels, one per row.
        groups: The group (plate, well ...) of each row, when the split is by group.
        split: Row positions of the train, validation and test sides.
        split_warning: Why the split is weaker than asked (e.g. no group column), if it is;
            :meth:`split_note` adds the groups the split moved.
        images: The images fitted to size, intensities unchanged (in memory or a cache).
        ids: Image id of each row.
    """

    spec: DatasetSpec
    frame: pd.DataFrame
    encoders: dict[str, TaskEncoder]
    targets: dict[str, np.ndarray]
    groups: np.ndarray | None
    split: Split
    split_warning: str | None
    images: Any
    ids: list[str]

    def describe_split(self) -> dict[str, Any]:
        """How the split was made and the class counts per side, by class name, per task."""
        info = self.split.describe(labels=self.targets, classes={t: e.classes for t, e in self.encoders.items()})
        note = self.split_note()
        if note:
            info["warning"] = note
        return info

    def split_note(self) -> str | None:
        """``split_warning`` and a sentence per group moved so a class is on every side, in one
        text (``None`` when there is neither): what a run logs and records as the split's warning."""
        parts = ([self.split_warning] if self.split_warning else []) + self.split.move_notes()
        return "; ".join(parts) or None


def prepare_data(spec: DatasetSpec, settings: PrepareSettings, *, split_override: Mapping[str, Any] | None = None,
                 progress: ProgressFn | None = None) -> PreparedData:
    """Load labels, split and images (fitted to size, intensities unchanged).

    Args:
        spec: The dataset (its tasks already selected).
        settings: Image size and fit, channels, decoding workers, cache, and how to split.
        split_override: A saved split (:func:`read_split`) to use instead of making one.
        progress: Called while images are read or cached.
    """
    frame = spec.load_manifest()
    encoders = fit_encoders(spec, frame)
    targets = encode_frame(spec, frame, encoders)
    method, group_col, warning = choose_split_method(spec.groups, settings.split_by, settings.split,
                                                     split_column=spec.split_column)
    groups = frame[group_col].astype(str).to_numpy() if group_col else None
    first = targets[spec.tasks[0].name]
    if split_override is not None:
        split = Split(**split_override, groups=groups, labels=first)
    else:
        split = make_split(
            frame, labels=first, groups=groups, method=method, val_fraction=settings.val_fraction,
            test_fraction=settings.test_fraction, seed=settings.seed, group_column=group_col,
            predefined=frame[spec.split_column].to_numpy() if method == "predefined" else None,
            classes=encoders[spec.tasks[0].name].classes,
        )
    ids = [spec.image_id(r) for r in frame.to_dict("records")]
    # A valid prepared cache is read in place (bounded memory); otherwise images are decoded
    # into memory, or cached first when settings.cache asks for it.
    images = images_for_training(
        spec, frame, size=settings.image_size, mode=settings.fit, channels=settings.channels or None,
        workers=settings.workers, build=settings.cache, cache_dir=settings.cache_dir,
        progress=progress,
    )
    return PreparedData(spec, frame, encoders, targets, groups, split, warning, images, ids)


def prepare_every_row(spec: DatasetSpec, settings: PrepareSettings,
                      encoders: Mapping[str, TaskEncoder]) -> PreparedData:
    """Every row of another dataset as a test side, labels encoded with a model's encoders.

    Raises:
        LabelError: When a label is not one of the model's classes.
    """
    frame = spec.load_manifest()
    targets = encode_frame(spec, frame, dict(encoders))
    images = images_for_training(spec, frame, size=settings.image_size, mode=settings.fit,
                                 channels=settings.channels or None, workers=settings.workers,
                                 cache_dir=settings.cache_dir)
    none = np.array([], dtype=np.int64)
    split = Split(train=none, val=none.copy(), test=np.arange(len(frame)), method="external dataset", group=None,
                  seed=0, fractions={})
    ids = [spec.image_id(r) for r in frame.to_dict("records")]
    return PreparedData(spec, frame, dict(encoders), targets, None, split, None, images, ids)


def prepare_pool(spec: DatasetSpec, settings: PrepareSettings,
                 encoders: Mapping[str, TaskEncoder] | None = None) -> PreparedData:
    """Every row of a dataset whose labels may be missing: a pool of images to embed or rank.

    Labels, where the pool has them, are encoded with ``encoders`` (a model's); an empty or
    absent label is ``-1`` (an empty set for multi-label tasks). Every row is on the test
    side; ``groups`` holds the first declared group column, when the pool has one.

    Raises:
        SpecError: When the pool has no row.
        LabelError: When a label is not one of the model's classes.
    """
    frame = spec.load_manifest(labels=False)
    if frame.empty:
        raise SpecError(f"pool {str(spec.manifest_path or spec.image_root)!r} has no row"
                        + (f" satisfying {' and '.join(spec.where)!r}" if spec.where else "")
                        + "; valid: a dataset with at least one image")
    known = {t.name for t in spec.tasks}
    kept = {t: e for t, e in (encoders or {}).items() if t in known}
    targets = encode_frame(spec, frame, kept) if kept else {}
    images = images_for_training(spec, frame, size=settings.image_size, mode=settings.fit,
                                 channels=settings.channels or None, workers=settings.workers,
                                 cache_dir=settings.cache_dir)
    groups = frame[spec.groups[0]].astype(str).to_numpy() if spec.groups else None
    none = np.array([], dtype=np.int64)
    split = Split(train=none, val=none.copy(), test=np.arange(len(frame)), method="pool: every row", group=None,
                  seed=0, fractions={})
    ids = [spec.image_id(r) for r in frame.to_dict("records")]
    return PreparedData(spec, frame, dict(kept), targets, groups, split, None, images, ids)


def write_split(path: str | Path, data: PreparedData) -> Path:
    """Write ``split.json``: the row positions and image ids of each side, and how the split was made."""
    split = data.split
    payload = {
        "split": {"train": split.train.tolist(), "val": split.val.tolist(), "test": split.test.tolist(),
                  "method": split.method, "group": split.group, "seed": split.seed,
                  "fractions": split.fractions, "moves": split.moves},
        "ids": {side: [data.ids[i] for i in getattr(split, side)] for side in SIDES},
    }
    return atomic_write_text(path, json.dumps(payload))


def read_split(path: str | Path) -> dict[str, Any] | None:
    """The split saved by :func:`write_split`, as ``split_override`` for :func:`prepare_data`
    (row positions as ``int64`` arrays); ``None`` when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())["split"]
    return {k: (np.asarray(v, dtype=np.int64) if k in SIDES else v) for k, v in saved.items()}
