"""The ``cellclass`` command line: the only place in cellclass that prints.

Every command that reads a dataset takes the same spec options: a YAML spec, a manifest
CSV with ``--image-col`` and ``--task``, or a folder with ``--preset``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cellclass import __version__
from cellclass.errors import CellclassError

app = typer.Typer(
    name="cellclass",
    help="Supervised classification of fluorescence microscopy cell images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
simulate_app = typer.Typer(help="Write realistic simulated datasets (deterministic by seed).", no_args_is_help=True)
app.add_typer(simulate_app, name="simulate")

console = Console()
err_console = Console(stderr=True)

# -- shared spec options ---------------------------------------------------------------
SpecArg = Annotated[
    Path,
    typer.Argument(help="Dataset: a YAML spec, a manifest CSV (with --image-col and --task), "
                        "or a folder (with --preset).", show_default=False),
]
PresetOpt = Annotated[
    str | None, typer.Option("--preset", help="Preset for a dataset folder: bps, hpa, rxrx1, folder, csv.")
]
ImageColOpt = Annotated[
    str | None, typer.Option("--image-col", help="Manifest column of image paths (relative to the manifest's folder).")
]
TaskOpt = Annotated[
    list[str] | None,
    typer.Option("--task", help="With a manifest: a label column, COLUMN[:TYPE] or NAME=COLUMN[:TYPE] "
                                "(TYPE: single, multilabel, binary). With a YAML or preset: a task to keep. Repeatable."),
]
GroupOpt = Annotated[
    list[str] | None, typer.Option("--group", help="Group column (plate, well, experiment). Repeatable.")
]
DelimiterOpt = Annotated[
    str | None, typer.Option("--delimiter", help="Separator of delimited multi-label columns (default: space).")
]
DropUnlabeledOpt = Annotated[
    bool, typer.Option("--drop-unlabeled", help="Drop rows whose labels are all empty.")
]


def _spec(source: Path, preset: str | None, image_col: str | None, task: list[str] | None,
          group: list[str] | None, delimiter: str | None = None, drop_unlabeled: bool = False) -> Any:
    from cellclass.data.presets import load_spec

    return load_spec(source, preset_name=preset, image_col=image_col, tasks=task or [],
                     groups=group or [], delimiter=delimiter, drop_unlabeled=drop_unlabeled)


@contextmanager
def _progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar, as a ``progress(done, total)`` callback."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True,
                  disable=not err_console.is_terminal) as bar:
        task_id = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task_id, completed=done, total=total)

        yield update


# -- commands --------------------------------------------------------------------------
@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details to stderr.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if version:
        console.print(f"cellclass {__version__}")
        raise typer.Exit()


@simulate_app.command("bps")
def simulate_bps_cmd(
    out: Annotated[Path, typer.Argument(help="Output folder (meta.csv + TIFF images).")],
    n_images: Annotated[int, typer.Option("--n-images", min=1, help="Number of nuclei to write.")] = 680,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
) -> None:
    """Simulate a NASA BPS-layout dataset: uint16 TIFF nuclei whose foci carry dose, particle and time signal."""
    from cellclass.data.simulate import simulate_bps

    meta = simulate_bps(out, n_images=n_images, seed=seed)
    console.print(f"wrote {n_images} images and {meta}")
    console.print(f"next: cellclass validate {out} --preset bps")


@simulate_app.command("hpa")
def simulate_hpa_cmd(
    out: Annotated[Path, typer.Argument(help="Output folder (train.csv + train/{Id}_{channel}.png).")],
    n_images: Annotated[int, typer.Option("--n-images", min=1, help="Number of 4-channel images.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Simulate a Human Protein Atlas-layout multi-label dataset (4-channel PNG sets)."""
    from cellclass.data.simulate import simulate_hpa

    meta = simulate_hpa(out, n_images=n_images, seed=seed)
    console.print(f"wrote {n_images} image sets and {meta}")
    console.print(f"next: cellclass validate {out} --preset hpa")


@app.command()
def validate(
    spec: SpecArg,
    preset: PresetOpt = None,
    image_col: ImageColOpt = None,
    task: TaskOpt = None,
    group: GroupOpt = None,
    delimiter: DelimiterOpt = None,
    drop_unlabeled: DropUnlabeledOpt = False,
    write_clean: Annotated[Path | None, typer.Option("--write-clean", help="Write a manifest of the good rows here.")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write every problem to this CSV.")] = None,
    no_images: Annotated[bool, typer.Option("--no-images", help="Check metadata only, do not decode images.")] = False,
    workers: Annotated[int, typer.Option(min=1, help="Decoding threads.")] = 4,
) -> None:
    """Read every row and every image; list all problems with row, file and reason.

    Exits 0 when the dataset is clean, 1 when a problem was found. Source files are never
    modified.
    """
    from cellclass.data.validate import validate as run_validate
    from cellclass.data.validate import write_clean_manifest

    ds = _spec(spec, preset, image_col, task, group, delimiter, drop_unlabeled)
    with _progress("validating") as progress:
        result = run_validate(ds, check_images=not no_images, workers=workers, progress=progress)
    if result.problems:
        table = Table(title=f"{len(result.problems)} problem(s) in {len(result.bad_rows)} of {result.n_rows} rows")
        for col in ("row", "file", "field", "reason"):
            table.add_column(col, overflow="fold")
        for p in result.problems:
            table.add_row("-" if p.row is None else str(p.row), p.file or "", p.field, p.reason)
        console.print(table)
    shapes = ", ".join(f"{s} x{n}" for s, n in result.shapes.most_common(5))
    console.print(f"dataset {ds.name!r}: {result.n_rows} rows" +
                  (f" ({result.n_dropped} unlabeled dropped)" if result.n_dropped else "") +
                  (f"; image shapes {shapes}; dtypes {dict(result.dtypes)}" if result.images_checked else "; images not checked"))
    if report is not None:
        from cellclass.atomic import atomic_path

        with atomic_path(report) as tmp:
            result.to_frame().to_csv(tmp, index=False)
        console.print(f"problems written to {report}")
    if write_clean is not None:
        path = write_clean_manifest(ds, result, write_clean)
        console.print(f"clean manifest ({result.n_rows - len(result.bad_rows)} rows) written to {path}")
    if result.ok:
        console.print("[green]no problem found[/green]")
    else:
        raise typer.Exit(1)


@app.command()
def inspect(
    spec: SpecArg,
    preset: PresetOpt = None,
    image_col: ImageColOpt = None,
    task: TaskOpt = None,
    group: GroupOpt = None,
    delimiter: DelimiterOpt = None,
    drop_unlabeled: DropUnlabeledOpt = False,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for tables, plots and sample grids.")] = None,
    max_images: Annotated[int, typer.Option(min=1, help="Images sampled for intensity statistics.")] = 2000,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Class counts, label co-occurrence, channel intensities, sample grids and the confound table."""
    from cellclass.data.inspect import inspect_dataset

    ds = _spec(spec, preset, image_col, task, group, delimiter, drop_unlabeled)
    with _progress("reading images") as progress:
        result = inspect_dataset(ds, out, max_images=max_images, seed=seed, progress=progress)
    _print_inspection(result)
    if out is not None:
        console.print(f"tables, plots and sample grids written to {out}")


def _print_inspection(result: Any) -> None:
    console.print(f"[bold]{result.dataset}[/bold]: {result.n_rows} rows, "
                  f"{result.images_found} images found")
    if result.metadata_only:
        console.print("[yellow]no image file was found: metadata-only inspection "
                      "(labels and groups analysed, no pixel statistics)[/yellow]")
    for task, counts in result.class_counts.items():
        n_classes = len([c for c in counts if not c.startswith("<")])
        table = Table(title=f"task {task}: {n_classes} classes")
        table.add_column("class")
        table.add_column("count", justify="right")
        for cls, n in list(counts.items())[:40]:
            table.add_row(cls, str(n))
        if len(counts) > 40:
            table.add_row(f"... {len(counts) - 40} more", "")
        console.print(table)
    if result.channel_stats is not None and len(result.channel_stats):
        table = Table(title=f"channel intensities ({result.images_checked} images sampled)")
        for col in result.channel_stats.columns:
            table.add_column(str(col), justify="right")
        for row in result.channel_stats.itertuples(index=False):
            table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
        console.print(table)
    if result.confounds:
        table = Table(title="confounds: how far each group alone predicts each task")
        for col in ("task", "group", "groups", "Cramér's V", "Theil's U", "verdict"):
            table.add_column(col)
        for c in result.confounds:
            style = {"determined": "red", "nearly": "yellow", "associated": "yellow"}.get(c.level, "")
            verdict = {"determined": "FULLY DETERMINED", "nearly": "nearly determined",
                       "associated": "associated"}.get(c.level, "ok")
            table.add_row(c.task, c.group, str(c.n_groups), f"{c.cramers_v:.2f}", f"{c.theils_u:.2f}",
                          f"[{style}]{verdict}[/{style}]" if style else verdict)
        console.print(table)
    for message in result.warnings:
        console.print(f"[bold red]warning:[/bold red] {message}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's data and results.")] = Path("demo"),
    n_images: Annotated[int, typer.Option("--n-images", min=34, help="Simulated nuclei.")] = 680,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """The main job on built-in data (no download): simulate BPS nuclei, validate and inspect them."""
    from cellclass.data.inspect import inspect_dataset
    from cellclass.data.presets import bps
    from cellclass.data.simulate import simulate_bps
    from cellclass.data.validate import validate as run_validate

    data = out / "data"
    console.rule("1. simulate a BPS-layout dataset")
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
    console.print(f"\nresults in {out}/inspect (class_counts.csv, confounds.csv, samples/, inspection.json)")


def main() -> None:
    """Console-script entry point: run the app, turning cellclass errors into one-line messages."""
    try:
        app()
    except CellclassError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
