"""The checkpoint saver: which epoch is best by the monitored validation metric, whether
patience is spent, and the run's ``best.ckpt`` and ``last.ckpt``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cellclass.inference.checkpoint import Checkpoint


class CheckpointSaver:
    """Tracks the monitored metric epoch by epoch and writes the run's checkpoints.

    A loss (a monitor name holding ``loss``) is better lower, any other metric higher; an
    undefined value (NaN) never improves. ``best.ckpt`` is written when an epoch improves
    on every earlier candidate, ``last.ckpt`` (with the training state) after every epoch.

    Args:
        folder: The run's ``checkpoints`` folder.
        monitor: Name of the metric that picks the best epoch (``val/macro_f1``, ``val_loss`` ...).
        patience: Epochs without improvement after which training stops (0: never); epochs
            before ``first_candidate`` do not count.
        first_candidate: First epoch that can be the best (earlier ones are recorded, never chosen).
    """

    def __init__(self, folder: str | Path, monitor: str, patience: int = 0, first_candidate: int = 1) -> None:
        self.folder = Path(folder)
        self.monitor = monitor
        self.patience = patience
        self.first_candidate = first_candidate
        self.mode = "min" if "loss" in monitor else "max"
        self.best_score = -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0

    def update(self, epoch: int, value: float | None) -> bool:
        """Record ``epoch``'s value of the monitored metric; whether it is the best so far."""
        if epoch < self.first_candidate:
            return False
        score = -math.inf if value is None or math.isnan(value) else (value if self.mode == "max" else -value)
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def patience_spent(self) -> bool:
        """Whether the monitored metric has not improved for ``patience`` epochs."""
        return bool(self.patience) and self.bad_epochs >= self.patience

    @property
    def best_value(self) -> float:
        """The best value of the monitored metric so far (in its own sign)."""
        return self.best_score if self.mode == "max" else -self.best_score

    def save(self, checkpoint: Checkpoint, improved: bool, training_state: Mapping[str, Any]) -> None:
        """Write ``checkpoint`` as ``best.ckpt`` when its epoch ``improved``, and with
        ``training_state`` as ``last.ckpt``."""
        if improved:
            checkpoint.save(self.folder / "best.ckpt")
        checkpoint.replace(training_state=dict(training_state)).save(self.folder / "last.ckpt")

    def state_dict(self) -> dict[str, Any]:
        """The best epoch, its score and the epochs since (part of ``last.ckpt``'s training state)."""
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`."""
        self.best_score = state["best_score"]
        self.best_epoch = state["best_epoch"]
        self.bad_epochs = state["bad_epochs"]
