"""The ``sweep`` command: hyperparameter search on Optuna, tracked per trial, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cellclass.cli.app import (
    DelimiterOpt,
    DropUnlabeledOpt,
    GroupOpt,
    ImageColOpt,
    PresetOpt,
    SeriesOpt,
    SpecArg,
    TaskOpt,
    TOpt,
    WhereOpt,
    ZOpt,
    _spec,
    _stage_progress,
    app,
    console,
)
from cellclass.cli.training import (
    BatchOpt,
    CacheOpt,
    ConfigOpt,
    EpochsOpt,
    ExperimentOpt,
    LrOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    SeedOpt,
    SetOpt,
    SizeOpt,
    SplitByOpt,
    SplitOpt,
    TrackerOpt,
    TrackingUriOpt,
    _f,
    build_config,
)


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="Sweep YAML (W&B sweep format): method grid|random|bayes, "
                                                    "metric {name, goal}, parameters.", show_default=False)],
    spec: SpecArg,
    out: Annotated[Path, typer.Option("--out", help="Sweep folder: trials/, study.db, mlflow.db, report.")],
    n_trials: Annotated[int | None, typer.Option("--n-trials", min=1, help="Trials in the study in all "
                                                 "(default: the grid's size, or the file's run_cap).")] = None,
    n_jobs: Annotated[int, typer.Option("--n-jobs", min=1, help="Worker processes on this machine, sharing "
                                        "the cores.")] = 1,
    storage: Annotated[str | None, typer.Option("--storage", help="Study database URL (default sqlite:///OUT/"
                                                "study.db); postgresql://... lets several machines share it.")] = None,
    study: Annotated[str | None, typer.Option("--study", help="Study name (default: the --out folder's name).")] = None,
    folds: Annotated[int | None, typer.Option("--folds", min=2, help="Optimise the mean validation metric of a "
                                              "k-fold cross-validation per trial.")] = None,
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
    precision: PrecisionOpt = None,
    seed: SeedOpt = None,
    pretrained: PretrainedOpt = None,
    cache: CacheOpt = None,
    tracker: TrackerOpt = "mlflow",
    tracking_uri: TrackingUriOpt = None,
    experiment: ExperimentOpt = None,
) -> None:
    """Search hyperparameters: each trial is a tracked training run; the best becomes a train config.

    The train options set the base configuration; the sweep file's parameters override it by
    name. Re-running the same command continues the same study (finished trials are kept,
    interrupted ones run again once) until it holds --n-trials trials.
    """
    from cellclass.tracking.space import SweepSpace
    from cellclass.tracking.sweep import run_sweep

    space = SweepSpace.from_yaml(sweep_file)
    ds = _spec(spec, preset, image_col, task, group, delimiter, drop_unlabeled, where, z, t, series)
    cfg = build_config(config, set_, model=model, epochs=epochs, image_size=image_size, batch_size=batch_size,
                       lr=lr, split_by=split_by, split=split, precision=precision, seed=seed,
                       pretrained=(True if pretrained == "hub" else pretrained), cache=cache)
    console.print(f"sweep {study or out.name}: {space.method} search, {space.goal} {space.metric}"
                  + (f" ({folds}-fold cross-validation)" if folds else ""))
    with _stage_progress() as progress:
        summary = run_sweep(ds, cfg, space, out, n_trials=n_trials, n_jobs=n_jobs, storage=storage, study=study,
                            folds=folds, tracker=tracker, tracking_uri=tracking_uri, experiment=experiment,
                            progress=progress)
    print_sweep(summary, out)


def print_sweep(summary: dict[str, Any], out: Path, top: int = 10) -> None:
    """The best trials, the best configuration and where the report is."""
    import pandas as pd

    from cellclass.tracking.sweep import failure_line

    counts = ", ".join(f"{v} {k.lower()}" for k, v in summary["counts"].items() if v)
    console.print(f"{summary['finished']} of {summary['n_trials']} trial(s) finished ({counts})")
    for failure in summary.get("failures", []):
        console.print(failure_line(failure), markup=False, highlight=False, soft_wrap=True)
    trials = pd.read_csv(out / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"].sort_values("value", ascending=summary["goal"] == "minimize")
    if len(done):
        params = [c for c in trials.columns if c not in _BOOKKEEPING]
        table = Table(title=f"best trials ({summary['goal']} {summary['metric']})")
        for col in ("trial", summary["metric"], *params, "best epoch"):
            table.add_column(col, justify="right")
        for row in done.head(top).to_dict("records"):
            table.add_row(str(row["trial"]), _f(row["value"]), *[_g(row[p]) for p in params],
                          _g(row.get("best_epoch")))
        console.print(table)
    best = summary.get("best")
    if best is not None:
        console.print(f"best trial {best['trial']}: {summary['metric']} = {best['value']:.4f} "
                      f"({', '.join(f'{k}={_g(v)}' for k, v in best['params'].items())}); "
                      f"run folder {out / str(best['run'])}")
        console.print(f"best configuration: {out / 'best_config.yaml'} "
                      f"(cellclass train ... --config {out / 'best_config.yaml'})")
    if summary.get("remaining"):
        console.print(f"[bold]{summary['remaining']} trial(s) remain[/bold]: re-run the same command to continue")
    console.print(f"report: {out / 'report.html'}, trials.csv, plots/")


def _g(value: Any) -> str:
    """A parameter value: 4 significant digits for floats (learning rates are small)."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e6 else f"{value:.4g}"
    return "" if value is None else str(value)


_BOOKKEEPING = {"trial", "number", "state", "value", "best_epoch", "epochs_run", "last_step", "duration_s",
                "retries", "worker_pid", "worker_host", "run_dir", "tracked_run", "error", "fold_values"}


def demo_sweep(spec: Any, out: Path, seed: int, n_trials: int = 4, epochs: int = 3) -> dict[str, Any]:
    """The demo's last step: a small TPE sweep of LeNet-5 over learning rate and batch size."""
    import yaml

    from cellclass.atomic import atomic_write_text
    from cellclass.tracking.space import SweepSpace
    from cellclass.tracking.sweep import run_sweep
    from cellclass.training.config import TrainConfig

    sweep_file = out.parent / f"{out.name}.yaml"
    atomic_write_text(sweep_file, yaml.safe_dump({
        "method": "bayes",
        "metric": {"name": "val/macro_f1", "goal": "maximize"},
        "parameters": {"lr": {"min": 0.0005, "max": 0.01, "distribution": "log_uniform_values"},
                       "batch_size": {"values": [16, 32, 64]}},
    }, sort_keys=False))
    space = SweepSpace.from_yaml(sweep_file)
    cfg = TrainConfig(model="lenet5", tasks=["particle_type"], epochs=epochs, seed=seed)
    console.print(f"sweep file {sweep_file}: {n_trials} trials of LeNet-5, {epochs} epochs each; "
                  f"{space.goal} {space.metric}")
    with _stage_progress() as progress:
        summary = run_sweep(spec, cfg, space, out, n_trials=n_trials, n_jobs=1, progress=progress)
    print_sweep(summary, out)
    console.print(f"MLflow: mlflow ui --backend-store-uri sqlite:///{(out / 'mlflow.db').resolve()}")
    return summary
