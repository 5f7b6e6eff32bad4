"""The table a run prints at its end shows the metrics that fit each task's type."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from test_cli_errors import call

from cellclass.cli.training import metric_tables
from cellclass.data.presets import bps, hpa
from cellclass.evaluation.metrics import task_metrics
from cellclass.training.config import TrainConfig

MULTILABEL_HEADERS = ["macro F1", "micro F1", "mAP", "macro ROC-AUC", "Hamming loss"]
SINGLE_HEADERS = ["accuracy", "balanced acc.", "macro F1", "ROC-AUC"]


def _header_and_row(out: str, task: str) -> tuple[str, list[str]]:
    """The table's header line and the cells of ``task``'s row."""
    lines = out.splitlines()
    header = next(line for line in lines if "task" in line and "macro F1" in line)
    row = next(line for line in lines if f" {task} " in line)
    return header, [c.strip() for c in row.strip("│┃ ").split("│")]


HPA_CONFIG = TrainConfig(model="lenet5", tasks=["localization"], image_size=32, workers=2, tta=False, split="random")


@pytest.fixture(scope="module")
def hpa_runs(hpa_dir: Path, tmp_path_factory: pytest.TempPathFactory, untrained_run) -> list[Path]:
    """Two multi-label run folders (untrained LeNet-5s of two seeds) on the same split."""
    folder = tmp_path_factory.mktemp("hpa_runs")
    return [untrained_run(hpa(hpa_dir), HPA_CONFIG, folder / f"seed{seed}", seed=seed) for seed in (0, 1)]


@pytest.mark.slow
def test_a_multilabel_run_prints_multilabel_metrics(hpa_runs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    run = hpa_runs[0]
    rc, out, err = call(["evaluate", run], capsys)
    assert rc == 0, err
    header, cells = _header_and_row(out, "localization")
    assert [h for h in MULTILABEL_HEADERS if h in header] == MULTILABEL_HEADERS
    assert "accuracy" not in header and "balanced" not in header
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())["tasks"]["localization"]
    assert cells == ["localization", *(f"{metrics[k]:.3f}" for k in ("macro_f1", "micro_f1", "map", "macro_roc_auc",
                                                                     "hamming_loss"))]
    assert "mistakes_<task>.csv" in out


@pytest.mark.slow
def test_a_single_label_run_keeps_its_columns(bps_dir: Path, tmp_path: Path, untrained_run,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = TrainConfig(model="lenet5", tasks=["particle_type"], image_size=32, workers=2, tta=False)
    run = untrained_run(bps(bps_dir), config, tmp_path / "run")
    rc, out, err = call(["evaluate", run], capsys)
    assert rc == 0, err
    header, cells = _header_and_row(out, "particle_type")
    assert [h for h in SINGLE_HEADERS if h in header] == SINGLE_HEADERS and "Hamming" not in header
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())["tasks"]["particle_type"]
    assert cells == ["particle_type", *(f"{metrics[k]:.3f}" for k in ("accuracy", "balanced_accuracy", "macro_f1",
                                                                      "roc_auc"))]


def test_single_and_multilabel_tasks_get_a_table_each() -> None:
    rng = np.random.default_rng(0)
    p = rng.random((30, 3))
    tasks = {
        "kind": task_metrics("single", rng.integers(0, 3, 30), p / p.sum(axis=1, keepdims=True), ["a", "b", "c"]),
        "marks": task_metrics("multilabel", rng.integers(0, 2, (30, 3)), p, ["x", "y", "z"]),
        "flag": task_metrics("binary", rng.integers(0, 2, 30), p[:, 0], ["no", "yes"]),
    }
    tables = metric_tables(tasks, "cell level")
    assert [t.title for t in tables] == ["cell level: single-label and binary tasks", "cell level: multi-label tasks"]
    assert [[c.header for c in t.columns] for t in tables] == [["task", *SINGLE_HEADERS], ["task", *MULTILABEL_HEADERS]]
    console = Console(file=io.StringIO(), width=200)
    for table in tables:
        console.print(table)
    text = console.file.getvalue()
    assert text.index("kind") < text.index("flag") < text.index("marks")
    assert f"{tasks['marks']['hamming_loss']:.3f}" in text
    (alone,) = metric_tables({"marks": tasks["marks"]})
    assert alone.title is None


@pytest.mark.slow
def test_compare_scores_multilabel_runs_on_label_sets(hpa_runs: list[Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    outs = [tmp_path / f"eval{i}" for i in range(2)]
    for run, out in zip(hpa_runs, outs, strict=True):
        assert call(["evaluate", run, "--out", out], capsys)[0] == 0
    rc, out, err = call(["compare", *outs, "--n-boot", "100"], capsys)
    assert rc == 0, err
    assert "subset accuracy" in out and "each run's test metrics (its metrics.json)" in out
    for folder in outs:
        metrics = json.loads((folder / "metrics.json").read_text())["tasks"]["localization"]
        line = next(line for line in out.splitlines() if f"{folder.name} " in line and "lenet5" in line)
        assert f"{metrics['macro_f1']:.3f} [" in line  # the bootstrap's estimate is the run's own macro F1
        line = next(line for line in out.splitlines() if f" {folder.name} " in line and "lenet5" not in line)
        assert [c.strip() for c in line.strip("│ ").split("│")][1:] == [
            f"{metrics[k]:.3f}" for k in ("macro_f1", "micro_f1", "map", "macro_roc_auc", "hamming_loss")]
