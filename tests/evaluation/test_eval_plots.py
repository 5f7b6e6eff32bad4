"""Every plot writes a real PNG, atomically."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellclass.errors import EvaluationError
from cellclass.evaluation.metrics import single_label_metrics
from cellclass.evaluation.plots import (
    plot_calibration,
    plot_comparison,
    plot_confusion_matrix,
    plot_learning_curves,
    plot_per_class_f1,
    plot_roc_pr,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1024
    leftovers = [p.name for p in Path(path).parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.fixture
def single_task() -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    k = 18
    y = rng.integers(0, k, 400)
    logits = rng.normal(size=(400, k)) + 2.5 * np.eye(k)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, p, [f"phenotype_{i:02d}" for i in range(k)]


def test_learning_curves_from_csv_with_separate_train_and_val_rows(tmp_path: Path) -> None:
    rows = []
    for epoch in range(1, 6):
        rows.append({"epoch": epoch, "step": epoch * 10, "train_loss": 1 / epoch, "lr": 0.1})
        rows.append({"epoch": epoch, "val_loss": 1.2 / epoch, "val_macro_f1": 0.1 * epoch, "val_accuracy": 0.15 * epoch})
    csv = tmp_path / "metrics.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    out = plot_learning_curves(csv, tmp_path / "plots" / "learning_curves.png")
    assert out == tmp_path / "plots" / "learning_curves.png"
    assert_png(out)


def test_learning_curves_from_dataframe_overwrites(tmp_path: Path) -> None:
    df = pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [1.0, 0.7, 0.5], "val_loss": [1.1, 0.9, 0.8]})
    out = tmp_path / "curves.png"
    out.write_bytes(b"old")
    assert_png(plot_learning_curves(df, out))


@pytest.mark.slow
def test_confusion_matrix_with_many_classes(tmp_path: Path, single_task) -> None:
    y, p, classes = single_task
    cm = single_label_metrics(y, p, classes)["confusion_matrix"]
    assert_png(plot_confusion_matrix(cm, classes, tmp_path / "cm.png"))
    assert_png(plot_confusion_matrix(cm, classes, tmp_path / "cm_counts.png", normalize=False))
    small = plot_confusion_matrix([[3, 1], [0, 0]], ["a", "b"], tmp_path / "cm_small.png")
    assert_png(small)


def test_per_class_f1(tmp_path: Path, single_task) -> None:
    y, p, classes = single_task
    per_class = single_label_metrics(y, p, classes)["per_class"]
    assert_png(plot_per_class_f1(per_class, tmp_path / "f1.png"))


@pytest.mark.parametrize("task_type", ["single", "binary", "multilabel"])
def test_roc_pr(tmp_path: Path, single_task, task_type: str) -> None:
    y, p, classes = single_task
    if task_type == "binary":
        y = (y < 9).astype(int)
        early = p[:, :9].sum(axis=1)
        p, classes = np.stack([1 - early, early], axis=1), ["other", "early"]
    elif task_type == "multilabel":
        y = (np.eye(len(classes))[y] + (np.random.default_rng(1).random(p.shape) < 0.05)).clip(0, 1).astype(int)
        y[:, -1] = 0  # a class without positives is skipped
    assert_png(plot_roc_pr(y, p, classes, tmp_path / f"roc_{task_type}.png", task_type=task_type, top_n=5))


def test_calibration_single_and_multilabel(tmp_path: Path, single_task) -> None:
    y, p, _ = single_task
    assert_png(plot_calibration(y, p, tmp_path / "cal.png"))
    y_ml = np.eye(p.shape[1], dtype=int)[y]
    assert_png(plot_calibration(y_ml, p, tmp_path / "cal_ml.png", n_bins=10))


def test_comparison_with_and_without_ci(tmp_path: Path) -> None:
    table = pd.DataFrame({
        "model": ["logreg", "mlp", "cnn"],
        "macro_f1": [0.25, 0.30, 0.68],
        "macro_f1_ci_low": [0.21, 0.26, 0.63],
        "macro_f1_ci_high": [0.29, 0.34, 0.72],
    })
    assert_png(plot_comparison(table, "macro_f1", tmp_path / "cmp.png"))
    bare = pd.DataFrame({"accuracy": [0.5, 0.7]}, index=["a", "b"])
    assert_png(plot_comparison(bare, "accuracy", tmp_path / "cmp_bare.png"))


@pytest.mark.slow
def test_plots_from_threads(tmp_path: Path, single_task) -> None:
    y, p, classes = single_task
    cm = single_label_metrics(y, p, classes)["confusion_matrix"]
    errors: list[Exception] = []

    def work(i: int) -> None:
        try:
            plot_confusion_matrix(cm, classes, tmp_path / f"cm_{i}.png")
        except Exception as exc:  # noqa: BLE001 - collected and asserted empty below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i in range(3):
        assert_png(tmp_path / f"cm_{i}.png")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda d: plot_learning_curves(d / "missing.csv", d / "x.png"), "does not exist"),
        (lambda d: plot_learning_curves(pd.DataFrame({"loss": [1.0]}), d / "x.png"), "needs an 'epoch' column"),
        (lambda d: plot_confusion_matrix([[1, 2, 3]], ["a"], d / "x.png"), "square matrix"),
        (lambda d: plot_per_class_f1({}, d / "x.png"), "per_class is empty"),
        (lambda d: plot_per_class_f1({"a": {"recall": 1.0}}, d / "x.png"), "need an 'f1' value"),
        (lambda d: plot_roc_pr([0, 1], [[0.5, 0.5], [0.2, 0.8]], ["a", "b"], d / "x.png", task_type="ranking"), "valid task types"),
        (lambda d: plot_roc_pr([0, 1], [[0.5, 0.5], [0.2, 0.8]], ["a"], d / "x.png"), "one name per column"),
        (lambda d: plot_roc_pr([0, 1], [[0.5, 0.5], [0.2, 0.8]], ["a", "b"], d / "x.png", top_n=-1), "top_n must be"),
        (lambda d: plot_calibration(np.zeros((2, 3)), np.full((2, 2), 0.5), d / "x.png"), r"shape \(2, 2\)"),
        (lambda d: plot_comparison(pd.DataFrame({"accuracy": [0.5]}), "macro_f1", d / "x.png"), "available columns are"),
        (lambda d: plot_comparison(pd.DataFrame({"accuracy": []}), "accuracy", d / "x.png"), "table is empty"),
    ],
)
def test_error_paths(tmp_path: Path, call, match: str) -> None:
    with pytest.raises(EvaluationError, match=match):
        call(tmp_path)
    assert not (tmp_path / "x.png").exists()


def test_plots_get_the_permissions_of_a_plain_file(tmp_path: Path) -> None:
    import os

    mask = os.umask(0o022)
    try:
        path = plot_learning_curves(pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.5]}), tmp_path / "lc.png")
    finally:
        os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o644  # readable by the group and others, as open() would make it
