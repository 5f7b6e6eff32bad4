"""k-fold cross-validation: stratified group k-fold (iterative stratification for
multi-label data), one full run per fold, mean and spread of every metric.

Images are decoded once and shared by the folds. Each fold's test side is one fold;
its validation side is carved from the remaining folds by group. A fold whose run
folder already holds ``metrics.json`` is not trained again, so an interrupted
cross-validation resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellclass.atomic import atomic_path, atomic_write_text
from cellclass.data.prepared import prepare_data
from cellclass.data.spec import DatasetSpec
from cellclass.data.splits import Split, kfold, make_split
from cellclass.progress import ProgressFn
from cellclass.training.config import TrainConfig
from cellclass.training.loop import train

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "micro_f1", "weighted_f1", "roc_auc", "map",
                   "hamming_loss", "jaccard_samples")


def cross_validate(spec: DatasetSpec, config: TrainConfig, out: str | Path, *, n_folds: int = 5,
                   progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run ``n_folds`` training runs and summarise them in ``cv.json`` and ``cv.csv``."""
    out = Path(out)
    spec = spec.select_tasks(config.tasks)
    base = prepare_data(spec, config, progress=progress)
    first_task = spec.tasks[0].name
    labels = base.targets[first_task]
    multilabel = base.encoders[first_task].type == "multilabel"
    folds = kfold(labels, base.groups, n_splits=n_folds, seed=config.seed, multilabel=multilabel)
    val_share = config.val_fraction / max(1e-9, 1 - 1 / n_folds)
    summaries = []
    for k, (rest, test) in enumerate(folds):
        fold_dir = out / f"fold_{k}"
        if (fold_dir / "metrics.json").is_file():
            log.info("fold %d already done: %s", k, fold_dir)
            summaries.append(json.loads((fold_dir / "metrics.json").read_text()))
            continue
        sub = base.frame.iloc[rest].reset_index(drop=True)
        inner = make_split(sub, labels=labels[rest], groups=None if base.groups is None else base.groups[rest],
                           method="group" if base.groups is not None else "random",
                           val_fraction=min(0.5, val_share), test_fraction=0.0, seed=config.seed + k,
                           group_column=base.split.group, classes=base.encoders[first_task].classes)
        split = Split(train=np.sort(rest[inner.train]), val=np.sort(rest[inner.val]), test=np.sort(test),
                      method=f"{base.split.method} {n_folds}-fold cross-validation, fold {k}",
                      group=base.split.group, seed=config.seed, fractions={"test": 1 / n_folds},
                      groups=base.groups, labels=labels, moves=inner.moves)
        data = dataclasses.replace(base, split=split)
        if progress:
            progress(f"fold {k + 1}/{n_folds}", k, n_folds)
        summaries.append(train(spec, config, fold_dir, data=data, progress=progress))
    return summarise(out, summaries, n_folds, base.split)


def summarise(out: Path, results: list[dict[str, Any]], n_folds: int, split: Any) -> dict[str, Any]:
    """Mean, standard deviation, min and max of every summary metric over folds."""
    rows = []
    for k, result in enumerate(results):
        for task, metrics in result["tasks"].items():
            for name in SUMMARY_METRICS:
                value = metrics.get(name)
                if isinstance(value, (int, float)):
                    rows.append({"fold": k, "task": task, "metric": name, "value": float(value)})
    table = pd.DataFrame(rows)
    summary: dict[str, Any] = {
        "n_folds": n_folds,
        "split": {"method": f"{split.method} k-fold", "group": split.group,
                  "note": "each fold's test side is one fold; validation carved from the rest by group"},
        "tasks": {},
    }
    if len(table):
        agg = table.groupby(["task", "metric"])["value"].agg(["mean", "std", "min", "max", "count"]).reset_index()
        for rec in agg.to_dict("records"):
            summary["tasks"].setdefault(rec["task"], {})[rec["metric"]] = {
                k: (None if pd.isna(rec[k]) else round(float(rec[k]), 6)) for k in ("mean", "std", "min", "max")
            } | {"folds": int(rec["count"])}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "cv.csv") as tmp:
        table.to_csv(tmp, index=False)
    atomic_write_text(out / "cv.json", json.dumps(summary, indent=2))
    return summary
