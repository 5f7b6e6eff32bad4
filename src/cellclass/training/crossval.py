"""k-fold cross-validation: stratified group k-fold (iterative stratification for
multi-label data), one full run per fold, mean and spread of every metric.

Images are decoded once and shared by the folds. Each fold's test side is one fold;
its validation side is carved from the remaining folds by group. A fold whose run
folder already holds ``metrics.json`` is not trained again, so an interrupted
cross-validation resumes (a fold trained on other rows is refused).

With ``holdout``, the test side of the split ``cellclass train`` would make (the same
method, fractions and seed) is held out of every fold, and every fold model is scored on
it. With ``ensemble``, the fold models are written as an ensemble (``ensemble.yaml``) and,
where there is a held-out test, scored on it beside them; without one the ensemble has no
honest score (each image of the folds trained all members but one).
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
from cellclass.data.prepared import PreparedData, prepare_data, read_split
from cellclass.data.spec import DatasetSpec
from cellclass.data.splits import Split, kfold, make_split
from cellclass.errors import SplitError, TrainingError
from cellclass.evaluation.ensemble import ENSEMBLE_NAME, evaluate_held_out, members_table, out_of_fold_thresholds
from cellclass.inference.ensemble import ENSEMBLE_FILE, Ensemble, write_ensemble_file
from cellclass.inference.predictor import Predictor
from cellclass.progress import ProgressFn
from cellclass.training.config import TrainConfig
from cellclass.training.loop import train

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "micro_f1", "weighted_f1", "roc_auc", "map",
                   "hamming_loss", "jaccard_samples")
HELD_OUT_METRICS = (*SUMMARY_METRICS, "macro_roc_auc")
ENSEMBLE_TEST_FOLDER = "ensemble_test"
NO_TEST_NOTE = ("no held-out test: each fold model is tested on its own fold, which trained every other member, "
                "so the ensemble has no honest score on these images; run cv with --holdout to test it, or "
                "`cellclass evaluate` it on another dataset (--data)")


def cross_validate(spec: DatasetSpec, config: TrainConfig, out: str | Path, *, n_folds: int = 5,
                   holdout: bool = False, ensemble: bool = False,
                   progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run ``n_folds`` training runs and summarise them in ``cv.json`` and ``cv.csv``.

    Args:
        spec: The dataset.
        config: Every fold's training settings.
        out: The cross-validation folder (``fold_<k>/`` inside).
        n_folds: Number of folds.
        holdout: Hold the test side of the usual split (``config.test_fraction``) out of
            every fold, and score every fold model on it (``holdout.csv``).
        ensemble: Write the fold models as an ensemble (``ensemble.yaml``), scored on the
            held-out test where there is one (``ensemble_test/``).
        progress: Progress callback.

    Returns:
        The ``cv.json`` content.

    Raises:
        SplitError: When ``holdout`` is asked and the split has no test side.
        TrainingError: When a finished fold in ``out`` was trained on other rows.
    """
    out = Path(out)
    spec = spec.select_tasks(config.tasks)
    base = prepare_data(spec, config, progress=progress)
    first_task = spec.tasks[0].name
    labels = base.targets[first_task]
    multilabel = base.encoders[first_task].type == "multilabel"
    held_out = base.split.test if holdout else np.zeros(0, dtype=np.int64)
    if holdout and not len(held_out):
        raise SplitError(f"--holdout needs a test side, and the split has none (test_fraction = "
                         f"{config.test_fraction}); valid: test_fraction > 0 (--set test_fraction=0.2)")
    pool = np.setdiff1d(np.arange(len(base.ids)), held_out)
    folds = [(pool[rest], pool[test]) for rest, test in
             kfold(labels[pool], None if base.groups is None else base.groups[pool], n_splits=n_folds,
                   seed=config.seed, multilabel=multilabel)]
    val_share = config.val_fraction / max(1e-9, 1 - 1 / n_folds)
    summaries = []
    for k, (rest, test) in enumerate(folds):
        fold_dir = out / f"fold_{k}"
        if (fold_dir / "metrics.json").is_file():
            _check_fold(fold_dir, k, test)
            log.info("fold %d already done: %s", k, fold_dir)
            summaries.append(json.loads((fold_dir / "metrics.json").read_text()))
            continue
        sub = base.frame.iloc[rest].reset_index(drop=True)
        inner = make_split(sub, labels=labels[rest], groups=None if base.groups is None else base.groups[rest],
                           method="group" if base.groups is not None else "random",
                           val_fraction=min(0.5, val_share), test_fraction=0.0, seed=config.seed + k,
                           group_column=base.split.group, classes=base.encoders[first_task].classes)
        held = f"; {len(held_out)} test images held out of every fold" if holdout else ""
        split = Split(train=np.sort(rest[inner.train]), val=np.sort(rest[inner.val]), test=np.sort(test),
                      method=f"{base.split.method} {n_folds}-fold cross-validation, fold {k}{held}",
                      group=base.split.group, seed=config.seed, fractions={"test": 1 / n_folds},
                      groups=base.groups, labels=labels, moves=inner.moves)
        data = dataclasses.replace(base, split=split)
        if progress:
            progress(f"fold {k + 1}/{n_folds}", k, n_folds)
        summaries.append(train(spec, config, fold_dir, data=data, progress=progress))
    summary = summarise(out, summaries, n_folds, base.split, n_held_out=len(held_out))
    if holdout or ensemble:
        if progress:
            progress("ensemble" if ensemble else "held-out test", n_folds, n_folds)
        summary |= _fold_models(out, base, folds, held_out, config, ensemble)
        atomic_write_text(out / "cv.json", json.dumps(summary, indent=2))
    return summary


def _check_fold(fold_dir: Path, k: int, test: np.ndarray) -> None:
    """A finished fold is kept only when it was tested on the rows this cross-validation gives it.

    Raises:
        TrainingError: When it was not (other folds, seed or --holdout).
    """
    saved = read_split(fold_dir / "split.json")
    if saved is not None and not np.array_equal(np.sort(saved["test"]), np.sort(test)):
        raise TrainingError(f"{str(fold_dir)!r} was trained as fold {k} of another cross-validation (its test "
                            f"side holds {len(saved['test'])} other rows than the {len(test)} it gets now: another "
                            "--folds, --seed, split or --holdout); valid: the settings it was made with, or a new "
                            "--out")


def _fold_models(out: Path, base: PreparedData, folds: list[tuple[np.ndarray, np.ndarray]], held_out: np.ndarray,
                 config: TrainConfig, ensemble: bool) -> dict[str, Any]:
    """The ``holdout`` and ``ensemble`` blocks of ``cv.json``; writes ``holdout.csv``,
    ``ensemble.yaml`` and ``ensemble_test/`` as asked."""
    runs = [out / f"fold_{k}" for k in range(len(folds))]
    members = [Predictor.from_checkpoint(run) for run in runs]
    names = [run.name for run in runs]
    blocks: dict[str, Any] = {}
    models = None
    if ensemble:
        thresholds, how = out_of_fold_thresholds(members, base, [test for _, test in folds],
                                                 config.threshold_method)
        models = Ensemble.of(members, runs, thresholds, how)
        write_ensemble_file(out, runs, thresholds, how)
        blocks["ensemble"] = {"file": ENSEMBLE_FILE, "members": names, "combine": "mean of the members' "
                              "probabilities, per task and class", **({"thresholds_from": how} if how else {}),
                              "test": ENSEMBLE_TEST_FOLDER if len(held_out) else None,
                              **({} if len(held_out) else {"note": NO_TEST_NOTE})}
    if len(held_out):
        note = (f"{base.split.method} split's test side ({len(held_out)} images, as `cellclass train` with these "
                f"settings holds out) held out of every fold; the rest cross-validated in {len(folds)} folds")
        results = evaluate_held_out(members, names, base, held_out, ensemble=models,
                                    out=out / ENSEMBLE_TEST_FOLDER if models is not None else None, note=note)
        table = pd.DataFrame(members_table(results, HELD_OUT_METRICS))
        with atomic_path(out / "holdout.csv") as tmp:
            table.to_csv(tmp, index=False)
        blocks["holdout"] = {"on": note, "n_images": len(held_out), "models": {
            model: {task: {m: _round(v) for m, v in metrics.items() if m in HELD_OUT_METRICS or m == "task_type"}
                    for task, metrics in tasks.items()} for model, tasks in results.items()}}
        blocks["holdout"]["fold_mean"] = _fold_mean(table[table["model"] != ENSEMBLE_NAME])
    return blocks


def _fold_mean(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """The fold models' mean of each held-out metric, per task."""
    out: dict[str, dict[str, float]] = {}
    for (task, metric), values in table.groupby(["task", "metric"])["value"]:
        out.setdefault(str(task), {})[str(metric)] = _round(values.mean())
    return out


def _round(value: Any) -> Any:
    return round(float(value), 6) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def summarise(out: Path, results: list[dict[str, Any]], n_folds: int, split: Any,
              n_held_out: int = 0) -> dict[str, Any]:
    """Mean, standard deviation, min and max of every summary metric over folds (each on its own fold)."""
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
                  "note": "each fold's test side is one fold; validation carved from the rest by group"
                          + (f"; {n_held_out} test images held out of every fold" if n_held_out else "")},
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
