"""Paired comparisons of models scored on the same test images.

Two models evaluated on the same images make correlated errors; comparing their scores as if
they came from independent samples overstates the uncertainty of the difference. Both tests
here are paired: :func:`paired_bootstrap` resamples images and scores both models on each
resample, :func:`mcnemar` counts the images on which exactly one model is right.

Predictions of a run are a DataFrame with columns ``image`` (an id unique within the run),
``y_true`` and ``y_pred`` (class names or indices) for one single-label task, or, given
``label_sets`` (the task's classes), ``;``-joined label sets of a multi-label task, scored as
0/1 matrices (accuracy is then subset accuracy, macro F1 the mean over classes).
:func:`compare_runs` compares finished run folders, task by task, from their
``predictions.csv``.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from cellclass.atomic import atomic_write_text
from cellclass.errors import CellclassError, EvaluationError
from cellclass.evaluation._validation import check_bootstrap_args
from cellclass.evaluation.metrics import bootstrap_ci, resolve_label_metric
from cellclass.evaluation.plots import plot_comparison
from cellclass.evaluation.results import json_default

__all__ = [
    "MCNEMAR_EXACT_BELOW",
    "MULTILABEL_METRICS",
    "align_predictions",
    "compare_predictions",
    "compare_runs",
    "mcnemar",
    "model_table",
    "paired_bootstrap",
]

logger = logging.getLogger(__name__)

MULTILABEL_METRICS = ("macro_f1", "micro_f1", "map", "macro_roc_auc", "hamming_loss")
"""The multi-label test metrics :func:`compare_runs` copies from each run's ``metrics.json``."""

MCNEMAR_EXACT_BELOW = 25
"""McNemar uses the exact binomial test when fewer than this many images are discordant."""

_REQUIRED = ("y_true", "y_pred")


def _encode(*arrays: ArrayLike) -> list[NDArray[Any]]:
    """Map class names (or indices) of 1-D arrays to shared integer codes; pass 2-D through."""
    arrs = [np.asarray(a) for a in arrays]
    n = arrs[0].shape[0]
    for arr in arrs[1:]:
        if arr.shape != arrs[0].shape:
            raise EvaluationError(
                "y_true and the predictions must have the same shape; received "
                f"{[a.shape for a in arrs]}."
            )
    if n == 0:
        raise EvaluationError("no samples to compare; y_true is empty.")
    if arrs[0].ndim == 2:
        return arrs
    if arrs[0].ndim != 1:
        raise EvaluationError(f"labels must be 1-D (or (N, K) indicators); received shape {arrs[0].shape}.")
    codes, _ = pd.factorize(np.concatenate([a.astype(object) for a in arrs]))
    return [codes[i * n:(i + 1) * n].astype(np.int64) for i in range(len(arrs))]


def _label_matrix(values: ArrayLike, classes: Sequence[str]) -> NDArray[np.int64]:
    """``;``-joined label sets (a multi-label task's column of ``predictions.csv``) as a 0/1 matrix ``(N, K)``."""
    index = {c: k for k, c in enumerate(classes)}
    texts = [str(v) for v in np.asarray(values, dtype=object)]
    out = np.zeros((len(texts), len(index)), dtype=np.int64)
    for i, text in enumerate(texts):
        for name in filter(None, text.split(";")):
            if name not in index:
                raise EvaluationError(f"label {name!r} (in {text!r}) is not one of the task's classes "
                                      f"{list(classes)[:10]}; the runs must share the task's classes.")
            out[i, index[name]] = 1
    return out


def _aligned_labels(aligned: pd.DataFrame, names: Sequence[str],
                    label_sets: Sequence[str] | None) -> tuple[NDArray[Any], dict[str, NDArray[Any]]]:
    """The true labels and each run's predictions of aligned runs: as they are, or as 0/1 matrices of label sets."""
    columns = ["y_true", *names]
    if label_sets is None:
        values = {c: aligned[c].to_numpy() for c in columns}
    else:
        values = {c: _label_matrix(aligned[c].to_numpy(), label_sets) for c in columns}
    return values["y_true"], {n: values[n] for n in names}


def _correct(y: NDArray[Any], pred: NDArray[Any]) -> NDArray[np.bool_]:
    return y == pred if y.ndim == 1 else np.all(y == pred, axis=1)


def paired_bootstrap(
    y_true: ArrayLike,
    pred_a: ArrayLike,
    pred_b: ArrayLike,
    metric: str | Callable[[ArrayLike, ArrayLike], float] = "macro_f1",
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Paired bootstrap of the difference ``metric(a) - metric(b)``.

    Each resample draws N test images with replacement and scores both models on those same
    images, so the interval reflects the uncertainty of the difference, not of each score.
    The two-sided p-value is twice the smaller fraction of resampled differences on either
    side of 0, with a +1 correction so it is never exactly 0, capped at 1.

    Args:
        y_true: True labels (N,) (names or indices) or indicator matrix (N, K).
        pred_a: Predictions of model A, same shape.
        pred_b: Predictions of model B, same shape.
        metric: ``"macro_f1"``, ``"accuracy"`` or a function ``f(y_true, y_pred) -> float``
            on integer-coded labels.
        n_boot: Number of resamples.
        seed: Seed of the random generator.
        alpha: One minus the confidence level of the interval.

    Returns:
        ``delta`` (A minus B on all images), ``ci_low``, ``ci_high``, ``p_value``, and
        ``metric`` (its name), ``metric_a``, ``metric_b``, ``n``, ``n_boot``, ``alpha``.

    Raises:
        EvaluationError: If the metric name is unknown, shapes differ or arguments are out
            of range.
    """
    fn = resolve_label_metric(metric)
    check_bootstrap_args(n_boot, alpha)
    y, a, b = _encode(y_true, pred_a, pred_b)
    n = y.shape[0]
    score_a, score_b = float(fn(y, a)), float(fn(y, b))
    rng = np.random.default_rng(seed)
    deltas = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, n, n)
        deltas[i] = fn(y[idx], a[idx]) - fn(y[idx], b[idx])
    low, high = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    tail = min(int(np.sum(deltas <= 0)), int(np.sum(deltas >= 0)))
    p_value = min(1.0, 2 * (tail + 1) / (n_boot + 1))
    return {
        "metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "custom"),
        "metric_a": score_a,
        "metric_b": score_b,
        "delta": score_a - score_b,
        "ci_low": float(low),
        "ci_high": float(high),
        "p_value": float(p_value),
        "n": int(n),
        "n_boot": int(n_boot),
        "alpha": float(alpha),
    }


def mcnemar(y_true: ArrayLike, pred_a: ArrayLike, pred_b: ArrayLike) -> dict[str, Any]:
    """McNemar's test of whether two models err on the same images equally often.

    ``b`` counts images model A gets right and model B wrong, ``c`` the reverse. With fewer
    than 25 discordant images (b + c) the exact two-sided binomial test is used (statistic
    min(b, c)); otherwise the chi-square test with continuity correction,
    (|b - c| - 1)^2 / (b + c) with one degree of freedom.

    Args:
        y_true: True labels (N,) (names or indices) or indicator matrix (N, K).
        pred_a: Predictions of model A, same shape.
        pred_b: Predictions of model B, same shape.

    Returns:
        ``b``, ``c``, ``statistic``, ``p_value`` and ``method`` (``"exact"`` or ``"chi2"``).

    Raises:
        EvaluationError: If shapes differ or there are no samples.
    """
    y, a, b_pred = _encode(y_true, pred_a, pred_b)
    right_a, right_b = _correct(y, a), _correct(y, b_pred)
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    if b + c < MCNEMAR_EXACT_BELOW:
        statistic = float(min(b, c))
        p_value = float(stats.binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
        method = "exact"
    else:
        statistic = (abs(b - c) - 1) ** 2 / (b + c)
        p_value = float(stats.chi2.sf(statistic, df=1))
        method = "chi2"
    return {"b": b, "c": c, "statistic": float(statistic), "p_value": min(1.0, p_value), "method": method}


def align_predictions(frames: Mapping[str, pd.DataFrame], key: str = "image") -> pd.DataFrame:
    """Join runs' predictions on the image id, checking they cover the same test images.

    Args:
        frames: Run name -> DataFrame with columns ``key``, ``y_true``, ``y_pred``.
        key: Column holding the image id.

    Returns:
        One row per image (sorted by ``key``): columns ``key``, ``y_true`` and one column
        per run, named after it, holding that run's ``y_pred``.

    Raises:
        EvaluationError: If no run is given, a column is missing, an image id repeats, the
            runs' image sets differ (the message says how many images differ), or the runs
            disagree on an image's true label.
    """
    if not frames:
        raise EvaluationError("no runs given; pass a mapping of run name -> predictions DataFrame.")
    names = list(frames)
    for name, df in frames.items():
        missing = [c for c in (key, *_REQUIRED) if c not in df.columns]
        if missing:
            raise EvaluationError(
                f"predictions of run {name!r} lack columns {missing}; received columns "
                f"{list(df.columns)}, needed {[key, *_REQUIRED]}."
            )
        dupes = df[key][df[key].duplicated()]
        if len(dupes):
            raise EvaluationError(
                f"predictions of run {name!r} list {dupes.nunique()} image ids more than once "
                f"(e.g. {dupes.iloc[0]!r}); each test image must appear once."
            )
    reference = names[0]
    ref_ids = set(frames[reference][key])
    for name in names[1:]:
        ids = set(frames[name][key])
        if ids != ref_ids:
            only_ref, only_other = len(ref_ids - ids), len(ids - ref_ids)
            raise EvaluationError(
                f"runs {reference!r} and {name!r} were scored on different test sets: "
                f"{only_ref + only_other} images differ ({only_ref} only in {reference!r}, "
                f"{only_other} only in {name!r}; {len(ref_ids)} vs {len(ids)} images). "
                "Paired comparisons need the same test images; evaluate both on one split."
            )
    merged = frames[reference][[key, "y_true"]].sort_values(key).reset_index(drop=True)
    for name in names:
        part = frames[name][[key, "y_true", "y_pred"]].rename(
            columns={"y_true": "_y_true", "y_pred": name}
        )
        merged = merged.merge(part, on=key, how="inner", validate="one_to_one")
        disagree = merged["y_true"].astype(object) != merged["_y_true"].astype(object)
        if disagree.any():
            raise EvaluationError(
                f"runs {reference!r} and {name!r} give different true labels for "
                f"{int(disagree.sum())} images (e.g. {merged.loc[disagree, key].iloc[0]!r}); "
                "they must be scored against the same labels."
            )
        merged = merged.drop(columns="_y_true")
    return merged


def compare_predictions(
    frames: Mapping[str, pd.DataFrame],
    metric: str = "macro_f1",
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    key: str = "image",
    label_sets: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Compare every pair of runs on their shared test images.

    Args:
        frames: Run name -> DataFrame with columns ``key``, ``y_true``, ``y_pred``; at
            least two runs, all on the same images.
        metric: ``"macro_f1"`` or ``"accuracy"``, for the paired bootstrap.
        n_boot: Bootstrap resamples per pair.
        seed: Seed of the random generator (the same for every pair).
        alpha: One minus the confidence level.
        key: Column holding the image id.
        label_sets: A multi-label task's classes: ``y_true`` and ``y_pred`` are then
            ``;``-joined label sets, scored as 0/1 matrices.

    Returns:
        One row per pair, in the order the runs are given: ``model_a, model_b, n, metric,
        metric_a, metric_b, delta, ci_low, ci_high, p_value`` (paired bootstrap, delta = A
        minus B) and ``mcnemar_b, mcnemar_c, mcnemar_statistic, mcnemar_p_value``.

    Raises:
        EvaluationError: If fewer than two runs are given or :func:`align_predictions`
            fails.
    """
    if len(frames) < 2:
        raise EvaluationError(
            f"comparing needs at least two runs; received {len(frames)} ({list(frames)})."
        )
    aligned = align_predictions(frames, key=key)
    y, preds = _aligned_labels(aligned, list(frames), label_sets)
    rows = []
    for name_a, name_b in itertools.combinations(list(frames), 2):
        a, b = preds[name_a], preds[name_b]
        boot = paired_bootstrap(y, a, b, metric=metric, n_boot=n_boot, seed=seed, alpha=alpha)
        test = mcnemar(y, a, b)
        rows.append({
            "model_a": name_a,
            "model_b": name_b,
            "n": boot["n"],
            "metric": boot["metric"],
            "metric_a": boot["metric_a"],
            "metric_b": boot["metric_b"],
            "delta": boot["delta"],
            "ci_low": boot["ci_low"],
            "ci_high": boot["ci_high"],
            "p_value": boot["p_value"],
            "mcnemar_b": test["b"],
            "mcnemar_c": test["c"],
            "mcnemar_statistic": test["statistic"],
            "mcnemar_p_value": test["p_value"],
        })
        logger.info("%s vs %s: %s delta %.4f [%.4f, %.4f]", name_a, name_b, metric,
                    boot["delta"], boot["ci_low"], boot["ci_high"])
    return pd.DataFrame(rows)


def model_table(
    frames: Mapping[str, pd.DataFrame],
    metrics: Sequence[str] = ("accuracy", "macro_f1"),
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    key: str = "image",
    label_sets: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per run with each metric and its bootstrap confidence interval.

    The runs must cover the same test images (checked by :func:`align_predictions`), so the
    rows are comparable. The result feeds :func:`cellclass.evaluation.plots.plot_comparison`.

    Args:
        frames: Run name -> DataFrame with columns ``key``, ``y_true``, ``y_pred``.
        metrics: Names from :data:`cellclass.evaluation.metrics.LABEL_METRICS`.
        n_boot: Bootstrap resamples per run and metric.
        seed: Seed of the random generator.
        alpha: One minus the confidence level.
        key: Column holding the image id.
        label_sets: A multi-label task's classes (see :func:`compare_predictions`).

    Returns:
        Columns ``model``, ``n`` and, per metric ``m``, ``m``, ``m_ci_low``, ``m_ci_high``.

    Raises:
        EvaluationError: If a metric name is unknown or :func:`align_predictions` fails.
    """
    fns = {m: resolve_label_metric(m) for m in metrics}
    aligned = align_predictions(frames, key=key)
    truth, preds = _aligned_labels(aligned, list(frames), label_sets)
    rows = []
    for name in frames:
        y, pred = _encode(truth, preds[name])
        row: dict[str, Any] = {"model": name, "n": int(y.shape[0])}
        for metric, fn in fns.items():
            ci = bootstrap_ci(fn, y, pred, n_boot=n_boot, seed=seed, alpha=alpha)
            row[metric] = ci["estimate"]
            row[f"{metric}_ci_low"] = ci["ci_low"]
            row[f"{metric}_ci_high"] = ci["ci_high"]
        rows.append(row)
    return pd.DataFrame(rows)


def compare_runs(runs: Sequence[str | Path], *, task: str | None = None, metric: str = "macro_f1",
                 n_boot: int = 2000, seed: int = 0, out: str | Path | None = None) -> dict[str, Any]:
    """Compare finished runs on the same test images, task by task.

    For each task: every run's accuracy and macro F1 with bootstrap confidence intervals,
    and for every pair a paired bootstrap of the difference and McNemar's test. Runs
    scored on different test images are refused (see :func:`align_predictions`). A
    multi-label task is scored on its label sets (accuracy is subset accuracy; an image is
    right when its whole set is), and its block also holds each run's multi-label test
    metrics from its ``metrics.json`` (``test_metrics``).

    Args:
        runs: Two or more run folders (each with ``metrics.json`` and ``predictions.csv``).
        task: The task to compare (default: every task the runs share).
        metric: ``macro_f1`` or ``accuracy``, for the paired bootstrap.
        n_boot: Bootstrap resamples.
        seed: Seed of the resamples.
        out: Folder for ``compare.json`` and a plot per task (nothing written when ``None``).

    Raises:
        CellclassError: When fewer than two runs are given, one is not a finished run, or
            they share no task.
    """
    if len(runs) < 2:
        raise CellclassError(f"compare needs at least two run folders, got {len(runs)}")
    names, metas, preds = _read_runs(runs)
    shared = [t for t in metas[names[0]]["tasks"] if all(t in m["tasks"] for m in metas.values())]
    if task is not None:
        if task not in shared:
            raise CellclassError(f"task {task!r} is not in every run; shared tasks: {', '.join(shared) or 'none'}")
        shared = [task]
    if not shared:
        raise CellclassError("the runs share no task")
    result: dict[str, Any] = {"metric": metric, "n_boot": n_boot,
                              "runs": {n: str(r) for n, r in zip(names, runs, strict=True)}, "tasks": {}}
    for t in shared:
        frames = {n: pd.DataFrame({"image": p["image"], "y_true": p[f"{t}__true"], "y_pred": p[f"{t}__pred"]})
                  for n, p in preds.items()}
        first = metas[names[0]]["tasks"][t]
        task_type = first.get("task_type", "single")
        label_sets = list(first["per_class"]) if task_type == "multilabel" else None
        table = model_table(frames, metrics=("accuracy", "macro_f1"), n_boot=n_boot, seed=seed, label_sets=label_sets)
        table.insert(0, "run", table.pop("model"))
        table["model_name"] = [metas[n].get("model") for n in table["run"]]
        table["split"] = [_split_text(metas[n]["split"]) for n in table["run"]]
        pairs = compare_predictions(frames, metric=metric, n_boot=n_boot, seed=seed, label_sets=label_sets)
        result["tasks"][t] = {"n": int(table["n"].iloc[0]), "task_type": task_type, "table": table.to_dict("records"),
                              "pairs": pairs.to_dict("records")}
        if task_type == "multilabel":
            result["tasks"][t]["test_metrics"] = {n: {k: metas[n]["tasks"][t].get(k) for k in MULTILABEL_METRICS}
                                                  for n in names}
    if out is not None:
        _write_comparison(Path(out), result)
    return result


def _read_runs(runs: Sequence[str | Path]) -> tuple[list[str], dict[str, Any], dict[str, pd.DataFrame]]:
    """Each run's name (its folder's, or its path where two share one), metrics and predictions."""
    names: list[str] = []
    metas: dict[str, Any] = {}
    preds: dict[str, pd.DataFrame] = {}
    for run in map(Path, runs):
        for required in ("metrics.json", "predictions.csv"):
            if not (run / required).is_file():
                raise CellclassError(f"{str(run)!r} has no {required}; is it a finished `cellclass train` run?")
        name = run.name if run.name not in names else str(run)
        names.append(name)
        metas[name] = json.loads((run / "metrics.json").read_text())
        preds[name] = pd.read_csv(run / "predictions.csv", dtype=str, keep_default_na=False)
    return names, metas, preds


def _write_comparison(out: Path, result: Mapping[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2, default=json_default))
    for t, block in result["tasks"].items():
        frame = pd.DataFrame(block["table"]).rename(columns={"run": "model"})
        plot_comparison(frame, "macro_f1", out / f"compare_{t}.png")


def _split_text(split: Mapping[str, Any]) -> str:
    method = split.get("method", "?")
    group = split.get("group_column")
    return f"{method} by {group}" if group else str(method)
