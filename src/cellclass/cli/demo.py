"""The ``demo`` command: the main job on simulated data, from files to a sweep."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cellclass.cli.app import app
from cellclass.cli.data import print_inspection
from cellclass.cli.output import console, stage_progress
from cellclass.cli.sweep import print_sweep
from cellclass.cli.training import print_metrics
from cellclass.errors import CellclassError


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

    ds = _demo_data(out / "data", n_images, seed)
    console.rule("3. inspect (class counts, intensities, confounds)")
    with stage_progress() as update:
        report = inspect_dataset(ds, out / "inspect", progress=update)
    print_inspection(report)
    console.rule("4. particle type of irradiated nuclei (dose_Gy > 0): MLP baseline and LeNet-5, split by plate")
    irradiated = dataclasses.replace(ds, where=["dose_Gy > 0"])
    runs = [_demo_run(irradiated, out / "runs" / model, model, epochs, seed) for model in ("mlp", "lenet5")]
    console.rule("5. compare on the same test images")
    _demo_compare(runs, out / "compare")
    console.rule("6. sham-vs-sham control (dose_Gy == 0): the plate-recognition floor")
    console.print("0 Gy Fe and 0 Gy X-ray nuclei had the same (sham) treatment and differ only by plate: a score "
                  "above chance here would measure plate effects, not radiation.")
    sham = dataclasses.replace(ds, where=["dose_Gy == 0"])
    _demo_run(sham, out / "runs" / "sham_control_lenet5", "lenet5", epochs, seed)
    console.rule("7. a small hyperparameter sweep: LeNet-5 over learning rate and batch size (Optuna, MLflow)")
    demo_sweep(irradiated, out / "sweep", seed)
    console.print(f"\nresults in {out}: inspect/, runs/*/report.html, compare/compare.json, sweep/report.html")


def _demo_data(data: Path, n_images: int, seed: int) -> Any:
    """Steps 1 and 2: simulate the BPS-layout set (once) and validate it."""
    from cellclass.data.presets import bps
    from cellclass.data.simulate import simulate_bps
    from cellclass.data.validate import validate

    console.rule("1. simulate a BPS-layout dataset")
    if not (data / "meta.csv").is_file():
        simulate_bps(data, n_images=n_images, seed=seed)
    ds = bps(data)
    console.print(f"{n_images} uint16 TIFF nuclei and meta.csv in {data}")
    console.rule("2. validate")
    with stage_progress() as update:
        result = validate(ds, progress=update)
    console.print(f"{result.n_rows} rows, {len(result.problems)} problem(s); shapes "
                  f"{dict(result.shapes.most_common(3))}; dtypes {dict(result.dtypes)}")
    if not result.ok:
        raise CellclassError(f"the simulated dataset has {len(result.problems)} problem(s): {result.problems[:3]}")
    return ds


def _demo_run(spec: Any, run: Path, model: str, epochs: int, seed: int) -> Path:
    """Train (or resume, or reuse) one demo run on particle type and print its metrics."""
    from cellclass.training.config import TrainConfig
    from cellclass.training.loop import train

    config = TrainConfig(model=model, tasks=["particle_type"], epochs=epochs, seed=seed)
    if not (run / "metrics.json").is_file():
        with stage_progress() as update:
            train(spec, config, run, resume=(run / "checkpoints" / "last.ckpt").is_file(), progress=update)
    print_metrics(json.loads((run / "metrics.json").read_text()), run)
    return run


def _demo_compare(runs: list[Path], out: Path) -> None:
    """Step 5: the runs' macro F1 with confidence intervals, and their paired difference."""
    from cellclass.evaluation.compare import compare_runs

    comparison = compare_runs(runs, metric="macro_f1", n_boot=1000, out=out)
    for task_name, block in comparison["tasks"].items():
        for row in block["table"]:
            console.print(f"{task_name} {row['run']:>7}: macro F1 {row['macro_f1']:.3f} "
                          f"[{row['macro_f1_ci_low']:.3f}, {row['macro_f1_ci_high']:.3f}], accuracy {row['accuracy']:.3f}")
        for p in block["pairs"]:
            console.print(f"{p['model_a']} - {p['model_b']}: macro F1 {p['delta']:+.3f} "
                          f"(95% CI [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]), McNemar p = {p['mcnemar_p_value']:.3g}")


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
    config = TrainConfig(model="lenet5", tasks=["particle_type"], epochs=epochs, seed=seed)
    console.print(f"sweep file {sweep_file}: {n_trials} trials of LeNet-5, {epochs} epochs each; "
                  f"{space.goal} {space.metric}")
    with stage_progress() as update:
        summary = run_sweep(spec, config, space, out, n_trials=n_trials, n_jobs=1, progress=update)
    print_sweep(summary, out)
    console.print(f"MLflow: mlflow ui --backend-store-uri sqlite:///{(out / 'mlflow.db').resolve()}")
    return summary
