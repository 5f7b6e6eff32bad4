"""The ``cellclass`` app and what its commands share: options, spec resolution, progress.

Every command that reads a dataset takes the same spec options: a YAML spec, a manifest
CSV with ``--image-col`` and ``--task``, or a folder with ``--preset``; and the same stack
options, ``--z``, ``--t`` and ``--series``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cellclass import __version__
from cellclass.errors import OutputPathError

if TYPE_CHECKING:
    import pandas as pd

app = typer.Typer(
    name="cellclass",
    help="Supervised classification of fluorescence microscopy cell images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
simulate_app = typer.Typer(help="Write realistic simulated datasets (deterministic by seed).", no_args_is_help=True)
app.add_typer(simulate_app, name="simulate")

class _Unfolded:
    """A table rendered at its natural width: no cell folded across lines, one line per row."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        wide = options.update(width=_UNBOUNDED, max_width=_UNBOUNDED)
        width = Measurement.get(console, wide, self.table).maximum
        yield from console.render(self.table, options.update(width=width, max_width=width))


_UNBOUNDED = 1_000_000


class CliConsole(Console):
    """The commands' console. Outside a terminal (a pipe, a file, a CI log) it wraps no line:
    a text line stays one line and a table is printed at its natural width, so a file name
    is never folded across lines and ``grep NAME`` finds its row."""

    def print(self, *objects: Any, **kwargs: Any) -> None:  # noqa: D102 (as rich's)
        if not self.is_terminal:
            kwargs.setdefault("soft_wrap", True)
            objects = tuple(_Unfolded(o) if isinstance(o, Table) else o for o in objects)
        super().print(*objects, **kwargs)


console = CliConsole()
err_console = CliConsole(stderr=True)


class OutputFormat(str, Enum):
    """How a command prints its result on stdout."""

    table = "table"
    json = "json"
    csv = "csv"


FormatOpt = Annotated[
    OutputFormat,
    typer.Option("--format", case_sensitive=False,
                 help="table (to read), json or csv (for programs: only the data goes to stdout, "
                      "messages to stderr)."),
]


def write_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout (plain text, never rich markup)."""
    sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")


def write_csv(tables: Mapping[str, pd.DataFrame]) -> None:
    """Print tables as CSV on stdout: one table as it is; several as blocks, each after a
    ``# NAME`` line and followed by a blank line."""
    single = len(tables) == 1
    for name, frame in tables.items():
        if not single:
            sys.stdout.write(f"# {name}\n")
        frame.to_csv(sys.stdout, index=False, lineterminator="\n")
        if not single:
            sys.stdout.write("\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)

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


def check_output_file(path: Path, option: str, inputs: Iterable[Path] = (),
                      input_folders: Iterable[Path] = ()) -> Path:
    """Refuse an output file that is a folder or would overwrite an input; return ``path``.

    Args:
        path: Where the command is asked to write one file.
        option: How the user gave it (``--out``), for the message.
        inputs: Files the command reads: none of them may be the output.
        input_folders: Folders the command reads (a run folder): no existing file in them
            may be the output.

    Raises:
        OutputPathError: When ``path`` is a folder, is one of
            ``inputs``, or is an existing file inside one of ``input_folders``.
    """
    if path.is_dir():
        raise OutputPathError(f"{option} {str(path)!r} is a folder; valid: a file path, "
                              f"e.g. {str(path / 'predictions.csv')!r}")
    if not path.exists():
        return path
    target = path.resolve()
    for source in inputs:
        if source.exists() and source.resolve() == target:
            raise OutputPathError(f"{option} {str(path)!r} is one of the inputs ({str(source)!r}); valid: "
                                  "a path that is not an input (inputs are never overwritten)")
    for folder in input_folders:
        if folder.is_dir() and target.is_relative_to(folder.resolve()):
            raise OutputPathError(f"{option} {str(path)!r} is a file of the input folder {str(folder)!r}; "
                                  "valid: a new file, or one outside that folder (inputs are never overwritten)")
    return path


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


