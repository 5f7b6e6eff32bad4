"""The fold models of a cross-validation as an ensemble: its thresholds, and its test.

A fold model's own test is its fold, and every other fold trained it, so the ensemble of
all fold models has no honest score on any image of the folds. Only images held out from
every fold (``cellclass cv --holdout``) test it, beside each fold model on the same images.
Its multi-label thresholds are tuned on the pooled out-of-fold predictions: each image of
the folds predicted by the one fold model that did not train on it.

:func:`evaluate_ensemble` scores any ensemble on another dataset, each member reading its
images as its own training images were read.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellclass.data.normalize import NormalizedView
from cellclass.data.prepared import PreparedData, PrepareSettings, prepare_every_row
from cellclass.data.spec import DatasetSpec
from cellclass.errors import EnsembleError
from cellclass.evaluation.results import evaluate_tasks, evaluation_block, tune_task_thresholds, write_results
from cellclass.inference.ensemble import Ensemble
from cellclass.inference.predictor import Predictor

log = logging.getLogger(__name__)

ENSEMBLE_NAME = "ensemble"
"""The ensemble's name beside the fold models' (``fold_0`` ...) in the held-out results."""


def rows_probabilities(predictor: Predictor, data: PreparedData, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Probabilities per task of ``rows`` of prepared data (read as the predictor's training images were)."""
    view = NormalizedView(data.images, predictor.normalizer, data.groups)
    return predictor.predict_normalized(view[rows] if predictor.kind == "baseline" else view.rows(rows))


def out_of_fold_thresholds(members: Sequence[Predictor], data: PreparedData, tests: Sequence[np.ndarray],
                           method: str) -> tuple[dict[str, list[float]], str | None]:
    """Per-class thresholds of the multi-label tasks for the ensemble's mean probabilities.

    Tuned on the pooled out-of-fold predictions: fold model ``k`` predicts its own test fold
    ``tests[k]``. These are one model's probabilities, not the ensemble's mean (which no
    image of the folds can give honestly); they cover every image of the folds, where a
    member's own thresholds saw its validation side only.

    Args:
        members: The fold models, in fold order.
        data: The cross-validation's prepared data.
        tests: Each fold's test rows.
        method: ``f1``, ``prevalence`` or ``none`` (as training tunes them).

    Returns:
        The thresholds by task and how they were chosen (empty and ``None`` without a multi-label task).
    """
    encoders = members[0].encoders
    if not any(e.type == "multilabel" for e in encoders.values()):
        return {}, None
    rows = np.concatenate(list(tests))
    pooled: dict[str, list[np.ndarray]] = {t: [] for t in encoders}
    for member, test in zip(members, tests, strict=True):
        probs = rows_probabilities(member, data, test)
        for task in encoders:
            pooled[task].append(probs[task])
    probs = {t: np.concatenate(v) for t, v in pooled.items()}
    targets = {t: v[rows] for t, v in data.targets.items()}
    thresholds = tune_task_thresholds(members[0], targets, probs, method)
    return thresholds, (f"tuned on the pooled out-of-fold predictions of the {len(members)} fold models "
                        f"({method}, {len(rows)} images)")


def evaluate_held_out(members: Sequence[Predictor], names: Sequence[str], data: PreparedData, rows: np.ndarray, *,
                      ensemble: Ensemble | None = None, out: Path | None = None,
                      note: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Every fold model, and the ensemble, scored on the same held-out rows.

    Each fold model decides with its own thresholds (as its run did), the ensemble with its
    own. With ``out``, the ensemble's results (``metrics.json``, ``predictions.csv``,
    plots, mistakes, ``report.html``) are written there.

    Args:
        members: The fold models.
        names: How each is named in the results (``fold_0`` ...).
        data: The prepared data the rows index.
        rows: The held-out rows.
        ensemble: The ensemble of ``members``.
        out: Folder of the ensemble's results.
        note: How the rows were held out, written in the ensemble's ``metrics.json``.

    Returns:
        Model name (the fold names, then :data:`ENSEMBLE_NAME`) to its metrics per task.
    """
    targets = {t: v[rows] for t, v in data.targets.items()}
    each = [rows_probabilities(m, data, rows) for m in members]
    results = {name: evaluate_tasks(m, targets, p, m.thresholds) for name, m, p in zip(names, members, each,
                                                                                          strict=True)}
    if ensemble is None:
        return results
    probs = ensemble.combine(each)
    results[ENSEMBLE_NAME] = evaluate_tasks(ensemble, targets, probs, ensemble.thresholds)  # type: ignore[arg-type]
    if out is not None:
        split = data.describe_split()
        result = _result(ensemble, data, {**split, "method": note or split.get("method")},
                         on="test (held out from every fold)", n_images=len(rows),
                         models=f"{len(members)} fold models", tasks=results[ENSEMBLE_NAME])
        write_results(out, result, ensemble, data, rows, targets, probs, "test")  # type: ignore[arg-type]
    return results


def members_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]],
                  metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Long rows (model, task, metric, value) of :func:`evaluate_held_out`'s results, for ``metrics``."""
    return [{"model": model, "task": task, "metric": name, "value": float(m[name])}
            for model, tasks in results.items() for task, m in tasks.items() for name in metrics
            if isinstance(m.get(name), (int, float)) and not isinstance(m.get(name), bool)]


def read_per_member(members: Sequence[Predictor], settings: Sequence[PrepareSettings], spec: DatasetSpec,
                    prepare: Callable[[DatasetSpec, PrepareSettings], PreparedData]) -> list[PreparedData]:
    """A dataset as each member reads it: its image size, fit, channels and Z/T projection
    (where the spec leaves them unset); members that read alike share one reading.

    Args:
        members: The models.
        settings: Each one's run configuration.
        spec: The dataset.
        prepare: Reads it (``prepare_every_row``, ``prepare_pool`` ...).

    Raises:
        EnsembleError: When two readings hold different rows.
    """
    read: list[tuple[tuple[Any, ...], PreparedData]] = []
    out = []
    for member, member_settings in zip(members, settings, strict=True):
        key = (member.image_size, member.fit, tuple(member.channel_indices), member.axes)
        data = next((d for k, d in read if k == key), None)
        if data is None:
            data = prepare(dataclasses.replace(spec, image=spec.image.with_defaults(member.axes)), member_settings)
            if read and list(data.ids) != list(read[0][1].ids):
                raise EnsembleError(f"the ensemble's members read {spec.name!r} into different rows "
                                    f"({len(data.ids)} and {len(read[0][1].ids)}); valid: a dataset every member "
                                    "reads alike")
            read.append((key, data))
        out.append(data)
    return out


def evaluate_ensemble(ensemble: Ensemble, settings: Sequence[PrepareSettings], spec: DatasetSpec,
                      out: str | Path) -> dict[str, Any]:
    """Score an ensemble on every row of a dataset; write its results into ``out``.

    Each member reads the dataset as its training images were read (image size, fit,
    channels, Z/T projection); members that read alike share one reading.

    Args:
        ensemble: The models.
        settings: Each member's run configuration (how its images were read).
        spec: The dataset, with the members' tasks and classes.
        out: Folder of ``metrics.json``, ``predictions.csv``, plots, mistakes and ``report.html``.

    Returns:
        The ``metrics.json`` content.

    Raises:
        LabelError: When a label is not one of the members' classes.
    """
    spec = spec.select_tasks(list(ensemble.encoders))
    readings = read_per_member(ensemble.members, settings, spec,
                               lambda s, member_settings: prepare_every_row(s, member_settings, ensemble.encoders))
    each = [rows_probabilities(m, d, np.arange(len(d.ids))) for m, d in zip(ensemble.members, readings, strict=True)]
    data = readings[0]
    rows = np.arange(len(data.ids))
    probs = ensemble.combine(each)
    targets = dict(data.targets)
    result = _result(ensemble, data, {"method": "external dataset: every row evaluated", "n_rows": len(rows)},
                     on="all rows", n_images=len(rows), models=f"{len(ensemble.members)} models",
                     tasks=evaluate_tasks(ensemble, targets, probs, ensemble.thresholds))  # type: ignore[arg-type]
    write_results(Path(out), result, ensemble, data, rows, targets, probs, "all rows")  # type: ignore[arg-type]
    return result


def _result(ensemble: Any, data: Any, split: dict[str, Any], *, on: str, n_images: int, models: str,
            tasks: dict[str, Any]) -> dict[str, Any]:
    """The ``metrics.json`` content of an ensemble's evaluation."""
    return {
        "dataset": data.spec.name,
        "split": split,
        "evaluation": evaluation_block(
            on=on, n_images=n_images, checkpoint=f"the best checkpoint of each of {models}, probabilities averaged",
            tta=ensemble.tta, thresholds=ensemble.thresholds_from if ensemble.thresholds else None),
        "model": ensemble.identity["model"],
        "members": [str(r) for r in ensemble.runs],
        "tasks": tasks,
    }
