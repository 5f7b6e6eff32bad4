"""The ``cellclass`` app: the one :data:`app` every command module registers on, and its
root options (``--version``, ``--verbose``)."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

import typer

from cellclass import __version__
from cellclass.cli.output import console

app = typer.Typer(
    name="cellclass",
    help="Supervised classification of fluorescence microscopy cell images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
simulate_app = typer.Typer(help="Write realistic simulated datasets (deterministic by seed).", no_args_is_help=True)
app.add_typer(simulate_app, name="simulate")


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the stream that was
    current when the handler was made (an embedding program or test may swap and close it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details to stderr.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # cellclass's own progress notes (one line per epoch, per fold) are shown by default.
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours = logging.getLogger("cellclass")
    ours.handlers[:] = [handler]
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = False
    if version:
        console.print(f"cellclass {__version__}")
        raise typer.Exit()
