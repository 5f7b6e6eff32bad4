"""Re-evaluate a finished run: on its own test split, or on another dataset."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from cellclass.data.normalize import NormalizedView
from cellclass.data.prepared import PreparedData, PrepareSettings, prepare_data, prepare_every_row, read_split
from cellclass.data.spec import DatasetSpec
from cellclass.errors import CellclassError
from cellclass.evaluation.fields import FIELD_COLUMN, Aggregation, field_column, task_aggregations, tune_field_thresholds
from cellclass.evaluation.results import evaluate_tasks, evaluation_block, field_results, write_results
from cellclass.inference.predictor import Predictor
from cellclass.progress import ProgressFn


def run_spec(run: str | Path) -> DatasetSpec:
    """The dataset spec a run was trained on (from its ``config.yaml``)."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise CellclassError(f"{str(run)!r} is not a run folder: no config.yaml (made by `cellclass train`)")
    dataset = dict(yaml.safe_load(path.read_text())["dataset"])
    base = dataset.pop("base_dir")
    return DatasetSpec.from_dict(dataset, base_dir=base)


def evaluate_run(run: str | Path, settings: PrepareSettings, *, spec: DatasetSpec | None = None,
                 out: str | Path | None = None, tta: bool | None = None, aggregate_by: str | None = None,
                 aggregation: Aggregation | None = None, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Evaluate a run's best checkpoint and write metrics.json, predictions.csv, plots and a report.

    Without ``spec``: on the run's own test split (the saved row positions), with the
    thresholds tuned at training time. With ``spec``: on every row of that dataset,
    which must carry the same tasks and classes.

    A cell model is also evaluated at the field level (``field_predictions.csv`` and the
    ``fields`` block of ``metrics.json``) where the dataset has a ``field_id`` column or
    ``aggregate_by`` names one: its cells' probabilities aggregated to their fields (see
    :mod:`cellclass.evaluation.fields`). The field thresholds are those tuned on the
    validation fields at training time; for an aggregation training did not tune, they are
    tuned on the run's own validation fields (without ``spec``), else the cell thresholds
    (which are also used for fields of another column than ``field_id`` of another dataset).

    Args:
        run: Run folder.
        settings: The run's configuration (how its images were read and split).
        spec: Another dataset to evaluate on.
        out: Output folder (default ``RUN/evaluation`` or ``RUN/evaluation-<dataset>``).
        tta: Override the run's test-time augmentation setting.
        aggregate_by: The column naming each row's field (default ``field_id`` where present).
        aggregation: How cells make their field's answer (default: each task type's).
        progress: Progress callback.

    Returns:
        The ``metrics.json`` content.

    Raises:
        EvaluationError: When ``aggregation`` does not fit a task or ``aggregate_by`` is no column.
    """
    run = Path(run)
    predictor = Predictor.from_checkpoint(run, tta=tta)
    task_aggregations(predictor.encoders, aggregation)  # a mistaken aggregation fails before images are read
    data = _evaluation_data(run, settings, predictor, spec, progress)
    own = spec is None
    column = field_column(data.frame.columns, aggregate_by)
    idx = data.split.test if len(data.split.test) else data.split.val
    view = NormalizedView(data.images, predictor.normalizer, data.groups)
    probs = predictor.predict_normalized(view[idx])
    targets = {t: v[idx] for t, v in data.targets.items()}
    result = {
        "dataset": data.spec.name,
        "run": str(run),
        "split": data.describe_split() if own else {"method": "external dataset: every row evaluated",
                                                     "n_rows": int(len(idx))},
        "evaluation": evaluation_block(
            on="test" if own and len(data.split.test) else "all rows" if not own else "val", n_images=len(idx),
            checkpoint=predictor.identity.get("checkpoint"), tta=predictor.tta,
            thresholds="per class, tuned on the run's validation split" if predictor.thresholds else None),
        "model": predictor.identity.get("model"),
        "tasks": evaluate_tasks(predictor, targets, probs, predictor.thresholds),
    }
    fields = None
    if column is not None:
        if column != FIELD_COLUMN:  # the thresholds training stored are those of the fields of field_id
            predictor.field_thresholds = {}
        if own:
            _tune_missing(predictor, data, view, column, aggregation, getattr(settings, "threshold_method", "f1"))
        result["fields"], fields = field_results(predictor, data, column, idx, targets, probs, side="test",
                                                 aggregation=aggregation)
    out = Path(out) if out else run / ("evaluation" if own else f"evaluation-{data.spec.name}")
    write_results(out, result, predictor, data, idx, targets, probs, "test", fields=fields)
    return result


def _tune_missing(predictor: Predictor, data: PreparedData, view: NormalizedView, column: str,
                  aggregation: Aggregation | None, method: str) -> None:
    """Tune on the run's validation fields the field thresholds training did not store for ``aggregation``."""
    aggregations = task_aggregations(predictor.encoders, aggregation)
    missing = [t for t, e in predictor.encoders.items() if e.type == "multilabel"
               and aggregations[t].key not in predictor.field_thresholds.get(t, {})]
    val = data.split.val
    if not missing or not len(val):
        return
    encoders = {t: predictor.encoders[t] for t in missing}
    probs = predictor.predict_normalized(view[val])
    tuned = tune_field_thresholds(encoders, data.frame[column].astype(str).to_numpy()[val], probs,
                                  {t: data.targets[t][val] for t in missing}, [aggregations[missing[0]]], method)
    for task, by_key in tuned.items():
        predictor.field_thresholds = {**predictor.field_thresholds,
                                      task: {**predictor.field_thresholds.get(task, {}), **by_key}}


def _evaluation_data(run: Path, settings: PrepareSettings, predictor: Predictor, spec: DatasetSpec | None,
                     progress: ProgressFn | None) -> PreparedData:
    """The run's own data with its saved split, or every row of ``spec`` (read as the run's images were)."""
    if spec is None:
        own = run_spec(run).select_tasks(list(predictor.encoders))
        saved = read_split(run / "split.json")
        if saved is None:
            raise CellclassError(f"{str(run)!r} has no split.json, so its test split is unknown; valid: a run "
                                 "folder made by `cellclass train`, or --data SPEC to evaluate on another dataset")
        return prepare_data(own, settings, split_override=saved, progress=progress)
    spec = spec.select_tasks(list(predictor.encoders))
    # Stacks are read as the training images were, unless the spec says otherwise.
    spec = dataclasses.replace(spec, image=spec.image.with_defaults(predictor.axes))
    return prepare_every_row(spec, settings, predictor.encoders)
