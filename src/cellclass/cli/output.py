"""What the commands print and write: consoles, machine formats, progress bars, numbers,
error lines, and the check that an output never replaces an input."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cellclass.errors import OutputPathError
from cellclass.progress import ProgressFn

if TYPE_CHECKING:
    import pandas as pd

_UNBOUNDED = 1_000_000


class _Unfolded:
    """A table rendered at its natural width: no cell folded across lines, one line per row."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        wide = options.update(width=_UNBOUNDED, max_width=_UNBOUNDED)
        width = Measurement.get(console, wide, self.table).maximum
        yield from console.render(self.table, options.update(width=width, max_width=width))


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


def print_error(message: str) -> None:
    """Print ``message`` as one ``error: ...`` line on stderr (never read as rich markup)."""
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


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
    return str(value)


def metric_text(value: Any) -> str:
    """A metric in a table: three decimals for a float, blank for none."""
    return f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))


def setting_text(value: Any) -> str:
    """A setting in a table: 4 significant digits for a float (learning rates are small)."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e6 else f"{value:.4g}"
    return "" if value is None else str(value)


def _bar() -> Progress:
    """A transient rich progress bar on stderr, shown only in a terminal."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=err_console, transient=True,
                    disable=not err_console.is_terminal)


@contextmanager
def stage_progress() -> Iterator[ProgressFn]:
    """A progress bar whose description follows the stage: ``progress(stage, done, total)``."""
    with _bar() as bar:
        task_id = bar.add_task("starting", total=None)

        def update(stage: str, done: int, total: int) -> None:
            bar.update(task_id, description=stage, completed=done, total=total)

        yield update


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
