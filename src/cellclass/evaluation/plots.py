"""Evaluation plots, each written atomically to a PNG file.

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas directly, never
through ``pyplot``: no global figure state, no GUI backend, safe to call from worker
threads (a web server, a sweep). Each function renders to memory, writes a temporary file
beside ``out`` and moves it over ``out`` with :func:`os.replace`, so a reader never sees a
half-written image. Each returns the path it wrote.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_curve,
)

from cellclass.atomic import atomic_write_bytes
from cellclass.data.inspect import display_rgb
from cellclass.errors import EvaluationError
from cellclass.evaluation._validation import (
    as_indicator,
    as_labels,
    as_proba,
)
from cellclass.evaluation.metrics import TASK_TYPES, calibration_bins

__all__ = [
    "plot_calibration",
    "plot_comparison",
    "plot_confusion_matrix",
    "plot_embedding_map",
    "plot_learning_curves",
    "plot_mistakes",
    "plot_per_class_f1",
    "plot_roc_pr",
]

logger = logging.getLogger(__name__)

_DPI = 120
# Columns of a metrics table that are bookkeeping, not metrics worth a curve.
_NOT_METRICS = {"epoch", "step", "global_step", "lr", "learning_rate", "time", "seconds", "wall_s"}


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: str | os.PathLike[str]) -> Path:
    """Render ``fig`` to PNG and move it onto ``out`` atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    path = atomic_write_bytes(out, buffer.getvalue())
    logger.debug("wrote %s", path)
    return path


def _read_metrics_table(metrics: str | os.PathLike[str] | pd.DataFrame) -> pd.DataFrame:
    if isinstance(metrics, pd.DataFrame):
        df = metrics.copy()
    else:
        path = Path(metrics)
        if not path.is_file():
            raise EvaluationError(f"metrics file {str(path)!r} does not exist; pass a CSV path or a DataFrame.")
        df = pd.read_csv(path)
    if "epoch" not in df.columns:
        raise EvaluationError(
            f"the metrics table needs an 'epoch' column; received columns {list(df.columns)}."
        )
    numeric = df.select_dtypes(include="number")
    if "epoch" not in numeric.columns:
        raise EvaluationError(f"the 'epoch' column must be numeric; received dtype {df['epoch'].dtype}.")
    # Loggers that write training and validation rows separately leave NaN gaps: keep each
    # epoch's last non-missing value of every column.
    return numeric.groupby("epoch", sort=True).last().reset_index()


def plot_learning_curves(
    metrics_csv_or_df: str | os.PathLike[str] | pd.DataFrame, out: str | os.PathLike[str]
) -> Path:
    """Plot losses (left) and validation metrics (right) against the epoch.

    Loss curves are the columns whose name contains ``loss``; metric curves are the other
    numeric columns starting with ``val`` (all other numeric columns, bar bookkeeping such
    as ``lr`` or ``step``, when none does).

    Args:
        metrics_csv_or_df: Per-epoch metrics, as a CSV path or a DataFrame, with an
            ``epoch`` column.
        out: PNG path to write.

    Returns:
        The path written.

    Raises:
        EvaluationError: If the file is missing or there is no numeric ``epoch`` column.
    """
    df = _read_metrics_table(metrics_csv_or_df)
    columns = [c for c in df.columns if c not in _NOT_METRICS and df[c].notna().any()]
    losses = [c for c in columns if "loss" in c.lower()]
    others = [c for c in columns if c not in losses]
    val_metrics = [c for c in others if c.lower().startswith("val")] or others

    fig = _new_figure(12, 4.5)
    ax_loss, ax_metric = fig.subplots(1, 2)
    for ax, cols, title in ((ax_loss, losses, "Loss"), (ax_metric, val_metrics, "Validation metrics")):
        for col in cols:
            mask = df[col].notna()
            style = "--" if "train" in col.lower() else "-"
            ax.plot(df.loc[mask, "epoch"], df.loc[mask, col], style, marker="o", markersize=3, label=col)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if cols:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no columns to plot", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, out)


def plot_confusion_matrix(
    cm: ArrayLike, classes: Sequence[str], out: str | os.PathLike[str], normalize: bool = True
) -> Path:
    """Plot a confusion matrix (rows true classes, columns predicted).

    The figure grows with the number of classes; cell values are written when there are at
    most 25 classes, and every class name stays legible.

    Args:
        cm: Counts, shape (K, K).
        classes: K class names.
        out: PNG path to write.
        normalize: Show each row as fractions of the true class (rows without samples
            stay 0); otherwise show counts.

    Returns:
        The path written.

    Raises:
        EvaluationError: If ``cm`` is not square or does not match ``classes``.
    """
    counts = np.asarray(cm, dtype=np.float64)
    names = [str(c) for c in classes]
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(names):
        raise EvaluationError(
            f"cm must be a square matrix with one row per class ({len(names)} classes); "
            f"received shape {counts.shape}."
        )
    k = len(names)
    if normalize:
        rows = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    else:
        values = counts
    side = max(5.0, 0.42 * k + 2.5)
    fig = _new_figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    label_size = max(6, min(10, int(200 / max(k, 1))))
    ax.set_xticks(range(k), names, rotation=90, fontsize=label_size)
    ax.set_yticks(range(k), names, fontsize=label_size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else ""))
    if k <= 25:
        cutoff = values.max() / 2 if values.size else 0
        for i in range(k):
            for j in range(k):
                text = f"{values[i, j]:.2f}" if normalize else f"{int(values[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=max(5, label_size - 2),
                        color="white" if values[i, j] > cutoff else "black")
    return _save(fig, out)


def plot_per_class_f1(per_class: Mapping[str, Mapping[str, Any]], out: str | os.PathLike[str]) -> Path:
    """Horizontal bar chart of each class's F1, lowest first, with its support.

    Args:
        per_class: The ``per_class`` entry of a metrics dictionary: class name ->
            mapping with ``f1`` (and optionally ``support``).
        out: PNG path to write.

    Returns:
        The path written.

    Raises:
        EvaluationError: If ``per_class`` is empty or an entry lacks ``f1``.
    """
    if not per_class:
        raise EvaluationError("per_class is empty; pass the 'per_class' entry of a metrics dictionary.")
    missing = [name for name, entry in per_class.items() if "f1" not in entry]
    if missing:
        raise EvaluationError(f"per_class entries need an 'f1' value; missing for {missing[:5]}.")
    items = sorted(per_class.items(), key=lambda item: float(item[1]["f1"]))
    names = [str(name) for name, _ in items]
    f1 = [float(entry["f1"]) for _, entry in items]
    fig = _new_figure(7, max(3.0, 0.3 * len(items) + 1.2))
    ax = fig.subplots()
    bars = ax.barh(range(len(items)), f1, color="tab:blue")
    ax.set_yticks(range(len(items)), names, fontsize=8 if len(items) > 20 else 10)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("F1")
    ax.set_title("F1 per class")
    ax.grid(axis="x", alpha=0.3)
    for bar, (_, entry) in zip(bars, items, strict=True):
        if "support" in entry:
            ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2,
                    f"n={int(entry['support'])}", va="center", fontsize=7)
    return _save(fig, out)


def _one_vs_rest(
    y_true: ArrayLike, proba: ArrayLike, classes: Sequence[str], task_type: str
) -> tuple[NDArray[np.int64], NDArray[np.float64], list[str]]:
    """Indicator matrix, probabilities and names of the curves to draw."""
    if task_type not in TASK_TYPES:
        raise EvaluationError(f"Unknown task_type {task_type!r}; valid task types are {', '.join(TASK_TYPES)}.")
    arr = np.asarray(proba, dtype=np.float64)
    if task_type == "binary" and arr.ndim == 1:
        arr = np.stack([1.0 - arr, arr], axis=1)
    p = as_proba(arr)
    names = [str(c) for c in classes]
    if len(names) != p.shape[1]:
        raise EvaluationError(
            f"classes has {len(names)} names but proba has {p.shape[1]} columns; give one name per column."
        )
    if task_type == "multilabel":
        y = as_indicator(y_true, p.shape)
    else:
        y = np.eye(p.shape[1], dtype=np.int64)[as_labels(y_true, p.shape[0], p.shape[1])]
    if task_type == "binary":  # the negative class's curves mirror the positive one's
        return y[:, 1:], p[:, 1:], names[1:]
    return y, p, names


def plot_roc_pr(
    y_true: ArrayLike,
    proba: ArrayLike,
    classes: Sequence[str],
    out: str | os.PathLike[str],
    task_type: str = "single",
    top_n: int = 10,
) -> Path:
    """ROC (left) and precision-recall (right) curves, one line per class (one vs rest).

    The ``top_n`` classes with the most positives are coloured and named in the legend with
    their AUC / average precision; the others are drawn as thin grey lines. Classes without
    positives (or, for ROC, without negatives) are skipped. A binary task draws the
    positive class only.

    Args:
        y_true: Class indices (N,) for single and binary tasks, indicator matrix (N, K)
            for multilabel.
        proba: Probabilities, shape (N, K) (binary also accepts (N,)).
        classes: Class names in column order.
        out: PNG path to write.
        task_type: ``"single"``, ``"binary"`` or ``"multilabel"``.
        top_n: Number of classes named in the legend.

    Returns:
        The path written.

    Raises:
        EvaluationError: If ``task_type`` is unknown, shapes disagree or ``top_n`` < 0.
    """
    y, p, names = _one_vs_rest(y_true, proba, classes, task_type)
    support = y.sum(axis=0)
    ranked = [int(k) for k in np.argsort(-support, kind="stable") if support[k] > 0]
    if top_n < 0:
        raise EvaluationError(f"top_n must be a non-negative integer; received {top_n}.")
    highlighted = set(ranked[:top_n])
    colours = iter(_palette(len(highlighted)))
    fig = _new_figure(12, 5.2)
    ax_roc, ax_pr = fig.subplots(1, 2)
    # Grey lines first so the highlighted ones lie on top, most frequent class first in the legend.
    order = [k for k in ranked if k not in highlighted] + ranked[:top_n]
    for k in order:
        lit = k in highlighted
        style: dict[str, Any] = {"color": next(colours), "lw": 1.6} if lit else {"color": "0.75", "lw": 0.8}
        precision, recall, _ = precision_recall_curve(y[:, k], p[:, k])
        ap = float(average_precision_score(y[:, k], p[:, k]))
        ax_pr.step(recall, precision, where="post", label=f"{names[k]} (AP {ap:.2f})" if lit else None, **style)
        if support[k] < y.shape[0]:
            fpr, tpr, _ = roc_curve(y[:, k], p[:, k])
            ax_roc.plot(fpr, tpr, label=f"{names[k]} (AUC {auc(fpr, tpr):.2f})" if lit else None, **style)
    ax_roc.plot([0, 1], [0, 1], ":", color="0.5", lw=1)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax_pr.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    hidden = len(ranked) - len(highlighted)
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        if highlighted:
            ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "lower left",
                      title=f"top {len(highlighted)} by support" + (f" (+{hidden} grey)" if hidden else ""),
                      title_fontsize=7)
    return _save(fig, out)


def _palette(n: int) -> list[Any]:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def plot_calibration(
    y_true: ArrayLike, proba: ArrayLike, out: str | os.PathLike[str], n_bins: int = 15
) -> Path:
    """Reliability diagram: accuracy against confidence per bin, with the bin counts below.

    Single-label (``y_true`` of shape (N,)): the confidence is the largest probability and a
    prediction is right when its argmax is the true class. Multi-label (``y_true`` of shape
    (N, K)): every (sample, class) probability is compared with its 0/1 label.

    Args:
        y_true: Class indices (N,) or indicator matrix (N, K).
        proba: Probabilities, shape (N, K).
        out: PNG path to write.
        n_bins: Number of equal-width confidence bins.

    Returns:
        The path written.

    Raises:
        EvaluationError: If shapes disagree.
    """
    p = as_proba(proba)
    y = np.asarray(y_true)
    if y.ndim == 2:
        confidence, correct = p.ravel(), as_indicator(y, p.shape).ravel().astype(np.float64)
        xlabel = "predicted probability"
    else:
        labels = as_labels(y, p.shape[0], p.shape[1])
        confidence, correct = p.max(axis=1), (p.argmax(axis=1) == labels).astype(np.float64)
        xlabel = "confidence (largest probability)"
    bins = calibration_bins(confidence, correct, n_bins)
    filled = bins["count"] > 0
    ece = bins["ece"]
    edges = bins["edges"]
    width = np.diff(edges)
    fig = _new_figure(6, 7)
    ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(edges[:-1][filled], bins["accuracy"][filled], width=width[filled], align="edge",
           edgecolor="black", color="tab:blue", alpha=0.8, label="observed")
    ax.plot([0, 1], [0, 1], "--", color="0.4", label="perfect calibration")
    ax.set(ylabel="observed frequency" if y.ndim == 2 else "accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability diagram (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    ax_hist.bar(edges[:-1], bins["count"], width=width, align="edge", color="0.5", edgecolor="black")
    ax_hist.set(xlabel=xlabel, ylabel="count")
    return _save(fig, out)


def plot_comparison(table_df: pd.DataFrame, metric: str, out: str | os.PathLike[str]) -> Path:
    """Bar chart of one metric per model, with confidence-interval error bars.

    Bars are labelled by the ``model`` column (else ``run``, else the index). Error bars come
    from ``{metric}_ci_low`` / ``{metric}_ci_high`` columns (else ``ci_low`` / ``ci_high``)
    when present, as :func:`cellclass.evaluation.compare.model_table` writes them.

    Args:
        table_df: One row per model.
        metric: Column to plot.
        out: PNG path to write.

    Returns:
        The path written.

    Raises:
        EvaluationError: If the table is empty or lacks the metric column.
    """
    if metric not in table_df.columns:
        raise EvaluationError(
            f"metric {metric!r} is not a column of the table; available columns are {list(table_df.columns)}."
        )
    if table_df.empty:
        raise EvaluationError("the comparison table is empty; it needs one row per model.")
    for key in ("model", "run"):
        if key in table_df.columns:
            labels = table_df[key].astype(str).tolist()
            break
    else:
        labels = [str(i) for i in table_df.index]
    values = table_df[metric].to_numpy(dtype=np.float64)
    low_col, high_col = f"{metric}_ci_low", f"{metric}_ci_high"
    if low_col not in table_df.columns:
        low_col, high_col = "ci_low", "ci_high"
    yerr = None
    if low_col in table_df.columns and high_col in table_df.columns:
        low = table_df[low_col].to_numpy(dtype=np.float64)
        high = table_df[high_col].to_numpy(dtype=np.float64)
        yerr = np.vstack([np.clip(values - low, 0, None), np.clip(high - values, 0, None)])
    fig = _new_figure(max(5.0, 0.8 * len(labels) + 2), 4.5)
    ax = fig.subplots()
    x = np.arange(len(labels))
    ax.bar(x, values, yerr=yerr, capsize=4, color="tab:blue", edgecolor="black")
    for xi, value in zip(x, values, strict=True):
        ax.text(xi, value / 2, f"{value:.3f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(x, labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by model" + (" (error bars: confidence interval)" if yerr is not None else ""))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def plot_embedding_map(coords: ArrayLike, categories: Sequence[str], out: str | os.PathLike[str], *,
                       title: str, max_legend: int = 20) -> Path:
    """Scatter of a 2-D map of embeddings, one colour per category (class, prediction, plate ...).

    Categories are drawn largest first, so small ones stay visible; an empty category
    (an unlabelled image) is drawn in light grey as ``(none)``. Beyond ``max_legend``
    categories the colours repeat and the legend names the largest ``max_legend``.

    Args:
        coords: ``(N, 2)`` map coordinates.
        categories: The category of each point.
        out: PNG path.
        title: Figure title (what the colours are).
        max_legend: Most categories named in the legend.
    """
    xy = np.asarray(coords, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) != len(categories):
        raise EvaluationError(f"a map needs (N, 2) coordinates and N categories; received {xy.shape} and "
                              f"{len(categories)}")
    labels = np.asarray([str(c) if str(c) != "" else "(none)" for c in categories], dtype=object)
    names, counts = np.unique(labels, return_counts=True)
    ranked = [str(n) for n in names[np.argsort(-counts, kind="stable")]]
    colours = _map_palette(len([n for n in ranked if n != "(none)"]))
    fig = _new_figure(7.5, 6.0)
    ax = fig.add_subplot(1, 1, 1)
    size = float(np.clip(12000 / max(len(xy), 1), 4, 30))
    coloured = 0
    for name in ranked:
        mask = labels == name
        if name == "(none)":
            colour = (0.8, 0.8, 0.8, 1.0)
        else:
            colour, coloured = colours[coloured % len(colours)], coloured + 1
        shown = name if ranked.index(name) < max_legend else None
        ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=colour, alpha=0.75, linewidths=0,
                   label=None if shown is None else f"{name} ({int(mask.sum())})")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    legend_note = f" (largest {max_legend} of {len(ranked)})" if len(ranked) > max_legend else ""
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, markerscale=max(1.0, 12 / size),
              frameon=False, title=f"{len(ranked)} categories{legend_note}", title_fontsize=7)
    return _save(fig, out)


def _map_palette(n: int) -> list[Any]:
    """Colours for many categories, without the greys (light grey marks an unlabelled point)."""
    if n <= 10:
        return _palette(n)
    tab20, tab20b = colormaps["tab20"], colormaps["tab20b"]
    return [tab20(i) for i in range(20) if i not in (14, 15)] + [tab20b(i) for i in range(20)]


GalleryRow = tuple[str, Sequence[tuple[np.ndarray, str]]]
"""One row of an image gallery: its label and its tiles, each an image ``(C, H, W)`` and a caption."""


def mistakes_figure(rows: Sequence[GalleryRow], title: str) -> Figure:
    """The figure of :func:`plot_mistakes`: a row of tiles per gallery row, one image per tile.

    Each image is stretched per channel for display (1-99.5 percentiles): one channel in
    gray, more as an RGB composite of the first three. Without rows the figure says so.
    """
    n_cols = max((len(tiles) for _, tiles in rows), default=0)
    if not n_cols:
        fig = _new_figure(5, 1.2)
        fig.text(0.5, 0.5, f"{title}: no mistakes", ha="center", va="center")
        return fig
    height = 2.05 * len(rows) + 0.6
    fig = _new_figure(1.6 * n_cols + 1.4, height)
    axes = np.asarray(fig.subplots(len(rows), n_cols, squeeze=False))
    for (label, tiles), row_axes in zip(rows, axes, strict=True):
        for j, ax in enumerate(row_axes):
            if j >= len(tiles):
                ax.axis("off")
                continue
            image, caption = tiles[j]
            ax.imshow(display_rgb(image), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(caption, fontsize=6, loc="left")
        row_axes[0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center", labelpad=6)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(top=1 - 0.75 / height, bottom=0.1 / height, hspace=0.45, wspace=0.1)
    return fig


def plot_mistakes(rows: Sequence[GalleryRow], out: str | os.PathLike[str], title: str) -> Path:
    """An image gallery (the most confident mistakes of a task): a row of captioned tiles per row.

    Args:
        rows: Gallery rows, each a label and its tiles (image ``(C, H, W)``, caption).
        out: PNG path to write.
        title: Figure title.

    Returns:
        The path written.
    """
    return _save(mistakes_figure(rows, title), out)
