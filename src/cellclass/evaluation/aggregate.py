"""From cells to their field: per-cell probabilities aggregated to one answer per field.

A cell-level model trained on cells that inherit their field's labels answers per cell;
a field's answer is an aggregate of its cells' answers:

- **multi-label** (:func:`aggregate_multilabel`): per class, the ``mean`` of the cells'
  probabilities, their ``max`` (one confident cell is enough: right where a label shows in
  a few cells only), or ``topk_mean``, the mean of the ``k`` highest (a field with fewer
  cells averages all of them), between the two. A class is present where the aggregate
  reaches its threshold.
- **single-label** (:func:`aggregate_single`): ``majority``, the share of cells whose most
  probable class is each class (the field takes the commonest; a tie goes to the class
  of higher mean probability, then to the lower index), or ``mean`` probability (the field
  takes its argmax).

Fields come out in the order of their first cell. Pure numpy; :func:`aggregate_frame` does
the same on a table of cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from cellclass.errors import EvaluationError
from cellclass.evaluation._validation import as_proba

__all__ = [
    "MULTILABEL_METHODS",
    "SINGLE_METHODS",
    "FieldAggregate",
    "aggregate_frame",
    "aggregate_multilabel",
    "aggregate_single",
]

MULTILABEL_METHODS: tuple[str, ...] = ("mean", "max", "topk_mean")
"""Aggregations of :func:`aggregate_multilabel`."""

SINGLE_METHODS: tuple[str, ...] = ("majority", "mean")
"""Aggregations of :func:`aggregate_single`."""


@dataclass(frozen=True)
class FieldAggregate:
    """One answer per field.

    Attributes:
        fields: Field ids, in the order of their first cell.
        n_cells: Cells per field.
        proba: ``(n_fields, n_classes)`` aggregated scores: probabilities (``mean``, ``max``,
            ``topk_mean``) or vote shares (``majority``).
        labels: Multi-label: ``(n_fields, n_classes)`` booleans; single-label:
            ``(n_fields,)`` class indices.
        method: The aggregation used.
    """

    fields: np.ndarray
    n_cells: np.ndarray
    proba: np.ndarray
    labels: np.ndarray
    method: str


def aggregate_multilabel(
    field_ids: ArrayLike,
    proba: ArrayLike,
    *,
    method: str = "mean",
    k: int = 3,
    thresholds: float | ArrayLike = 0.5,
) -> FieldAggregate:
    """Aggregate per-cell multi-label probabilities to their fields.

    Args:
        field_ids: Field of each cell, ``(n_cells,)``.
        proba: Per-cell, per-class probabilities, ``(n_cells, n_classes)``.
        method: ``mean``, ``max`` or ``topk_mean``.
        k: Cells averaged per class by ``topk_mean``.
        thresholds: One threshold, or one per class: a class is present where the
            aggregate is at least its threshold.

    Raises:
        EvaluationError: On an unknown method, a ``k`` below 1, thresholds of the wrong
            shape or outside [0, 1], or inputs of different lengths or not probabilities.
    """
    _check_method(method, MULTILABEL_METHODS, "multi-label")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise EvaluationError(f"k must be an integer >= 1; received {k!r}.")
    codes, fields, p = _grouped(field_ids, proba)
    n_fields, n_classes = len(fields), p.shape[1]
    n_cells = np.bincount(codes, minlength=n_fields)
    if method == "mean":
        out = _group_sum(codes, p, n_fields) / n_cells[:, None]
    elif method == "max":
        out = np.zeros((n_fields, n_classes))
        np.maximum.at(out, codes, p)
    else:
        # Per class: cells ordered by field, then by falling probability; keep the first k.
        out = np.zeros((n_fields, n_classes))
        starts = np.concatenate([[0], np.cumsum(n_cells)[:-1]])
        for j in range(n_classes):
            order = np.lexsort((-p[:, j], codes))
            rank = np.arange(len(codes)) - starts[codes[order]]
            top = order[rank < k]
            out[:, j] = np.bincount(codes[top], weights=p[top, j], minlength=n_fields)
        out /= np.minimum(n_cells, k)[:, None]
    cut = _thresholds(thresholds, n_classes)
    return FieldAggregate(fields, n_cells, out, out >= cut, method)


def aggregate_single(field_ids: ArrayLike, proba: ArrayLike, *, method: str = "majority") -> FieldAggregate:
    """Aggregate per-cell single-label probabilities to their fields.

    Args:
        field_ids: Field of each cell, ``(n_cells,)``.
        proba: Per-cell class probabilities, ``(n_cells, n_classes)``.
        method: ``majority`` (of the cells' argmax) or ``mean`` probability.

    Raises:
        EvaluationError: On an unknown method, or inputs of different lengths or not
            probabilities.
    """
    _check_method(method, SINGLE_METHODS, "single-label")
    codes, fields, p = _grouped(field_ids, proba)
    n_fields, n_classes = len(fields), p.shape[1]
    n_cells = np.bincount(codes, minlength=n_fields)
    mean = _group_sum(codes, p, n_fields) / n_cells[:, None]
    if method == "mean":
        return FieldAggregate(fields, n_cells, mean, mean.argmax(axis=1), method)
    votes = np.zeros((n_fields, n_classes))
    np.add.at(votes, (codes, p.argmax(axis=1)), 1.0)
    share = votes / n_cells[:, None]
    # Most votes; among tied classes the higher mean probability, then the lower index.
    tied = share == share.max(axis=1, keepdims=True)
    labels = np.where(tied, mean, -np.inf).argmax(axis=1)
    return FieldAggregate(fields, n_cells, share, labels, method)


def aggregate_frame(
    cells: pd.DataFrame,
    proba_columns: Sequence[str],
    *,
    field_column: str = "field_id",
    task_type: str = "multilabel",
    method: str | None = None,
    k: int = 3,
    thresholds: float | ArrayLike = 0.5,
) -> pd.DataFrame:
    """Aggregate a table of cells (one row per cell, one probability column per class).

    Args:
        cells: The cells.
        proba_columns: Their probability columns, one per class, in class order.
        field_column: The column naming each cell's field.
        task_type: ``multilabel`` (also ``binary``, as one class) or ``single``.
        method: The aggregation (default: ``mean`` for multi-label, ``majority`` for single).
        k: See :func:`aggregate_multilabel`.
        thresholds: See :func:`aggregate_multilabel`.

    Returns:
        One row per field: ``field_column``, ``n_cells``, the aggregated ``proba_columns``,
        then ``label`` (single: the class column's name) or one boolean ``<column>_label``
        per class (multi-label).

    Raises:
        EvaluationError: On a missing column, an unknown task type or method, or values
            that are not probabilities.
    """
    missing = [c for c in [field_column, *proba_columns] if c not in cells.columns]
    if missing:
        raise EvaluationError(f"the cell table has no column(s) {', '.join(map(repr, missing))}; it has: "
                              f"{', '.join(map(str, cells.columns))}.")
    if not proba_columns:
        raise EvaluationError("no probability column given; pass one column per class.")
    values = cells[list(proba_columns)].to_numpy(dtype=np.float64)
    ids = cells[field_column].to_numpy()
    if task_type in ("multilabel", "binary"):
        result = aggregate_multilabel(ids, values, method=method or "mean", k=k, thresholds=thresholds)
    elif task_type == "single":
        result = aggregate_single(ids, values, method=method or "majority")
    else:
        raise EvaluationError(f"task type {task_type!r} is invalid; valid: single, multilabel, binary.")
    table = pd.DataFrame({field_column: result.fields, "n_cells": result.n_cells})
    for j, column in enumerate(proba_columns):
        table[column] = result.proba[:, j]
    if result.labels.ndim == 1:
        table["label"] = [proba_columns[i] for i in result.labels]
    else:
        for j, column in enumerate(proba_columns):
            table[f"{column}_label"] = result.labels[:, j]
    return table


def _grouped(field_ids: ArrayLike, proba: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes of the cells' fields (first-appearance order), the fields, the checked probabilities."""
    p = as_proba(proba)
    ids = np.asarray(field_ids)
    if ids.ndim != 1 or len(ids) != len(p):
        raise EvaluationError(
            f"field_ids must give one field per cell: {len(p)} cells, received field_ids of shape {ids.shape}."
        )
    if pd.isna(ids).any():
        raise EvaluationError(f"field_ids holds {int(pd.isna(ids).sum())} missing value(s); every cell needs "
                              f"its field.")
    codes, fields = pd.factorize(ids, sort=False)
    return codes.astype(np.int64), np.asarray(fields), p


def _group_sum(codes: np.ndarray, p: np.ndarray, n_fields: int) -> np.ndarray:
    out = np.zeros((n_fields, p.shape[1]))
    np.add.at(out, codes, p)
    return out


def _thresholds(thresholds: float | ArrayLike, n_classes: int) -> np.ndarray:
    cut = np.asarray(thresholds, dtype=np.float64)
    if cut.ndim == 0:
        cut = np.full(n_classes, float(cut))
    if cut.shape != (n_classes,):
        raise EvaluationError(f"thresholds must be one number or one per class ({n_classes}); received shape "
                              f"{cut.shape}.")
    if not np.all(np.isfinite(cut)) or cut.min() < 0 or cut.max() > 1:
        raise EvaluationError(f"thresholds must lie in [0, 1]; received {cut.tolist()}.")
    return cut


def _check_method(method: str, valid: tuple[str, ...], kind: str) -> None:
    if method not in valid:
        raise EvaluationError(f"{kind} aggregation {method!r} is invalid; valid: {', '.join(valid)}.")
