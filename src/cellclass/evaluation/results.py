"""A run's results: thresholds tuned on validation, metrics per task on test, and the files
that hold them: ``metrics.json``, ``predictions.csv``, ``plots/``, the most confident
mistakes per task (``mistakes_<task>.csv`` and a gallery) and ``report.html``, an HTML page
that says how every number was obtained.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellclass.atomic import atomic_path, atomic_write_text
from cellclass.data.prepared import PreparedData
from cellclass.data.spec import ROW_COLUMN
from cellclass.evaluation import plots as P
from cellclass.evaluation.fields import (
    STORED_AGGREGATIONS,
    Aggregation,
    choose_thresholds,
    evaluate_fields,
    field_column,
    task_aggregations,
    tune_field_thresholds,
)
from cellclass.evaluation.metrics import task_metrics
from cellclass.evaluation.mistakes import write_mistakes
from cellclass.evaluation.thresholds import tune_thresholds
from cellclass.inference.checkpoint import Checkpoint
from cellclass.inference.predictor import Predictor

log = logging.getLogger(__name__)

TTA_TEXT = "D4 (8 flips/rotations averaged)"


def _keep(encoder_type: str, y: np.ndarray) -> np.ndarray:
    return np.ones(len(y), dtype=bool) if encoder_type == "multilabel" else y >= 0


def tune_task_thresholds(predictor: Predictor, targets: Mapping[str, np.ndarray], probs: Mapping[str, np.ndarray],
                         method: str) -> dict[str, list[float]]:
    """Per-class thresholds of every multi-label task, tuned on validation data."""
    out = {}
    for task, enc in predictor.encoders.items():
        if enc.type != "multilabel":
            continue
        if method == "none":
            out[task] = [0.5] * enc.n_outputs
        else:
            tuned = tune_thresholds(targets[task], probs[task], method=method, classes=enc.classes)
            out[task] = [float(t) for t in tuned]
    return out


def evaluate_tasks(predictor: Predictor, targets: Mapping[str, np.ndarray], probs: Mapping[str, np.ndarray],
                   thresholds: Mapping[str, list[float]] | None = None) -> dict[str, dict[str, Any]]:
    """Metrics per task; multi-label tasks also report the fixed 0.5 threshold for contrast."""
    result = {}
    for task, enc in predictor.encoders.items():
        y = np.asarray(targets[task])
        keep = _keep(enc.type, y)
        p = np.asarray(probs[task], dtype=np.float64)[keep]
        if enc.type == "multilabel":
            thr = (thresholds or {}).get(task)
            metrics = task_metrics(enc.type, y[keep], p, enc.classes,
                                   thresholds=None if thr is None else np.asarray(thr))
            fixed = task_metrics(enc.type, y[keep], p, enc.classes, thresholds=0.5)
            metrics["fixed_threshold_0.5"] = {k: fixed[k] for k in ("macro_f1", "micro_f1", "samples_f1",
                                                                    "hamming_loss") if k in fixed}
        else:
            metrics = task_metrics(enc.type, y[keep], p, enc.classes)
        metrics["n_unlabeled_skipped"] = int((~keep).sum())
        result[task] = metrics
    return result


def predictions_frame(predictor: Predictor, ids: list[str], rows: np.ndarray, targets: Mapping[str, np.ndarray],
                      probs: Mapping[str, np.ndarray], split_name: str) -> pd.DataFrame:
    """One row per image: true and predicted labels and every probability, per task."""
    labels = predictor.decide(probs)
    frame = pd.DataFrame({"image": ids, "row": rows, "split": split_name})
    for task, enc in predictor.encoders.items():
        y = np.asarray(targets[task])
        if enc.type == "multilabel":
            frame[f"{task}__true"] = [";".join(v) for v in enc.decode(y)]
            frame[f"{task}__pred"] = [";".join(v) for v in labels[task]]
        else:
            frame[f"{task}__true"] = [enc.classes[i] if i >= 0 else "" for i in y]
            frame[f"{task}__pred"] = labels[task]
        for j, cls in enumerate(enc.classes):
            frame[f"{task}__p__{cls}"] = np.round(probs[task][:, j], 6)
    return frame


def write_evaluation(out: Path, predictor: Predictor, data: PreparedData, x: Any, *, threshold_method: str,
                     extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Tune the thresholds on validation (saved in ``best.ckpt``), evaluate the best checkpoint on
    test (on validation when there is no test side) and write the run's results.

    Args:
        out: Run folder.
        predictor: The run's best checkpoint.
        data: The run's prepared data.
        x: Its images as the model reads them (normalized), indexable by row.
        threshold_method: How multi-label thresholds are tuned (``f1``, ``prevalence``, ``none``).
        extra: More entries of ``metrics.json`` (model, best epoch, training time ...).

    Returns:
        The ``metrics.json`` content.
    """
    split = data.split
    val_probs = predictor.predict_normalized(x[split.val])
    val_targets = {t: v[split.val] for t, v in data.targets.items()}
    thresholds = tune_task_thresholds(predictor, val_targets, val_probs, threshold_method)
    predictor.thresholds = {**predictor.thresholds, **thresholds}
    column = field_column(data.frame.columns, None)
    if column is not None:  # a cell model: its field answers' thresholds, tuned on the validation fields
        predictor.field_thresholds = tune_field_thresholds(
            predictor.encoders, data.frame[column].astype(str).to_numpy()[split.val], val_probs, val_targets, STORED_AGGREGATIONS,
            threshold_method)
    changes = {k: v for k, v in (("thresholds", thresholds), ("field_thresholds", predictor.field_thresholds)) if v}
    best = out / "checkpoints" / "best.ckpt"
    if changes and best.is_file():
        Checkpoint.load(best).replace(**changes).save(best)
    on_test = len(split.test) > 0
    idx = split.test if on_test else split.val
    test_probs = predictor.predict_normalized(x[idx]) if on_test else val_probs
    test_targets = {t: v[idx] for t, v in data.targets.items()}
    tasks = evaluate_tasks(predictor, test_targets, test_probs, thresholds)
    val_tasks = evaluate_tasks(predictor, val_targets, val_probs, thresholds)
    for task in tasks:
        tasks[task]["val"] = {k: v for k, v in val_tasks[task].items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    result = {
        "dataset": data.spec.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "split": data.describe_split(),
        "evaluation": evaluation_block(
            on="test" if on_test else "val (no test split: test_fraction = 0)", n_images=len(idx),
            checkpoint="best (selected on validation)", tta=predictor.tta,
            thresholds=f"per class, tuned on validation ({threshold_method})" if thresholds else None),
        **dict(extra or {}),
        "tasks": tasks,
    }
    side = "test" if on_test else "val"
    fields = None
    if column is not None:
        result["fields"], fields = field_results(predictor, data, column, idx, test_targets, test_probs, side=side)
    write_results(out, result, predictor, data, idx, test_targets, test_probs, side, fields=fields)
    return result


def field_results(predictor: Predictor, data: PreparedData, column: str, idx: np.ndarray,
                  targets: Mapping[str, np.ndarray], probs: Mapping[str, np.ndarray], *, side: str,
                  aggregation: Aggregation | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """The field level of an evaluation: rows ``idx`` of ``data`` aggregated to their fields.

    The thresholds are the predictor's field thresholds for the aggregation (see
    :func:`~cellclass.evaluation.fields.choose_thresholds`).

    Args:
        predictor: The cell model.
        data: The cells.
        column: The column naming each cell's field.
        idx: The rows evaluated.
        targets: Their labels, per task.
        probs: Their probabilities, per task.
        side: Which side ``idx`` is (``test`` ...), written in ``field_predictions.csv``.
        aggregation: The aggregation (default: each task type's).

    Returns:
        The ``fields`` block of ``metrics.json`` and the ``field_predictions.csv`` table.
    """
    aggregations = task_aggregations(predictor.encoders, aggregation)
    thresholds, sources = choose_thresholds(predictor.encoders, aggregations, predictor.field_thresholds,
                                            predictor.thresholds)
    ids = data.frame[column].astype(str).to_numpy()
    block, table = evaluate_fields(predictor.encoders, column, ids[idx], probs, targets, aggregations, thresholds,
                                   sources, on=f"{side} fields", side=side)
    chosen = np.zeros(len(ids), dtype=bool)
    chosen[idx] = True
    # Fields with cells outside the rows evaluated (a split not made by this column) are answered from part of
    # their cells only.
    block["n_fields_split_across_sides"] = len(set(ids[idx]) & set(ids[~chosen]))
    return block, table


def evaluation_block(*, on: str, n_images: int, checkpoint: str | None, tta: bool,
                     thresholds: str | None) -> dict[str, Any]:
    """The ``evaluation`` entry of ``metrics.json``: what was evaluated, and how.

    Args:
        on: Which images (``test``, ``all rows`` ...).
        n_images: How many.
        checkpoint: Which checkpoint.
        tta: Whether D4 test-time augmentation was used.
        thresholds: Where the multi-label thresholds come from; ``None`` for argmax decisions only.
    """
    return {"on": on, "n_images": int(n_images), "checkpoint": checkpoint, "tta": TTA_TEXT if tta else "none",
            "thresholds": thresholds or "argmax (single-label tasks)"}


def write_results(out: Path, result: Mapping[str, Any], predictor: Predictor, data: PreparedData, idx: np.ndarray,
                  targets: Mapping[str, np.ndarray], probs: Mapping[str, np.ndarray], side: str, *,
                  fields: pd.DataFrame | None = None) -> None:
    """Write ``metrics.json`` (``result``), ``predictions.csv`` (rows ``idx`` of ``data``, named
    ``side``), ``field_predictions.csv`` (``fields``, when given), the plots, the most confident
    mistakes of each task and ``report.html`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, default=json_default))
    ids, row_numbers = [data.ids[i] for i in idx], data.frame[ROW_COLUMN].to_numpy()[idx]
    frame = predictions_frame(predictor, ids, row_numbers, targets, probs, side)
    with atomic_path(out / "predictions.csv") as tmp:
        frame.to_csv(tmp, index=False)
    if fields is not None:
        with atomic_path(out / "field_predictions.csv") as tmp:
            fields.to_csv(tmp, index=False)
    plots = write_plots(out, predictor, targets, probs, result["tasks"])
    mistakes = write_mistakes(out, predictor.encoders, predictor.thresholds, data.images, np.asarray(idx), ids,
                              row_numbers, targets, probs)
    write_report(out, result, plots, mistakes)


def json_default(value: Any) -> Any:
    """``json.dumps`` ``default`` for numpy scalars and arrays."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_plots(out: Path, predictor: Predictor, targets: Mapping[str, np.ndarray], probs: Mapping[str, np.ndarray],
                tasks: Mapping[str, Mapping[str, Any]]) -> list[Path]:
    """Learning curves, and per task: confusion matrix, per-class F1, ROC/PR, calibration."""
    folder = out / "plots"
    made: list[Path] = []
    if (out / "metrics.csv").is_file() and len(pd.read_csv(out / "metrics.csv")) > 1:
        made.append(P.plot_learning_curves(out / "metrics.csv", folder / "learning_curves.png"))
    for task, enc in predictor.encoders.items():
        y = np.asarray(targets[task])
        keep = _keep(enc.type, y)
        p = np.asarray(probs[task])[keep]
        metrics = tasks[task]
        try:
            if "confusion_matrix" in metrics:
                made.append(P.plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), enc.classes,
                                                    folder / f"confusion_{task}.png"))
            made.append(P.plot_per_class_f1(metrics["per_class"], folder / f"per_class_f1_{task}.png"))
            made.append(P.plot_roc_pr(y[keep], p, enc.classes, folder / f"roc_pr_{task}.png",
                                      task_type=enc.type))
            made.append(P.plot_calibration(y[keep], p, folder / f"calibration_{task}.png"))
        except Exception as exc:  # a plot must never lose the metrics already written
            log.warning("could not draw plots for task %s: %s", task, exc)
    return made


def write_report(out: Path, result: Mapping[str, Any], plots: list[Path],
                 mistakes: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """A self-contained HTML page: how the numbers were obtained, the numbers, the plots and the
    galleries of the most confident mistakes (``mistakes``, as :func:`write_mistakes` returns them)."""
    esc = html.escape
    rows = [_metric_row(task, m) for task, m in result["tasks"].items()]
    header = "".join(f"<th>{h}</th>" for h in ("task", "accuracy", "balanced acc.", "macro F1", "micro F1",
                                               "ROC-AUC", "mAP", "Hamming loss", "Jaccard"))
    fields_html = _fields_html(result.get("fields"), header)
    split = result["split"]
    how = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in result["evaluation"].items())
    warning = f'<p class="warn">{esc(split["warning"])}</p>' if split.get("warning") else ""
    split_html = _split_html(split)
    images = "".join(
        f'<figure><img src="{esc(p.relative_to(out).as_posix())}" alt="{esc(p.stem)}">'
        f"<figcaption>{esc(p.stem)}</figcaption></figure>" for p in plots)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cellclass run report: {esc(str(result.get('model', '')))}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#f4f4f4}}
.warn{{background:#fff3cd;padding:8px;border:1px solid #e0c36a}}figure{{display:inline-block;margin:8px}}
img{{max-width:540px;border:1px solid #ddd}}img.gallery{{max-width:100%}}</style></head><body>
<h1>{esc(str(result.get('model', 'model')))} on {esc(result['dataset'])}</h1>
<h2>How these numbers were obtained</h2>{warning}<ul>{how}</ul>{split_html}
<h2>Test metrics</h2><table><tr>{header}</tr>{''.join(rows)}</table>{fields_html}
<h2>Plots</h2>{images}{_mistakes_html(out, mistakes or {})}
</body></html>"""
    return atomic_write_text(out / "report.html", page)


def _metric_row(task: str, m: Mapping[str, Any]) -> str:
    # A multi-label task's macro ROC-AUC is its ROC-AUC column (a single-label one's is macro one-vs-rest too).
    values = {**m, "roc_auc": m.get("roc_auc", m.get("macro_roc_auc"))}
    cells = "".join(f"<td>{_fmt(values.get(k))}</td>" for k in ("accuracy", "balanced_accuracy", "macro_f1",
                                                               "micro_f1", "roc_auc", "map", "hamming_loss",
                                                               "jaccard_samples"))
    return f"<tr><th>{html.escape(task)}</th>{cells}</tr>"


def _mistakes_html(out: Path, mistakes: Mapping[str, Mapping[str, Any]]) -> str:
    """A section per task: what its gallery shows, the gallery and its CSV."""
    if not mistakes:
        return ""
    esc = html.escape
    parts = ["<h2>Most confident mistakes</h2>"]
    for task, m in mistakes.items():
        plot, csv = (esc(Path(m[k]).relative_to(out).as_posix()) for k in ("plot", "csv"))
        cut = (f" The figure shows the first {m['n_rows_shown']} of {m['n_rows']} rows; the CSV lists them all."
               if m["n_rows_shown"] < m["n_rows"] else "")
        parts.append(f"<h3>{esc(task)}</h3><p>{esc(m['text'])}{esc(cut)} {m['n_listed']} listed in "
                     f'<a href="{csv}">{csv}</a>.</p><img class="gallery" src="{plot}" alt="mistakes of {esc(task)}">')
    return "".join(parts)


def _fields_html(fields: Mapping[str, Any] | None, header: str) -> str:
    """The field level of a cell model: how its answers were made, and their metrics."""
    if not fields:
        return ""
    esc = html.escape
    how = "".join(f"<li><b>{esc(task)}</b>: {esc(m['aggregation_text'])} ({esc(m['aggregation'])}); thresholds: "
                  f"{esc(m['thresholds_from'])}</li>" for task, m in fields["tasks"].items())
    rows = "".join(_metric_row(task, m) for task, m in fields["tasks"].items())
    return (f"<h2>Field metrics</h2><p>{fields['n_fields']} {esc(fields['on'])} by <b>{esc(fields['column'])}</b>, "
            f"{fields['n_cells']} cells; truth: {esc(fields['truth'])}</p><ul>{how}</ul>"
            f"<table><tr>{header}</tr>{rows}</table>")


def _split_html(split: Mapping[str, Any]) -> str:
    """The split as a sentence and a table of sizes, groups and class counts per side."""
    esc = html.escape
    sides = ("train", "val", "test")
    group = split.get("group_column")
    head = (f"<p><b>split</b>: {esc(str(split.get('method')))}"
            + (f" by <b>{esc(str(group))}</b>" if group else "")
            + f", seed {esc(str(split.get('seed')))}"
            + ("" if split.get("groups_overlap") is None else
               f"; groups shared between sides: {'yes' if split['groups_overlap'] else 'none'}") + "</p>")
    sizes = split.get("sizes") or {}
    rows = ["<tr><th>images</th>" + "".join(f"<td>{sizes.get(s, '')}</td>" for s in sides) + "</tr>"]
    if split.get("groups"):
        rows.append(f"<tr><th>{esc(str(group))}s</th>"
                    + "".join(f"<td>{split['groups'].get(s, '')}</td>" for s in sides) + "</tr>")
    counts = split.get("class_counts") or {}
    for task, per_side in counts.items():
        if not isinstance(per_side, Mapping) or "train" not in per_side:
            continue
        classes = list(dict.fromkeys(c for s in sides for c in per_side.get(s, {})))
        for cls in classes[:60]:
            cells = "".join(f"<td>{per_side.get(s, {}).get(cls, 0)}</td>" for s in sides)
            rows.append(f"<tr><th>{esc(task)}: {esc(str(cls))}</th>{cells}</tr>")
    header = "<tr><th></th>" + "".join(f"<th>{s}</th>" for s in sides) + "</tr>"
    return head + f"<table>{header}{''.join(rows)}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else html.escape(str(value))
