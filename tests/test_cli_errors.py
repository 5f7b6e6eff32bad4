"""A user's mistake is one clear line and a non-zero exit, never a traceback; nothing is overwritten.

The walk enumerates the commands from the typer app, so a new command is covered without
editing this file: every command is called with an unknown option, and with bad files (a
0-byte file, a non-UTF-8 file, random bytes) in every path parameter at once. The
specific cases below each failed (traceback, overwritten source or a silent wrong result)
before the checks they exercise existed.
"""

from __future__ import annotations

import inspect
import re
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer

from cellclass.cli import app, main
from cellclass.data.io import write_tiff


def leaf_commands() -> list[tuple[list[str], typer.core.TyperCommand]]:
    """``(words, command)`` of every command of the app, sub-commands included."""
    out = []

    def walk(command: object, words: list[str]) -> None:
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                walk(sub, [*words, name])
        else:
            out.append((words, command))

    walk(typer.main.get_command(app), [])
    return out


COMMANDS = leaf_commands()
COMMAND_IDS = [" ".join(words) for words, _ in COMMANDS]


def takes_path(param: object) -> bool:
    """Whether a parameter's annotation is a path (``Path``, ``Path | None``, ``list[Path]``)."""
    annotation = param.type_descriptor.annotation
    return Path in {annotation, *typing.get_args(annotation),
                    *(a for arg in typing.get_args(annotation) for a in typing.get_args(arg))}


def bad_arguments(command: object, bad: Path) -> list[str]:
    """Arguments filling every path parameter with ``bad`` and other required ones with ``nope``;
    a command reading a dataset also gets ``--image-col`` and ``--task``, so the manifest is read."""
    args: list[str] = []
    names = {param.name for param in command.params}
    for param in command.params:
        if param.param_type_name == "argument":
            value = str(bad) if takes_path(param) else "nope"
            args += [value] * (2 if param.nargs == -1 else 1)  # compare wants two runs
        elif takes_path(param):
            args += [param.opts[0], str(bad)]
        elif param.required:
            args += [param.opts[0], "nope"]
    if "image_col" in names:
        args += ["--image-col", "filename", "--task", "label"]
    return args


def call(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``cellclass ARGS`` in this process as the console script does: ``(rc, stdout, stderr)``.

    An exception other than ``SystemExit`` escaping :func:`main` is what a user sees as a
    traceback; it propagates and fails the test.
    """
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1), out, err


def assert_one_error_line(rc: int, out: str, err: str, *fragments: str) -> str:
    """rc != 0, no traceback, and stderr ends with its one ``error:`` line (holding
    ``fragments``), the whole message on that line; returns it."""
    assert rc != 0, out + err
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    """A 0-byte file, a non-UTF-8 text file and a file of random bytes."""
    files = {"empty": tmp_path / "empty.csv", "latin1": tmp_path / "latin1.csv", "noise": tmp_path / "noise.tif"}
    files["empty"].write_bytes(b"")
    files["latin1"].write_bytes("filename,label\ncaf\u00e9.tif,a\n".encode("latin-1"))
    files["noise"].write_bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes())
    return files


def test_the_walk_covers_every_command() -> None:
    assert {"validate", "inspect", "train", "predict", "compare", "simulate bps", "keys create"} <= set(COMMAND_IDS)


@pytest.mark.parametrize("words", [w for w, _ in COMMANDS], ids=COMMAND_IDS)
def test_unknown_option_is_one_error_line(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = call([*words, "--no-such-option"], capsys)
    assert rc == 2
    assert_one_error_line(rc, out, err, "No such option: --no-such-option", f"cellclass {' '.join(words)} --help")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["empty", "latin1", "noise"])
@pytest.mark.parametrize(("words", "command"), COMMANDS, ids=COMMAND_IDS)
def test_bad_files_in_every_path_are_one_error_line(words: list[str], command: object, kind: str,
                                                     bad_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    if not any(takes_path(p) for p in command.params):
        pytest.skip(f"`cellclass {' '.join(words)}` takes no path")
    bad = bad_files[kind]
    before = {p: p.read_bytes() for p in bad_files.values()}
    monkeypatch.chdir(bad.parent)
    rc, out, err = call([*words, *bad_arguments(command, bad)], capsys)
    assert_one_error_line(rc, out, err)
    assert {p: p.read_bytes() for p in bad_files.values()} == before
