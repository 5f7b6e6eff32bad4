"""The ``cellclass`` command line: the only place in cellclass that prints.

Commands live in sub-modules by concern, each registering on the one :data:`app`:
``data`` (simulate, validate, inspect), ``cache`` (prepare, fetch), ``training`` (models,
train, evaluate, predict, cv, compare, demo), ``sweep`` and ``serve`` (serve, keys,
contributions, export).
"""

from __future__ import annotations

import sys

from cellclass.cli import cache, data, serve, sweep, training  # noqa: F401  (register their commands)
from cellclass.cli.app import app, err_console
from cellclass.errors import CellclassError


def main() -> None:
    """Console-script entry point: run the app, turning cellclass errors into one-line messages."""
    try:
        app()
    except CellclassError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()

