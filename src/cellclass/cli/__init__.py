"""The ``cellclass`` command line: the only place in cellclass that prints.

Commands live in sub-modules by concern, each registering on the one :data:`app`
(``app``): ``data`` (simulate, validate, inspect), ``cache`` (prepare, fetch), ``training``
(models, train, evaluate, predict, cv, compare), ``labelling`` (embed, rank), ``fields``
(segment, crops, simulate hpa-fields), ``sweep``, ``serve`` (serve, keys, contributions,
export) and ``demo``. The options several commands share are defined once
in ``options``; what they print goes through ``output``. A command imports the library
modules it runs in its body, so ``--help`` and a mistaken option answer without loading
pandas or torch.

Every error a user can cause ends the command with one line on stderr, ``error: ...``,
and exit status 2: cellclass's own errors, mistaken options (click's usage errors) and
files the system refuses (a folder where a file is needed, no permission, a full disk).
``--verbose`` logs the traceback of the last kind.
"""

from __future__ import annotations

import errno
import logging
import sys

import typer

from cellclass.cli import cache, data, demo, fields, labelling, serve, sweep, training  # noqa: F401  (register their commands)
from cellclass.cli.app import app
from cellclass.cli.output import print_error
from cellclass.errors import CellclassError

log = logging.getLogger("cellclass.cli")

USER_ERROR = 2
"""Exit status of a command stopped by a user's mistake (as click's usage errors)."""

_OS_REASONS = {
    errno.ENOENT: "does not exist",
    errno.EEXIST: "exists and is not a folder; valid: a folder, or a path that does not exist yet",
    errno.ENOTDIR: "has a file where a folder is needed; valid: a path whose parents are folders",
    errno.EISDIR: "is a folder; valid: a file path",
    errno.EACCES: "is not accessible (permission denied)",
    errno.EPERM: "is not accessible (operation not permitted)",
    errno.ENOSPC: "cannot be written: no space left on the device",
    errno.EROFS: "cannot be written: read-only file system",
}


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning every user error into one line.

    Args:
        argv: Arguments after ``cellclass`` (default: ``sys.argv[1:]``).
    """
    try:
        code = app(args=argv, prog_name="cellclass", standalone_mode=False)
    except CellclassError as exc:
        _fail(str(exc))
    except typer.TyperException as exc:  # click's usage errors
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed already
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _fail(f"{exc.format_message()}{hint}", getattr(exc, "exit_code", USER_ERROR))
    except typer.Abort:
        _fail("aborted", 1)
    except OSError as exc:
        log.debug("system error", exc_info=True)
        _fail(_os_message(exc))
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int = USER_ERROR) -> None:
    print_error(message)
    sys.exit(code)


def _os_message(exc: OSError) -> str:
    """One line for a refused file operation: the path, and what was wrong with it."""
    if exc.filename is None:
        return exc.strerror or str(exc)
    reason = _OS_REASONS.get(exc.errno or 0, exc.strerror or type(exc).__name__)
    # A rename (an atomic write moving its temporary file into place) names the target second.
    path = exc.filename if exc.filename2 is None else exc.filename2
    return f"{str(path)!r} {reason}"


if __name__ == "__main__":
    main()
