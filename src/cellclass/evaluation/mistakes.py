"""The most confident mistakes of a run, per class: a gallery and a table, as fastai's
``ClassificationInterpretation.plot_top_losses`` shows them.

A single-label or binary task's gallery has a row per true class: the test images predicted
as another class, highest probability of that wrong class first. A multi-label task's has
two rows per class: its most confident false positives (the class predicted, at or above
its threshold, but absent; highest probability first) and false negatives (present but
below the threshold; lowest probability first). Only the images shown are read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellclass.atomic import atomic_path
from cellclass.data.labels import TaskEncoder
from cellclass.evaluation.plots import GalleryRow, plot_mistakes

__all__ = ["MAX_GALLERY_ROWS", "MISTAKES_PER_CLASS", "confident_mistakes", "mistakes_text", "write_mistakes"]

log = logging.getLogger(__name__)

MISTAKES_PER_CLASS = 8
"""Most mistakes shown (and listed) per class, or per class and kind for a multi-label task."""
MAX_GALLERY_ROWS = 40
"""Most rows in a gallery figure (the CSV lists the mistakes of every row)."""

FALSE_POSITIVE, FALSE_NEGATIVE, MISCLASSIFIED = "false positive", "false negative", "misclassified"


def confident_mistakes(task_type: str, classes: Sequence[str], y: np.ndarray, probs: np.ndarray,
                       thresholds: Sequence[float] | None = None,
                       per_class: int = MISTAKES_PER_CLASS) -> pd.DataFrame:
    """The most confident mistakes per class, in class order.

    Decisions are the predictor's: the argmax class for single-label and binary tasks, each
    class at or above its threshold (default 0.5) for a multi-label task.

    Args:
        task_type: ``single``, ``binary`` or ``multilabel``.
        classes: Class names in column order.
        y: Class indices ``(N,)`` (``-1`` unlabelled, skipped) or a 0/1 matrix ``(N, K)``.
        probs: Probabilities ``(N, K)``.
        thresholds: A multi-label task's thresholds, one per class.
        per_class: Most mistakes kept per class (and kind).

    Returns:
        One row per mistake: ``position`` (row of ``y``), ``class`` (the gallery row's class:
        the true class, or the multi-label class in error), ``error`` (misclassified, false
        positive or false negative), ``true`` and ``predicted`` (labels, ``;``-joined sets
        for multi-label), ``probability`` (of the predicted class; multi-label: of
        ``class``), ``threshold`` (multi-label: of ``class``; else empty) and ``n_errors``
        (mistakes of that class and kind in all).
    """
    p = np.asarray(probs, dtype=np.float64)
    if task_type == "multilabel":
        return _multilabel_mistakes(list(classes), np.asarray(y).astype(bool), p, thresholds, per_class)
    y = np.asarray(y, dtype=np.int64)
    pred = p.argmax(axis=1)
    wrong = np.flatnonzero((y >= 0) & (pred != y))
    records = []
    for k, name in enumerate(classes):
        mine = wrong[y[wrong] == k]
        confidence = p[mine, pred[mine]]
        for i in mine[np.argsort(-confidence, kind="stable")][:per_class]:
            records.append({"position": int(i), "class": name, "error": MISCLASSIFIED, "true": name,
                            "predicted": classes[pred[i]], "probability": float(p[i, pred[i]]),
                            "n_errors": len(mine)})
    return _frame(records)


def _multilabel_mistakes(classes: list[str], y: np.ndarray, p: np.ndarray, thresholds: Sequence[float] | None,
                         per_class: int) -> pd.DataFrame:
    """False positives (highest probability first) and false negatives (lowest first) of each class."""
    cut = np.full(len(classes), 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    pred = p >= cut

    def names(row: np.ndarray) -> str:
        return ";".join(c for c, on in zip(classes, row, strict=True) if on)

    records = []
    for k, name in enumerate(classes):
        for error, rows, order in ((FALSE_POSITIVE, np.flatnonzero(pred[:, k] & ~y[:, k]), -1.0),
                                   (FALSE_NEGATIVE, np.flatnonzero(~pred[:, k] & y[:, k]), 1.0)):
            for i in rows[np.argsort(order * p[rows, k], kind="stable")][:per_class]:
                records.append({"position": int(i), "class": name, "error": error, "true": names(y[i]),
                                "predicted": names(pred[i]), "probability": float(p[i, k]),
                                "threshold": float(cut[k]), "n_errors": len(rows)})
    return _frame(records)


def _frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    columns = ["position", "class", "error", "true", "predicted", "probability", "threshold", "n_errors"]
    return pd.DataFrame(records, columns=columns)


def mistakes_text(task_type: str, per_class: int = MISTAKES_PER_CLASS) -> str:
    """What a task's gallery shows, in a sentence (for the report)."""
    if task_type == "multilabel":
        return (f"For each class, up to {per_class} false positives (the class predicted, at or above its "
                f"threshold, but absent; highest probability first) and up to {per_class} false negatives (present "
                "but below the threshold; lowest probability first). Tiles give the class's probability and "
                "threshold, the true labels and the file.")
    return (f"For each true class, up to {per_class} test images predicted as another class, highest probability "
            "of that wrong class first. Tiles give the true and predicted class, that probability and the file.")


def write_mistakes(out: Path, encoders: Mapping[str, TaskEncoder], thresholds: Mapping[str, Sequence[float]],
                   images: Any, image_rows: np.ndarray, ids: Sequence[str], row_numbers: np.ndarray,
                   targets: Mapping[str, np.ndarray], probs: Mapping[str, np.ndarray],
                   per_class: int = MISTAKES_PER_CLASS) -> dict[str, dict[str, Any]]:
    """Write each task's most confident mistakes: ``mistakes_<task>.csv`` and ``plots/mistakes_<task>.png``.

    Args:
        out: Results folder.
        encoders: The tasks.
        thresholds: Multi-label thresholds per task (the predictor's).
        images: The images, indexable by an int array of rows (an array or a cache).
        image_rows: The row of ``images`` of each evaluated sample.
        ids: The image id of each evaluated sample (written as ``file``).
        row_numbers: The manifest row of each evaluated sample (written as ``row``).
        targets: Labels per task, one per evaluated sample.
        probs: Probabilities per task, one row per evaluated sample.
        per_class: Most mistakes shown per class (and kind).

    Returns:
        Per task: ``plot`` and ``csv`` (paths), ``n_listed``, ``n_rows_shown`` and ``n_rows``
        (gallery rows shown and in all), ``task_type`` and ``text`` (what is shown).
    """
    made: dict[str, dict[str, Any]] = {}
    for task, enc in encoders.items():
        try:
            table = confident_mistakes(enc.type, enc.classes, targets[task], probs[task], thresholds.get(task),
                                       per_class)
            table.insert(0, "file", [ids[i] for i in table["position"]])
            table.insert(1, "row", np.asarray(row_numbers)[table["position"].to_numpy(dtype=np.int64)])
            csv = out / f"mistakes_{task}.csv"
            columns = ["file", "row", *(["class", "error"] if enc.type == "multilabel" else []),
                       "true", "predicted", "probability", *(["threshold"] if enc.type == "multilabel" else [])]
            with atomic_path(csv) as tmp:
                table[columns].round({"probability": 6, "threshold": 6}).to_csv(tmp, index=False)
            rows, n_rows = _gallery_rows(table, enc.type, images, np.asarray(image_rows))
            plot = plot_mistakes(rows, out / "plots" / f"mistakes_{task}.png", f"{task}: most confident mistakes")
        except Exception as exc:  # a gallery must never lose the metrics already written
            log.warning("could not draw the mistakes of task %s: %s", task, exc)
            continue
        made[task] = {"plot": plot, "csv": csv, "n_listed": len(table), "n_rows": n_rows, "n_rows_shown": len(rows),
                      "task_type": enc.type, "text": mistakes_text(enc.type, per_class)}
    return made


def _gallery_rows(table: pd.DataFrame, task_type: str, images: Any,
                  image_rows: np.ndarray) -> tuple[list[GalleryRow], int]:
    """The first :data:`MAX_GALLERY_ROWS` gallery rows (a row per class and kind with mistakes), reading
    only the images they show, and how many rows there are in all."""
    groups = list(table.groupby(["class", "error"], sort=False))
    shown = groups[:MAX_GALLERY_ROWS]
    positions = np.concatenate([g["position"].to_numpy(dtype=np.int64) for _, g in shown]) if shown else []
    wanted = np.unique(image_rows[positions]) if len(positions) else np.array([], dtype=np.int64)
    pixels = dict(zip(wanted.tolist(), np.asarray(images[wanted]) if len(wanted) else [], strict=True))
    rows: list[GalleryRow] = []
    for (name, error), group in shown:
        tiles = [(pixels[int(image_rows[m.position])], _caption(m, task_type)) for m in group.itertuples(index=False)]
        label = f"true {name}" if error == MISCLASSIFIED else f"{name}\n{error}s"
        rows.append((f"{label}\n({group['n_errors'].iloc[0]} in all)", tiles))
    return rows, len(groups)


def _caption(mistake: Any, task_type: str) -> str:
    file = _short(Path(str(mistake.file)).name, 30)
    if task_type != "multilabel":
        return f"true {_short(mistake.true, 20)}\npred {_short(mistake.predicted, 15)} {mistake.probability:.2f}\n{file}"
    return (f"p {mistake.probability:.2f} (threshold {mistake.threshold:.2f})\n"
            f"true {_short(mistake.true or '(none)', 20)}\n{file}")


def _short(text: str, width: int) -> str:
    """``text`` cut in its middle to at most ``width`` characters."""
    return text if len(text) <= width else text[: width // 2 - 1] + "…" + text[-(width - width // 2):]
