"""The ``cellclass`` app and what its commands share: options, spec resolution, progress.

Every command that reads a dataset takes the same spec options: a YAML spec, a manifest
CSV with ``--image-col`` and ``--task``, or a folder with ``--preset``; and the same stack
options, ``--z``, ``--t`` and ``--series``.
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

from cellclass import __version__

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
    str | None, typer.Option("--preset", help="Preset for a dataset folder: bps, hpa, rxrx1, folder, csv, plate.")
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
WhereOpt = Annotated[
    list[str] | None, typer.Option("--where", help="Keep rows where COLUMN OP VALUE holds, e.g. 'dose_Gy > 0'. Repeatable.")
]
DropUnlabeledOpt = Annotated[
    bool, typer.Option("--drop-unlabeled", help="Drop rows whose labels are all empty.")
]
ZOpt = Annotated[
    str | None, typer.Option("--z", help="Z stacks: max, mean, sum or min projection, middle, or slice N "
                                         "(0-based). Without it, a file with Z > 1 is refused.")
]
TOpt = Annotated[
    str | None, typer.Option("--t", help="Time series: frame N (0-based), max, mean (or sum, min, "
                                         "middle). Without it, a file with T > 1 is refused.")
]
SeriesOpt = Annotated[
    int | None, typer.Option("--series", min=0, help="Series (OME image, position) to read of files "
                                                     "holding several.")
]


def _spec(source: Path, preset: str | None, image_col: str | None, task: list[str] | None,
          group: list[str] | None, delimiter: str | None = None, drop_unlabeled: bool = False,
          where: list[str] | None = None, z: str | None = None, t: str | None = None,
          series: int | None = None) -> Any:
    from cellclass.data.presets import load_spec

    return load_spec(source, preset_name=preset, image_col=image_col, tasks=task or [],
                     groups=group or [], delimiter=delimiter, drop_unlabeled=drop_unlabeled, where=where,
                     z=z, t=t, series=series)


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


@contextmanager
def _stage_progress() -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar whose description follows the stage: ``progress(stage, done, total)``."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True,
                  disable=not err_console.is_terminal) as bar:
        task_id = bar.add_task("starting", total=None)

        def update(stage: str, done: int, total: int) -> None:
            bar.update(task_id, description=stage, completed=done, total=total)

        yield update



@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details to stderr.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # cellclass's own progress notes (one line per epoch, per fold) are shown by default.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours = logging.getLogger("cellclass")
    ours.handlers[:] = [handler]
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = False
    if version:
        console.print(f"cellclass {__version__}")
        raise typer.Exit()


