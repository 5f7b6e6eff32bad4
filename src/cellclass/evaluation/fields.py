"""Field answers of a cell model: its cells' probabilities aggregated to their field, and scored.

A model trained on single-cell crops that inherit their field's labels (``cellclass crops``,
the weak-label setting of the HPA single-cell challenge) answers per cell. A field's answer
aggregates the answers of its cells (:mod:`cellclass.evaluation.aggregate`):

- **Which cells make a field**: the rows sharing a value of the ``field_id`` column that
  ``crops`` writes (:data:`FIELD_COLUMN`), or of any column named instead.
- **Aggregation** (:class:`Aggregation`): ``mean``, ``max`` or ``topk_mean`` (the mean of
  the ``k`` most probable cells) per class for multi-label tasks (default ``mean``);
  ``majority`` vote or ``mean`` probability for single-label and binary tasks (default
  ``majority``).
- **Field truth**: multi-label, the union of its cells' labels (cells inherit their field's
  labels, so the union is the field's own); single-label, the commonest label of its
  labelled cells. Fields whose cells disagree are counted (``n_fields_mixed_labels``).
- **Thresholds** of multi-label tasks: per class, tuned on the *validation fields* (their
  cells aggregated the same way) with the run's threshold method (F1 by default), exactly
  as the cell thresholds are tuned on validation cells. Training tunes them for each of
  :data:`STORED_AGGREGATIONS` and keeps them in the checkpoint; another aggregation is
  tuned on the run's validation fields where they are at hand (``cellclass evaluate RUN``),
  else the cell thresholds are used, and the results say which.

Fields are scored with the metric functions of the cell level
(:func:`cellclass.evaluation.metrics.task_metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cellclass.data.labels import TaskEncoder
from cellclass.errors import EvaluationError
from cellclass.evaluation.aggregate import (
    MULTILABEL_METHODS,
    SINGLE_METHODS,
    aggregate_multilabel,
    aggregate_single,
)
from cellclass.evaluation.metrics import task_metrics
from cellclass.evaluation.thresholds import tune_thresholds

__all__ = [
    "AGGREGATION_CHOICES",
    "FIELD_COLUMN",
    "STORED_AGGREGATIONS",
    "Aggregation",
    "FieldAnswers",
    "answer_fields",
    "choose_thresholds",
    "evaluate_fields",
    "field_column",
    "field_metrics",
    "field_predictions_frame",
    "field_targets",
    "fields_block",
    "parse_aggregation",
    "task_aggregations",
    "tune_field_thresholds",
]

FIELD_COLUMN = "field_id"
"""The column of a cell manifest naming each cell's field (written by ``cellclass crops``)."""

AGGREGATION_CHOICES = "mean, max, topk or topk:K (multi-label); majority, mean (single-label)"
"""How ``--aggregate`` is written, for messages and help texts."""


@dataclass(frozen=True)
class Aggregation:
    """How the cells of a field make its answer.

    Attributes:
        method: ``mean``, ``max``, ``topk_mean`` (multi-label) or ``majority``, ``mean``
            (single-label).
        k: Cells averaged per class by ``topk_mean``.
    """

    method: str
    k: int = 3

    @property
    def key(self) -> str:
        """The name results and checkpoints use: ``mean``, ``max``, ``topk_mean:3``, ``majority``."""
        return f"topk_mean:{self.k}" if self.method == "topk_mean" else self.method

    def describe(self) -> str:
        """In words, for reports."""
        if self.method == "topk_mean":
            return f"mean of the {self.k} most probable cells per class"
        return {"mean": "mean of the cells' probabilities", "max": "max of the cells' probabilities",
                "majority": "majority vote of the cells"}[self.method]


STORED_AGGREGATIONS: tuple[Aggregation, ...] = (Aggregation("mean"), Aggregation("max"), Aggregation("topk_mean", 3))
"""The multi-label aggregations whose field thresholds training tunes and stores."""


def parse_aggregation(text: str | None) -> Aggregation | None:
    """An :class:`Aggregation` from its written form (``mean``, ``max``, ``topk``, ``topk:5``, ``majority``).

    Returns:
        ``None`` for ``None`` (each task takes its default).

    Raises:
        EvaluationError: On another name, or a ``k`` that is not an integer >= 1.
    """
    if text is None:
        return None
    name, colon, k = str(text).strip().lower().partition(":")
    if name in ("topk", "topk_mean"):
        if not colon:
            return Aggregation("topk_mean", 3)
        if not k.isdigit() or int(k) < 1:
            raise EvaluationError(f"aggregation {text!r}: k must be an integer >= 1; valid: e.g. topk:3")
        return Aggregation("topk_mean", int(k))
    if name in ("mean", "max", "majority") and not colon:
        return Aggregation(name)
    raise EvaluationError(f"aggregation {text!r} is invalid; valid: {AGGREGATION_CHOICES}")


def task_aggregations(encoders: Mapping[str, TaskEncoder], choice: Aggregation | None) -> dict[str, Aggregation]:
    """The aggregation of every task: ``choice``, or each task type's default.

    Raises:
        EvaluationError: When ``choice`` does not apply to a task's type (``max`` for a
            single-label task, ``majority`` for a multi-label one).
    """
    out = {}
    for task, encoder in encoders.items():
        multi = encoder.type == "multilabel"
        if choice is None:
            out[task] = Aggregation("mean" if multi else "majority")
            continue
        valid = MULTILABEL_METHODS if multi else SINGLE_METHODS
        if choice.method not in valid:
            kind = "multi-label" if multi else f"{encoder.type}-label" if encoder.type == "single" else "binary"
            names = ", ".join("topk[:K]" if m == "topk_mean" else m for m in valid)
            raise EvaluationError(f"aggregation {choice.key!r} does not apply to task {task!r}, which is {kind}; "
                                  f"valid for it: {names}")
        out[task] = choice
    return out


def field_column(columns: Sequence[str], aggregate_by: str | None) -> str | None:
    """The column naming each row's field: ``aggregate_by``, else :data:`FIELD_COLUMN` where present.

    Returns:
        ``None`` when there is no field level (no ``aggregate_by`` and no ``field_id`` column).

    Raises:
        EvaluationError: When ``aggregate_by`` is not one of ``columns``.
    """
    names = [str(c) for c in columns]
    if aggregate_by is None:
        return FIELD_COLUMN if FIELD_COLUMN in names else None
    if aggregate_by not in names:
        shown = ", ".join(n for n in names if not n.startswith("_"))
        raise EvaluationError(f"--aggregate-by {aggregate_by!r} is not a column of the dataset; valid: one of "
                              f"{shown}")
    return aggregate_by


@dataclass
class FieldAnswers:
    """Every field's answer, per task.

    Attributes:
        column: The column the fields were read from.
        fields: Field ids, in the order of their first cell.
        n_cells: Cells per field.
        codes: The field (index into ``fields``) of each cell.
        probs: Per task, ``(n_fields, n_classes)`` aggregated scores: probabilities, or vote
            shares for ``majority``.
        labels: Per task, multi-label ``(n_fields, n_classes)`` booleans, single-label
            ``(n_fields,)`` class indices.
        aggregations: The aggregation of each task.
        thresholds: The per-class thresholds of each multi-label task.
    """

    column: str
    fields: np.ndarray
    n_cells: np.ndarray
    codes: np.ndarray
    probs: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    aggregations: dict[str, Aggregation]
    thresholds: dict[str, list[float]]

    def decoded(self, encoders: Mapping[str, TaskEncoder]) -> dict[str, list[Any]]:
        """The labels by class name: a list of names per field (multi-label) or one name."""
        out: dict[str, list[Any]] = {}
        for task, labels in self.labels.items():
            classes = encoders[task].classes
            if labels.ndim == 2:
                out[task] = [[classes[j] for j in np.flatnonzero(row)] for row in labels]
            else:
                out[task] = [classes[int(i)] for i in labels]
        return out


def answer_fields(column: str, field_ids: Sequence[Any] | np.ndarray, probs: Mapping[str, np.ndarray],
                  encoders: Mapping[str, TaskEncoder], aggregations: Mapping[str, Aggregation],
                  thresholds: Mapping[str, Sequence[float]] | None = None) -> FieldAnswers:
    """Aggregate per-cell probabilities to their fields, task by task.

    Args:
        column: The column ``field_ids`` come from (reported).
        field_ids: Each cell's field.
        probs: Per task, the cells' probabilities ``(n_cells, n_classes)``.
        encoders: The tasks.
        aggregations: The aggregation of each task (:func:`task_aggregations`).
        thresholds: Per-class field thresholds of multi-label tasks (default 0.5).

    Raises:
        EvaluationError: On no cell, a missing field id, or values that are not probabilities.
    """
    ids = np.asarray(field_ids, dtype=object)
    if len(ids) == 0:
        raise EvaluationError("no cell to aggregate; valid: at least one cell with its field")
    codes, fields = pd.factorize(ids, sort=False)
    out_probs, out_labels, used = {}, {}, {}
    n_cells = np.bincount(codes, minlength=len(fields))
    for task, encoder in encoders.items():
        agg = aggregations[task]
        if encoder.type == "multilabel":
            cut = list((thresholds or {}).get(task) or [0.5] * encoder.n_outputs)
            result = aggregate_multilabel(ids, probs[task], method=agg.method, k=agg.k, thresholds=cut)
            used[task] = [float(t) for t in cut]
        else:
            result = aggregate_single(ids, probs[task], method=agg.method)
        out_probs[task], out_labels[task] = result.proba, result.labels
    return FieldAnswers(column, np.asarray(fields, dtype=object), n_cells, codes.astype(np.int64), out_probs,
                        out_labels, dict(aggregations), used)


def field_targets(codes: np.ndarray, n_fields: int, targets: Mapping[str, np.ndarray],
                  encoders: Mapping[str, TaskEncoder]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The true labels of every field from its cells', and how many fields' cells disagree.

    Multi-label: the union of the cells' labels. Single-label and binary: the commonest
    label among its labelled cells (the lower class index on a tie), ``-1`` for a field
    without one.
    """
    truth, mixed = {}, {}
    for task, encoder in encoders.items():
        y = np.asarray(targets[task])
        if encoder.type == "multilabel":
            high = np.zeros((n_fields, y.shape[1]), dtype=np.int64)
            low = np.ones((n_fields, y.shape[1]), dtype=np.int64)
            np.maximum.at(high, codes, y)
            np.minimum.at(low, codes, y)
            truth[task], mixed[task] = high, int((high != low).any(axis=1).sum())
        else:
            labelled = y >= 0
            counts = np.zeros((n_fields, encoder.n_outputs), dtype=np.int64)
            np.add.at(counts, (codes[labelled], y[labelled]), 1)
            truth[task] = np.where(counts.sum(axis=1) > 0, counts.argmax(axis=1), -1)
            mixed[task] = int(((counts > 0).sum(axis=1) > 1).sum())
    return truth, mixed


def tune_field_thresholds(encoders: Mapping[str, TaskEncoder], field_ids: Sequence[Any] | np.ndarray,
                          probs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                          aggregations: Sequence[Aggregation], method: str) -> dict[str, dict[str, list[float]]]:
    """Per-class field thresholds of every multi-label task, tuned on validation fields.

    The validation cells are aggregated to their fields by each of ``aggregations``; the
    thresholds are then tuned on the fields' aggregated probabilities against the fields'
    labels, as :func:`~cellclass.evaluation.thresholds.tune_thresholds` tunes cell thresholds.

    Args:
        encoders: The tasks (single-label ones are skipped: their answer is the argmax).
        field_ids: The field of each validation cell.
        probs: The validation cells' probabilities, per task.
        targets: Their labels, per task.
        aggregations: The multi-label aggregations to tune for.
        method: ``f1``, ``prevalence`` or ``none`` (0.5 everywhere).

    Returns:
        Task, then :attr:`Aggregation.key`, to thresholds (empty without a multi-label task
        or a validation cell).
    """
    multi = {t: e for t, e in encoders.items() if e.type == "multilabel"}
    if not multi or len(field_ids) == 0:
        return {}
    out: dict[str, dict[str, list[float]]] = {t: {} for t in multi}
    for agg in aggregations:
        answers = answer_fields(FIELD_COLUMN, field_ids, {t: probs[t] for t in multi}, multi,
                                {t: agg for t in multi})
        truth, _ = field_targets(answers.codes, len(answers.fields), targets, multi)
        for task, encoder in multi.items():
            cut = np.full(encoder.n_outputs, 0.5)
            # Classes no validation field shows keep 0.5, as tune_thresholds keeps them (said once, for the cells).
            shown = truth[task].any(axis=0)
            if method != "none" and shown.any():
                cut[shown] = tune_thresholds(truth[task][:, shown], answers.probs[task][:, shown], method=method)
            out[task][agg.key] = [float(t) for t in cut]
    return out


def choose_thresholds(encoders: Mapping[str, TaskEncoder], aggregations: Mapping[str, Aggregation],
                      stored: Mapping[str, Mapping[str, Sequence[float]]],
                      cell: Mapping[str, Sequence[float]]) -> tuple[dict[str, list[float]], dict[str, str]]:
    """The field thresholds of every multi-label task and where they come from.

    Args:
        encoders: The tasks.
        aggregations: The aggregation of each task.
        stored: Field thresholds by task and aggregation key (tuned on validation fields).
        cell: The cell thresholds, used where ``stored`` has none for the aggregation.

    Returns:
        ``(thresholds, sources)``: per multi-label task, the thresholds and a sentence.
    """
    thresholds, sources = {}, {}
    for task, encoder in encoders.items():
        if encoder.type != "multilabel":
            continue
        key = aggregations[task].key
        if (stored.get(task) or {}).get(key):
            thresholds[task] = [float(v) for v in stored[task][key]]
            sources[task] = f"per class, tuned on the validation fields ({key} of their cells)"
        elif cell.get(task):
            thresholds[task] = [float(v) for v in cell[task]]
            sources[task] = (f"the cell thresholds (tuned on validation cells): the run holds no field thresholds "
                             f"for {key}")
        else:
            thresholds[task] = [0.5] * encoder.n_outputs
            sources[task] = "0.5 for every class (the run holds no tuned thresholds)"
    return thresholds, sources


def field_metrics(encoders: Mapping[str, TaskEncoder], answers: FieldAnswers,
                  truth: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Metrics per task of the fields' answers against their labels (the cell level's functions).

    Multi-label tasks also report the fixed 0.5 threshold, for contrast; single-label
    tasks are scored on the fields' own labels (a majority vote's tie broken as
    :func:`~cellclass.evaluation.aggregate.aggregate_single` breaks it).
    """
    out = {}
    for task, encoder in encoders.items():
        y, p = np.asarray(truth[task]), answers.probs[task]
        if encoder.type == "multilabel":
            metrics = task_metrics("multilabel", y, p, encoder.classes, thresholds=np.asarray(answers.thresholds[task]))
            fixed = task_metrics("multilabel", y, p, encoder.classes, thresholds=0.5)
            metrics["fixed_threshold_0.5"] = {k: fixed[k] for k in ("macro_f1", "micro_f1", "samples_f1",
                                                                    "hamming_loss") if k in fixed}
            keep = np.ones(len(y), dtype=bool)
        else:
            keep = y >= 0
            predictions = answers.labels[task][keep] if encoder.type == "single" else None
            metrics = task_metrics(encoder.type, y[keep], p[keep], encoder.classes, predictions=predictions)
        metrics["n_unlabeled_skipped"] = int((~keep).sum())
        out[task] = metrics
    return out


def fields_block(answers: FieldAnswers, metrics: Mapping[str, Mapping[str, Any]], *, on: str,
                 sources: Mapping[str, str], mixed: Mapping[str, int]) -> dict[str, Any]:
    """The ``fields`` entry of ``metrics.json``: which fields, how their answers were made, their metrics.

    Args:
        answers: The fields' answers.
        metrics: Their metrics per task (:func:`field_metrics`).
        on: Which fields (``test fields`` ...).
        sources: Where each multi-label task's thresholds come from.
        mixed: Per task, the fields whose cells' labels disagree.
    """
    counts = answers.n_cells
    tasks = {}
    for task, values in metrics.items():
        agg = answers.aggregations[task]
        tasks[task] = {"aggregation": agg.key, "aggregation_text": agg.describe(),
                       "thresholds_from": sources.get(task, "argmax (single-label task)"),
                       "n_fields_mixed_labels": mixed.get(task, 0), **values}
    return {
        "column": answers.column, "on": on, "n_fields": len(answers.fields), "n_cells": int(counts.sum()),
        "cells_per_field": {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())},
        "truth": "multi-label: the union of the field's cells' labels (the field's own); single-label: the "
                 "commonest label of its cells",
        "tasks": tasks,
    }


def field_predictions_frame(answers: FieldAnswers, encoders: Mapping[str, TaskEncoder],
                            truth: Mapping[str, np.ndarray] | None = None, side: str | None = None) -> pd.DataFrame:
    """One row per field: its id, cell count, true (when known) and predicted labels and aggregated scores per task."""
    frame = pd.DataFrame({answers.column: answers.fields, "n_cells": answers.n_cells})
    if side is not None:
        frame["split"] = side
    decoded = answers.decoded(encoders)
    for task, encoder in encoders.items():
        if truth is not None:
            y = np.asarray(truth[task])
            if encoder.type == "multilabel":
                frame[f"{task}__true"] = [";".join(v) for v in encoder.decode(y)]
            else:
                frame[f"{task}__true"] = [encoder.classes[i] if i >= 0 else "" for i in y]
        labels = decoded[task]
        frame[f"{task}__pred"] = [";".join(v) if isinstance(v, list) else v for v in labels]
        for j, cls in enumerate(encoder.classes):
            frame[f"{task}__p__{cls}"] = np.round(answers.probs[task][:, j], 6)
    return frame


def evaluate_fields(encoders: Mapping[str, TaskEncoder], column: str, field_ids: Sequence[Any] | np.ndarray,
                    probs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                    aggregations: Mapping[str, Aggregation], thresholds: Mapping[str, Sequence[float]],
                    sources: Mapping[str, str], *, on: str, side: str | None = None) -> tuple[dict[str, Any],
                                                                                           pd.DataFrame]:
    """Answer the fields of some cells and score them: the ``fields`` block and ``field_predictions.csv``.

    Args:
        encoders: The tasks.
        column: The column ``field_ids`` come from.
        field_ids: Each cell's field.
        probs: The cells' probabilities, per task.
        targets: The cells' labels, per task (the fields' labels are made of them).
        aggregations: The aggregation of each task.
        thresholds: The field thresholds of the multi-label tasks.
        sources: Where those come from, a sentence per task.
        on: Which fields, for the block (``test fields`` ...).
        side: The split side written in the table's ``split`` column, if any.

    Returns:
        ``(block, table)``: :func:`fields_block` and :func:`field_predictions_frame`.
    """
    answers = answer_fields(column, field_ids, probs, encoders, aggregations, thresholds)
    truth, mixed = field_targets(answers.codes, len(answers.fields), targets, encoders)
    block = fields_block(answers, field_metrics(encoders, answers, truth), on=on, sources=sources, mixed=mixed)
    return block, field_predictions_frame(answers, encoders, truth, side)
