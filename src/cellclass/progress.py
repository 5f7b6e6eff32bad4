"""The progress callback every long operation takes."""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``: what is being done (e.g. ``"epoch"``,
``"images"``), how many units are done, and how many there are in all."""
