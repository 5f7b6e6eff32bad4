"""Data commands: simulate, validate, inspect."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from cellclass.cli.app import app, simulate_app
from cellclass.cli.options import DatasetOptions, SpecArg, takes_options
from cellclass.cli.output import (
    FormatOpt,
    OutputFormat,
    check_output_file,
    console,
    err_console,
    stage_progress,
    write_csv,
    write_json,
)
from cellclass.errors import OutputPathError


_SIMULATIONS = {  # command: (images written by default, what an image is, the command's help)
    "bps": (680, "images", ("Simulate a NASA BPS-layout dataset: uint16 TIFF nuclei whose foci carry dose, "
                            "particle and time signal (OUT: meta.csv + TIFF images).")),
    "hpa": (200, "image sets", ("Simulate a Human Protein Atlas-layout multi-label dataset: 4-channel PNG sets "
                                "(OUT: train.csv + train/{Id}_{channel}.png).")),
}


def simulate(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="Output folder (the images and their manifest).")],
    n_images: Annotated[int | None, typer.Option("--n-images", min=1, help="Number of images to write "
                                                 "(default: 680 nuclei with bps, 200 image sets with hpa).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
) -> None:
    """Write the simulated dataset the command names (``simulate bps``, ``simulate hpa``)."""
    from cellclass.data import simulate as simulators

    kind = ctx.info_name
    default_n, what, _ = _SIMULATIONS[kind]
    n_images = default_n if n_images is None else n_images
    meta = getattr(simulators, f"simulate_{kind}")(out, n_images=n_images, seed=seed)
    console.print(f"wrote {n_images} {what} and {meta}")
    console.print(f"next: cellclass validate {out} --preset {kind}")


for _kind, (_, _, _help) in _SIMULATIONS.items():
    simulate_app.command(_kind, help=_help)(simulate)


@simulate_app.command("plate")
def simulate_plate_cmd(
    out: Annotated[Path, typer.Argument(help="Output folder (plate.zarr + wells.csv).")],
    rows: Annotated[int, typer.Option(min=1, max=26, help="Plate rows (A, B, ...).")] = 4,
    cols: Annotated[int, typer.Option(min=1, max=48, help="Plate columns (1, 2, ...).")] = 6,
    fields: Annotated[int, typer.Option(min=1, help="Fields of view per well.")] = 2,
    image_size: Annotated[int, typer.Option("--image-size", min=16, help="Side of every field, in pixels.")] = 64,
    z_planes: Annotated[int, typer.Option("--z-planes", min=1, help="Z planes per field (more than 1: Z stacks).")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a plate already in OUT.")] = False,
) -> None:
    """Simulate an OME-Zarr screening plate (needs the zarr extra): wells whose treatment shows in their fields."""
    from cellclass.data.simulate_plate import simulate_plate

    manifest = simulate_plate(out, rows=rows, cols=cols, fields=fields, image_size=image_size,
                              z_planes=z_planes, seed=seed, overwrite=overwrite)
    console.print(f"wrote a {rows}x{cols} plate, {fields} field(s) per well, to {out / 'plate.zarr'} and {manifest}")
    console.print(f"next: cellclass validate {out} --preset plate" + (" --z max" if z_planes > 1 else ""))


@app.command()
@takes_options
def validate(
    spec: SpecArg,
    dataset: DatasetOptions,
    write_clean: Annotated[Path | None, typer.Option("--write-clean", help="Write a manifest of the good rows here.")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write every problem to this CSV.")] = None,
    no_images: Annotated[bool, typer.Option("--no-images", help="Check metadata only, do not decode images.")] = False,
    workers: Annotated[int, typer.Option(min=1, help="Decoding threads.")] = 4,
    output: FormatOpt = OutputFormat.table,
) -> None:
    """Read every row and every image; list all problems with row, file and reason.

    Exits 0 when the dataset has no error (warnings, such as paths that leave the data
    folder, are listed but allowed), 1 when it has one. Source files are never modified.
    """
    from cellclass.data.validate import validate as run_validate
    from cellclass.data.validate import write_clean_manifest

    ds = dataset.to_spec(spec)
    sources = [p for p in (spec, ds.manifest_path) if p is not None]
    for option, path in (("--write-clean", write_clean), ("--report", report)):
        if path is not None:
            check_output_file(path, option, inputs=sources)
    if write_clean is not None and report is not None and write_clean.resolve() == report.resolve():
        raise OutputPathError(f"--write-clean and --report are both {str(report)!r}; valid: two different files")
    with stage_progress() as update:
        result = run_validate(ds, check_images=not no_images, workers=workers, progress=update)
    notes = console if output is OutputFormat.table else err_console
    if output is OutputFormat.json:
        write_json({"dataset": ds.name, **result.to_dict()})
    elif output is OutputFormat.csv:
        write_csv({"problems": result.to_frame()})
    else:
        _print_problems(result)
        shapes = ", ".join(f"{s} x{n}" for s, n in result.shapes.most_common(5))
        console.print(f"dataset {ds.name!r}: {result.n_rows} rows" +
                      (f" ({result.n_dropped} unlabeled dropped)" if result.n_dropped else "") +
                      (f"; image shapes {shapes}; dtypes {dict(result.dtypes)}" if result.images_checked
                       else "; images not checked"))
    if report is not None:
        from cellclass.atomic import atomic_path

        with atomic_path(report) as tmp:
            result.to_frame().to_csv(tmp, index=False)
        notes.print(f"problems written to {report}")
    if write_clean is not None:
        path = write_clean_manifest(ds, result, write_clean)
        notes.print(f"clean manifest ({result.n_rows - len(result.bad_rows)} rows) written to {path}")
    if not result.ok:
        raise typer.Exit(1)
    notes.print("[green]no problem found[/green]" if not result.warnings else
                f"[yellow]no error found; {len(result.warnings)} warning(s)[/yellow]")


def _print_problems(result: Any) -> None:
    errors, warnings = result.errors, result.warnings
    if not result.problems:
        return
    title = f"{len(errors)} problem(s) in {len(result.bad_rows)} of {result.n_rows} rows"
    if warnings:
        title += f", {len(warnings)} warning(s)"
    table = Table(title=title)
    for col in ("row", "file", "field", "severity", "reason"):
        table.add_column(col, overflow="fold")
    for p in result.problems:
        severity = "[yellow]warning[/yellow]" if p.severity == "warning" else "[red]error[/red]"
        table.add_row("-" if p.row is None else str(p.row), escape(p.file or ""), p.field, severity,
                      escape(p.reason))
    console.print(table)


@app.command()
@takes_options
def inspect(
    spec: SpecArg,
    dataset: DatasetOptions,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for tables, plots and sample grids.")] = None,
    max_images: Annotated[int, typer.Option(min=1, help="Images sampled for intensity statistics.")] = 2000,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    output: FormatOpt = OutputFormat.table,
) -> None:
    """Class counts, label co-occurrence, channel intensities, sample grids and the confound table."""
    from cellclass.data.inspect import inspect_dataset

    ds = dataset.to_spec(spec)
    with stage_progress() as update:
        result = inspect_dataset(ds, out, max_images=max_images, seed=seed, progress=update)
    if output is OutputFormat.json:
        write_json(result.to_dict())
    elif output is OutputFormat.csv:
        write_csv(_inspection_tables(result))
    else:
        print_inspection(result)
    if out is not None:
        (console if output is OutputFormat.table else err_console).print(
            f"tables, plots and sample grids written to {out}")


def _inspection_tables(result: Any) -> dict[str, Any]:
    """The inspection's tables, for ``--format csv``."""
    import pandas as pd

    tables = {"class_counts": pd.DataFrame(
        [(t, c, n) for t, counts in result.class_counts.items() for c, n in counts.items()],
        columns=["task", "class", "count"])}
    if result.channel_stats is not None and len(result.channel_stats):
        tables["channel_stats"] = result.channel_stats
    tables["left_out"] = pd.DataFrame([(x.reason, x.count, "; ".join(x.examples)) for x in result.left_out],
                                      columns=["reason", "count", "examples"])
    tables["confounds"] = pd.DataFrame(
        [(c.task, c.group, c.n_groups, c.cramers_v, c.theils_u, c.level) for c in result.confounds],
        columns=["task", "group", "groups", "cramers_v", "theils_u", "level"])
    return tables


def print_inspection(result: Any) -> None:
    """The inspection of a dataset as tables: classes, intensities, what was left out, confounds."""
    console.print(f"[bold]{escape(result.dataset)}[/bold]: {result.n_rows} rows, "
                  f"{result.images_found} images found")
    if result.metadata_only:
        console.print("[yellow]no image file was found: metadata-only inspection "
                      "(labels and groups analysed, no pixel statistics)[/yellow]")
    for note in result.axes:
        console.print(f"axes: {note}")
    for task, counts in result.class_counts.items():
        n_classes = len([c for c in counts if not c.startswith("<")])
        table = Table(title=f"task {escape(task)}: {n_classes} classes")
        table.add_column("class")
        table.add_column("count", justify="right")
        for cls, n in list(counts.items())[:40]:
            table.add_row(escape(cls), str(n))
        if len(counts) > 40:
            table.add_row(f"... {len(counts) - 40} more", "")
        console.print(table)
    if result.channel_stats is not None and len(result.channel_stats):
        groups = result.channel_stats[["dtype", "channels"]].drop_duplicates()
        title = f"channel intensities ({result.images_checked} of {result.n_rows} images read"
        title += f"; {len(groups)} groups of dtype x channel count, never pooled)" if len(groups) > 1 else ")"
        table = Table(title=title)
        for col in result.channel_stats.columns:
            table.add_column(str(col), justify="right")
        for row in result.channel_stats.itertuples(index=False):
            table.add_row(*[f"{v:.4g}" if isinstance(v, float) else escape(str(v)) for v in row])
        console.print(table)
    for left in result.left_out:
        examples = f": {'; '.join(left.examples)}" + (" ..." if left.count > len(left.examples) else "") \
            if left.examples else ""
        console.print(f"left out of the intensities: {left.count} image(s), {escape(left.reason)}{escape(examples)}")
    if result.confounds:
        table = Table(title="confounds: how far each group alone predicts each task")
        for col in ("task", "group", "groups", "Cramér's V", "Theil's U", "verdict"):
            table.add_column(col)
        for c in result.confounds:
            style = {"determined": "red", "nearly": "yellow", "associated": "yellow"}.get(c.level, "")
            verdict = {"determined": "FULLY DETERMINED", "nearly": "nearly determined",
                       "associated": "associated"}.get(c.level, "ok")
            table.add_row(escape(c.task), escape(c.group), str(c.n_groups), f"{c.cramers_v:.2f}", f"{c.theils_u:.2f}",
                          f"[{style}]{verdict}[/{style}]" if style else verdict)
        console.print(table)
    for message in result.warnings:
        console.print(f"[bold red]warning:[/bold red] {escape(message)}")
