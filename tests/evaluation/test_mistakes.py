"""The most confident mistakes of a run: which images, in which order, in the CSV, the
gallery and the report, for single-label, multi-task and multi-label runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellclass.data.labels import TaskEncoder
from cellclass.data.presets import bps, hpa
from cellclass.evaluation.evaluate import evaluate_run
from cellclass.evaluation.mistakes import (
    FALSE_NEGATIVE,
    FALSE_POSITIVE,
    MAX_GALLERY_ROWS,
    MISTAKES_PER_CLASS,
    confident_mistakes,
    write_mistakes,
)
from cellclass.evaluation.plots import mistakes_figure
from cellclass.training.config import TrainConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_single_label_mistakes_are_the_wrong_answers_most_confident_first() -> None:
    classes = ["a", "b", "c"]
    y = np.array([0, 0, 0, 0, 1, 1, 2, -1])
    p = np.array([[0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.9, 0.05, 0.05], [0.3, 0.6, 0.1],
                  [0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.9, 0.1, 0.0]])
    table = confident_mistakes("single", classes, y, p, per_class=2)
    # Class a: three wrong (0.8 b, 0.6 b, 0.5 c), the two most confident kept; b: one; c: none; unlabelled skipped.
    assert table[["position", "true", "predicted"]].values.tolist() == [[0, "a", "b"], [3, "a", "b"], [4, "b", "a"]]
    assert table["probability"].tolist() == [0.8, 0.6, 0.7]
    assert table["n_errors"].tolist() == [3, 3, 1]


def test_multilabel_mistakes_are_false_positives_and_false_negatives_per_class() -> None:
    classes = ["x", "y"]
    y = np.array([[0, 1], [0, 0], [1, 0], [1, 1], [0, 0]])
    p = np.array([[0.7, 0.2], [0.9, 0.8], [0.1, 0.3], [0.3, 0.9], [0.2, 0.1]])
    table = confident_mistakes("multilabel", classes, y, p, thresholds=[0.5, 0.4])
    got = table[["class", "error", "position", "probability"]].values.tolist()
    # x: false positives 0.9 then 0.7; false negatives lowest first (0.1, then 0.3). y: 0.8 a false positive,
    # 0.2 a false negative (under its threshold 0.4).
    assert got == [["x", FALSE_POSITIVE, 1, 0.9], ["x", FALSE_POSITIVE, 0, 0.7], ["x", FALSE_NEGATIVE, 2, 0.1],
                   ["x", FALSE_NEGATIVE, 3, 0.3], ["y", FALSE_POSITIVE, 1, 0.8], ["y", FALSE_NEGATIVE, 0, 0.2]]
    assert table.loc[0, "true"] == "" and table.loc[0, "predicted"] == "x;y"
    assert table["threshold"].tolist() == [0.5, 0.5, 0.5, 0.5, 0.4, 0.4]


class CountingImages:
    """An image array that records which rows are read from it."""

    def __init__(self, images: np.ndarray) -> None:
        self.images, self.read = images, []

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        self.read.extend(np.atleast_1d(rows).tolist())
        return self.images[rows]


def test_a_gallery_has_a_row_per_class_with_mistakes_and_reads_only_its_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = CountingImages(rng.random((40, 3, 12, 12)).astype(np.float32))
    encoders = {"kind": TaskEncoder("kind", "single", ["a", "b", "c"])}
    y = np.array([0] * 12 + [1] * 3 + [2] * 5)
    p = np.full((20, 3), 0.1)
    p[:12, 1] = np.linspace(0.5, 0.8, 12)  # every a is predicted b
    p[:12, 0] = 0.05
    p[12:15, 0] = 0.8  # every b is predicted a
    p[15:, 2] = 0.8  # every c is right
    rows = np.arange(20) * 2  # the evaluated samples are every other image
    made = write_mistakes(tmp_path, encoders, {}, images, rows, [f"dir/img{i}.tif" for i in range(20)],
                          np.arange(20) + 100, {"kind": y}, {"kind": p})
    info = made["kind"]
    assert info["plot"] == tmp_path / "plots" / "mistakes_kind.png"
    assert info["plot"].read_bytes()[:8] == PNG_SIGNATURE
    assert (info["n_rows"], info["n_rows_shown"], info["n_listed"]) == (2, 2, MISTAKES_PER_CLASS + 3)
    csv = pd.read_csv(info["csv"])
    assert list(csv.columns) == ["file", "row", "true", "predicted", "probability"]
    assert csv["file"].tolist()[:2] == ["dir/img11.tif", "dir/img10.tif"]  # highest probability of b first
    assert csv["row"].tolist()[:2] == [111, 110]
    assert set(zip(csv["true"], csv["predicted"], strict=True)) == {("a", "b"), ("b", "a")}
    shown = [11, 10, 9, 8, 7, 6, 5, 4, 12, 13, 14]
    assert sorted(images.read) == sorted(2 * i for i in shown)  # only the images shown, each once

    figure = mistakes_figure([("true a", [(images.images[0], "t")] * 8), ("true b", [(images.images[1], "t")] * 3)],
                             "kind")
    tiles = [ax for ax in figure.axes if ax.images]
    assert len(tiles) == 11 and len(figure.axes) == 2 * 8  # two rows of eight, five of them empty


def test_a_gallery_is_capped_in_rows_but_its_csv_lists_every_row(tmp_path: Path) -> None:
    k = MAX_GALLERY_ROWS + 5
    encoders = {"many": TaskEncoder("many", "single", [f"c{i}" for i in range(k)])}
    y = np.arange(k)
    p = np.roll(np.eye(k), 1, axis=1) * 0.9 + 0.1 / k  # every sample predicted as the next class
    made = write_mistakes(tmp_path, encoders, {}, np.zeros((k, 1, 4, 4), dtype=np.float32), np.arange(k),
                          [f"f{i}" for i in range(k)], np.arange(k), {"many": y}, {"many": p})
    assert (made["many"]["n_rows"], made["many"]["n_rows_shown"]) == (k, MAX_GALLERY_ROWS)
    assert len(pd.read_csv(made["many"]["csv"])) == k


def test_a_figure_without_mistakes_says_so() -> None:
    figure = mistakes_figure([], "perfect")
    assert [t.get_text() for t in figure.texts] == ["perfect: no mistakes"]


@pytest.mark.slow
def test_a_multitask_run_writes_a_gallery_and_a_csv_per_task(bps_dir: Path, tmp_path: Path, untrained_run) -> None:
    config = TrainConfig(model="lenet5", tasks=["particle_type", "dose"], image_size=32, workers=2, tta=False)
    run = untrained_run(bps(bps_dir), config, tmp_path / "run")
    evaluate_run(run, config)
    out = run / "evaluation"
    predictions = pd.read_csv(out / "predictions.csv", dtype=str, keep_default_na=False).set_index("image")
    report = (out / "report.html").read_text()
    assert "<h2>Most confident mistakes</h2>" in report
    for task in config.tasks:
        assert (out / "plots" / f"mistakes_{task}.png").read_bytes()[:8] == PNG_SIGNATURE
        assert f'src="plots/mistakes_{task}.png"' in report and f'href="mistakes_{task}.csv"' in report
        csv = pd.read_csv(out / f"mistakes_{task}.csv", dtype={"true": str, "predicted": str})
        truth, pred = predictions[f"{task}__true"], predictions[f"{task}__pred"]
        wrong = truth[(truth != pred) & (truth != "")]
        assert len(wrong) > 0
        # Each true class: its min(8, n wrong) most confident wrong answers, as predictions.csv gives them.
        assert csv.groupby("true").size().to_dict() == {c: min(MISTAKES_PER_CLASS, n)
                                                         for c, n in wrong.value_counts().items()}
        assert csv["true"].tolist() == truth[csv["file"]].tolist()
        assert csv["predicted"].tolist() == pred[csv["file"]].tolist()
        probability = [float(predictions.loc[f, f"{task}__p__{c}"]) for f, c in zip(csv["file"], csv["predicted"],
                                                                                      strict=True)]
        assert csv["probability"].tolist() == pytest.approx(probability, abs=1e-6)
        for _, group in csv.groupby("true"):
            assert group["probability"].is_monotonic_decreasing


@pytest.mark.slow
def test_a_multilabel_run_lists_false_positives_and_negatives(hpa_dir: Path, tmp_path: Path, untrained_run) -> None:
    config = TrainConfig(model="lenet5", tasks=["localization"], image_size=32, workers=2, tta=False,
                         split="random")
    run = untrained_run(hpa(hpa_dir), config, tmp_path / "run", thresholds={"localization": [0.45] * 28})
    evaluate_run(run, config)
    out = run / "evaluation"
    csv = pd.read_csv(out / "mistakes_localization.csv", dtype=str, keep_default_na=False)
    assert list(csv.columns) == ["file", "row", "class", "error", "true", "predicted", "probability", "threshold"]
    assert len(csv) > 0 and set(csv["threshold"].astype(float)) == {0.45}
    predictions = pd.read_csv(out / "predictions.csv", dtype=str, keep_default_na=False).set_index("image")
    for m in csv.to_dict("records"):
        true = set(filter(None, predictions.loc[m["file"], "localization__true"].split(";")))
        predicted = set(filter(None, predictions.loc[m["file"], "localization__pred"].split(";")))
        assert (m["true"], m["predicted"]) == tuple(predictions.loc[m["file"], ["localization__true",
                                                                                 "localization__pred"]])
        probability = float(predictions.loc[m["file"], f"localization__p__{m['class']}"])
        assert float(m["probability"]) == pytest.approx(probability, abs=1e-6)
        if m["error"] == FALSE_POSITIVE:
            assert m["class"] in predicted and m["class"] not in true and probability >= 0.45
        else:
            assert m["error"] == FALSE_NEGATIVE and m["class"] in true and m["class"] not in predicted
            assert probability < 0.45
    assert "false positives (the class predicted" in (out / "report.html").read_text()
