"""Model commands: models, train, evaluate, predict, cv, compare, and the demo."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from cellclass.cli.app import (
    DelimiterOpt,
    DropUnlabeledOpt,
    FormatOpt,
    GroupOpt,
    ImageColOpt,
    PresetOpt,
    SeriesOpt,
    SpecArg,
    OutputFormat,
    TaskOpt,
    TOpt,
    WhereOpt,
    ZOpt,
    _progress,
    _spec,
    _stage_progress,
    app,
    check_output_file,
    console,
    err_console,
    write_csv,
    write_json,
)
from cellclass.cli.data import _print_inspection
from cellclass.errors import CellclassError


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


def build_config(config_file: Path | None, sets: list[str] | None, base: Any = None, **options: Any) -> Any:
    """Defaults (or ``base``), then ``--config FILE``, then explicit options, then ``--set key=value``."""
    import yaml

    from cellclass.training.config import TrainConfig, parse_set_options

    config = base if base is not None else TrainConfig()
    if config_file:
        from_file = TrainConfig.from_yaml(config_file)  # checks the file and its keys
        given = yaml.safe_load(config_file.read_text()) or {}
        config = config.override({k: getattr(from_file, k) for k in given})
    explicit = {k: v for k, v in options.items() if v is not None}
    return config.override({**explicit, **parse_set_options(sets or [])})


ModelOpt = Annotated[str | None, typer.Option("--model", help="Model name (see `cellclass models`).")]
EpochsOpt = Annotated[int | None, typer.Option("--epochs", min=1, help="Maximum epochs.")]
SizeOpt = Annotated[int | None, typer.Option("--image-size", min=8, help="Side of the square model input.")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", min=1, help="Global batch size.")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")]
SplitByOpt = Annotated[str | None, typer.Option("--split-by", help="Keep each value of this column on one side "
                                                                   "(default: the spec's first group).")]
SplitOpt = Annotated[str | None, typer.Option("--split", help="group, random (warns on grouped data) or predefined.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML config file (keys of TrainConfig).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: --set lr=1e-3. Repeatable.")]
DevicesOpt = Annotated[int | None, typer.Option("--devices", min=1, help="Processes/devices (DDP when > 1).")]
StrategyOpt = Annotated[str | None, typer.Option("--strategy", help="Fabric strategy: auto, ddp, ddp_spawn.")]
PrecisionOpt = Annotated[str | None, typer.Option(
    "--precision", help="32-true, bf16-mixed, 16-mixed or auto (the default: bf16-mixed on a GPU or a CPU with "
    "native bfloat16, else 32-true).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed of split, weights and augmentation.")]
PretrainedOpt = Annotated[str | None, typer.Option("--pretrained", help="Path to local weights (or 'hub').")]
CacheOpt = Annotated[bool | None, typer.Option("--cache", help="Build the prepared image cache when no valid one exists "
                                                               "(a valid one is always used; see `cellclass prepare`).")]
TrackerOpt = Annotated[str, typer.Option("--tracker", help="Experiment tracker: mlflow (a local store "
                                         "RUNS/mlflow.db beside the run folder unless --tracking-uri), "
                                         "wandb (pip install 'cellclass[wandb]') or none.")]
TrackingUriOpt = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow server or database URL "
                                                    "(http://host:5000, sqlite:///x.db); W&B: server URL.")]
ExperimentOpt = Annotated[str | None, typer.Option("--experiment", help="MLflow experiment / W&B project "
                                                   "(default: cellclass).")]


def _run_tracker(name: str, uri: str | None, experiment: str | None, out: Path, job_type: str) -> Any:
    """The tracker of one run folder ``out`` (its default local store sits beside it)."""
    from cellclass.tracking import make_tracker

    return make_tracker(name, uri, experiment, run_name=out.name, root=out.parent, job_type=job_type,
                        record=None if name == "none" else out / "tracking.json")


@app.command()
def train(
    spec: SpecArg,
    out: Annotated[Path, typer.Option("--out", help="Run folder.")],
    preset: PresetOpt = None,
    image_col: ImageColOpt = None,
    task: TaskOpt = None,
    group: GroupOpt = None,
    delimiter: DelimiterOpt = None,
    drop_unlabeled: DropUnlabeledOpt = False,
    where: WhereOpt = None,
    z: ZOpt = None, t: TOpt = None, series: SeriesOpt = None,
    model: ModelOpt = None,
    epochs: EpochsOpt = None,
    image_size: SizeOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    split_by: SplitByOpt = None,
    split: SplitOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    devices: DevicesOpt = None,
    strategy: StrategyOpt = None,
    precision: PrecisionOpt = None,
    seed: SeedOpt = None,
    pretrained: PretrainedOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out with its settings; "
                                         "--epochs N (more than done) extends it, other changes are refused.")] = False,
    cache: CacheOpt = None,
    tracker: TrackerOpt = "mlflow",
    tracking_uri: TrackingUriOpt = None,
    experiment: ExperimentOpt = None,
) -> None:
    """Train a model, select its best epoch on validation, evaluate it on test, write the run folder."""
    from cellclass.training.loop import train as run_train

    ds = _spec(spec, preset, image_col, task, group, delimiter, drop_unlabeled, where, z, t, series)
    ds.load_manifest()  # a bad manifest fails now, before a tracker opens a run for it
    base = None
    if resume and (out / "config.yaml").is_file():
        from cellclass.evaluation.evaluate import run_config

        base = run_config(out)  # the options given are checked against it (more epochs: applied)
    cfg = build_config(config, set_, base, model=model, epochs=epochs, image_size=image_size,
                       batch_size=batch_size, lr=lr, split_by=split_by, split=split, devices=devices,
                       strategy=strategy, precision=precision, seed=seed,
                       pretrained=(True if pretrained == "hub" else pretrained), cache=cache)
    with _run_tracker(tracker, tracking_uri, experiment, out, "train") as run_tracker, \
            _stage_progress() as progress:
        result = run_train(ds, cfg, out, resume=resume, progress=progress, tracker=run_tracker)
    if result:
        _print_metrics(result, out)


def _print_metrics(result: dict[str, Any], out: Path) -> None:
    split = result["split"]
    console.print(f"[bold]{result.get('model')}[/bold] on {result['dataset']}: split {split.get('method')}"
                  + (f" by {split['group_column']}" if split.get("group_column") else "")
                  + f"; evaluated on {result['evaluation']['on']} ({result['evaluation']['n_images']} images)")
    if split.get("warning"):
        console.print(f"[bold red]warning:[/bold red] {split['warning']}")
    table = Table()
    for col in ("task", "accuracy", "balanced acc.", "macro F1", "ROC-AUC"):
        table.add_column(col, justify="right")
    for task, m in result["tasks"].items():
        table.add_row(task, *[_f(m.get(k)) for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")])
    console.print(table)
    console.print(f"run folder: {out} (metrics.json, predictions.csv, plots/, report.html)")


def _f(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder made by `cellclass train`.")],
    data: Annotated[Path | None, typer.Option("--data", help="Evaluate on this dataset instead of the run's test split.")] = None,
    preset: PresetOpt = None,
    image_col: ImageColOpt = None,
    task: TaskOpt = None,
    group: GroupOpt = None,
    z: ZOpt = None, t: TOpt = None, series: SeriesOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN/evaluation).")] = None,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="D4 test-time augmentation.")] = None,
) -> None:
    """Evaluate a run's best checkpoint on its test split or on another dataset."""
    from cellclass.evaluation.evaluate import evaluate_run

    spec = _spec(data, preset, image_col, task, group, z=z, t=t, series=series) if data is not None else None
    with _stage_progress() as progress:
        result = evaluate_run(run, spec=spec, out=out, tta=tta, progress=progress)
    _print_metrics(result, out or run / "evaluation")


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder or .ckpt file.")],
    images: Annotated[list[Path], typer.Argument(help="Image files (TIFF, PNG, NPY).")],
    out: Annotated[Path, typer.Option("--out", help="Predictions CSV.")] = Path("predictions.csv"),
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="D4 test-time augmentation.")] = None,
) -> None:
    """Predict image files with a trained run; writes one CSV row per image.

    An image that cannot be predicted (missing, undecodable, empty, NaN pixels, another
    channel count) keeps its row, with the reason in the ``error`` column, and the others
    are predicted; the command then exits 1. The output never replaces an input.
    """
    import pandas as pd

    from cellclass.atomic import atomic_path
    from cellclass.serving.predictor import Predictor

    check_output_file(out, "--out", inputs=[run, *images], input_folders=[run])
    predictor = Predictor.from_checkpoint(run, tta=tta)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(images), 256):
        chunk = images[start : start + 256]
        prepared: dict[int, Any] = {}
        for i, path in enumerate(chunk):
            row: dict[str, Any] = {"image": str(path), "error": ""}
            try:
                prepared[i] = predictor.prepare([predictor.read_image(path)], names=[f"image {str(path)!r}"])
            except CellclassError as exc:
                row["error"] = str(exc)
                err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            rows.append(row)
        if not prepared:
            continue
        x = predictor.normalize(np.concatenate(list(prepared.values())))
        results = predictor.describe(predictor.predict_normalized(x))
        for i, result in zip(prepared, results, strict=True):
            row = rows[start + i]
            for task_name, r in result.items():
                label = r["label"]
                row[task_name] = ";".join(label) if isinstance(label, list) else label
                row.update({f"{task_name}__p__{c}": round(p, 6) for c, p in r["probabilities"].items()})
    with atomic_path(out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    failed = sum(bool(r["error"]) for r in rows)
    console.print(f"{len(rows) - failed} prediction(s) written to {out}"
                  + (f"; {failed} image(s) could not be predicted (see the error column)" if failed else ""))
    if failed:
        raise typer.Exit(1)


@app.command()
def cv(
    spec: SpecArg,
    out: Annotated[Path, typer.Option("--out", help="Folder for the fold runs and cv.json.")],
    folds: Annotated[int, typer.Option("--folds", min=2, help="Number of folds.")] = 5,
    preset: PresetOpt = None,
    image_col: ImageColOpt = None,
    task: TaskOpt = None,
    group: GroupOpt = None,
    delimiter: DelimiterOpt = None,
    drop_unlabeled: DropUnlabeledOpt = False,
    where: WhereOpt = None,
    z: ZOpt = None, t: TOpt = None, series: SeriesOpt = None,
    model: ModelOpt = None,
    epochs: EpochsOpt = None,
    image_size: SizeOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    split_by: SplitByOpt = None,
    split: SplitOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    seed: SeedOpt = None,
    cache: CacheOpt = None,
    tracker: TrackerOpt = "mlflow",
    tracking_uri: TrackingUriOpt = None,
    experiment: ExperimentOpt = None,
) -> None:
    """k-fold cross-validation (stratified group k-fold by default); reports mean and spread.

    Re-running the same command skips the folds already finished.
    """
    from cellclass.evaluation.crossval import cross_validate

    ds = _spec(spec, preset, image_col, task, group, delimiter, drop_unlabeled, where, z, t, series)
    ds.load_manifest()  # a bad manifest fails now, before a tracker opens a run for it
    cfg = build_config(config, set_, model=model, epochs=epochs, image_size=image_size, batch_size=batch_size,
                       lr=lr, split_by=split_by, split=split, seed=seed, cache=cache)
    from cellclass.tracking.runs import FoldLogger, cv_progress

    with _run_tracker(tracker, tracking_uri, experiment, out, "cv") as run_tracker:
        run_tracker.log_params({**cfg.to_dict(), "folds": folds, "dataset": ds.name})
        fold_logger = FoldLogger(run_tracker, out, folds)
        with _stage_progress() as progress:
            summary = cross_validate(ds, cfg, out, n_folds=folds, progress=cv_progress(fold_logger, progress))
        fold_logger.finish(summary)
    table = Table(title=f"{cfg.model}: {folds}-fold cross-validation ({summary['split']['method']}"
                        + (f" by {summary['split']['group']})" if summary["split"]["group"] else ")"))
    for col in ("task", "metric", "mean", "std", "min", "max"):
        table.add_column(col, justify="right")
    for task_name, metrics in summary["tasks"].items():
        for name in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc"):
            if name in metrics:
                m = metrics[name]
                table.add_row(task_name, name, *[_f(m[k]) for k in ("mean", "std", "min", "max")])
    console.print(table)
    console.print(f"per-fold runs and cv.json in {out}")


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

    from cellclass.evaluation.evaluate import compare_runs

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
        table = Table(title=f"task {task_name}: test metrics with 95% bootstrap CI ({block['n']} images)")
        for col in ("run", "model", "split", "accuracy", "macro F1"):
            table.add_column(col)
        for row in block["table"]:
            table.add_row(row["run"], str(row.get("model_name", "")), str(row.get("split", "")),
                          f"{row['accuracy']:.3f} [{row['accuracy_ci_low']:.3f}, {row['accuracy_ci_high']:.3f}]",
                          f"{row['macro_f1']:.3f} [{row['macro_f1_ci_low']:.3f}, {row['macro_f1_ci_high']:.3f}]")
        console.print(table)
        pairs = Table(title=f"paired differences ({metric}, A minus B)")
        for col in ("A", "B", "delta", "95% CI", "bootstrap p", "McNemar p"):
            pairs.add_column(col)
        for p in block["pairs"]:
            pairs.add_row(p["model_a"], p["model_b"], f"{p['delta']:+.3f}", f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]",
                          f"{p['p_value']:.3g}", f"{p['mcnemar_p_value']:.3g}")
        console.print(pairs)
    if out is not None:
        console.print(f"comparison written to {out}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's data and results.")] = Path("demo"),
    n_images: Annotated[int, typer.Option("--n-images", min=68, help="Simulated nuclei.")] = 680,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="LeNet-5 epochs.")] = 12,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """The main job on built-in data (no download): simulate, validate, inspect, train, compare.

    Simulates BPS nuclei, validates and inspects them, trains the MLP baseline and LeNet-5
    on irradiated nuclei split by plate, compares the two, trains the sham-vs-sham
    control that measures plate recognition, and ends with a small sweep of LeNet-5's
    learning rate and batch size (4 trials, tracked in ``OUT/sweep/mlflow.db``).
    """
    from cellclass.data.inspect import inspect_dataset
    from cellclass.data.presets import bps
    from cellclass.data.simulate import simulate_bps
    from cellclass.data.validate import validate as run_validate
    from cellclass.evaluation.evaluate import compare_runs

    data = out / "data"
    console.rule("1. simulate a BPS-layout dataset")
    if not (data / "meta.csv").is_file():
        simulate_bps(data, n_images=n_images, seed=seed)
    ds = bps(data)
    console.print(f"{n_images} uint16 TIFF nuclei and meta.csv in {data}")
    console.rule("2. validate")
    with _progress("validating") as progress:
        result = run_validate(ds, progress=progress)
    console.print(f"{result.n_rows} rows, {len(result.problems)} problem(s); shapes "
                  f"{dict(result.shapes.most_common(3))}; dtypes {dict(result.dtypes)}")
    if not result.ok:
        raise CellclassError(f"the simulated dataset has {len(result.problems)} problem(s): {result.problems[:3]}")
    console.rule("3. inspect (class counts, intensities, confounds)")
    with _progress("reading images") as progress:
        report = inspect_dataset(ds, out / "inspect", progress=progress)
    _print_inspection(report)
    console.rule("4. particle type of irradiated nuclei (dose_Gy > 0): MLP baseline and LeNet-5, split by plate")
    irradiated = dataclasses.replace(ds, where=["dose_Gy > 0"])
    runs = [_demo_run(irradiated, out / "runs" / model, model, epochs, seed) for model in ("mlp", "lenet5")]
    console.rule("5. compare on the same test images")
    comparison = compare_runs(runs, metric="macro_f1", n_boot=1000, out=out / "compare")
    for task_name, block in comparison["tasks"].items():
        for row in block["table"]:
            console.print(f"{task_name} {row['run']:>7}: macro F1 {row['macro_f1']:.3f} "
                          f"[{row['macro_f1_ci_low']:.3f}, {row['macro_f1_ci_high']:.3f}], accuracy {row['accuracy']:.3f}")
        for p in block["pairs"]:
            console.print(f"{p['model_a']} - {p['model_b']}: macro F1 {p['delta']:+.3f} "
                          f"(95% CI [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]), McNemar p = {p['mcnemar_p_value']:.3g}")
    console.rule("6. sham-vs-sham control (dose_Gy == 0): the plate-recognition floor")
    console.print("0 Gy Fe and 0 Gy X-ray nuclei had the same (sham) treatment and differ only by plate: a score "
                  "above chance here would measure plate effects, not radiation.")
    sham = dataclasses.replace(ds, where=["dose_Gy == 0"])
    _demo_run(sham, out / "runs" / "sham_control_lenet5", "lenet5", epochs, seed)
    console.rule("7. a small hyperparameter sweep: LeNet-5 over learning rate and batch size (Optuna, MLflow)")
    from cellclass.cli.sweep import demo_sweep

    demo_sweep(irradiated, out / "sweep", seed)
    console.print(f"\nresults in {out}: inspect/, runs/*/report.html, compare/compare.json, sweep/report.html")


def _demo_run(spec: Any, run: Path, model: str, epochs: int, seed: int) -> Path:
    """Train (or resume, or reuse) one demo run on particle type and print its metrics."""
    import json

    from cellclass.training.config import TrainConfig
    from cellclass.training.loop import train as run_train

    cfg = TrainConfig(model=model, tasks=["particle_type"], epochs=epochs, seed=seed)
    if not (run / "metrics.json").is_file():
        with _stage_progress() as progress:
            run_train(spec, cfg, run, resume=(run / "checkpoints" / "last.ckpt").is_file(), progress=progress)
    _print_metrics(json.loads((run / "metrics.json").read_text()), run)
    return run


