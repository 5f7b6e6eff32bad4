"""A cross-validation's folds told to its tracker as their run folders finish.

A fold's run folder is the record of its run (``metrics.csv`` per epoch, ``metrics.json``
with the best epoch and the test figures); :class:`FoldLogger` reads each finished one
into the cross-validation's tracked run, and :func:`cv_progress` polls for them while the
folds train.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cellclass.atomic import atomic_write_text
from cellclass.progress import ProgressFn
from cellclass.tracking.trackers import Tracker

log = logging.getLogger(__name__)


class FoldLogger:
    """Tells a tracker about a cross-validation's folds as their run folders finish.

    Each finished fold's per-epoch metrics are logged as ``fold_<k>/<metric>`` at their
    epoch, its test figures as ``fold_<k>/test/<task>/<metric>``. A fold already told to
    the same tracked run (a re-run that skipped finished folds) is not logged twice.

    Args:
        tracker: Tracker of the cross-validation's run.
        out: Cross-validation folder (``fold_<k>/`` inside).
        n_folds: Number of folds.
        on_fold: Called as ``on_fold(k, run_folder)`` after fold ``k`` is logged.
    """

    def __init__(self, tracker: Tracker, out: str | Path, n_folds: int,
                 on_fold: Callable[[int, Path], None] | None = None) -> None:
        self.tracker = tracker
        self.out = Path(out)
        self.n_folds = n_folds
        self.on_fold = on_fold
        self.done: list[int] = []

    def poll(self) -> list[int]:
        """Log every newly finished fold; return their indices."""
        new = []
        for k in range(self.n_folds):
            fold = self.out / f"fold_{k}"
            if k in self.done or not (fold / "metrics.json").is_file():
                continue
            self._log_fold(k, fold)
            self.done.append(k)
            new.append(k)
            if self.on_fold is not None:
                self.on_fold(k, fold)
        return new

    def _log_fold(self, k: int, fold: Path) -> None:
        marker = fold / "tracked.json"
        run_id = self.tracker.run_id
        if run_id is not None and marker.is_file():
            try:
                if json.loads(marker.read_text()).get("run_id") == run_id:
                    return
            except ValueError:
                pass
        table = pd.read_csv(fold / "metrics.csv")
        for row in table.to_dict("records"):
            epoch = int(row.pop("epoch"))
            self.tracker.log_metrics({f"fold_{k}/{key}": v for key, v in row.items()
                                      if isinstance(v, (int, float)) and not _nan(v)}, step=epoch)
        result = json.loads((fold / "metrics.json").read_text())
        test = {f"fold_{k}/test/{task}/{name}": v for task, metrics in result.get("tasks", {}).items()
                for name, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.tracker.log_metrics(test, step=int(result.get("best_epoch") or 0))
        run_id = self.tracker.run_id
        if run_id is not None:
            atomic_write_text(marker, json.dumps({"run_id": run_id}))

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Log the remaining folds, the summary (``cv/<task>/<metric>/mean`` ...), the held-out
        test's metrics of each model (``holdout/<model>/<task>/<metric>``) and the files."""
        self.poll()
        flat: dict[str, float] = {}
        for task, metrics in summary.get("tasks", {}).items():
            for name, stats in metrics.items():
                for stat in ("mean", "std", "min", "max"):
                    if isinstance(stats.get(stat), (int, float)):
                        flat[f"cv/{task}/{name}/{stat}"] = stats[stat]
        for model, tasks in summary.get("holdout", {}).get("models", {}).items():
            for task, metrics in tasks.items():
                flat |= {f"holdout/{model}/{task}/{name}": v for name, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and not _nan(v)}
        self.tracker.log_metrics(flat, step=0)
        self.tracker.log_artifacts(self.out)


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def cv_progress(logger: FoldLogger, progress: ProgressFn | None) -> ProgressFn:
    """A progress callback for :func:`~cellclass.training.crossval.cross_validate` that also
    logs folds as they finish (checked when the stage changes: a new epoch or fold)."""
    last = {"stage": None}

    def update(stage: str, done: int, total: int) -> None:
        if stage != last["stage"]:
            last["stage"] = stage
            logger.poll()
        if progress is not None:
            progress(stage, done, total)

    return update
