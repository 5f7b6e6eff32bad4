"""Model commands: models, train, evaluate, predict, cv, compare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from cellclass.cli.app import app
from cellclass.cli.options import DatasetOptions, SpecArg, TrackerOptions, TrainOptions, takes_options
from cellclass.cli.output import (
    FormatOpt,
    OutputFormat,
    check_output_file,
    console,
    err_console,
    metric_text,
    print_error,
    stage_progress,
    write_csv,
    write_json,
)
from cellclass.errors import CellclassError, SpecError

AggregateByOpt = Annotated[str | None, typer.Option(
    "--aggregate-by", help="Answer per field too: the column naming each cell's field (default: field_id where the "
                           "dataset has it, as `cellclass crops` writes). predict with image files: folder (each "
                           "file's parent folder is its field).", show_default=False)]
AggregateOpt = Annotated[str | None, typer.Option(
    "--aggregate", help="How a field's cells make its answer: mean, max, topk or topk:K (multi-label; default "
                        "mean), majority or mean (single-label; default majority).", show_default=False)]


@app.command()
def models(
    pattern: Annotated[str | None, typer.Argument(help="Shell-style filter, e.g. 'resnet*'.")] = None,
) -> None:
    """List model names: scikit-learn baselines, LeNet-5 and every timm backbone."""
    from cellclass.models import list_models, model_info

    names = list_models(pattern)
    ours = [n for n in names if model_info(n).source == "cellclass"] if len(names) < 2000 else \
        [n for n in ("lenet5", "logreg", "mlp", "svm") if n in names]
    for name in ours:
        info = model_info(name)
        console.print(f"[bold]{name}[/bold]  ({info.kind}) {info.description}")
    others = [n for n in names if n not in ours]
    if others:
        console.print(f"timm backbones ({len(others)}): " + ", ".join(others[:200]) +
                      (" ..." if len(others) > 200 else ""))


@app.command()
@takes_options
def train(
    spec: SpecArg,
    out: Annotated[Path, typer.Option("--out", help="Run folder.")],
    dataset: DatasetOptions,
    training: TrainOptions,
    tracking: TrackerOptions,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out with its settings; "
                                         "--epochs N (more than done) extends it, other changes are refused.")] = False,
    register: Annotated[str | None, typer.Option("--register", help="MLflow: register the trained model under "
                                                 "this name in the tracking store's registry.")] = None,
) -> None:
    """Train a model, select its best epoch on validation, evaluate it on test, write the run folder."""
    from cellclass.training.loop import train as run_train

    if register is not None and tracking.tracker != "mlflow":
        raise SpecError(f"--register {register} needs the MLflow tracker; got --tracker {tracking.tracker}; "
                        "valid: --tracker mlflow (the default)")

    ds = dataset.to_spec(spec)
    ds.load_manifest()  # a bad manifest fails now, before a tracker opens a run for it
    base = None
    if resume and (out / "config.yaml").is_file():
        from cellclass.training.config import run_config

        base = run_config(out)  # the options given are checked against it (more epochs: applied)
    config = training.to_config(base)
    with tracking.open(out, "train") as tracker, stage_progress() as update:
        result = run_train(ds, config, out, resume=resume, progress=update, tracker=tracker)
    if result:
        print_metrics(result, out)
    if result and register is not None:
        from cellclass.tracking.mlflow_model import register_run

        done = register_run(out, register)
        console.print(f"registered as {register} version {done.version}: {done.uri} in {done.store} (serve it "
                      f"with `cellclass serve {done.uri} --tracking-uri {done.store}`)", highlight=False)


SINGLE_COLUMNS = (("accuracy", "accuracy"), ("balanced acc.", "balanced_accuracy"), ("macro F1", "macro_f1"),
                  ("ROC-AUC", "roc_auc"))
"""Summary columns (header, metric) of a single-label or binary task."""
MULTILABEL_COLUMNS = (("macro F1", "macro_f1"), ("micro F1", "micro_f1"), ("mAP", "map"),
                      ("macro ROC-AUC", "macro_roc_auc"), ("Hamming loss", "hamming_loss"))
"""Summary columns (header, metric) of a multi-label task."""


def _is_multilabel(metrics: dict[str, Any]) -> bool:
    return metrics.get("task_type") == "multilabel" or ("hamming_loss" in metrics and "accuracy" not in metrics)


def metric_tables(tasks: dict[str, dict[str, Any]], title: str | None = None,
                  text_columns: tuple[str, ...] = ()) -> list[Table]:
    """Tables of a row per task, with the metrics that fit its type: one table when every task
    is of one kind, else one for single-label and binary tasks and one for multi-label tasks.

    Args:
        tasks: Task name to its metrics (a ``tasks`` block of ``metrics.json``).
        title: Title of the table (or prefix of the titles of two).
        text_columns: Keys of each task's metrics shown as they are, after the task name.
    """
    kinds: dict[bool, list[str]] = {}
    for task, metrics in tasks.items():
        kinds.setdefault(_is_multilabel(metrics), []).append(task)
    tables = []
    for multilabel, names in kinds.items():
        columns = MULTILABEL_COLUMNS if multilabel else SINGLE_COLUMNS
        kind = "multi-label tasks" if multilabel else "single-label and binary tasks"
        table = Table(title=title if len(kinds) == 1 else f"{title}: {kind}" if title else kind)
        for header in ("task", *text_columns, *(h for h, _ in columns)):
            table.add_column(header, justify="right")
        for task in names:
            metrics = tasks[task]
            table.add_row(task, *[str(metrics.get(k, "")) for k in text_columns],
                          *[metric_text(metrics.get(k)) for _, k in columns])
        tables.append(table)
    return tables


def print_metrics(result: dict[str, Any], out: Path) -> None:
    """A run's metrics (its ``metrics.json``): how it was split and evaluated, a row per task."""
    split = result["split"]
    console.print(f"[bold]{result.get('model')}[/bold] on {result['dataset']}: split {split.get('method')}"
                  + (f" by {split['group_column']}" if split.get("group_column") else "")
                  + f"; evaluated on {result['evaluation']['on']} ({result['evaluation']['n_images']} images)")
    if split.get("warning"):
        console.print(f"[bold red]warning:[/bold red] {split['warning']}")
    fields = result.get("fields")
    for table in metric_tables(result["tasks"], "cell level" if fields else None):
        console.print(table)
    if fields:
        _print_fields(fields)
    console.print(f"run folder: {out} (metrics.json, predictions.csv{', field_predictions.csv' if fields else ''}, "
                  "mistakes_<task>.csv, plots/, report.html)")


def _print_fields(fields: dict[str, Any]) -> None:
    """The field level of a cell model's metrics: its fields, how they were answered, a row per task."""
    counts = fields["cells_per_field"]
    title = (f"field level: {fields['n_fields']} {fields['on']} by {fields['column']} "
             f"({fields['n_cells']} cells, {counts['min']} to {counts['max']} per field)")
    for table in metric_tables(fields["tasks"], title, text_columns=("aggregation",)):
        console.print(table)
    for task, m in fields["tasks"].items():
        if m["thresholds_from"].startswith("argmax"):
            continue
        console.print(f"field thresholds of {task}: {m['thresholds_from']}")
    if fields.get("n_fields_split_across_sides"):
        console.print(f"[bold red]warning:[/bold red] {fields['n_fields_split_across_sides']} field(s) have cells on "
                      f"other sides of the split; they are answered from their {fields['on'].split()[0]} cells only")


@app.command()
@takes_options
def evaluate(
    run: Annotated[Path, typer.Argument(
        help="Run folder made by `cellclass train`; or a `cellclass cv` folder (its ensemble), with --data.")],
    dataset: DatasetOptions,
    data: Annotated[Path | None, typer.Option("--data", help="Evaluate on this dataset instead of the run's test split.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN/evaluation).")] = None,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="D4 test-time augmentation.")] = None,
    member: Annotated[list[Path] | None, typer.Option(
        "--member", help="Another run folder (or cv folder) whose models join RUN's in an ensemble (with --data). "
                         "Repeatable.", show_default=False)] = None,
    aggregate_by: AggregateByOpt = None,
    aggregate: AggregateOpt = None,
) -> None:
    """Evaluate a run's best checkpoint on its test split or on another dataset (--data).

    A cell model (trained on `cellclass crops` output) is evaluated at the cell level and at
    the field level: its cells' probabilities aggregated to their field (the field_id
    column, or --aggregate-by) and scored against the field's labels, in
    field_predictions.csv and the "fields" block of metrics.json.

    An ensemble (a cv folder, or --member) is evaluated on another dataset (--data) only:
    every image of a cross-validation's folds trained all of its members but one (its
    held-out test, `cv --holdout --ensemble`, is scored in CV/ensemble_test).
    """
    from cellclass.evaluation.evaluate import evaluate_run
    from cellclass.evaluation.fields import parse_aggregation
    from cellclass.inference.ensemble import is_ensemble_folder
    from cellclass.training.config import run_config

    if data is None and dataset.given():
        raise SpecError(f"{', '.join(dataset.given())} given without --data; valid: the dataset options with "
                        "--data SPEC (without --data the run's own test split is evaluated)")
    if member or is_ensemble_folder(run):
        _evaluate_ensemble(run, member or [], dataset, data, out, tta, aggregate_by or aggregate)
        return
    choice = parse_aggregation(aggregate)
    spec = None if data is None else dataset.to_spec(data)
    with stage_progress() as update:
        result = evaluate_run(run, run_config(run), spec=spec, out=out, tta=tta, aggregate_by=aggregate_by,
                              aggregation=choice, progress=update)
    print_metrics(result, out or run / "evaluation")


def _evaluate_ensemble(run: Path, members: list[Path], dataset: DatasetOptions, data: Path | None,
                       out: Path | None, tta: bool | None, aggregating: str | None) -> None:
    """``evaluate`` of an ensemble: every row of --data, the members' probabilities averaged."""
    from cellclass.evaluation.ensemble import evaluate_ensemble
    from cellclass.inference.ensemble import Ensemble
    from cellclass.training.config import run_config

    if data is None:
        raise SpecError(f"{str(run)!r} is an ensemble, which has no test split of its own (every image of a "
                        "cross-validation's folds trained all its members but one); valid: --data SPEC, or `cellclass "
                        "cv --holdout --ensemble`, which scores it on the held-out test in CV/ensemble_test")
    if aggregating is not None:
        raise SpecError("--aggregate-by and --aggregate are for one run's cells; valid: evaluate an ensemble "
                        "without them (cell level)")
    model = Ensemble.load([run, *members], tta=tta)
    spec = dataset.to_spec(data)
    folder = out or run / f"evaluation-{'ensemble-' if members else ''}{spec.name}"
    result = evaluate_ensemble(model, [run_config(r) for r in model.runs], spec, folder)
    print_metrics(result, folder)
    console.print(f"ensemble of {len(model.members)} models (probabilities averaged)"
                  + (f"; multi-label thresholds: {model.thresholds_from}" if model.thresholds else ""),
                  highlight=False)


@app.command()
@takes_options
def predict(
    run: Annotated[Path, typer.Argument(
        help="Run folder or .ckpt file; or a `cellclass cv` folder: its ensemble (ensemble.yaml, else its fold "
             "runs).")],
    dataset: DatasetOptions,
    images: Annotated[list[Path] | None, typer.Argument(
        help="Image files (TIFF, PNG, NPY); or none with --data.", show_default=False)] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", help="Predict every row of this dataset instead of image files (e.g. the cells.yaml of "
                       "`cellclass crops`).", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", help="Predictions CSV.")] = Path("predictions.csv"),
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="D4 test-time augmentation.")] = None,
    member: Annotated[list[Path] | None, typer.Option(
        "--member", help="Another run folder (or cv folder) whose models join RUN's in an ensemble: their "
                         "probabilities averaged. Repeatable.", show_default=False)] = None,
    aggregate_by: AggregateByOpt = None,
    aggregate: AggregateOpt = None,
) -> None:
    """Predict image files, or every row of a dataset (--data), with a run or an ensemble; writes a CSV row per image.

    An image that cannot be predicted (missing, undecodable, empty, NaN pixels, another
    channel count) keeps its row, with the reason in the ``error`` column, and the others
    are predicted; the command then exits 1. The output never replaces an input.

    An ensemble (a cv folder, or --member) averages its models' probabilities, each model
    reading the images as its own training images were read; multi-label tasks apply the
    thresholds of ensemble.yaml, else the mean of the members'. Its rows add
    <task>__agreement: the share of members whose own decision is the ensemble's.

    Cells of fields (a --data with a field_id column, or --aggregate-by) are also answered
    per field, their probabilities aggregated (--aggregate), in field_<OUT name> beside OUT
    (field_predictions.csv by default).
    """
    import pandas as pd

    from cellclass.atomic import atomic_path
    from cellclass.evaluation.fields import parse_aggregation, task_aggregations
    from cellclass.inference.ensemble import Ensemble

    if (data is None) == (not images):
        raise SpecError("give image files or --data SPEC (one of them); valid: `cellclass predict RUN a.tif b.tif` "
                        "or `cellclass predict RUN --data cells.yaml`")
    if data is None and dataset.given():
        raise SpecError(f"{', '.join(dataset.given())} given without --data; valid: the dataset options with "
                        "--data SPEC")
    if data is None and aggregate_by not in (None, "folder"):
        raise SpecError(f"--aggregate-by {aggregate_by!r} with image files; valid: --aggregate-by folder (each "
                        "file's parent folder is its field), or a column of a --data dataset")
    fields_out = out.with_name(f"field_{out.name}")
    models = [run, *(member or [])]
    sources = [*models, *(images or []), *([] if data is None else [data])]
    check_output_file(out, "--out", inputs=sources, input_folders=models)
    choice = parse_aggregation(aggregate)
    model = Ensemble.load(models, tta=tta)
    aggregations = task_aggregations(model.encoders, choice)
    if data is None:
        rows, column = _predict_files(model, images or [], aggregate_by == "folder"), aggregate_by
    else:
        rows, column = _predict_rows(model, dataset.to_spec(data), aggregate_by)
    if column is not None:
        check_output_file(fields_out, "the field predictions file", inputs=sources, input_folders=models)
    with atomic_path(out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    failed = sum(bool(r["error"]) for r in rows)
    by = (f" by an ensemble of {len(model.members)} models (probabilities averaged"
          + ("; multi-label thresholds: " + model.thresholds_from if model.thresholds else "") + ")"
          if len(model.members) > 1 else "")
    console.print(f"{len(rows) - failed} prediction(s){by} written to {out}"
                  + (f"; {failed} image(s) could not be predicted (see the error column)" if failed else ""),
                  highlight=False)
    if column is not None:
        _write_field_answers(model, rows, column, aggregations, fields_out)
    if failed:
        raise typer.Exit(1)


def _predict_files(model: Any, images: list[Path], folders: bool) -> list[dict[str, Any]]:
    """One row per image file: its path (and parent folder), an error or its labels and probabilities."""
    rows: list[dict[str, Any]] = []
    for start in range(0, len(images), 256):
        chunk = images[start : start + 256]
        prepared: dict[int, Any] = {}
        for i, path in enumerate(chunk):
            row: dict[str, Any] = {"image": str(path), **({"folder": str(path.parent)} if folders else {}), "error": ""}
            try:
                prepared[i] = model.prepare(lambda member, path=path: member.read_image(path), f"image {str(path)!r}")
            except CellclassError as exc:
                row["error"] = str(exc)
                print_error(str(exc))
            rows.append(row)
        _fill_predictions(model, rows, start, prepared)
    return rows


def _predict_rows(model: Any, spec: Any, aggregate_by: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """One row per row of ``spec`` (read by each model as its training images were), and the column naming
    its field, if any."""
    import dataclasses

    from cellclass.data.spec import ROW_COLUMN
    from cellclass.evaluation.fields import field_column

    # Stacks are read as each model's training images were, unless the spec says otherwise.
    specs: list[tuple[Any, Any]] = []

    def spec_of(member: Any) -> Any:
        found = next((s for axes, s in specs if axes == member.axes), None)
        if found is None:
            found = dataclasses.replace(spec, image=spec.image.with_defaults(member.axes))
            specs.append((member.axes, found))
        return found

    first = spec_of(model.members[0])
    frame = first.load_manifest(apply_drop=False)
    column = field_column([c for c in frame.columns if c != ROW_COLUMN], aggregate_by)
    records = frame.to_dict("records")
    rows: list[dict[str, Any]] = []
    for start in range(0, len(records), 256):
        prepared: dict[int, Any] = {}
        for i, record in enumerate(records[start : start + 256]):
            image_id = first.image_id(record)
            row: dict[str, Any] = {"image": image_id, "row": record[ROW_COLUMN]}
            if column is not None:
                row[column] = str(record[column])
            row["error"] = ""
            try:
                name = f"row {record[ROW_COLUMN]} ({image_id})"
                prepared[i] = model.prepare(lambda member, record=record: spec_of(member).read_image(record), name)
            except CellclassError as exc:
                row["error"] = str(exc)
                print_error(str(exc))
            rows.append(row)
        _fill_predictions(model, rows, start, prepared)
    return rows, column


def _fill_predictions(model: Any, rows: list[dict[str, Any]], start: int, prepared: dict[int, Any]) -> None:
    """Predict the prepared images of a chunk and write their labels and probabilities (and, for an
    ensemble, its members' agreement) into their rows."""
    if not prepared:
        return
    probs, each = model.predict_prepared(list(prepared.values()))
    results = model.describe(probs)
    agreement = model.agreement(each, probs) if len(model.members) > 1 else {}
    for n, (i, result) in enumerate(zip(prepared, results, strict=True)):
        row = rows[start + i]
        for task_name, r in result.items():
            label = r["label"]
            row[task_name] = ";".join(label) if isinstance(label, list) else label
            row.update({f"{task_name}__p__{c}": round(p, 6) for c, p in r["probabilities"].items()})
            if task_name in agreement:
                row[f"{task_name}__agreement"] = round(float(agreement[task_name][n]), 3)


def _write_field_answers(predictor: Any, rows: list[dict[str, Any]], column: str, aggregations: dict[str, Any],
                         path: Path) -> None:
    """Aggregate the predicted rows of ``predictor`` (a run's or an ensemble's) to their fields, write them
    to ``path`` and say how."""
    from cellclass.atomic import atomic_path
    from cellclass.evaluation.fields import (
        FIELD_COLUMN,
        answer_fields,
        choose_thresholds,
        field_predictions_frame,
    )

    done = [r for r in rows if not r["error"]]
    if not done:
        print_error(f"no image was predicted: no field answer written to {path}")
        return
    encoders = predictor.encoders
    probs = {t: np.array([[r[f"{t}__p__{c}"] for c in e.classes] for r in done]) for t, e in encoders.items()}
    # The thresholds training stored were tuned on the fields of field_id, which are the crops' folders.
    stored = predictor.field_thresholds if column in (FIELD_COLUMN, "folder") else {}
    thresholds, sources = choose_thresholds(encoders, aggregations, stored, predictor.thresholds)
    answers = answer_fields(column, [r[column] for r in done], probs, encoders, aggregations, thresholds)
    with atomic_path(path) as tmp:
        field_predictions_frame(answers, encoders).to_csv(tmp, index=False)
    how = ", ".join(f"{t}: {a.key}" for t, a in aggregations.items())
    console.print(f"{len(answers.fields)} field answer(s) by {column} written to {path} ({how})")
    for task, text in sources.items():
        console.print(f"field thresholds of {task}: {text}")


@app.command()
@takes_options
def cv(
    spec: SpecArg,
    out: Annotated[Path, typer.Option("--out", help="Folder for the fold runs and cv.json.")],
    dataset: DatasetOptions,
    training: TrainOptions,
    tracking: TrackerOptions,
    folds: Annotated[int, typer.Option("--folds", min=2, help="Number of folds.")] = 5,
    holdout: Annotated[bool, typer.Option(
        "--holdout", help="Hold the test side of the split `train` would make (test_fraction, default 0.25; "
                          "same method and seed) out of every fold, and score every fold model on it "
                          "(holdout.csv).")] = False,
    ensemble: Annotated[bool, typer.Option(
        "--ensemble", help="Also write the fold models as an ensemble (ensemble.yaml: probabilities averaged; "
                           "`cellclass predict OUT` uses it), scored on the held-out test with --holdout "
                           "(ensemble_test/).")] = False,
) -> None:
    """k-fold cross-validation (stratified group k-fold by default); reports mean and spread.

    Each fold model is tested on its own fold. With --holdout, the test side of the usual
    split is held out of every fold and every fold model is tested on it too. With
    --ensemble, the fold models are written as an ensemble; only a held-out test can score
    it (each image of the folds trained every member but one).

    Re-running the same command skips the folds already finished (a finished fold made with
    other settings is refused).
    """
    from cellclass.tracking.folds import FoldLogger, cv_progress
    from cellclass.training.crossval import cross_validate

    ds = dataset.to_spec(spec)
    ds.load_manifest()  # a bad manifest fails now, before a tracker opens a run for it
    config = training.to_config()
    with tracking.open(out, "cv") as tracker:
        tracker.log_params({**config.to_dict(), "folds": folds, "dataset": ds.name, "holdout": holdout,
                            "ensemble": ensemble})
        fold_logger = FoldLogger(tracker, out, folds)
        with stage_progress() as update:
            summary = cross_validate(ds, config, out, n_folds=folds, holdout=holdout, ensemble=ensemble,
                                     progress=cv_progress(fold_logger, update))
        fold_logger.finish(summary)
    _print_folds(summary, config.model, folds)
    if "holdout" in summary:
        _print_held_out(summary["holdout"])
    if "ensemble" in summary:
        block = summary["ensemble"]
        console.print(f"ensemble of the {len(block['members'])} fold models (probabilities averaged) in "
                      f"{out / block['file']}" + (f"; multi-label thresholds: {block['thresholds_from']}"
                                                  if block.get("thresholds_from") else ""), highlight=False)
        if block.get("note"):
            console.print(f"[bold]not scored:[/bold] {block['note']}", highlight=False)
    console.print(f"per-fold runs and cv.json in {out}"
                  + ("; holdout.csv" if "holdout" in summary else "")
                  + ("; ensemble_test/ (report.html)" if summary.get("ensemble", {}).get("test") else ""))


def _print_folds(summary: dict[str, Any], model: str, folds: int) -> None:
    """Mean, spread and range of each metric over the folds of a cross-validation."""
    split = summary["split"]
    table = Table(title=f"{model}: {folds}-fold cross-validation ({split['method']}"
                        + (f" by {split['group']})" if split["group"] else ")") + ", each fold model on its fold")
    for col in ("task", "metric", "mean", "std", "min", "max"):
        table.add_column(col, justify="right")
    for task_name, metrics in summary["tasks"].items():
        columns = MULTILABEL_COLUMNS if _is_multilabel(metrics) else SINGLE_COLUMNS
        for _, name in columns:
            if name in metrics:
                table.add_row(task_name, name, *[metric_text(metrics[name][k]) for k in ("mean", "std", "min", "max")])
    console.print(table)


def _print_held_out(block: dict[str, Any]) -> None:
    """Every fold model, their mean and the ensemble on the held-out test: a table per task."""
    models = block["models"]
    rows = {**{m: t for m, t in models.items() if m != "ensemble"}, "mean of folds": block["fold_mean"],
            **({"ensemble": models["ensemble"]} if "ensemble" in models else {})}
    for task in next(iter(models.values())):
        columns = MULTILABEL_COLUMNS if _is_multilabel(next(iter(models.values()))[task]) else SINGLE_COLUMNS
        table = Table(title=f"task {task} on the held-out test ({block['n_images']} images, in no fold)")
        for header in ("model", *(h for h, _ in columns)):
            table.add_column(header, justify="right")
        for name, tasks in rows.items():
            table.add_row(f"[bold]{name}[/bold]" if name == "ensemble" else name,
                          *[metric_text(tasks.get(task, {}).get(k)) for _, k in columns])
        console.print(table)


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Two or more run folders evaluated on the same test images.")],
    task: Annotated[str | None, typer.Option("--task", help="Task to compare (default: every shared task).")] = None,
    metric: Annotated[str, typer.Option("--metric", help="macro_f1 or accuracy, for the paired bootstrap.")] = "macro_f1",
    n_boot: Annotated[int, typer.Option("--n-boot", min=100, help="Bootstrap resamples.")] = 2000,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for compare.json, tables and a plot.")] = None,
    output: FormatOpt = OutputFormat.table,
) -> None:
    """Side-by-side metrics, paired bootstrap confidence intervals and McNemar tests on the same test images."""
    import pandas as pd

    from cellclass.evaluation.compare import compare_runs

    result = compare_runs(runs, task=task, metric=metric, n_boot=n_boot, out=out)
    if output is not OutputFormat.table:
        if output is OutputFormat.json:
            write_json(result)
        else:
            write_csv({
                "metrics": pd.DataFrame([{"task": t, **row} for t, b in result["tasks"].items() for row in b["table"]]),
                "pairs": pd.DataFrame([{"task": t, **pair} for t, b in result["tasks"].items() for pair in b["pairs"]]),
            })
        if out is not None:
            err_console.print(f"comparison written to {out}")
        return
    for task_name, block in result["tasks"].items():
        multilabel = block.get("task_type") == "multilabel"
        table = Table(title=f"task {task_name}: test metrics with 95% bootstrap CI ({block['n']} images"
                            + ("; label sets: an image is right when its whole set is)" if multilabel else ")"))
        for col in ("run", "model", "split", "subset accuracy" if multilabel else "accuracy", "macro F1"):
            table.add_column(col)
        for row in block["table"]:
            table.add_row(row["run"], str(row.get("model_name", "")), str(row.get("split", "")),
                          f"{row['accuracy']:.3f} [{row['accuracy_ci_low']:.3f}, {row['accuracy_ci_high']:.3f}]",
                          f"{row['macro_f1']:.3f} [{row['macro_f1_ci_low']:.3f}, {row['macro_f1_ci_high']:.3f}]")
        console.print(table)
        if multilabel:
            for run_table in metric_tables(block["test_metrics"], f"task {task_name}: each run's test metrics "
                                                                  "(its metrics.json)"):
                run_table.columns[0].header = "run"
                console.print(run_table)
        pairs = Table(title=f"paired differences ({metric}, A minus B)")
        for col in ("A", "B", "delta", "95% CI", "bootstrap p", "McNemar p"):
            pairs.add_column(col)
        for p in block["pairs"]:
            pairs.add_row(p["model_a"], p["model_b"], f"{p['delta']:+.3f}", f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]",
                          f"{p['p_value']:.3g}", f"{p['mcnemar_p_value']:.3g}")
        console.print(pairs)
    if out is not None:
        console.print(f"comparison written to {out}")
