"""The ``sweep`` command: hyperparameter search on Optuna, tracked per trial, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cellclass.cli.app import app
from cellclass.cli.options import DatasetOptions, SpecArg, TrackerOptions, TrainOptions, takes_options
from cellclass.cli.output import console, metric_text, setting_text, stage_progress


@app.command()
@takes_options
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="Sweep YAML (W&B sweep format): method grid|random|bayes, "
                                                    "metric {name, goal}, parameters.", show_default=False)],
    spec: SpecArg,
    out: Annotated[Path, typer.Option("--out", help="Sweep folder: trials/, study.db, mlflow.db, report.")],
    dataset: DatasetOptions,
    training: TrainOptions,
    tracking: TrackerOptions,
    n_trials: Annotated[int | None, typer.Option("--n-trials", min=1, help="Trials in the study in all "
                                                 "(default: the grid's size, or the file's run_cap).")] = None,
    n_jobs: Annotated[int, typer.Option("--n-jobs", min=1, help="Worker processes on this machine, sharing "
                                        "the cores.")] = 1,
    storage: Annotated[str | None, typer.Option("--storage", help="Study database URL (default sqlite:///OUT/"
                                                "study.db); postgresql://... lets several machines share it.")] = None,
    study: Annotated[str | None, typer.Option("--study", help="Study name (default: the --out folder's name).")] = None,
    folds: Annotated[int | None, typer.Option("--folds", min=2, help="Optimise the mean validation metric of a "
                                              "k-fold cross-validation per trial.")] = None,
) -> None:
    """Search hyperparameters: each trial is a tracked training run; the best becomes a train config.

    The train options set the base configuration; the sweep file's parameters override it by
    name. Re-running the same command continues the same study (finished trials are kept,
    interrupted ones run again once) until it holds --n-trials trials.
    """
    from cellclass.tracking.space import SweepSpace
    from cellclass.tracking.sweep import run_sweep

    space = SweepSpace.from_yaml(sweep_file)
    ds = dataset.to_spec(spec)
    config = training.to_config()
    console.print(f"sweep {study or out.name}: {space.method} search, {space.goal} {space.metric}"
                  + (f" ({folds}-fold cross-validation)" if folds else ""))
    with stage_progress() as update:
        summary = run_sweep(ds, config, space, out, n_trials=n_trials, n_jobs=n_jobs, storage=storage, study=study,
                            folds=folds, tracker=tracking.tracker, tracking_uri=tracking.tracking_uri,
                            experiment=tracking.experiment, progress=update, log_models=bool(tracking.log_model))
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
            table.add_row(str(row["trial"]), metric_text(row["value"]), *[setting_text(row[p]) for p in params],
                          setting_text(row.get("best_epoch")))
        console.print(table)
    best = summary.get("best")
    if best is not None:
        console.print(f"best trial {best['trial']}: {summary['metric']} = {best['value']:.4f} "
                      f"({', '.join(f'{k}={setting_text(v)}' for k, v in best['params'].items())}); "
                      f"run folder {out / str(best['run'])}")
        console.print(f"best configuration: {out / 'best_config.yaml'} "
                      f"(cellclass train ... --config {out / 'best_config.yaml'})")
    if summary.get("remaining"):
        console.print(f"[bold]{summary['remaining']} trial(s) remain[/bold]: re-run the same command to continue")
    console.print(f"report: {out / 'report.html'}, trials.csv, plots/")


_BOOKKEEPING = {"trial", "number", "state", "value", "best_epoch", "epochs_run", "last_step", "duration_s",
                "retries", "worker_pid", "worker_host", "run_dir", "tracked_run", "error", "fold_values"}
