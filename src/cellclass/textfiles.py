"""Reading the text files a user hands cellclass: manifests, dataset specs, configs, sweep files.

A file that is not UTF-8, or not valid YAML, is refused with one line that names the
file, the line and column, and what is valid, instead of a decoder's byte offset or a
parser's multi-line report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from cellclass.errors import CellclassError

UTF8_HINT = "valid: UTF-8 text (re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 FILE`)"


def utf8_position(data: bytes, offset: int) -> tuple[int, int]:
    """1-based ``(line, column)`` of byte ``offset`` in ``data`` (the column counts bytes)."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


def decode_utf8(data: bytes, what: str, error: type[CellclassError]) -> str:
    """``data`` as text (UTF-8, a leading byte-order mark dropped).

    Args:
        data: The file's bytes.
        what: The file, as the message should name it (``"config file '/x/c.yaml'"``).
        error: Exception class raised when the bytes are not UTF-8.

    Raises:
        CellclassError: ``error``, naming the line and column of the first bad byte.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, column = utf8_position(data, exc.start)
        raise error(f"{what} is not UTF-8 text: line {line}, column {column} holds the byte "
                    f"0x{data[exc.start]:02x}; {UTF8_HINT}") from None


def read_text(path: str | os.PathLike[str], what: str, error: type[CellclassError]) -> str:
    """The UTF-8 text of ``path`` (see :func:`decode_utf8`); ``what`` names the kind of file."""
    path = Path(path)
    return decode_utf8(path.read_bytes(), f"{what} {str(path)!r}", error)


def load_yaml(path: str | os.PathLike[str], what: str, error: type[CellclassError]) -> Any:
    """The YAML document of ``path``.

    Raises:
        CellclassError: ``error`` when the file is not UTF-8 or not valid YAML; the message
            names the line and column.
    """
    text = read_text(path, what, error)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{what} {str(path)!r} is not valid YAML{where}: {problem}") from None
