"""Fixtures of the training tests: a run stopped part-way, as a kill would stop it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cellclass.training.loop import train


class Interrupt(Exception):
    """Raised from the progress callback when epoch 2 starts."""


@pytest.fixture
def interrupt_in_epoch_2() -> Callable[[Any, Any, Path], None]:
    """Train ``(spec, config, out)`` until epoch 2 starts, then stop: the folder keeps epoch 1."""

    def stop(stage: str, done: int, total: int) -> None:
        if stage.startswith("epoch 2/"):
            raise Interrupt

    def run(spec: Any, config: Any, out: Path) -> None:
        with pytest.raises(Interrupt):
            train(spec, config, out, progress=stop)

    return run


def assert_same_epochs(a: Path, b: Path) -> None:
    """Two run folders logged the same epochs (all but the seconds)."""
    pd.testing.assert_frame_equal(pd.read_csv(a / "metrics.csv").drop(columns="seconds"),
                                  pd.read_csv(b / "metrics.csv").drop(columns="seconds"), atol=1e-6)


@pytest.fixture
def same_epochs() -> Callable[[Path, Path], None]:
    """:func:`assert_same_epochs`."""
    return assert_same_epochs
